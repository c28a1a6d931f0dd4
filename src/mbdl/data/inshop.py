"""In-Shop Clothes Retrieval (DeepFashion; Liu et al., CVPR 2016) in its official layout.

``root`` holds ``list_eval_partition.txt`` (the image count, a header line
``image_name item_id evaluation_status``, then one line per image with status ``train``,
``query`` or ``gallery``) and the ``img/`` folder the image names point into (names start with
``img/``). The split is the file's: ``train`` items (3,997) train, validation items are carved
from them; ``query`` and ``gallery`` (3,985 other items) are the test protocol: each query image
retrieves from the gallery.

``Splits.query`` and ``Splits.gallery`` share one label space (an item has the same label in
both); ``Splits.test`` is their union (query images first) in that same label space, so any code
that wants "the test images" (thumbnails, a plain all-vs-all check) sees every test item. The
evaluator uses query against gallery whenever ``Splits.query`` is set.

The data set is distributed through the DeepFashion Google Drive folder after accepting its
agreement (``Img/img.zip``, ``Eval/list_eval_partition.txt``), which has no stable direct URL or
published checksum: :func:`download` needs ``url`` (an archive holding ``img/`` and
``list_eval_partition.txt``) and, when known, its ``md5``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mbdl.data.base import Splits
from mbdl.data.download import DownloadError, download_and_extract
from mbdl.data.files import class_disjoint_splits, file_dataset, find_root

PROJECT_PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
PARTITION_FILE = "list_eval_partition.txt"
FOLDER = "inshop"
STATUSES = ("train", "query", "gallery")


def download(
    root: str | os.PathLike[str],
    *,
    url: str | None = None,
    md5: str | None = None,
    filename: str = "inshop.zip",
) -> Path:
    """Fetch an In-Shop archive from ``url`` into ``root`` (MD5 ``md5`` when given) and extract it
    atomically; returns ``root``. Does nothing when ``list_eval_partition.txt`` is there."""
    base = Path(os.path.expanduser(str(root)))
    if (base / PARTITION_FILE).is_file():
        return base
    if url is None:
        raise DownloadError(
            f"In-Shop has no direct download URL: get Img/img.zip and Eval/{PARTITION_FILE} from "
            f"{PROJECT_PAGE} (Google Drive, after the agreement), then put img/ and "
            f"{PARTITION_FILE} in {base}"
        )
    return download_and_extract(url, base, filename, md5)


def read_partition(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(image_names, item_ids, statuses)`` of ``list_eval_partition.txt``."""
    if not path.is_file():
        raise FileNotFoundError(f"In-Shop partition file missing: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) < 2 or lines[1].split()[:3] != ["image_name", "item_id", "evaluation_status"]:
        raise ValueError(
            f"{path}: expected a count line, then 'image_name item_id evaluation_status'"
        )
    names, items, statuses = [], [], []
    for number, line in enumerate(lines[2:], start=3):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3 or fields[2] not in STATUSES:
            raise ValueError(
                f"{path}:{number}: expected 'image item train|query|gallery', got {line!r}"
            )
        names.append(fields[0])
        items.append(fields[1])
        statuses.append(fields[2])
    declared = lines[0].strip()
    if declared.isdigit() and int(declared) != len(names):
        raise ValueError(f"{path}: declares {declared} images but lists {len(names)}")
    return names, items, np.asarray(statuses)


def load_splits(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    val_fraction: float = 0.15,
    seed: int = 0,
    skip_corrupt: bool = False,
) -> Splits:
    """In-Shop: train items (validation carved from them); query and gallery for the test."""
    if root is None:
        raise ValueError(
            "data source 'inshop' needs data.root (the folder with list_eval_partition.txt)"
        )
    base = find_root(root, PARTITION_FILE, FOLDER)
    names, items, statuses = read_partition(base / PARTITION_FILE)
    item_array = np.asarray(items)
    train_items = np.unique(item_array[statuses == "train"])
    test_items = np.unique(item_array[statuses != "train"])
    shared = np.intersect1d(train_items, test_items)
    if len(shared):
        raise ValueError(
            f"{base / PARTITION_FILE}: items {shared[:5].tolist()} are in train and test"
        )
    dataset = file_dataset(
        names, item_array, root=base, skip_corrupt=skip_corrupt, attributes={"status": statuses}
    )
    splits = class_disjoint_splits(
        dataset,
        train_items.tolist(),
        test_items.tolist(),
        source="inshop",
        image_size=image_size,
        val_fraction=val_fraction,
        seed=seed,
        info={"root": str(base)},
    )
    status = dataset.attributes["status"]
    test_names = set(test_items.tolist())
    is_test = np.asarray([dataset.class_names[c] in test_names for c in dataset.labels], dtype=bool)
    label_space = np.unique(dataset.labels[is_test])
    query_idx = np.flatnonzero(status == "query")
    gallery_idx = np.flatnonzero(status == "gallery")
    if len(query_idx) == 0 or len(gallery_idx) == 0:
        raise ValueError(f"{base / PARTITION_FILE}: needs both query and gallery images")
    splits.query = dataset.subset(query_idx, label_space)
    splits.gallery = dataset.subset(gallery_idx, label_space)
    splits.test = dataset.subset(np.concatenate([query_idx, gallery_idx]), label_space)
    return splits
