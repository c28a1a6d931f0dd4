"""CUB-200-2011 (Wah et al., Caltech technical report CNS-TR-2011-001) in its official layout.

``root`` is the extracted ``CUB_200_2011`` folder or its parent::

    CUB_200_2011/images.txt               <image_id> <relative path under images/>
    CUB_200_2011/image_class_labels.txt   <image_id> <class_id 1..200>
    CUB_200_2011/classes.txt              <class_id> <class name>
    CUB_200_2011/bounding_boxes.txt       <image_id> <x> <y> <width> <height>   (pixels)
    CUB_200_2011/images/<class folder>/<image>.jpg

The metric-learning split (Song et al., CVPR 2016) trains on classes 1-100 and tests on classes
101-200 (``train_test_split.txt`` is the classification split and is not used). Validation
classes are carved from classes 1-100. ``bbox=True`` crops every image to its bounding box.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mbdl.data.base import Splits
from mbdl.data.download import download_and_extract
from mbdl.data.files import class_disjoint_splits, file_dataset, find_root

URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
FILENAME = "CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"
FOLDER = "CUB_200_2011"
TRAIN_CLASS_IDS = range(1, 101)
TEST_CLASS_IDS = range(101, 201)


def download(root: str | os.PathLike[str], *, url: str = URL, md5: str | None = MD5) -> Path:
    """Download ``CUB_200_2011.tgz`` into ``root``, verify its MD5 and extract it (atomically);
    returns the ``CUB_200_2011`` folder. Does nothing when it is already there."""
    target = Path(os.path.expanduser(str(root))) / FOLDER
    if (target / "images.txt").is_file():
        return target
    download_and_extract(url, root, FILENAME, md5)
    return target


def _read_table(path: Path, columns: int) -> list[list[str]]:
    """Rows of a whitespace-separated file: the first ``columns - 1`` fields, then the rest."""
    if not path.is_file():
        raise FileNotFoundError(f"CUB-200-2011 file missing: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(None, columns - 1)
        if len(fields) != columns:
            raise ValueError(f"{path}:{number}: expected {columns} fields, got {line!r}")
        rows.append(fields)
    return rows


def load_splits(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    val_fraction: float = 0.15,
    seed: int = 0,
    bbox: bool = False,
    skip_corrupt: bool = False,
) -> Splits:
    """CUB-200-2011 with classes 1-100 for training (validation carved from them), 101-200 test."""
    if root is None:
        raise ValueError("data source 'cub' needs data.root (the CUB_200_2011 folder)")
    base = find_root(root, "images.txt", FOLDER)
    images = {i: p for i, p in _read_table(base / "images.txt", 2)}
    classes = {int(i): name for i, name in _read_table(base / "classes.txt", 2)}
    image_class = {i: int(c) for i, c in _read_table(base / "image_class_labels.txt", 2)}
    missing = sorted(set(images) - set(image_class), key=int)
    if missing:
        raise ValueError(
            f"{base / 'image_class_labels.txt'} has no class for image id {missing[0]}"
        )
    ids = sorted(images, key=int)
    boxes = None
    if bbox:
        table = {r[0]: r[1:] for r in _read_table(base / "bounding_boxes.txt", 5)}
        if not set(ids) <= set(table):
            raise ValueError(f"{base / 'bounding_boxes.txt'} lacks boxes for some images")
        xywh = np.asarray([[float(v) for v in table[i]] for i in ids], dtype=np.float64)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    class_ids = np.asarray([image_class[i] for i in ids], dtype=np.int64)
    dataset = file_dataset(
        [Path("images") / images[i] for i in ids],
        class_ids,
        root=base,
        class_names={c: classes.get(c, str(c)) for c in np.unique(class_ids).tolist()},
        bbox=boxes,
        skip_corrupt=skip_corrupt,
    )
    info: dict[str, Any] = {"root": str(base), "bbox": bbox}
    return class_disjoint_splits(
        dataset,
        [classes.get(c, str(c)) for c in TRAIN_CLASS_IDS],
        [classes.get(c, str(c)) for c in TEST_CLASS_IDS],
        source="cub",
        image_size=image_size,
        val_fraction=val_fraction,
        seed=seed,
        info=info,
    )
