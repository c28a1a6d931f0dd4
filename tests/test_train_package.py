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
from mbdl.config import config_to_dict, load_config
from mbdl.models import build_model
from mbdl.train.checkpoint import save_checkpoint

#: modules of the training loop that no inference command may import
TRAINING_MODULES = (
    "mbdl.train.trainer",
    "mbdl.train.optim",
    "mbdl.train.seeding",
    "mbdl.train.schedule",
    "mbdl.train.rundir",
    "mbdl.train.callbacks",
    "mbdl.losses.xbm",
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
    commands = {
        "eval": ["eval", str(checkpoint), "--device", "cpu"],
        "embed": ["embed", str(checkpoint), "-o", str(tmp_path / "x.npz"), "--device", "cpu"],
        "embed-npy": ["embed", str(checkpoint), "-o", str(tmp_path / "x.npy"), "--no-progress"],
        "search": ["search", str(checkpoint), image, "-k", "2", "--device", "cpu"],
        "verify": ["verify", str(checkpoint), image, other, "--threshold", "0.5"],
        "index": ["index", "build", str(checkpoint), "-o", str(tmp_path / "index")],
        "export": ["export", str(checkpoint), "--format", "safetensors", "-o", str(tmp_path / "m")],
    }
    script = textwrap.dedent(
        """
        import contextlib, io, json, sys
        from mbdl.cli import main
        commands, forbidden = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        result = {}
        for name, argv in commands.items():
            with contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
            result[name] = [code, sorted(m for m in forbidden if m in sys.modules)]
        print(json.dumps(result))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands), json.dumps(TRAINING_MODULES)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # every command ran, and after each (cumulatively) no training module was imported
    assert result == {name: [0, []] for name in commands}


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
