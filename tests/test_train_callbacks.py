"""The open trainer: a user's callback stops a run, logs per step and is resumed; injected
objects are the ones used; the built-in policies choose and stop as before (also from a
checkpoint written before callbacks had state); the weight average (train.ema), gradient
accumulation (train.accumulate) and torch.compile (train.compile) each do what they say."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fixtures_data import make_folder
from mbdl.config import load_config
from mbdl.train import train
from mbdl.train import trainer as trainer_module
from mbdl.train.callbacks import Callback
from mbdl.train.checkpoint import load_checkpoint, save_checkpoint
from mbdl.train.trainer import Trainer


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images") / "folder", num_classes=24, per_class=4)


def folder_config(root: Path, out: Path, *extra: str) -> Any:
    """9 training, 3 validation and 12 test classes of 4 images; 3 steps of 4 x 2 images per
    epoch."""
    return load_config(
        None,
        [
            "data.source=folder",
            f"data.root={root}",
            "data.val_fraction=0.25",
            "model.backbone=smallcnn",
            "model.embedding_dim=8",
            "train.epochs=3",
            "train.batch_classes=4",
            "train.batch_per_class=2",
            "train.max_steps_per_epoch=3",
            "train.checkpoint_every_steps=2",
            "train.device=cpu",
            "train.num_threads=1",
            "train.progress=false",
            "eval.ks=[1]",
            "eval.report=false",
            f"out={out}",
            *extra,
        ],
    )


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


class StepCounter(Callback):
    """Counts steps (its state), logs twice the step number, stops the run at ``stop_at``."""

    def __init__(self, stop_at: int | None = None, interrupt_at: int | None = None) -> None:
        self.seen = 0
        self.loaded: dict[str, Any] | None = None
        self.stop_at, self.interrupt_at = stop_at, interrupt_at

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = dict(state)
        self.seen = state["seen"]

    def on_step_end(self, trainer: Any, step: int, logs: dict[str, float]) -> None:
        if step == self.interrupt_at:
            raise KeyboardInterrupt
        self.seen += 1
        logs["double_step"] = 2.0 * step
        if step == self.stop_at:
            trainer.should_stop = True


def test_a_callback_stops_the_run_and_logs_per_step(image_root: Path, tmp_path: Path) -> None:
    counter = StepCounter(stop_at=4)  # the first step of epoch 2
    metrics = train(folder_config(image_root, tmp_path / "run"), callbacks=[counter])
    log = records(tmp_path / "run")
    assert [r["epoch"] for r in log] == [1, 2] and [r["step"] for r in log] == [3, 4]
    assert [r["double_step"] for r in log] == [4.0, 8.0]  # the mean of 2, 4, 6; then 8
    assert "stopped_by" not in log[0] and log[1]["stopped_by"] == "StepCounter"
    assert "validation" in log[1]  # the stopped epoch is validated
    assert metrics["stopped"] == {"epoch": 2, "step": 4, "by": "StepCounter"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["progress"]["stopped_early"] and last["callbacks"]["StepCounter"] == {"seen": 4}
    assert "map@r" in metrics["test"]  # the chosen checkpoint was tested


def test_a_callback_is_resumed_with_its_state(image_root: Path, tmp_path: Path) -> None:
    whole = StepCounter()
    reference = train(folder_config(image_root, tmp_path / "whole"), callbacks=[whole])
    with pytest.raises(KeyboardInterrupt):  # step 5; last.pt holds step 4 (every 2 steps)
        train(folder_config(image_root, tmp_path / "cut"), callbacks=[StepCounter(interrupt_at=5)])
    resumed = StepCounter()
    again = train(folder_config(image_root, tmp_path / "cut", "resume=true"), callbacks=[resumed])
    assert resumed.loaded == {"seen": 4} and resumed.seen == whole.seen == 9
    assert again == reference
    # the step logs of the interrupted epoch 2 (steps 4 to 6) were kept across the resume
    assert [r["double_step"] for r in records(tmp_path / "cut")] == [4.0, 10.0, 16.0]
    assert records(tmp_path / "cut") == [
        {**r, "elapsed_s": c["elapsed_s"], "images_per_s": c["images_per_s"]}
        for r, c in zip(records(tmp_path / "whole"), records(tmp_path / "cut"), strict=True)
    ]


class Scores(Callback):
    """Feeds the fake validation the score of the epoch being validated."""

    def __init__(self, scores: dict[int, float], interrupt_after: int | None = None) -> None:
        self.scores, self.interrupt_after = scores, interrupt_after
        self.trainer: Any = None

    def on_train_start(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        if path.name == "last.pt" and trainer.progress.epoch == self.interrupt_after:
            raise KeyboardInterrupt

    def evaluate(self, model: Any, dataset: Any, config: Any, device: Any) -> tuple:
        score = self.scores[self.trainer.progress.epoch + 1]
        return {"map@r": score}, torch.zeros(len(dataset), 8), torch.as_tensor(dataset.labels)


@pytest.mark.parametrize("written_before_callbacks_had_state", [False, True])
def test_the_policies_choose_and_stop_as_before_across_a_resume(
    image_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    written_before_callbacks_had_state: bool,
) -> None:
    """Best epoch 2; epochs 3 and 4 miss, so patience 2 stops after epoch 4. Interrupted after
    epoch 3 and resumed, the policies must remember the best value (else epoch 4's 0.4 would
    be chosen) and the first miss (else the run would not stop at epoch 4)."""
    scores = {1: 0.5, 2: 0.6, 3: 0.55, 4: 0.4, 5: 0.9, 6: 0.95}
    extra = ("train.epochs=6", "train.max_steps_per_epoch=1", "train.patience=2")
    out = tmp_path / "run"
    first = Scores(scores, interrupt_after=3)
    monkeypatch.setattr(trainer_module, "evaluate_dataset", first.evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(folder_config(image_root, out, *extra), callbacks=[first])
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["callbacks"]["EarlyStopping"]["bad_validations"] == 1
    assert last["progress"]["best_epoch"] == 2 and last["progress"]["bad_validations"] == 1
    if written_before_callbacks_had_state:  # as mbdl wrote it before: the v1 fields only
        del last["callbacks"]
        save_checkpoint(out / "checkpoints" / "last.pt", last)
    second = Scores(scores)
    monkeypatch.setattr(trainer_module, "evaluate_dataset", second.evaluate)
    metrics = train(folder_config(image_root, out, *extra, "resume=true"), callbacks=[second])
    assert [r["validation"]["map@r"] for r in records(out)] == [0.5, 0.6, 0.55, 0.4]
    assert records(out)[-1]["stopped_by"] == "EarlyStopping"
    assert load_checkpoint(out / "checkpoints" / "best.pt")["epoch"] == 2
    assert metrics["validation"] == {"map@r": 0.6}
    assert metrics["stopped"] == {"epoch": 4, "step": 4, "by": "EarlyStopping"}


def test_injected_objects_are_the_ones_used(image_root: Path, tmp_path: Path) -> None:
    from mbdl.losses import build_loss
    from mbdl.models import build_model
    from mbdl.runconfig import load_data

    config = folder_config(image_root, tmp_path / "run", "train.epochs=1")
    splits = load_data(config)
    model = build_model("smallcnn", 8, in_channels=3)
    loss = build_loss("contrastive")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(
        config, model=model, loss=loss, optimizer=optimizer, scheduler=scheduler, data=splits
    )
    try:
        assert trainer.model is model and trainer.loss is loss and trainer.splits is splits
        assert trainer.optimizer is optimizer and trainer.scheduler is scheduler
        trainer.fit()
    finally:
        trainer.close()
    assert scheduler.last_epoch == 3  # stepped once per optimiser step
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.0.weight" in changed  # the injected model was trained
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert torch.equal(saved["model_state"]["head.0.weight"], model.state_dict()["head.0.weight"])
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.05  # the injected optimiser's


# -- train.ema ------------------------------------------------------------------------------------


class WeightLog(Callback):
    """The model's weights at the start and after every step, and at each validation."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.validated: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer: Any) -> None:
        self.steps.append(_copy(trainer.model))

    def on_step_end(self, trainer: Any, step: int, logs: dict[str, float]) -> None:
        self.steps.append(_copy(trainer.model))

    def on_validation(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        self.validated.append(_copy(trainer.model))


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ema(steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    average = {k: v.clone() for k, v in steps[0].items()}
    for weights in steps[1:]:
        for k, v in weights.items():
            average[k] = decay * average[k] + (1 - decay) * v if v.is_floating_point() else v
    return average


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a
    )


def test_ema_weights_are_validated_selected_and_saved(image_root: Path, tmp_path: Path) -> None:
    weights = WeightLog()
    out = tmp_path / "run"
    train(folder_config(image_root, out, "train.epochs=2", "train.ema=0.5"), callbacks=[weights])
    assert len(weights.steps) == 7  # the start and 6 steps
    assert _close(weights.validated[0], _ema(weights.steps[:4], 0.5))  # after epoch 1
    assert _close(weights.validated[1], _ema(weights.steps, 0.5))
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    chosen = best["epoch"]
    assert _close(best["model_state"], _ema(weights.steps[: 3 * chosen + 1], 0.5))
    assert _close(last["model_state"], weights.steps[-1])  # last.pt: the training weights
    assert not _close(best["model_state"], weights.steps[3 * chosen])  # not the raw weights
    assert _close(
        last["callbacks"]["ExponentialMovingAverage"]["average"], _ema(weights.steps, 0.5)
    )


def test_ema_resumes_exactly(image_root: Path, tmp_path: Path) -> None:
    ema = ("train.epochs=2", "train.ema=0.9")
    reference = train(folder_config(image_root, tmp_path / "whole", *ema))
    with pytest.raises(KeyboardInterrupt):
        train(
            folder_config(image_root, tmp_path / "cut", *ema),
            callbacks=[StepCounter(interrupt_at=5)],
        )
    assert train(folder_config(image_root, tmp_path / "cut", *ema, "resume=true")) == reference
    for name in ("best.pt", "last.pt"):
        a = load_checkpoint(tmp_path / "whole" / "checkpoints" / name)
        b = load_checkpoint(tmp_path / "cut" / "checkpoints" / name)
        for k, v in a["model_state"].items():
            assert torch.equal(v, b["model_state"][k]), (name, k)


def test_ema_must_be_below_one() -> None:
    from mbdl.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.ema must be in \(0, 1\)"):
        load_config(None, ["train.ema=1"])
    with pytest.raises(ConfigError, match=r"train\.ema must be > 0"):
        load_config(None, ["train.ema=0"])


# -- train.accumulate ---------------------------------------------------------------------------


class Linear(nn.Module):
    """A model without batch statistics, so that a batch's gradient is the sum of its parts'."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 32 * 32, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(images.flatten(1)), dim=1)


def test_accumulated_gradients_equal_the_large_batch(image_root: Path, tmp_path: Path) -> None:
    """normsoftmax is a mean over samples: two accumulated micro-batches of 8 give the gradient
    (and the step) of one batch of 16."""
    from mbdl.losses import build_loss

    config = folder_config(
        image_root, tmp_path / "run", "loss.name=normsoftmax", "train.accumulate=2", "train.amp=off"
    )
    torch.manual_seed(0)
    model = Linear()
    loss = build_loss("normsoftmax", num_classes=9, embedding_dim=8)
    optimizer = torch.optim.SGD([*model.parameters(), *loss.parameters()], lr=0.1)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = Trainer(config, model=model, loss=loss, optimizer=optimizer, scheduler=constant)
    try:
        generator = torch.Generator().manual_seed(1)
        images = torch.rand(16, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 9, (16,), generator=generator)
        start = _copy(model), _copy(trainer.loss)
        trainer._train_step([images[:8], images[8:]], [labels[:8], labels[8:]])
        accumulated = [p.grad.clone() for p in [*model.parameters(), *trainer.loss.parameters()]]
        stepped = _copy(model), _copy(loss)
        model.load_state_dict(start[0])
        trainer.loss.load_state_dict(start[1])
        trainer._train_step([images], [labels])
        large = [p.grad.clone() for p in [*model.parameters(), *trainer.loss.parameters()]]
    finally:
        trainer.close()
    assert len(accumulated) == 3  # weight, bias, proxies
    for a, b in zip(accumulated, large, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert _close(stepped[0], _copy(model)) and _close(stepped[1], _copy(loss))
    assert not _close(stepped[0], start[0])


def test_accumulate_takes_that_many_batches_per_step(
    image_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    original = Trainer._train_step

    def counting(self: Any, images: Any, labels: Any) -> float:
        seen.append(len(images))
        return original(self, images, labels)

    monkeypatch.setattr(Trainer, "_train_step", counting)
    out = tmp_path / "run"
    config = folder_config(
        image_root, out, "train.accumulate=3", "train.epochs=1", "train.max_steps_per_epoch=null"
    )
    train(config)
    from mbdl.data import ClassBalancedBatchSampler
    from mbdl.runconfig import load_data

    labels = load_data(config).train.labels
    batches_per_epoch = len(ClassBalancedBatchSampler(labels, 4, 2))
    assert batches_per_epoch >= 3
    assert seen == [3] * (batches_per_epoch // 3)
    assert records(out)[0]["step"] == batches_per_epoch // 3


# -- train.compile ------------------------------------------------------------------------------


def _compiled_run(image_root: Path, out: Path) -> dict[str, Any]:
    """One step of a run with train.compile=true; the number of graphs the compiler made."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    config = folder_config(
        image_root,
        out,
        "train.compile=true",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
        "data.val_fraction=0",
    )
    metrics = train(config)
    assert "map@r" in metrics["test"]
    return dict(counters["stats"])


def test_compile_sends_the_model_through_the_compiler(
    image_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring, with torch.compile's eager backend (no code generation: seconds, not
    minutes); the slow test below runs the default backend."""
    compile_ = torch.compile

    def eager(model: Any, **options: Any) -> Any:
        return compile_(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager)
    assert _compiled_run(image_root, tmp_path / "run").get("unique_graphs", 0) >= 1


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MBDL_SLOW", "") in ("", "0"),
    reason="MBDL_SLOW=1: torch.compile's default backend generates C++ (minutes on a busy CPU)",
)
def test_compile_runs_a_step_with_the_default_backend(image_root: Path, tmp_path: Path) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler (none on PATH)")
    assert _compiled_run(image_root, tmp_path / "run").get("unique_graphs", 0) >= 1
