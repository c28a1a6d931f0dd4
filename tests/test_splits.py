"""Class-disjoint split helpers, in-memory datasets and the ``load_splits`` dispatcher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mbdl.data
from mbdl.config import ConfigError, load_config
from mbdl.data import SOURCES, Source, Splits, load_splits
from mbdl.data.sources import check_signature
from mbdl.data.splits import (
    ArrayImageDataset,
    SubsetImageDataset,
    attach_transforms,
    carve_validation,
    carve_validation_classes,
    relabel_contiguous,
    split_classes,
)


def small_dataset(
    num_classes: int = 10, per_class: int = 3, rgb: bool = False
) -> ArrayImageDataset:
    rng = np.random.default_rng(0)
    shape = (num_classes * per_class, 12, 10) + ((3,) if rgb else ())
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes), per_class)
    return ArrayImageDataset(images, labels, [f"class{c}" for c in range(num_classes)])


def test_relabel_contiguous_round_trips() -> None:
    labels = np.array([7, 3, 3, 42, 7, -1])
    new, originals = relabel_contiguous(labels)
    assert new.dtype == np.int64
    assert new.tolist() == [2, 1, 1, 3, 2, 0]
    assert np.array_equal(originals[new], labels)
    with pytest.raises(ValueError, match="one-dimensional"):
        relabel_contiguous(np.zeros((2, 2)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("num_classes", "fraction", "expected"), [(100, 0.15, 15), (7, 0.15, 1)])
def test_carve_validation_classes(
    seed: int, num_classes: int, fraction: float, expected: int
) -> None:
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes) * 3, 4))
    train, val = carve_validation_classes(labels, fraction, seed)
    assert len(np.unique(labels[val])) == expected
    assert not set(labels[train]) & set(labels[val])
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    again = carve_validation_classes(labels, fraction, seed)
    assert np.array_equal(again[1], val)


def test_carve_validation_classes_depends_on_seed_and_edge_cases() -> None:
    labels = np.repeat(np.arange(50), 2)
    picks = {
        tuple(np.unique(labels[carve_validation_classes(labels, 0.2, s)[1]])) for s in range(5)
    }
    assert len(picks) > 1
    train, val = carve_validation_classes(labels, 0.0, 0)
    assert len(val) == 0 and len(train) == len(labels)
    with pytest.raises(ValueError, match="val_fraction"):
        carve_validation_classes(labels, 1.0, 0)
    with pytest.raises(ValueError, match="leaves no training class"):
        carve_validation_classes(np.zeros(5, dtype=np.int64), 0.5, 0)


def test_split_classes_groups_and_overlap() -> None:
    labels = np.array([1, 2, 3, 4, 1, 2, 3, 4])
    train, test = split_classes(labels, [[1, 2], [3, 4]])
    assert train.tolist() == [0, 1, 4, 5] and test.tolist() == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="overlap"):
        split_classes(labels, [[1, 2], [2, 3]])


def test_array_dataset_images_labels_and_describe() -> None:
    grey = small_dataset()
    assert len(grey) == 30 and grey.num_classes == 10 and grey.channels == 1
    image = grey.load_image(4)
    assert image.mode == "L" and image.size == (10, 12)
    assert np.array_equal(np.asarray(image), grey.images[4])
    assert grey.describe(4) == "class1 #4"
    rgb = small_dataset(rgb=True)
    assert rgb.load_image(0).mode == "RGB" and rgb.channels == 3
    named = ArrayImageDataset(grey.images[:2], [0, 0], ["a"], ["first", "second"])
    assert named.describe(1) == "second"
    called = ArrayImageDataset(grey.images[:2], [0, 0], ["a"], lambda i: f"item {i}")
    assert called.describe(1) == "item 1"
    with pytest.raises(RuntimeError, match="no transform"):
        grey[0]
    grey.transform = lambda im: torch.from_numpy(np.asarray(im).copy())
    x, y = grey[5]
    assert y == 1 and x.shape == (12, 10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros((2, 4, 4), np.float32), [0, 0], ["a"]), "uint8"),
        ((np.zeros((2, 4), np.uint8), [0, 0], ["a"]), "N x H x W"),
        ((np.zeros((2, 4, 4), np.uint8), [0], ["a"]), "2 images but 1 labels"),
        ((np.zeros((2, 4, 4), np.uint8), [0, 1], ["a"]), "labels must lie in"),
        ((np.zeros((2, 4, 4), np.uint8), [0, 0], ["a"], ["x"]), "2 images but 1 descriptions"),
    ],
)
def test_array_dataset_rejects_bad_input(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ArrayImageDataset(*args)


def test_subsets_relabel_and_delegate() -> None:
    base = small_dataset()
    indices = np.flatnonzero(np.isin(base.labels, [2, 7, 5]))
    for subset in (base.subset(indices), SubsetImageDataset(base, indices)):
        assert subset.class_names == ["class2", "class5", "class7"]
        assert sorted(set(subset.labels.tolist())) == [0, 1, 2]
        position = int(np.flatnonzero(indices == 21)[0])  # image 21 is class 7
        assert subset.labels[position] == 2
        assert np.array_equal(np.asarray(subset.load_image(position)), base.images[21])
        assert subset.describe(position) == base.describe(21)
    with pytest.raises(ValueError, match="out of range"):
        SubsetImageDataset(base, [30])


def test_carve_validation_on_datasets() -> None:
    base = small_dataset(num_classes=20)
    wrapped = SubsetImageDataset(base, np.arange(len(base)))
    for dataset in (base, wrapped):
        train, val = carve_validation(dataset, 0.15, seed=4)
        assert val.num_classes == 3 and train.num_classes == 17
        assert not set(train.class_names) & set(val.class_names)
        assert len(train) + len(val) == len(base)


def test_attach_transforms_sets_train_and_eval() -> None:
    datasets = {"train": small_dataset(), "val": small_dataset(), "test": small_dataset()}
    splits = Splits(**datasets, channels=3, image_size=16, source="test")
    attach_transforms(splits)
    x, _ = splits.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    a, _ = splits.test[0]
    b, _ = splits.test[0]
    assert torch.equal(a, b)  # evaluation is deterministic


@pytest.mark.parametrize("name", SOURCES.builtin_names())
def test_every_builtin_source_is_declared_documented_and_checked(name: str) -> None:
    declared = SOURCES.get(name)
    assert isinstance(declared, Source) and name in SOURCES
    function = declared.function()
    check_signature(function, name)  # callable as (root, *, image_size, val_fraction, seed)
    assert (function.__doc__ or "").strip(), f"{name}: load_splits has no docstring"
    assert 8 <= declared.image_size <= 4096
    if declared.needs_root:
        with pytest.raises(ValueError, match=f"data source '{name}' needs a root directory"):
            load_splits(name)
        with pytest.raises(ConfigError, match=f"data.source={name} needs data.root"):
            load_config(None, [f"data.source={name}"])
    else:
        assert load_config(None, [f"data.source={name}"]).data.source == name


def test_dispatcher_rejects_unknown_sources() -> None:
    assert SOURCES.builtin_names()[0] == "glyphs"  # the default source comes first
    with pytest.raises(ValueError, match=r"unknown data source 'mnist'; allowed: glyphs, folder"):
        load_splits("mnist")
    with pytest.raises(
        ConfigError, match=r"data.source='mnist' is not allowed; choose one of glyphs"
    ):
        load_config(None, ["data.source=mnist"])


def _fake_splits(source: str = "fake") -> Splits:
    return Splits(small_dataset(), small_dataset(), small_dataset(), 1, 16, source)


def test_dispatcher_passes_arguments_to_the_source_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []

    def fake(root, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((root, kwargs))
        return _fake_splits()

    for name in ("cub", "glyphs"):
        module = SOURCES.get(name).load
        assert isinstance(module, str)
        monkeypatch.setattr(f"{module.replace(':', '.')}", fake)
    assert isinstance(load_splits("cub", "/data/CUB", seed=3, crop=True), Splits)
    assert calls[-1] == (
        "/data/CUB",
        {"image_size": 224, "val_fraction": 0.15, "seed": 3, "crop": True},
    )
    load_splits("glyphs", image_size=48, val_fraction=0.2)
    assert calls[-1] == (None, {"image_size": 48, "val_fraction": 0.2, "seed": 0})


def test_package_exports() -> None:
    for name in ("ImageDataset", "Splits", "build_transforms", "ClassBalancedBatchSampler"):
        assert hasattr(mbdl.data, name)
    assert isinstance(small_dataset().load_image(0), Image.Image)
