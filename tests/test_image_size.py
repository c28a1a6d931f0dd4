"""``data.image_size=null`` on file sources: the input size is picked from the training images
and the backbone (small images are not upscaled to 224), and the run says which it picked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbdl.cli import main
from mbdl.data import auto_image_size, load_splits, typical_image_side
from mbdl.models import NATIVE_INPUT_SIZES


def _folder(root: Path, side: int, classes: int = 6, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for k in range(per_class):
            pixels = rng.integers(0, 256, size=(side, side + 10 * k, 3), dtype=np.uint8)
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{k}.png")
    return root


@pytest.mark.parametrize(
    ("side", "backbone", "expected"),
    [
        (64, "smallcnn", 32),
        (64, "mobilenet_v2", 64),
        (100, "resnet18", 96),
        (500, "resnet50", 224),
        (20, "mobilenet_v2", 32),
    ],
)
def test_auto_image_size(side: int, backbone: str, expected: int) -> None:
    assert auto_image_size(side, backbone) == expected


def test_every_backbone_has_a_native_size() -> None:
    from mbdl.models import BACKBONES

    assert set(NATIVE_INPUT_SIZES) == set(BACKBONES.builtin_names())


def test_typical_side_reads_headers(tmp_path: Path) -> None:
    splits = load_splits("folder", _folder(tmp_path, 80), image_size=32, val_fraction=0.0)
    assert typical_image_side(splits.train) == 80  # the shorter side, whatever the width


def test_folder_size_is_picked_for_the_backbone(tmp_path: Path) -> None:
    root = _folder(tmp_path, 64)
    small = load_splits("folder", root, val_fraction=0.0, backbone="smallcnn")
    mobile = load_splits("folder", root, val_fraction=0.0, backbone="mobilenet_v2")
    assert small.image_size == 32 and mobile.image_size == 64
    assert small.train[0][0].shape == (3, 32, 32)
    assert mobile.test[0][0].shape == (3, 64, 64)
    assert "median shorter side (64 px)" in (mobile.info or {})["image_size"]
    fixed = load_splits("folder", root, image_size=48, val_fraction=0.0, backbone="smallcnn")
    assert fixed.image_size == 48  # an explicit size is kept
    assert load_splits("folder", root, val_fraction=0.0).image_size == 224  # no backbone named


def test_train_prints_size_speed_and_eta(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _folder(tmp_path / "data", 64, classes=8, per_class=4)
    code = main(
        [
            "train",
            "data.source=folder",
            f"data.root={root}",
            "model.backbone=smallvgg",  # named: auto would choose the whole recipe (test_recipe)
            "data.val_fraction=0",
            "train.epochs=2",
            "train.warmup_epochs=0",
            "train.batch_classes=2",
            "train.max_steps_per_epoch=1",
            "model.embedding_dim=8",
            "eval.report=false",
            f"out={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert "input 32 px, picked for smallvgg" in err  # the backbone's native size
    assert "img/s" in err and "ETA" in err
