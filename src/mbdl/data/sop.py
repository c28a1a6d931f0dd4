"""Stanford Online Products (Song et al., CVPR 2016) in its official layout.

``root`` is the extracted ``Stanford_Online_Products`` folder or its parent, with
``Ebay_train.txt`` and ``Ebay_test.txt`` (a header line, then
``image_id class_id super_class_id path``, paths relative to the folder). The split is the
files': the classes of ``Ebay_train.txt`` (11,318 products) train, those of ``Ebay_test.txt``
(11,316) test; validation classes are carved from the training classes. Each dataset keeps the
super-class of every image in ``attributes["super_class_id"]`` (1..12) and the super-class names
(the path's first folder without ``_final``) in ``attributes["super_class_name"]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mbdl.data.base import Splits
from mbdl.data.download import download_and_extract
from mbdl.data.files import class_disjoint_splits, file_dataset, find_root

#: the Google Drive link on the authors' page (github.com/rksltnl/Deep-Metric-Learning-CVPR16)
URL = "https://drive.usercontent.google.com/download?id=1TclrpQOF_ullUP99wk_gjGN8pKvtErG8&export=download&confirm=t"
#: the original host, offline since about 2022
LEGACY_URL = "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip"
FILENAME = "Stanford_Online_Products.zip"
MD5 = "7f73d41a2f44250d4779881525aea32e"
FOLDER = "Stanford_Online_Products"


def download(root: str | os.PathLike[str], *, url: str = URL, md5: str | None = MD5) -> Path:
    """Download ``Stanford_Online_Products.zip`` into ``root``, verify its MD5 and extract it
    (atomically); returns the ``Stanford_Online_Products`` folder. Does nothing when present."""
    target = Path(os.path.expanduser(str(root))) / FOLDER
    if (target / "Ebay_train.txt").is_file():
        return target
    download_and_extract(url, root, FILENAME, md5)
    return target


def read_list(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(class_ids, super_class_ids, paths)`` of one ``Ebay_*.txt`` file."""
    if not path.is_file():
        raise FileNotFoundError(f"Stanford Online Products file missing: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or lines[0].split()[:2] != ["image_id", "class_id"]:
        raise ValueError(f"{path}: expected the header 'image_id class_id super_class_id path'")
    class_ids, super_ids, paths = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split(None, 3)
        if len(fields) != 4:
            raise ValueError(f"{path}:{number}: expected 4 fields, got {line!r}")
        class_ids.append(int(fields[1]))
        super_ids.append(int(fields[2]))
        paths.append(fields[3])
    return np.asarray(class_ids, np.int64), np.asarray(super_ids, np.int64), paths


def load_splits(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    val_fraction: float = 0.15,
    seed: int = 0,
    skip_corrupt: bool = False,
) -> Splits:
    """SOP with the ``Ebay_train.txt`` classes for training (validation carved from them) and
    the ``Ebay_test.txt`` classes for testing."""
    if root is None:
        raise ValueError("data source 'sop' needs data.root (the Stanford_Online_Products folder)")
    base = find_root(root, "Ebay_train.txt", FOLDER)
    train_ids, train_super, train_paths = read_list(base / "Ebay_train.txt")
    test_ids, test_super, test_paths = read_list(base / "Ebay_test.txt")
    shared = np.intersect1d(train_ids, test_ids)
    if len(shared):
        raise ValueError(
            f"{base}: class ids {shared[:5].tolist()} are in both Ebay_train and Ebay_test"
        )
    paths = train_paths + test_paths
    super_ids = np.concatenate([train_super, test_super])
    super_names = np.asarray(
        [Path(p).parts[0].removesuffix("_final") if Path(p).parts else "" for p in paths]
    )
    dataset = file_dataset(
        paths,
        np.concatenate([train_ids, test_ids]),
        root=base,
        skip_corrupt=skip_corrupt,
        attributes={"super_class_id": super_ids, "super_class_name": super_names},
    )
    return class_disjoint_splits(
        dataset,
        [str(c) for c in np.unique(train_ids)],
        [str(c) for c in np.unique(test_ids)],
        source="sop",
        image_size=image_size,
        val_fraction=val_fraction,
        seed=seed,
        info={"root": str(base)},
    )
