"""A CSV list of images: a header row with the columns ``path,label,split`` (others ignored).

``split`` is ``train``, ``val`` or ``test``; ``label`` is any class name. Relative paths are
resolved against the CSV file's folder. ``root`` is the CSV file, or a folder holding exactly one
``.csv`` file. The split must be class-disjoint: a label in two splits is an error. When no row is
``val``, validation classes are carved from the training classes.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from mbdl.data.base import Splits
from mbdl.data.files import class_disjoint_splits, file_dataset

COLUMNS = ("path", "label", "split")
SPLITS = ("train", "val", "test")


def find_csv(root: Path) -> Path:
    """``root`` when it is a file, else the single ``.csv`` file in the folder ``root``."""
    if root.is_file():
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"CSV file not found: {root}")
    found = sorted(root.glob("*.csv"))
    if len(found) != 1:
        raise ValueError(f"{root} holds {len(found)} .csv files; point data.root at one of them")
    return found[0]


def read_rows(path: Path) -> tuple[list[str], list[str], list[str]]:
    """``(paths, labels, splits)`` of the CSV file."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        absent = [c for c in COLUMNS if c not in header]
        if absent:
            raise ValueError(
                f"{path}: the header lacks the columns {absent} (need path,label,split)"
            )
        reader.fieldnames = header
        paths, labels, splits = [], [], []
        for number, row in enumerate(reader, start=2):
            split = (row["split"] or "").strip()
            if split not in SPLITS:
                raise ValueError(
                    f"{path}:{number}: split must be train, val or test, got {split!r}"
                )
            if not (row["path"] or "").strip() or not (row["label"] or "").strip():
                raise ValueError(f"{path}:{number}: empty path or label")
            paths.append(row["path"].strip())
            labels.append(row["label"].strip())
            splits.append(split)
    if not paths:
        raise ValueError(f"{path} lists no images")
    return paths, labels, splits


def load_splits(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    val_fraction: float = 0.15,
    seed: int = 0,
    channels: int = 3,
    skip_corrupt: bool = False,
) -> Splits:
    """The splits a ``path,label,split`` CSV file defines (see the module docstring)."""
    if root is None:
        raise ValueError("data source 'csv' needs data.root (a path,label,split CSV file)")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    csv_path = find_csv(Path(os.path.expanduser(str(root))))
    paths, labels, splits = read_rows(csv_path)
    by_split: dict[str, set[str]] = {s: set() for s in SPLITS}
    for label, split in zip(labels, splits, strict=True):
        by_split[split].add(label)
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        both = by_split[first] & by_split[second]
        if both:
            raise ValueError(
                f"{csv_path}: labels {sorted(both)[:5]} appear in both {first} and {second}; "
                "the splits must be class-disjoint"
            )
    dataset = file_dataset(
        paths,
        labels,
        root=csv_path.parent,
        skip_corrupt=skip_corrupt,
        mode="L" if channels == 1 else "RGB",
    )
    return class_disjoint_splits(
        dataset,
        sorted(by_split["train"]),
        sorted(by_split["test"]),
        val_classes=sorted(by_split["val"]) if by_split["val"] else None,
        source="csv",
        image_size=image_size,
        val_fraction=val_fraction,
        seed=seed,
        info={"root": str(csv_path)},
    )
