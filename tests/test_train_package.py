"""The training package's rooms: the inference commands import no training code, and the
checkpoints the trainer writes keep the format of those written before the trainer was split
(``tests/fixtures/checkpoint_v1_layout.json``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures_data import make_folder
from mbdl.config import ConfigError, config_to_dict, load_config
from mbdl.evaluate import split_metrics
from mbdl.models import build_model
from mbdl.train import train
from mbdl.train.callbacks import Callback, TestResult
from mbdl.train.checkpoint import load_checkpoint, save_checkpoint

#: modules of the training loop that no inference command may import (the loss modules, the
#: cross-batch memory's included, are imported by the loss registry that validates loss.name)
TRAINING_MODULES = (
    "mbdl.train.trainer",
    "mbdl.train.optim",
    "mbdl.train.seeding",
    "mbdl.train.schedule",
    "mbdl.train.rundir",
    "mbdl.train.callbacks",
    "mbdl.data.sampler",
)


def _untrained_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A ``best.pt`` of an untrained small CNN on a folder of 6 classes (no training needed to
    exercise the inference commands), and the folder."""
    root = make_folder(tmp_path / "images", num_classes=6, per_class=3)
    config = load_config(
        None,
        [
            "data.source=folder",
            f"data.root={root}",
            "data.val_fraction=0",
            "model.backbone=smallcnn",
            "model.embedding_dim=8",
            "eval.ks=[1]",
        ],
    )
    model = build_model("smallcnn", 8, in_channels=3)
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(
        checkpoint,
        {
            "kind": "best",
            "config": config_to_dict(config),
            "model_args": {"backbone": "smallcnn", "embedding_dim": 8, "in_channels": 3},
            "data_args": {"source": "folder", "root": str(root), "image_size": 32, "channels": 3},
            "model_state": model.state_dict(),
            "epoch": 0,
            "validation": {},
        },
    )
    return checkpoint, root


def test_inference_commands_import_no_training_code(tmp_path: Path) -> None:
    faiss = pytest.importorskip("faiss")
    del faiss
    checkpoint, root = _untrained_checkpoint(tmp_path)
    image = str(root / "class_0" / "0.png")
    other = str(root / "class_1" / "0.png")
    # the inference commands (search over a split included) import nothing at all from
    # mbdl.train; index (being rewritten as the catalog) at least none of the training loop's
    # modules
    strict = {
        "eval": ["eval", str(checkpoint), "--device", "cpu"],
        "embed": ["embed", str(checkpoint), "-o", str(tmp_path / "x.npz"), "--device", "cpu"],
        "embed-npy": ["embed", str(checkpoint), "-o", str(tmp_path / "x.npy"), "--no-progress"],
        "embed-train": [
            "embed",
            str(checkpoint),
            "--split",
            "train",
            "-o",
            str(tmp_path / "t.npz"),
        ],
        "verify": ["verify", str(checkpoint), image, other, "--threshold", "0.5"],
        "export": ["export", str(checkpoint), "--format", "safetensors", "-o", str(tmp_path / "m")],
        "eval-model-dir": ["eval", str(tmp_path / "m"), "--device", "cpu"],
        "search": ["search", str(checkpoint), image, "-k", "2", "--device", "cpu"],
    }
    loose = {
        "index": ["index", "build", str(checkpoint), "-o", str(tmp_path / "index")],
    }
    script = textwrap.dedent(
        """
        import contextlib, io, json, sys
        import torch
        torch.set_num_threads(1)
        from mbdl.cli import main
        strict, loose, forbidden = (json.loads(a) for a in sys.argv[1:4])
        result = {}
        for name, argv in strict.items():
            with contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
            result[name] = [code, sorted(m for m in sys.modules if m.startswith("mbdl.train"))]
        for name, argv in loose.items():
            with contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
            result[name] = [code, sorted(m for m in forbidden if m in sys.modules)]
        print(json.dumps(result))
        """
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            json.dumps(strict),
            json.dumps(loose),
            json.dumps(TRAINING_MODULES),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # every command ran, and after each (cumulatively) nothing forbidden was imported
    assert result == {name: [0, []] for name in (*strict, *loose)}


def test_train_is_still_reachable_from_the_package() -> None:
    import mbdl.train
    from mbdl.train import trainer

    assert mbdl.train.train is trainer.train
    assert mbdl.train.Trainer is trainer.Trainer
    assert mbdl.train.TrainingDiverged is trainer.TrainingDiverged
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = mbdl.train.nothing  # type: ignore[attr-defined]


# -- the checkpoint format ----------------------------------------------------------------------

#: fields whose contents are not part of the frozen layout: the config (its keys grow), torch's
#: own state dicts (they vary with the torch version) and metric dicts (their keys grow)
_OPAQUE = frozenset({"config", "optimizer", "scheduler", "scaler", "validation", "verification"})


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    return type(value).__name__


def checkpoint_layout(state: dict[str, Any]) -> dict[str, Any]:
    """The keys of a checkpoint in order, the type of each value, and one level further the keys
    and types (tensor dtype and shape) of its dicts."""
    layout: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict) and key not in _OPAQUE:
            layout[key] = {str(k): _describe(v) for k, v in value.items()}
        else:
            layout[key] = _describe(value)
    return layout


def assert_layout_extends(layout: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """``layout`` has every key of ``expected`` in the same order with the same description
    (recursively for dicts); keys ``expected`` lacks (fields added later) are allowed."""
    present = [key for key in layout if key in expected]
    missing = [key for key in expected if key not in layout]
    assert not missing, f"{where}: missing or renamed {missing}"
    assert present == list(expected), f"{where}: the old keys changed order"
    for key, old in expected.items():
        if isinstance(old, dict):
            assert isinstance(layout[key], dict), f"{where}.{key}"
            assert_layout_extends(layout[key], old, f"{where}.{key}")
        else:
            assert layout[key] == old, f"{where}.{key}: {layout[key]} != {old}"


def test_the_layout_check_allows_new_fields_and_refuses_missing_ones() -> None:
    expected = {"format": "str", "model_args": {"backbone": "str", "embedding_dim": "int"}}
    newer = {
        "format": "str",
        "model_args": {"backbone": "str", "embedding_dim": "int", "extra": "int"},
        "record": "dict",
    }
    assert_layout_extends(newer, expected, "ok")
    renamed = {"format": "str", "model_args": {"backbone": "str", "embedding_size": "int"}}
    retyped = {"format": "str", "model_args": {"backbone": "str", "embedding_dim": "float"}}
    dropped = {"model_args": {"backbone": "str", "embedding_dim": "int"}}
    for broken in (renamed, retyped, dropped):
        with pytest.raises(AssertionError):
            assert_layout_extends(broken, expected, "broken")


# -- callbacks ----------------------------------------------------------------------------------


class Recorder(Callback):
    """Records each hook with what it was given, and what was on disk at that moment."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_train_start(self, trainer: Any) -> None:
        self.events.append(("train_start",))

    def on_validation(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        self.events.append(("validation", epoch, dict(metrics)))

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        state = load_checkpoint(path)
        step = state["progress"]["global_step"] if "progress" in state else state["epoch"]
        self.events.append(("checkpoint", path.name, step))

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        lines = (trainer.out / "log.jsonl").read_text(encoding="utf-8").splitlines()
        assert json.loads(lines[-1]) == record  # appended before the hook
        self.events.append(("epoch_end", record["epoch"]))

    def on_train_end(self, trainer: Any, result: TestResult) -> None:
        on_disk = json.loads((trainer.out / "metrics.json").read_text(encoding="utf-8"))
        assert on_disk == result.metrics and len(result.labels) == len(result.embeddings)
        self.events.append(("train_end",))

    def on_close(self, trainer: Any) -> None:
        self.events.append(("close",))


def _folder_config(tmp_path: Path, *extra: str) -> Any:
    root = make_folder(tmp_path / "images", num_classes=24, per_class=4)
    return load_config(
        None,
        [
            "data.source=folder",
            f"data.root={root}",
            "data.val_fraction=0.25",
            "model.backbone=smallcnn",
            "model.embedding_dim=8",
            "train.epochs=2",
            "train.batch_classes=4",
            "train.batch_per_class=2",
            "train.max_steps_per_epoch=3",
            "train.checkpoint_every_steps=2",
            "train.device=cpu",
            "train.num_threads=1",
            "train.progress=false",
            "eval.ks=[1]",
            "eval.report=false",
            f"out={tmp_path / 'run'}",
            *extra,
        ],
    )


def test_callbacks_are_called_in_order(tmp_path: Path) -> None:
    recorder = Recorder()
    metrics = train(_folder_config(tmp_path), callbacks=[recorder])
    validations = [e for e in recorder.events if e[0] == "validation"]
    assert [e[1] for e in validations] == [1, 2]
    best_epoch_2 = validations[1][2]["map@r"] > validations[0][2]["map@r"]
    assert metrics["validation"] == split_metrics(validations[1 if best_epoch_2 else 0][2])[0]
    assert recorder.events == [
        ("train_start",),
        ("checkpoint", "last.pt", 2),  # train.checkpoint_every_steps=2, mid-epoch
        validations[0],
        ("checkpoint", "best.pt", 1),  # the first validation is the best so far
        ("epoch_end", 1),
        ("checkpoint", "last.pt", 3),
        ("checkpoint", "last.pt", 4),
        validations[1],
        *([("checkpoint", "best.pt", 2)] if best_epoch_2 else []),
        ("epoch_end", 2),
        ("checkpoint", "last.pt", 6),
        ("checkpoint", "best.pt", 2 if best_epoch_2 else 1),  # + the verification threshold
        ("train_end",),
        ("close",),
    ]


def test_a_failing_run_still_closes_its_callbacks(tmp_path: Path) -> None:
    recorder = Recorder()
    with pytest.raises(ConfigError, match=r"train\.batch_classes=30"):
        train(_folder_config(tmp_path, "train.batch_classes=30"), callbacks=[recorder])
    assert recorder.events == []  # refused while building: no hook was called
    recorder = Recorder()
    config = _folder_config(tmp_path, f"out={tmp_path / 'run2'}")
    with pytest.raises(ZeroDivisionError):
        train(config, callbacks=[recorder, _FailsAtEpochEnd()])
    assert recorder.events[-1] == ("close",)
    recorder = Recorder()
    config = _folder_config(tmp_path, f"out={tmp_path / 'run3'}")
    with pytest.raises(ZeroDivisionError):
        train(config, callbacks=[recorder, _FailsAtStart()])
    assert recorder.events == [("train_start",), ("close",)]
    assert not (tmp_path / "run3" / ".lock").exists()  # the run directory was released


class _FailsAtStart(Callback):
    def on_train_start(self, trainer: Any) -> None:
        raise ZeroDivisionError("a callback failed")


class _FailsAtEpochEnd(Callback):
    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        raise ZeroDivisionError("a callback failed")
