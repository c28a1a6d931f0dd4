"""Cars196 (Krause et al., 3dRR 2013) in its official metric-learning layout.

``root`` holds ``cars_annos.mat`` and ``car_ims/``. ``cars_annos.mat`` (read with
``scipy.io.loadmat``) has a struct array ``annotations`` with fields ``relative_im_path``
(``car_ims/000001.jpg``), ``bbox_x1``, ``bbox_y1``, ``bbox_x2``, ``bbox_y2`` (1-based, inclusive),
``class`` (1..196) and ``test`` (the classification split, not used), and a cell array
``class_names``.

The metric-learning split (Song et al., CVPR 2016) trains on classes 1-98 and tests on classes
99-196. Validation classes are carved from classes 1-98. ``bbox=True`` crops to the box.

The Stanford host of the files (``ai.stanford.edu/~jkrause/car196``) has been unreliable since
2023; :func:`download` takes other URLs (a mirror, a ``file://`` path) for the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from mbdl.data.base import Splits
from mbdl.data.download import download_and_extract
from mbdl.data.files import class_disjoint_splits, file_dataset, find_root

IMAGES_URL = "http://ai.stanford.edu/~jkrause/car196/car_ims.tgz"
IMAGES_FILENAME = "car_ims.tgz"
IMAGES_MD5 = "d5c8f0aa497503f355e17dc7886c3f14"
ANNOTATIONS_URL = "http://ai.stanford.edu/~jkrause/car196/cars_annos.mat"
ANNOTATIONS_FILENAME = "cars_annos.mat"
ANNOTATIONS_MD5 = "b407c6086d669747186bd1d764ff9dbc"
TRAIN_CLASS_IDS = range(1, 99)
TEST_CLASS_IDS = range(99, 197)


def download(
    root: str | os.PathLike[str],
    *,
    url: str = IMAGES_URL,
    md5: str | None = IMAGES_MD5,
    annotations_url: str = ANNOTATIONS_URL,
    annotations_md5: str | None = ANNOTATIONS_MD5,
) -> Path:
    """Download ``car_ims.tgz`` (extracted to ``car_ims/``) and ``cars_annos.mat`` into ``root``,
    verifying both MD5s; returns ``root``. Does nothing when both are already there."""
    base = Path(os.path.expanduser(str(root)))
    if not (base / ANNOTATIONS_FILENAME).is_file():
        download_and_extract(
            annotations_url, base, ANNOTATIONS_FILENAME, annotations_md5, extract=False
        )
    if not (base / "car_ims").is_dir():
        download_and_extract(url, base, IMAGES_FILENAME, md5)
    return base


def _text(value: Any) -> str:
    """A MATLAB char array as loaded by scipy (``str``, or an array holding one string)."""
    if isinstance(value, str):
        return value
    array = np.asarray(value).reshape(-1)
    return str(array[0]) if array.size else ""


def read_annotations(path: str | Path) -> dict[str, Any]:
    """``cars_annos.mat`` as arrays: ``paths``, ``class_ids``, ``bbox`` (``x1, y1, x2, y2``, 1-based
    inclusive), ``test`` and ``class_names`` (by class id - 1)."""
    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # scipy raises MatReadError, ValueError, NotImplementedError, ...
        raise ValueError(f"cannot read {path}: {error}") from None
    if "annotations" not in mat:
        raise ValueError(f"{path} has no 'annotations' struct array")
    annotations = np.atleast_1d(mat["annotations"])
    fields = annotations.dtype.names or ()
    needed = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class")
    absent = [f for f in needed if f not in fields]
    if absent:
        raise ValueError(f"{path}: annotations lack the fields {absent}")
    names_raw = np.atleast_1d(mat.get("class_names", np.asarray([], dtype=object)))
    return {
        "paths": [_text(p) for p in annotations["relative_im_path"]],
        "class_ids": np.asarray([int(c) for c in annotations["class"]], dtype=np.int64),
        "bbox": np.asarray(
            [
                [float(a[f]) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")]
                for a in annotations
            ],
            dtype=np.float64,
        ),
        "test": np.asarray(
            [int(t) for t in annotations["test"]] if "test" in fields else [], dtype=np.int64
        ),
        "class_names": [_text(n) for n in names_raw],
    }


def load_splits(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    val_fraction: float = 0.15,
    seed: int = 0,
    bbox: bool = False,
    skip_corrupt: bool = False,
) -> Splits:
    """Cars196 with classes 1-98 for training (validation carved from them), 99-196 test."""
    if root is None:
        raise ValueError("data source 'cars' needs data.root (the folder with cars_annos.mat)")
    base = find_root(root, ANNOTATIONS_FILENAME, "cars196")
    annotations = read_annotations(base / ANNOTATIONS_FILENAME)
    names = annotations["class_names"]

    def name(class_id: int) -> str:
        return names[class_id - 1] if 0 < class_id <= len(names) else str(class_id)

    boxes = None
    if bbox:  # 1-based inclusive -> PIL's 0-based (left, upper, right, lower)
        boxes = annotations["bbox"] - np.asarray([1.0, 1.0, 0.0, 0.0])
    class_ids = annotations["class_ids"]
    dataset = file_dataset(
        annotations["paths"],
        class_ids,
        root=base,
        class_names={c: name(c) for c in np.unique(class_ids).tolist()},
        bbox=boxes,
        skip_corrupt=skip_corrupt,
    )
    return class_disjoint_splits(
        dataset,
        [name(c) for c in TRAIN_CLASS_IDS],
        [name(c) for c in TEST_CLASS_IDS],
        source="cars",
        image_size=image_size,
        val_fraction=val_fraction,
        seed=seed,
        info={"root": str(base), "bbox": bbox},
    )
