"""Decode-once cache of a file source's training split (mbdl.data.cache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T

from mbdl.data import cache as cache_module
from mbdl.data import load_splits
from mbdl.data.batched import batched_training_data
from mbdl.data.cache import cache_side, decode_resized, decoded_training_split
from mbdl.data.splits import ArrayImageDataset


def write_folder(
    root: Path, classes: int = 8, per_class: int = 5, size: tuple[int, int] = (50, 40)
) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_small_images_are_cached_exactly_as_the_per_image_path_prepares_them(
    tmp_path: Path,
) -> None:
    splits = load_splits("folder", write_folder(tmp_path / "data"), image_size=32, seed=0)
    train = splits.train
    cached = decoded_training_split(train, 32, 3, mode="memory")
    assert isinstance(cached, ArrayImageDataset) and cached.images.shape[1:] == (32, 32, 3)
    assert np.array_equal(cached.labels, train.labels)
    assert cached.class_names == train.class_names
    assert [cached.describe(i) for i in range(3)] == [train.describe(i) for i in range(3)]
    prefix = T.Compose([T.Resize(32), T.CenterCrop(32)])  # build_transforms' deterministic part
    for i in range(len(train)):
        expected = np.asarray(prefix(train.load_image(i).convert("RGB")))
        assert np.array_equal(cached.images[i], expected)
    batches = batched_training_data(cached)
    assert batches is not None and batches.augment.kind == "affine"


def test_large_images_keep_the_eval_resize_margin_for_crops() -> None:
    assert cache_side(32) == 32 and cache_side(64) == 73 and cache_side(224) == 256
    image = Image.new("RGB", (300, 200))
    assert decode_resized(image, 73, 3).shape == (73, 73, 3)
    assert decode_resized(image, 73, 1).shape == (73, 73)


def test_disk_cache_is_reused_and_keyed_by_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_folder(tmp_path / "data")
    splits = load_splits("folder", root, image_size=64, seed=0)
    store = tmp_path / "cache"
    first = decoded_training_split(splits.train, 64, 3, mode="disk", cache_dir=store)
    files = sorted(store.glob("decoded-*.u8"))
    assert len(files) == 1 and not list(store.glob("*.tmp"))
    assert first.images.shape == (len(splits.train), 73, 73, 3)
    assert batched_training_data(first) is not None  # crop augmentation, batched

    def fail(*args: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_module, "decode_all", fail)
    again = decoded_training_split(splits.train, 64, 3, mode="disk", cache_dir=store)
    assert np.array_equal(np.asarray(again.images), np.asarray(first.images))
    monkeypatch.undo()
    changed = Path(splits.train.describe(0))
    Image.new("RGB", (50, 40), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(1, 1))
    third = decoded_training_split(splits.train, 64, 3, mode="disk", cache_dir=store)
    assert len(list(store.glob("decoded-*.u8"))) == 2
    assert (np.asarray(third.images[0]) == [255, 0, 0]).all()


def test_what_is_left_alone(tmp_path: Path) -> None:
    splits = load_splits("folder", write_folder(tmp_path / "data"), image_size=32, seed=0)
    assert decoded_training_split(splits.train, 32, 3, mode="off") is splits.train
    splits.train.transform = T.ToTensor()  # a custom transform must see the original image
    assert decoded_training_split(splits.train, 32, 3) is splits.train
    glyphs = load_splits("glyphs", root=str(tmp_path / "glyphs"), image_size=32, max_classes=10)
    assert decoded_training_split(glyphs.train, 32, 1) is glyphs.train  # already in memory
    with pytest.raises(ValueError, match="cache mode"):
        decoded_training_split(splits.train, 32, 3, mode="sometimes")
