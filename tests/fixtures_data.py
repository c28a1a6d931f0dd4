"""Builders of tiny data sets in the official on-disk layouts (CUB-200-2011, Cars196, Stanford
Online Products, In-Shop), image folders, CSV lists and IDX files, for the data tests."""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

IMAGE_SIZE = (12, 10)  # width, height


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = IMAGE_SIZE) -> bytes:
    """A small encoded colour image whose colour depends on ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, seed: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt))


def write_corrupt(path: Path) -> None:
    """A file with a JPEG name whose content is not an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a jpeg")


def write_undecodable_png(path: Path, seed: int = 0) -> None:
    """A PNG whose chunks (and their CRCs) are valid, so it opens and passes PIL's ``verify()``,
    but whose compressed pixel data is garbage, so decoding it fails."""
    data = bytearray(image_bytes(seed, "PNG"))
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    data[start : start + length] = np.random.default_rng(seed).bytes(length)
    crc = zlib.crc32(bytes(data[start - 4 : start + length])) & 0xFFFFFFFF
    data[start + length : start + length + 4] = crc.to_bytes(4, "big")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


# -- CUB-200-2011 -------------------------------------------------------------------------------


def make_cub(root: Path, images_per_class: int = 2, num_classes: int = 200) -> Path:
    """``root/CUB_200_2011`` with ``num_classes`` classes of ``images_per_class`` images."""
    base = root / "CUB_200_2011"
    images, labels, classes, boxes, split = [], [], [], [], []
    image_id = 0
    for class_id in range(1, num_classes + 1):
        folder = f"{class_id:03d}.Bird_{class_id}"
        classes.append(f"{class_id} {folder}")
        for k in range(images_per_class):
            image_id += 1
            name = f"{folder}/Bird_{class_id}_{k:04d}_{image_id}.jpg"
            write_image(base / "images" / name, image_id)
            images.append(f"{image_id} {name}")
            labels.append(f"{image_id} {class_id}")
            boxes.append(f"{image_id} 1.0 2.0 6.0 5.0")
            split.append(f"{image_id} {k % 2}")
    for filename, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("classes.txt", classes),
        ("bounding_boxes.txt", boxes),
        ("train_test_split.txt", split),
    ):
        (base / filename).write_text("\n".join(lines) + "\n")
    return base


def make_tgz(source: Path, archive: Path) -> Path:
    """A gzipped tar of the folder ``source`` (stored under its own name)."""
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(source, arcname=source.name)
    return archive


# -- Cars196 ------------------------------------------------------------------------------------


def make_cars(root: Path, images_per_class: int = 2, num_classes: int = 196) -> Path:
    """``root/car_ims/*.jpg`` and a real ``root/cars_annos.mat`` in the official struct layout."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    count = num_classes * images_per_class
    annotations = np.zeros((1, count), dtype=[(f, "O") for f in fields])
    index = 0
    for class_id in range(1, num_classes + 1):
        for k in range(images_per_class):
            relative = f"car_ims/{index + 1:06d}.jpg"
            write_image(root / relative, 10_000 + index)
            values = [relative, 2, 3, 9, 8, class_id, k % 2]
            for field, value in zip(fields, values, strict=True):
                annotations[0, index][field] = (
                    value if isinstance(value, str) else np.array([[value]], dtype=np.uint16)
                )
            index += 1
    class_names = np.empty((1, num_classes), dtype=object)
    for class_id in range(1, num_classes + 1):
        class_names[0, class_id - 1] = f"Make Model {class_id} 2012"
    scipy.io.savemat(
        root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names}
    )
    return root


# -- Stanford Online Products -------------------------------------------------------------------

SOP_SUPER_CLASSES = ("bicycle", "cabinet", "chair")


def make_sop(root: Path, train_classes: int = 6, test_classes: int = 5, per_class: int = 2) -> Path:
    """``root/Stanford_Online_Products`` with Ebay_train.txt (classes 1..train_classes) and
    Ebay_test.txt (the next test_classes); super class of class c = c % 3 + 1."""
    base = root / "Stanford_Online_Products"
    image_id = 0
    for filename, class_ids in (
        ("Ebay_train.txt", range(1, train_classes + 1)),
        ("Ebay_test.txt", range(train_classes + 1, train_classes + test_classes + 1)),
    ):
        lines = ["image_id class_id super_class_id path"]
        for class_id in class_ids:
            super_id = class_id % 3 + 1
            for k in range(per_class):
                image_id += 1
                path = f"{SOP_SUPER_CLASSES[super_id - 1]}_final/{class_id}_{k}.JPG"
                write_image(base / path, 20_000 + image_id)
                lines.append(f"{image_id} {class_id} {super_id} {path}")
        (base / filename).write_text("\n".join(lines) + "\n")
    return base


# -- In-Shop ------------------------------------------------------------------------------------


def make_inshop(root: Path, train_items: int = 6, test_items: int = 4) -> Path:
    """``root/list_eval_partition.txt`` and ``root/img/...``: each train item has 2 train images;
    each test item 1 query and 2 gallery images."""
    rows = []
    number = 0
    for item in range(1, train_items + test_items + 1):
        item_id = f"id_{item:08d}"
        statuses = ["train", "train"] if item <= train_items else ["query", "gallery", "gallery"]
        for k, status in enumerate(statuses):
            number += 1
            name = f"img/WOMEN/Dresses/{item_id}/{k + 1:02d}_1_front.jpg"
            write_image(root / name, 30_000 + number)
            rows.append(f"{name}  {item_id}  {status}")
    header = ["image_name item_id evaluation_status"]
    (root / "list_eval_partition.txt").write_text(
        "\n".join([str(len(rows)), *header, *rows]) + "\n"
    )
    return root


# -- generic sources ----------------------------------------------------------------------------


def make_folder(root: Path, num_classes: int = 6, per_class: int = 3) -> Path:
    """``root/class_<c>/<k>.png`` (c = 0..num_classes-1), plus a hidden file to be ignored."""
    for c in range(num_classes):
        for k in range(per_class):
            write_image(root / f"class_{c}" / f"{k}.png", 40_000 + c * 100 + k, fmt="PNG")
    (root / "class_0" / ".hidden.png").write_bytes(b"")
    (root / "class_0" / "notes.txt").write_text("not an image")
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (uint8), gzipped when ``path`` ends in ``.gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def make_idx(
    root: Path, per_class: tuple[int, int] = (3, 2), gz: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Train and t10k IDX files with 10 classes (``per_class`` images each in train / t10k), 28x28;
    image pixel [0, 0] holds the item's index in the concatenated data. Returns (images, labels)."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    all_images, all_labels = [], []
    offset = 0
    for prefix, count in (("train", per_class[0]), ("t10k", per_class[1])):
        labels = np.repeat(np.arange(10, dtype=np.uint8), count)
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(offset, offset + len(labels))
        images[:, 5:20, 5:20] = (labels * 20 + 30)[:, None, None]
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        all_images.append(images)
        all_labels.append(labels)
        offset += len(labels)
    return np.concatenate(all_images), np.concatenate(all_labels).astype(np.int64)


#: the smallest training run on glyphs: one step of a tiny model, no report
TINY_GLYPH_RUN = [
    "data.max_classes=24",
    "model.embedding_dim=8",
    "train.epochs=1",
    "train.batch_classes=4",
    "train.batch_per_class=2",
    "train.max_steps_per_epoch=1",
    "train.device=cpu",
    "train.num_threads=1",
    "train.progress=false",
    "eval.ks=[1]",
    "eval.report=false",
]


def make_small_model_dir(folder: Path) -> Path:
    """An untrained smallcnn model directory (8-d, 16 px colour) written through a checkpoint."""
    import torch

    from mbdl.export import save_pretrained
    from mbdl.models import build_model
    from mbdl.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("smallcnn", 8, in_channels=3)
    state = {
        "config": {},
        "model_args": dict(model.build_args),
        "data_args": {"image_size": 16, "channels": 3},
        "model_state": model.state_dict(),
    }
    save_checkpoint(folder / "model.pt", state)
    return save_pretrained(folder / "model.pt", folder / "model")
