"""``model.init``: a run starts from a trained mbdl embedder (backbone and head), with its
preprocessing; an incompatible one is refused in one line before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures_data import TINY_GLYPH_RUN
from mbdl.cli import main
from mbdl.config import load_config

SMALL = TINY_GLYPH_RUN


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("warm") / "first"
    assert main(["train", *SMALL, "data.mean=[0.3]", "data.std=[0.2]", f"out={out}"]) == 0
    return out


def test_warm_start_loads_backbone_and_head_and_preprocessing(
    first_run: Path, tmp_path: Path
) -> None:
    from mbdl.export import load_state, save_pretrained
    from mbdl.train.trainer import Trainer

    model_dir = save_pretrained(first_run, tmp_path / "model")
    stored = load_state(model_dir)["model_state"]
    config = load_config(None, [*SMALL, f"model.init={model_dir}", f"out={tmp_path / 'second'}"])
    trainer = Trainer(config)
    try:
        for key, value in trainer.model.state_dict().items():
            torch.testing.assert_close(value, stored[key], msg=key)
        spec = trainer.splits.test.transform.spec
        assert spec["mean"] == [0.3] and spec["std"] == [0.2]  # the stored model's statistics
    finally:
        trainer.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model.embedding_dim=16", "embedding_dim 8"),
        ("model.backbone=smallcnn", "backbone 'smallvgg'"),
    ],
)
def test_incompatible_init_is_one_line(
    first_run: Path,
    change: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "refused"
    assert main(["train", *SMALL, change, f"model.init={first_run}", f"out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit this run" in err and message in err and len(err.splitlines()) == 1
    assert not (out / "checkpoints").exists()


def test_missing_init_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["train", *SMALL, f"model.init={tmp_path / 'nothing'}", f"out={tmp_path / 'r'}"]) == 2
    )
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
