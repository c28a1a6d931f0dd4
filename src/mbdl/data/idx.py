"""MNIST-style IDX files (LeCun et al.; Fashion-MNIST, Xiao et al. 2017), plain or ``.gz``.

``root`` holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``; the
``-idx3-ubyte`` / ``.idx3-ubyte`` spellings both work). Without ``root`` it defaults to
``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``) when that exists.

For metric learning the split is by class, and both official files' images are used: the
classes in ``test_classes`` (default: the last five by id, 5-9) are the test classes, the others
train, with validation classes carved from them. ``class_names`` defaults to Fashion-MNIST's names
when the folder name contains ``fashion``, else the digits.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mbdl.data.base import Splits
from mbdl.data.splits import ArrayImageDataset, carve_validation_classes

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_TEST_CLASSES = (5, 6, 7, 8, 9)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (``.gz`` or plain) as a numpy array of its declared type and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read IDX file {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(data[4:header], dtype=">u4"))
    dtype = np.dtype(_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes) but holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def find_idx_file(root: Path, prefix: str, kind: str) -> Path:
    """The file of ``prefix`` (``train``/``t10k``) and ``kind`` (``images-idx3``/``labels-idx1``)."""
    stem_dash = f"{prefix}-{kind}-ubyte"
    stem_dot = f"{prefix}-{kind.replace('-', '.')}-ubyte"
    for stem in (stem_dash, stem_dot):
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
    raise FileNotFoundError(f"IDX file {stem_dash}[.gz] not found in {root}")


def load_idx_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images (``N x H x W`` uint8) and labels of the train and t10k files, concatenated."""
    images, labels = [], []
    for prefix in ("train", "t10k"):
        x = read_idx(find_idx_file(root, prefix, "images-idx3"))
        y = read_idx(find_idx_file(root, prefix, "labels-idx1"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{root}: {prefix} images {x.shape} and labels {y.shape} do not match")
        images.append(x.astype(np.uint8, copy=False))
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_splits(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    val_fraction: float = 0.15,
    seed: int = 0,
    test_classes: Sequence[int] = DEFAULT_TEST_CLASSES,
    class_names: Sequence[str] | None = None,
) -> Splits:
    """IDX images split by class: ``test_classes`` test, the rest train (validation carved)."""
    if root is None:
        if not DEFAULT_ROOT.is_dir():
            raise ValueError(
                f"data source 'idx' needs data.root (no default: {DEFAULT_ROOT} does not exist; "
                "install Debian's dataset-fashion-mnist or point at MNIST IDX files)"
            )
        root = DEFAULT_ROOT
    base = Path(os.path.expanduser(str(root)))
    images, labels = load_idx_folder(base)
    present = np.unique(labels)
    if class_names is None:
        fashion = "fashion" in str(base).lower() and present.max() < len(FASHION_MNIST_CLASSES)
        names = (
            list(FASHION_MNIST_CLASSES)
            if fashion
            else [str(c) for c in range(int(present.max()) + 1)]
        )
    else:
        names = [str(n) for n in class_names]
        if present.max() >= len(names):
            raise ValueError(
                f"class_names has {len(names)} names but labels go up to {present.max()}"
            )
    test_set = sorted({int(c) for c in test_classes})
    unknown = [c for c in test_set if c not in set(present.tolist())]
    if unknown or not test_set or len(test_set) >= len(present):
        raise ValueError(
            f"test_classes must be a non-empty proper subset of the classes {present.tolist()}, got {list(test_classes)}"
        )
    is_test = np.isin(labels, test_set)
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    keep, val_pos = carve_validation_classes(labels[train_idx], val_fraction, seed)
    full = ArrayImageDataset(images, labels, names, describe=lambda i: f"{base} #{i}")
    splits = Splits(
        train=full.subset(train_idx[keep]),
        val=full.subset(train_idx[val_pos]),
        test=full.subset(test_idx),
        channels=1,
        image_size=image_size,
        source="idx",
        info={"root": str(base), "test_classes": test_set},
    )
    return splits
