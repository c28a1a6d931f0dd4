"""Example plugins, as a user would write them in their own package (docs/plugins.md shows them).

- ``data.source=example_plugins:load_splits``: a data source, a function
  ``(root, *, image_size, val_fraction, seed, **options) -> Splits``. Here: grey stripes whose
  class is their orientation and spacing, drawn in memory (no files); classes 0-5 train (minus
  the validation classes), 6-9 test.
- ``model.backbone=example_plugins:build``: a backbone, a function
  ``(pretrained, in_channels) -> (nn.Module, feature_dim)`` mapping images to pooled features.
"""

from __future__ import annotations

import os

import numpy as np
from torch import nn

from mbdl.data import Splits
from mbdl.data.splits import ArrayImageDataset, carve_validation_classes

CLASSES = 10
TEST_CLASSES = range(6, 10)


def stripes(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` uint8 image of stripes: angle and spacing set by ``label``."""
    angle = np.pi * (label % 5) / 5
    spacing = 3 + 2 * (label // 5)
    y, x = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / spacing + phase)
    noise = rng.normal(0, 0.2, size=(size, size))
    return np.clip(127.5 * (1 + wave + noise), 0, 255).astype(np.uint8)


def load_splits(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    val_fraction: float = 0.15,
    seed: int = 0,
    per_class: int = 8,
) -> Splits:
    """Stripes: 10 classes of ``per_class`` grey images (``root`` is not used)."""
    rng = np.random.default_rng(1234)  # the images are fixed; ``seed`` picks validation classes
    labels = np.repeat(np.arange(CLASSES), per_class)
    images = np.stack([stripes(int(label), image_size, rng) for label in labels])
    full = ArrayImageDataset(images, labels, [f"stripes{c}" for c in range(CLASSES)])
    is_test = np.isin(labels, list(TEST_CLASSES))
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    keep, val = carve_validation_classes(labels[train_idx], val_fraction, seed)
    splits = Splits(
        train=full.subset(train_idx[keep]),
        val=full.subset(train_idx[val]),
        test=full.subset(test_idx),
        channels=1,
        image_size=image_size,
        source="stripes",
    )
    return splits  # no transforms: mbdl.data.load_splits attaches them


def build(pretrained: str | None, in_channels: int) -> tuple[nn.Module, int]:
    """A two-convolution network with 16 pooled features (no pretrained weights)."""
    if pretrained is not None:
        raise ValueError("example_plugins:build has no pretrained weights")
    module = nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return module, 16


build.native_size = 32  # type: ignore[attr-defined]  # the input side it was designed for
