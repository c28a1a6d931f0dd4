"""Hugging Face ``datasets`` as a source: ``data.source=hf data.root=DIR``.

``DIR`` is a dataset saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (the
splits of a ``DatasetDict`` are pooled: mbdl makes its own class-disjoint splits), or a folder
of ``.parquet`` files (searched recursively). The image column (``data.image_column``, default
``image``) holds images (a ``datasets.Image`` feature, or encoded image bytes); the label column
(``data.label_column``, default ``label``) holds class labels (a ``ClassLabel``, integers or
strings). Every row's image is checked when the splits are built (:func:`inspect_cell`: the
checks of :mod:`mbdl.data.files`: a header PIL recognises, at most ``MAX_PIXELS`` pixels, a
supported mode, a cheap decode); any bad one is refused in one line naming the first row and
counting them all, or, with ``skip_corrupt``, dropped and listed in ``info["skipped_files"]``
(what ``mbdl scan`` prints). Images are then decoded by mbdl from their bytes, one at a time.

The split is the folder source's: class names sorted, the last half of the classes are the test
classes, validation classes are carved from the rest with ``data.val_fraction``.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mbdl.data.base import ImageDataset, Splits
from mbdl.data.files import (
    PIL_ERRORS,
    check_header,
    inspect_image,
    read_error_reason,
    read_image,
    to_mode,
)
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
        rows: np.ndarray | None = None,
    ) -> None:
        self.table = undecoded(table, image_column).select_columns([image_column])
        self.image_column = image_column
        self.labels = labels
        self.class_names = names
        self.mode = mode
        self.root = root
        self.rows = np.arange(len(table)) if rows is None else rows  # index -> row of the file

    def load_image(self, index: int) -> Image.Image:
        data, path = cell_contents(self.table[int(index)][self.image_column])
        if data is None and path:
            return read_image(path, self.mode)  # the checked reader of files on disk
        if data is None:
            raise HfDataError(
                f"{self.describe(index)}: column {self.image_column!r} holds no image bytes"
            )
        try:
            with Image.open(io.BytesIO(data)) as image:
                check_header(image)
                image.load()
                return to_mode(image, self.mode)
        except PIL_ERRORS as error:
            reason = _bytes_reason(error)
            raise HfDataError(f"{self.describe(index)}: not a readable image ({reason})") from None

    def describe(self, index: int) -> str:
        return f"{self.root}[{int(self.rows[int(index)])}]"


def undecoded(table: Any, image_column: str) -> Any:
    """``table`` with a ``datasets.Image`` column left as ``{"bytes", "path"}`` (mbdl decodes)."""
    datasets = _datasets()
    if isinstance(table.features.get(image_column), datasets.Image):
        return table.cast_column(image_column, datasets.Image(decode=False))
    return table


def cell_contents(value: object) -> tuple[bytes | None, str | None]:
    """``(encoded bytes, file path)`` of one cell of the image column (either may be None)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    else:
        data, path = value, None
    data = bytes(data) if isinstance(data, (bytes, bytearray)) else None
    return data, path if isinstance(path, str) and path else None


def inspect_cell(value: object) -> str | None:
    """``None`` when a cell of the image column holds a readable, supported image within
    ``MAX_PIXELS`` (:func:`mbdl.data.files.inspect_image`'s checks), else the reason."""
    data, path = cell_contents(value)
    if data is None:
        return inspect_image(path) if path else "no image bytes"
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_header(image)
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except PIL_ERRORS as error:
        return _bytes_reason(error)
    return None


_BUFFER = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")


def _bytes_reason(error: BaseException) -> str:
    """PIL's message without the in-memory file object it names."""
    return _BUFFER.sub("", read_error_reason(error, "")) or type(error).__name__


def inspect_rows(table: Any, image_column: str, batch_size: int = 256) -> list[str | None]:
    """:func:`inspect_cell` of every row of ``image_column``, decoded in threads."""
    from concurrent.futures import ThreadPoolExecutor

    column = undecoded(table, image_column).select_columns([image_column])
    workers = min(8, os.cpu_count() or 1)
    reasons: list[str | None] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch in column.iter(batch_size=batch_size):
            reasons.extend(pool.map(inspect_cell, batch[image_column]))
    return reasons


#: ``datasets.Value`` dtypes a label column may hold
LABEL_DTYPES = frozenset(
    {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
    | {"string", "large_string"}
)

#: ``datasets.Value`` dtypes an image column may hold (encoded image bytes)
IMAGE_DTYPES = frozenset({"binary", "large_binary"})


def check_columns(table: Any, image_column: str, label_column: str, where: str) -> None:
    """Refuse a missing image or label column, an image column of neither images nor bytes,
    a label column of neither integers nor strings (nor a ``ClassLabel``)."""
    datasets = _datasets()
    columns = list(table.column_names)
    for key, column in (("data.image_column", image_column), ("data.label_column", label_column)):
        if column not in columns:
            raise HfDataError(
                f"{where} has no column {column!r} (columns: {', '.join(columns[:10])}); set "
                f"{key}=NAME"
            )
    image = table.features[image_column]
    if not isinstance(image, datasets.Image) and getattr(image, "dtype", None) not in IMAGE_DTYPES:
        raise HfDataError(
            f"{where}: column {image_column!r} holds {_kind(image)}, not images (a datasets "
            "Image feature or encoded image bytes); set data.image_column=NAME"
        )
    label = table.features[label_column]
    if not isinstance(label, datasets.ClassLabel) and getattr(label, "dtype", None) not in (
        LABEL_DTYPES
    ):
        raise HfDataError(
            f"{where}: column {label_column!r} holds {_kind(label)}; class labels must be "
            "integers or strings (or a ClassLabel); set data.label_column=NAME"
        )


def _kind(feature: object) -> str:
    dtype = getattr(feature, "dtype", None)
    return f"{dtype} values" if isinstance(dtype, str) else type(feature).__name__


def read_labels(
    table: Any, label_column: str, where: str = "the dataset"
) -> tuple[np.ndarray, list[str]]:
    """``(labels int64 [N] into the sorted class names, class names)`` of the label column;
    a row without a label (or a ``ClassLabel`` index outside its names) is refused."""
    datasets = _datasets()
    values = list(table[label_column])
    feature = table.features.get(label_column)
    missing = next((i for i, v in enumerate(values) if v is None), None)
    if isinstance(feature, datasets.ClassLabel) and missing is None:
        missing = next((i for i, v in enumerate(values) if not 0 <= v < feature.num_classes), None)
        if missing is None:
            values = [feature.int2str(int(v)) for v in values]
    if missing is not None:
        raise HfDataError(
            f"{where}[{missing}]: column {label_column!r} holds no class label "
            f"({values[missing]!r}); every row needs one"
        )
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
    skip_corrupt: bool = False,
    test_fraction: float = 0.5,
    channels: int = 3,
) -> Splits:
    """The class-disjoint splits of a Hugging Face dataset (see the module docstring)."""
    if root is None:
        raise HfDataError("data.source=hf needs data.root (a saved dataset or parquet files)")
    base = Path(os.path.expanduser(str(root)))
    table = open_table(base)
    check_columns(table, image_column, label_column, str(base))
    if len(table) == 0:
        raise HfDataError(f"{base} holds no rows")
    read_labels(table, label_column, str(base))  # every row's label, before any image
    rows, skipped_files = readable_rows(table, image_column, str(base), skip_corrupt)
    if len(rows) < len(table):
        table = table.select(rows)
    labels, names = read_labels(table, label_column, str(base))
    if len(names) < 2:
        raise HfDataError(f"{base}: column {label_column!r} has {len(names)} class; need 2+")
    dataset = HfImageDataset(
        table, image_column, labels, names, "L" if channels == 1 else "RGB", str(base), rows
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
            "rows": len(rows) + len(skipped_files),
            "skipped": len(skipped_files),
            "skipped_files": skipped_files,
            "split": f"last {num_test} of {len(names)} sorted class names for test",
        },
    )
    return splits


def readable_rows(
    table: Any, image_column: str, where: str, skip_corrupt: bool
) -> tuple[np.ndarray, list[str]]:
    """``(rows whose image passes :func:`inspect_cell`, "where[row] (reason)" of the others)``;
    without ``skip_corrupt`` any bad row is refused in one line (the first named, all counted)."""
    reasons = inspect_rows(table, image_column)
    bad = [i for i, reason in enumerate(reasons) if reason is not None]
    if bad and not skip_corrupt:
        raise HfDataError(
            f"image cannot be read: {where}[{bad[0]}] ({reasons[bad[0]]}); {len(bad)} of "
            f"{len(reasons)} rows of {where} cannot be used; fix or remove them, or set "
            "data.skip_corrupt=true"
        )
    skipped = [f"{where}[{i}] ({reasons[i]})" for i in bad]
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} unreadable image(s) in {where}, first: {skipped[0]}",
            stacklevel=3,
        )
    keep = np.ones(len(reasons), dtype=bool)
    keep[bad] = False
    return np.flatnonzero(keep).astype(np.int64), skipped
