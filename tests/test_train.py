"""The trainer: an end-to-end run on a small glyphs subset, determinism, exact resumption after an
interruption, NaN handling, run-directory safety and checkpoints that cannot run code."""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from mbdl.config import ConfigError, load_config
from mbdl.evaluate import split_metrics
from mbdl.train import TrainingDiverged, train
from mbdl.train import trainer as trainer_module
from mbdl.train.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from mbdl.train.schedule import warmup_cosine_factor

# 40 glyph classes: 20 test, 17 train, 3 validation; 2 epochs of 3 batches of 8 x 4 images.
SMALL = [
    "data.max_classes=40",
    "model.embedding_dim=16",
    "train.epochs=2",
    "train.batch_classes=8",
    "train.batch_per_class=4",
    "train.max_steps_per_epoch=3",
    "train.warmup_epochs=0.5",
    "train.checkpoint_every_steps=2",
    "train.progress=false",
    "train.device=cpu",
    "eval.ks=[1, 2]",
    "eval.report=false",
]


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("glyph-cache"))


def small_config(out: Path, cache: str, *extra: str) -> Any:
    return load_config(None, [*SMALL, f"data.root={cache}", f"out={out}", *extra])


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model_state"]  # type: ignore[no-any-return]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, glyph_cache: str) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "reference"
    metrics = train(small_config(out, glyph_cache, "eval.report=true"))
    return out, metrics


def test_end_to_end_run_writes_everything(reference: tuple[Path, dict]) -> None:
    out, metrics = reference
    for name in ("config.yaml", "log.jsonl", "metrics.json", "report.html"):
        assert (out / name).is_file(), name
    assert set(metrics) == {"validation", "test", "verification", "meta"}
    for split in ("validation", "test"):  # run metadata apart from the metric tables
        assert not {"kmeans/seed", "genuine_pairs"} & set(metrics[split])
        assert isinstance(metrics["meta"][split]["genuine_pairs"], int)
    assert metrics["meta"]["test"]["kmeans/backend"] in ("torch", "faiss")
    assert set(metrics["test"]) >= {"recall@1", "recall@2", "precision@1", "map@r", "nmi", "f1"}
    assert set(metrics["test"]) >= {"ami", "eer", "tar@far=1e-3", "tar@threshold", "far@threshold"}
    assert metrics["verification"]["chosen_on"] == "validation"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["step"] for r in records] == [3, 6]
    for record in records:
        assert math.isfinite(record["train_loss"]) and record["images_per_s"] > 0
        assert set(split_metrics(record["validation"])[0]) == set(metrics["validation"])
    # the chosen checkpoint is the best validation epoch on map@r
    best_epoch = max(records, key=lambda r: r["validation"]["map@r"])["epoch"]
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["epoch"] == best_epoch
    assert split_metrics(best["validation"])[0] == metrics["validation"]
    # the saved config reloads to the run's config
    saved = load_config(out / "config.yaml")
    assert saved.out == str(out) and saved.data.max_classes == 40
    # the model comes back from the checkpoint and embeds
    model = model_from_checkpoint(out / "checkpoints" / "best.pt")
    with torch.no_grad():
        embeddings = model(torch.rand(3, 1, 32, 32))
    assert embeddings.shape == (3, 16)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)


def test_same_seed_gives_identical_results(
    reference: tuple[Path, dict], tmp_path: Path, glyph_cache: str
) -> None:
    out, metrics = reference
    again = train(small_config(tmp_path / "again", glyph_cache))
    assert again == metrics
    assert_same_state(
        model_state(out / "checkpoints" / "last.pt"),
        model_state(tmp_path / "again" / "checkpoints" / "last.pt"),
    )


def test_resume_after_interruption_equals_an_uninterrupted_run(
    reference: tuple[Path, dict],
    tmp_path: Path,
    glyph_cache: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, metrics = reference
    run = tmp_path / "interrupted"
    original = trainer_module.Trainer._train_step

    def interrupt_at_step_5(self: Any, images: torch.Tensor, labels: torch.Tensor) -> float:
        if self.progress.global_step == 4:  # the 5th step, mid-way through epoch 2
            raise KeyboardInterrupt
        return original(self, images, labels)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(run, glyph_cache))
    monkeypatch.setattr(trainer_module.Trainer, "_train_step", original)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["progress"]["global_step"] == 4  # the mid-epoch checkpoint (every 2 steps)
    assert last["progress"]["epoch"] == 1 and last["progress"]["step_in_epoch"] == 1
    assert not (run / "metrics.json").exists()

    resumed = train(small_config(run, glyph_cache, "resume=true"))
    assert resumed == metrics
    assert_same_state(
        model_state(out / "checkpoints" / "last.pt"), model_state(run / "checkpoints" / "last.pt")
    )
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    reference_records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["train_loss"], r["validation"]) for r in records] == [
        (r["epoch"], r["train_loss"], r["validation"]) for r in reference_records
    ]
    # resuming a finished run does nothing and returns its metrics
    assert train(small_config(run, glyph_cache, "resume=true")) == metrics


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, glyph_cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mbdl.losses.mdl import MarginDiscriminateLoss

    calls = {"n": 0}
    original = MarginDiscriminateLoss.forward

    def explode_at_call_4(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(MarginDiscriminateLoss, "forward", explode_at_call_4)
    run = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at epoch 2, step 1") as info:
        train(small_config(run, glyph_cache, "train.amp=bf16"))  # bf16 autocast on CPU too
    assert "last good checkpoint" in str(info.value)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["progress"]["global_step"] == 3  # end of epoch 1, before the bad step
    assert all(torch.isfinite(t).all() for t in last["model_state"].values())
    assert not (run / "metrics.json").exists()


def test_run_directory_safety(reference: tuple[Path, dict], glyph_cache: str) -> None:
    out, _ = reference
    with pytest.raises(ConfigError, match="already exists and is not empty; continue it with"):
        train(small_config(out, glyph_cache))
    with pytest.raises(ConfigError, match=r"cannot resume .* different config \(train.lr"):
        train(small_config(out, glyph_cache, "resume=true", "train.lr=0.01"))
    with pytest.raises(ConfigError, match="resume=true needs out="):
        train(load_config(None, [*SMALL, "resume=true"]))


def test_early_stopping_keeps_the_best_epoch(
    tmp_path: Path, glyph_cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    scores = iter([0.5, 0.6, 0.55, 0.4, 0.9])  # epochs 1-4 validate; epoch 4 is the 2nd miss

    def fake_evaluate(model: Any, dataset: Any, config: Any, device: Any) -> tuple:
        embeddings = torch.zeros(len(dataset), 16)
        return {"map@r": next(scores, 0.0)}, embeddings, torch.as_tensor(dataset.labels)

    monkeypatch.setattr(trainer_module, "evaluate_dataset", fake_evaluate)
    run = tmp_path / "early"
    metrics = train(
        small_config(
            run, glyph_cache, "train.epochs=6", "train.max_steps_per_epoch=1", "train.patience=2"
        )
    )
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["validation"]["map@r"] for r in records] == [0.5, 0.6, 0.55, 0.4]
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == 2
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["stopped_early"]
    assert metrics["validation"] == {"map@r": 0.6}


def test_without_validation_classes_the_last_epoch_is_tested(
    tmp_path: Path, glyph_cache: str
) -> None:
    run = tmp_path / "no-val"
    metrics = train(
        small_config(run, glyph_cache, "data.val_fraction=0", "train.max_steps_per_epoch=1")
    )
    assert metrics["validation"] == {} and "map@r" in metrics["test"]
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == 2
    assert_same_state(
        model_state(run / "checkpoints" / "best.pt"), model_state(run / "checkpoints" / "last.pt")
    )


def test_too_few_classes_for_the_batch(tmp_path: Path, glyph_cache: str) -> None:
    with pytest.raises(
        ConfigError, match=r"train\.batch_classes=32 but the training split has only"
    ):
        train(small_config(tmp_path / "run", glyph_cache, "train.batch_classes=32"))


class _RunsCode:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "mbdl-checkpoint", "payload": _RunsCode()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(path)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ValueError, match=r"refusing to load|cannot read checkpoint|not an mbdl"):
        load_checkpoint(raw)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="is not an mbdl checkpoint"):
        load_checkpoint(other)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoints_load_with_plain_weights_only(reference: tuple[Path, dict]) -> None:
    out, _ = reference
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / "checkpoints" / name, weights_only=True)
        assert state["format"] == "mbdl-checkpoint"


def test_atomic_save_keeps_the_old_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"value": torch.ones(3)})

    def broken_save(obj: Any, file: Any) -> None:
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"value": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["value"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_warmup_then_cosine() -> None:
    factors = [warmup_cosine_factor(step, 4, 12) for step in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert factors[8] == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    assert warmup_cosine_factor(0, 0, 5) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_factor(0, 6, 5)


def test_results_do_not_depend_on_loader_workers(
    reference: tuple[Path, dict], tmp_path: Path, glyph_cache: str
) -> None:
    out, metrics = reference  # data.num_workers=auto: 0 or 1 worker, as the machine says
    for workers in (0, 1):  # in the main process; a worker process augments the batches
        run = tmp_path / f"w{workers}"
        assert train(small_config(run, glyph_cache, f"data.num_workers={workers}")) == metrics
        assert_same_state(
            model_state(out / "checkpoints" / "last.pt"),
            model_state(run / "checkpoints" / "last.pt"),
        )


def test_checkpoints_keep_the_format_of_earlier_versions(reference: tuple[Path, dict]) -> None:
    """last.pt and best.pt keep every key, in order, with the type of those written before the
    trainer was split into modules (so old checkpoints load and resume); fields added since (the
    model record's, version 2) may follow, but none may be missing, renamed or retyped."""
    from test_train_package import assert_layout_extends, checkpoint_layout

    fixture = Path(__file__).parent / "fixtures" / "checkpoint_v1_layout.json"
    expected = json.loads(fixture.read_text(encoding="utf-8"))
    out, _ = reference
    for name in ("last", "best"):
        layout = checkpoint_layout(load_checkpoint(out / "checkpoints" / f"{name}.pt"))
        if isinstance(layout.get("rng"), dict):
            layout["rng"].pop("cuda", None)  # present only where CUDA is available
        assert_layout_extends(layout, expected[name], name)
