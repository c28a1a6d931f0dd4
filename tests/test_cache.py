"""Decode-once cache of a file source's training and evaluation splits (mbdl.data.cache)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mbdl.data import build_transforms, load_splits
from mbdl.data import cache as cache_module
from mbdl.data.batched import batched_training_data
from mbdl.data.cache import (
    DecodedEvaluationSplit,
    cache_side,
    decode_resized,
    decode_splits,
    decoded_evaluation_split,
    decoded_training_split,
)
from mbdl.data.splits import ArrayImageDataset
from mbdl.evaluate import split_metrics


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
    # rebuilt under a new key; the stale cache of the same files before the change is removed
    assert sorted(store.glob("decoded-*.u8")) != files
    assert len(list(store.glob("decoded-*.u8"))) == 1 and not files[0].exists()
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


@pytest.mark.parametrize(("image_size", "channels"), [(32, 3), (64, 3), (64, 1)])
def test_evaluation_splits_give_the_per_image_tensors_bit_for_bit(
    tmp_path: Path, image_size: int, channels: int
) -> None:
    splits = load_splits("folder", write_folder(tmp_path / "data"), image_size=image_size, seed=0)
    test = splits.test
    test.transform = build_transforms(False, image_size, channels, imagenet_norm=channels == 3)
    cached = decoded_evaluation_split(test, mode="memory")
    assert isinstance(cached, DecodedEvaluationSplit)
    assert cached.images.shape[1:3] == (image_size, image_size)
    assert len(cached) == len(test) and np.array_equal(cached.labels, test.labels)
    assert cached.class_names == test.class_names
    for i in range(len(test)):
        image, label = cached[i]
        expected, expected_label = test[i]
        assert torch.equal(image, expected) and label == expected_label
        assert cached.describe(i) == test.describe(i)
    assert cached.load_image(0).size == test.load_image(0).size  # the original, for thumbnails


def test_evaluation_cache_on_disk_is_keyed_by_the_transform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_folder(tmp_path / "data")
    store = tmp_path / "cache"
    val = load_splits("folder", root, image_size=64, seed=0).val
    first = decoded_evaluation_split(val, mode="disk", cache_dir=store)
    assert len(list(store.glob("decoded-*.u8"))) == 1
    monkeypatch.setattr(cache_module, "decode_all", lambda *args: pytest.fail("decoded again"))
    again = decoded_evaluation_split(val, mode="disk", cache_dir=store)
    assert all(torch.equal(again[i][0], first[i][0]) for i in range(len(val)))
    assert all(torch.equal(again[i][0], val[i][0]) for i in range(len(val)))
    monkeypatch.undo()
    val.transform = build_transforms(False, 32, 3)  # another size: another file
    smaller = decoded_evaluation_split(val, mode="disk", cache_dir=store)
    assert len(list(store.glob("decoded-*.u8"))) == 2 and smaller[0][0].shape == (3, 32, 32)


def test_evaluation_splits_left_alone(tmp_path: Path) -> None:
    splits = load_splits("folder", write_folder(tmp_path / "data"), image_size=32, seed=0)
    assert decoded_evaluation_split(splits.test, mode="off") is splits.test
    assert decoded_evaluation_split(splits.train) is splits.train  # random: not an eval transform
    splits.test.transform = T.Compose([T.Resize(32), T.ToTensor()])  # custom
    assert decoded_evaluation_split(splits.test) is splits.test
    glyphs = load_splits("glyphs", root=str(tmp_path / "glyphs"), image_size=32, max_classes=10)
    assert decoded_evaluation_split(glyphs.test) is glyphs.test  # already in memory
    with pytest.raises(ValueError, match="cache mode"):
        decoded_evaluation_split(splits.test, mode="sometimes")


def test_decode_splits_caches_every_split_a_run_reads_again(tmp_path: Path) -> None:
    splits = load_splits("folder", write_folder(tmp_path / "data"), image_size=32, seed=0)
    originals = (splits.val, splits.test)
    decode_splits(splits, "memory")
    assert isinstance(splits.train, ArrayImageDataset)
    for cached, original in zip((splits.val, splits.test), originals, strict=True):
        assert isinstance(cached, DecodedEvaluationSplit) and cached.source is original
    assert splits.query is None and splits.gallery is None


def test_trainer_evaluates_the_cached_splits_to_the_same_metrics(tmp_path: Path) -> None:
    from mbdl.config import load_config
    from mbdl.inference import evaluate_test, load_data
    from mbdl.train.trainer import Trainer

    root = write_folder(tmp_path / "data", classes=20, per_class=4)
    config = load_config(
        None,
        [
            "data.source=folder",
            f"data.root={root}",
            "data.image_size=16",
            "data.val_fraction=0.3",
            "model.backbone=smallcnn",
            "model.embedding_dim=8",
            "train.epochs=1",
            "train.batch_classes=2",
            "train.batch_per_class=2",
            "train.max_steps_per_epoch=1",
            "train.progress=false",
            "eval.report=false",
            "eval.kmeans_restarts=1",
            f"out={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(config)
    try:
        trainer.fit()
        metrics = trainer.test()
        assert isinstance(trainer.splits.val, DecodedEvaluationSplit)
        assert isinstance(trainer.splits.test, DecodedEvaluationSplit)
        with trainer._contiguous_model():  # as the trainer evaluates
            uncached, _, _ = evaluate_test(trainer.model, load_data(config), config, trainer.device)
    finally:
        trainer.close()
    table, meta = split_metrics(uncached)
    assert {key: metrics["test"][key] for key in table} == table  # exactly
    assert {key: metrics["meta"]["test"][key] for key in meta} == meta


def test_a_disk_too_small_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mbdl.errors import UserError

    splits = load_splits("folder", write_folder(tmp_path / "data"), image_size=64, seed=0)
    store = tmp_path / "cache"
    monkeypatch.setattr(cache_module, "disk_free", lambda folder: 1000)
    needed = len(splits.train) * 73 * 73 * 3 + cache_module.DISK_MARGIN
    with pytest.raises(UserError, match=f"needs {needed / 2**30:.2f} GiB free") as caught:
        decoded_training_split(splits.train, 64, 3, mode="disk", cache_dir=store)
    assert "\n" not in str(caught.value) and "data.cache=off" in str(caught.value)
    assert not store.exists() or not list(store.iterdir())  # nothing written
    # auto, with the memory also too small: per-image decoding, and the reason
    monkeypatch.setattr(cache_module, "available_memory", lambda: 1000)
    notes: list[str] = []
    same = decoded_training_split(splits.train, 64, 3, mode="auto", cache_dir=store, notes=notes)
    assert same is splits.train and notes and "decoded per image" in notes[0]


def test_a_cache_of_another_version_or_shape_is_rebuilt_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    splits = load_splits("folder", write_folder(tmp_path / "data"), image_size=64, seed=0)
    store = tmp_path / "cache"
    first = decoded_training_split(splits.train, 64, 3, mode="disk", cache_dir=store)
    expected = np.array(first.images)
    (path,) = store.glob("decoded-*.u8")
    record = path.with_suffix(".json")
    assert json.loads(record.read_text())["version"] == cache_module.CACHE_VERSION
    for meta in (
        {"version": cache_module.CACHE_VERSION - 1, "shape": list(expected.shape)},
        {"version": cache_module.CACHE_VERSION, "shape": [len(expected), 73 * 73 * 3]},
        None,  # no record: an interrupted or foreign file
    ):
        path.write_bytes(b"\xff" * expected.size)  # stale content of the right size
        if meta is None:
            record.unlink()
        else:
            record.write_text(json.dumps(meta))
        again = decoded_training_split(splits.train, 64, 3, mode="disk", cache_dir=store)
        assert np.array_equal(np.asarray(again.images), expected)


def test_large_jpegs_are_decoded_reduced_into_the_training_cache(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rng = np.random.default_rng(1)
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(3):
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC)
            image.save(root / f"c{c}" / f"{i}.jpg", quality=90)
    splits = load_splits("folder", root, image_size=64, seed=0, val_fraction=0.0)
    cached = decoded_training_split(splits.train, 64, 3, mode="memory")
    exact = np.stack(
        [decode_resized(splits.train.load_image(i), 73, 3) for i in range(len(splits.train))]
    )
    difference = np.abs(cached.images.astype(np.int16) - exact)
    assert cached.images.shape == exact.shape and 0 < difference.mean() < 2.0


def test_the_data_line_says_where_the_images_are_and_why(tmp_path: Path) -> None:
    splits = load_splits("folder", write_folder(tmp_path / "data"), image_size=32, seed=0)
    decode_splits(splits, "memory", num_workers="auto")
    line = splits.info["data_path"]
    assert "data.cache=memory" in line and "loader worker(s): auto: whole batches" in line
    from mbdl.train.preflight import describe_data

    assert line in describe_data(splits)
    other = load_splits("folder", write_folder(tmp_path / "other"), image_size=32, seed=0)
    decode_splits(other, "off", num_workers=3)
    assert other.info["data_path"].startswith("data.cache=off")
    assert "3 loader worker(s): data.num_workers" in other.info["data_path"]


def test_data_cache_off_is_read_as_off_not_as_false() -> None:
    from mbdl.config import load_config

    assert load_config(None, ["data.cache=off"]).data.cache == "off"  # YAML 1.1: off is false
    assert load_config(None, ["data.cache=disk"]).data.cache == "disk"


def test_train_refuses_a_disk_too_small_in_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib
    import io

    from mbdl.cli import main

    root = write_folder(tmp_path / "data", classes=6, per_class=4)
    monkeypatch.setenv("MBDL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache_module, "disk_free", lambda folder: 1000)
    argv = [
        "train",
        "data.source=folder",
        f"data.root={root}",
        "data.image_size=64",
        "data.val_fraction=0",
        "data.cache=disk",
        "model.backbone=smallcnn",
        "model.embedding_dim=8",
        "train.epochs=1",
        "train.batch_classes=2",
        "train.batch_per_class=2",
        "train.max_steps_per_epoch=1",
        "train.num_threads=1",
        "train.progress=false",
        "train.device=cpu",
        f"out={tmp_path / 'run'}",
    ]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "the decoded-image cache needs" in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not list((tmp_path / "cache").glob("decoded-*"))


def test_a_source_changed_in_mtime_or_size_alone_is_never_read_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits = load_splits("folder", write_folder(tmp_path / "data"), image_size=64, seed=0)
    store = tmp_path / "cache"
    first = decoded_training_split(splits.train, 64, 3, mode="disk", cache_dir=store)
    expected = np.array(first.images)
    decoded: list[int] = []
    decode_all = cache_module.decode_all

    def counting(*args: Any, **kwargs: Any) -> Any:
        decoded.append(1)
        return decode_all(*args, **kwargs)

    monkeypatch.setattr(cache_module, "decode_all", counting)
    source = Path(splits.train.describe(0))
    before = source.stat()
    # other pixels of another size, the mtime put back as it was: decoded again, the new pixels
    Image.new("RGB", (50, 40), (0, 0, 255)).save(source)
    assert source.stat().st_size != before.st_size
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    second = decoded_training_split(splits.train, 64, 3, mode="disk", cache_dir=store)
    assert decoded == [1] and (np.asarray(second.images[0]) == [0, 0, 255]).all()
    assert np.array_equal(np.asarray(second.images[1:]), expected[1:])
    # then the mtime alone (the same bytes): decoded again, not trusted
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    third = decoded_training_split(splits.train, 64, 3, mode="disk", cache_dir=store)
    assert decoded == [1, 1] and np.array_equal(np.asarray(third.images), np.asarray(second.images))
    assert len(list(store.glob("decoded-*.u8"))) == 1  # the stale caches removed


def test_train_names_a_corrupt_jpeg_among_thousands_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib
    import io

    from mbdl.cli import main

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in range(40):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(30):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c:02d}" / f"{i:02d}.jpg", quality=90)
    corrupt = root / "c23" / "17.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:-60])  # the header whole, the pixels cut short
    monkeypatch.setenv("MBDL_CACHE", str(tmp_path / "cache"))
    argv = [
        "train",
        "data.source=folder",
        f"data.root={root}",
        "data.image_size=8",
        "data.val_fraction=0",
        "data.cache=disk",
        "model.backbone=smallcnn",
        "model.embedding_dim=8",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
        "train.num_threads=1",
        "train.progress=false",
        "train.device=cpu",
        f"out={tmp_path / 'run'}",
    ]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and str(corrupt) in lines[0] and "1200" in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not list((tmp_path / "cache").glob("decoded-*"))
