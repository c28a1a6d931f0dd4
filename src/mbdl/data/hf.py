"""Hugging Face ``datasets`` as a source: ``data.source=hf data.root=DIR``.

``DIR`` is a dataset saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (the
splits of a ``DatasetDict`` are pooled: mbdl makes its own class-disjoint splits), or a folder
of ``.parquet`` files (searched recursively). The image column (``data.image_column``, default
``image``) holds images (a ``datasets.Image`` feature, or encoded image bytes); the label column
(``data.label_column``, default ``label``) holds class labels (a ``ClassLabel``, integers or
strings). Images are decoded by mbdl from their bytes, one at a time, with the checks of
:mod:`mbdl.data.files`.

The split is the folder source's: class names sorted, the last half of the classes are the test
classes, validation classes are carved from the rest with ``data.val_fraction``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mbdl.data.base import ImageDataset, Splits
from mbdl.data.files import to_mode
from mbdl.data.splits import SubsetImageDataset, carve_validation_classes
from mbdl.errors import UserError


class HfDataError(UserError):
    """A Hugging Face dataset that cannot be used (missing columns, no images, ...)."""


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise HfDataError(
            "data.source=hf needs the datasets package: pip install 'mbdl[datasets]'"
        ) from None
    return datasets


def open_table(root: Path) -> Any:
    """The ``datasets.Dataset`` at ``root``: a ``save_to_disk`` directory (a ``DatasetDict``'s
    splits concatenated) or the ``.parquet`` files under it."""
    datasets = _datasets()
    if not root.is_dir():
        raise HfDataError(f"data.root={root} is not a directory")
    if (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(root))
        except (OSError, ValueError) as error:
            first = (str(error).splitlines() or [type(error).__name__])[0]
            raise HfDataError(f"cannot load the saved dataset {root}: {first}") from None
        if isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.concatenate_datasets(list(loaded.values()))
        return loaded
    files = sorted(str(p) for p in root.rglob("*.parquet"))
    if not files:
        raise HfDataError(
            f"{root} holds neither a dataset saved with save_to_disk nor .parquet files"
        )
    try:
        return datasets.Dataset.from_parquet(files)
    except Exception as error:  # pyarrow raises many types for a damaged file
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise HfDataError(f"cannot read the parquet files under {root}: {first}") from None


class HfImageDataset(ImageDataset):
    """The rows of a ``datasets.Dataset``: images decoded from the image column's bytes."""

    def __init__(
        self,
        table: Any,
        image_column: str,
        labels: np.ndarray,
        names: list[str],
        mode: str,
        root: str,
    ) -> None:
        datasets = _datasets()
        if isinstance(table.features.get(image_column), datasets.Image):
            table = table.cast_column(image_column, datasets.Image(decode=False))
        self.table = table.select_columns([image_column])
        self.image_column = image_column
        self.labels = labels
        self.class_names = names
        self.mode = mode
        self.root = root

    def load_image(self, index: int) -> Image.Image:
        value = self.table[int(index)][self.image_column]
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is None and path:
                data = Path(path).read_bytes()
        else:
            data = value
        if not isinstance(data, (bytes, bytearray)):
            raise HfDataError(
                f"{self.describe(index)}: column {self.image_column!r} holds no image bytes"
            )
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return to_mode(image, self.mode)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise HfDataError(f"{self.describe(index)}: not a readable image ({error})") from None

    def describe(self, index: int) -> str:
        return f"{self.root}[{int(index)}]"


def read_labels(table: Any, label_column: str) -> tuple[np.ndarray, list[str]]:
    """``(labels int64 [N] into the sorted class names, class names)`` of the label column."""
    datasets = _datasets()
    values = table[label_column]
    feature = table.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        values = [feature.int2str(int(v)) for v in values]
    names_of_items = np.asarray([str(v) for v in values], dtype=object)
    names, labels = np.unique(names_of_items, return_inverse=True)
    return labels.astype(np.int64).reshape(-1), [str(n) for n in names]


def load_splits(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    val_fraction: float = 0.15,
    seed: int = 0,
    image_column: str = "image",
    label_column: str = "label",
    test_fraction: float = 0.5,
    channels: int = 3,
) -> Splits:
    """The class-disjoint splits of a Hugging Face dataset (see the module docstring)."""
    if root is None:
        raise HfDataError("data.source=hf needs data.root (a saved dataset or parquet files)")
    base = Path(os.path.expanduser(str(root)))
    table = open_table(base)
    columns = list(table.column_names)
    for key, column in (("data.image_column", image_column), ("data.label_column", label_column)):
        if column not in columns:
            raise HfDataError(
                f"{base} has no column {column!r} (columns: {', '.join(columns[:10])}); set "
                f"{key}=NAME"
            )
    if len(table) == 0:
        raise HfDataError(f"{base} holds no rows")
    labels, names = read_labels(table, label_column)
    if len(names) < 2:
        raise HfDataError(f"{base}: column {label_column!r} has {len(names)} class; need 2+")
    dataset = HfImageDataset(
        table, image_column, labels, names, "L" if channels == 1 else "RGB", str(base)
    )
    num_test = min(len(names) - 1, max(1, round(test_fraction * len(names))))
    is_test = labels >= len(names) - num_test
    train_idx = np.flatnonzero(~is_test).astype(np.int64)
    test_idx = np.flatnonzero(is_test).astype(np.int64)
    keep, val_pos = carve_validation_classes(labels[train_idx], val_fraction, seed)
    splits = Splits(
        train=SubsetImageDataset(dataset, train_idx[keep]),
        val=SubsetImageDataset(dataset, train_idx[val_pos]),
        test=SubsetImageDataset(dataset, test_idx),
        channels=channels,
        image_size=image_size,
        source="hf",
        info={
            "root": str(base),
            "rows": len(table),
            "split": f"last {num_test} of {len(names)} sorted class names for test",
        },
    )
    return splits
