"""The glyphs data set: rendering, selection of characters, cache, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mbdl.data.builders.glyphs as renderer_module
import mbdl.data.glyphs as glyphs_module
from mbdl.data import load_splits
from mbdl.data.glyphs import (
    FACES,
    REFERENCE_FACE,
    GlyphSet,
    build_glyphs,
    common_codepoints,
    describe_glyphs,
    load_glyphs,
    rendering_params,
    split_classes,
)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("glyph-cache")


@pytest.fixture(scope="session")
def glyphs(cache_dir: Path) -> GlyphSet:
    """Rendered once per test session into a temporary cache."""
    return load_glyphs(cache_dir=cache_dir)


def test_classes_and_instances(glyphs: GlyphSet) -> None:
    num_classes = len(glyphs.codepoints)
    assert num_classes >= 500
    assert glyphs.images.shape == (num_classes, 16, 32, 32)
    assert glyphs.images.dtype == np.uint8
    assert len(FACES) == 16
    assert np.all(np.diff(glyphs.codepoints) > 0)
    assert glyphs.images.reshape(num_classes, 16, -1).max(axis=2).min() > 0  # nothing blank


def test_rendering_is_deterministic(glyphs: GlyphSet) -> None:
    images, codepoints = build_glyphs(rendering_params())
    assert np.array_equal(images, glyphs.images)
    assert np.array_equal(codepoints, glyphs.codepoints)


def test_baseline_keeps_case_apart(glyphs: GlyphSet) -> None:
    position = {int(cp): i for i, cp in enumerate(glyphs.codepoints)}
    for lower, upper in [("o", "O"), ("c", "C"), ("s", "S"), ("x", "X")]:
        a, b = glyphs.images[position[ord(lower)]], glyphs.images[position[ord(upper)]]
        assert all(not np.array_equal(a[f], b[f]) for f in range(16)), (lower, upper)


def test_identical_renderings_are_merged(glyphs: GlyphSet) -> None:
    common = set(common_codepoints())
    kept = set(glyphs.codepoints.tolist())
    lookalikes = [0x391, 0x410, 0x392, 0x412]  # Greek Alpha, Cyrillic A, Greek Beta, Cyrillic Ve
    assert set(lookalikes) <= common  # every face has them ...
    assert not set(lookalikes) & kept  # ... but they render like Latin A and B
    assert {ord("A"), ord("B")} <= kept
    reference = glyphs.images[:, FACES.index(REFERENCE_FACE)].reshape(len(kept), -1)
    assert len(np.unique(reference, axis=0)) == len(kept)  # all pairwise distinct
    assert len(kept) < len(common)


def test_cache_is_reused_and_rebuilt_on_parameter_change(
    glyphs: GlyphSet, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered: list[dict] = []

    def fake_build(params: dict) -> tuple[np.ndarray, np.ndarray]:
        rendered.append(params)
        size = params["size"]
        return np.full((2, 16, size, size), 7, np.uint8), np.array([65, 66])

    monkeypatch.setattr(renderer_module, "build_glyphs", fake_build)
    again = load_glyphs(cache_dir=cache_dir)
    assert not rendered and again.path == glyphs.path
    assert np.array_equal(again.images, glyphs.images)

    smaller = load_glyphs(24, cache_dir=cache_dir)  # other size: other file, rendered once
    assert len(rendered) == 1 and smaller.path != glyphs.path
    assert smaller.images.shape == (2, 16, 24, 24)
    load_glyphs(24, cache_dir=cache_dir)
    other_font = load_glyphs(24, font_size=14, cache_dir=cache_dir)
    assert len(rendered) == 2 and other_font.path not in (glyphs.path, smaller.path)

    monkeypatch.setattr(glyphs_module, "GLYPHS_VERSION", glyphs_module.GLYPHS_VERSION + 1)
    assert load_glyphs(24, cache_dir=cache_dir).path != smaller.path
    assert len(rendered) == 3

    smaller.path.write_bytes(b"not an npz")  # corrupt: rebuilt, not an error
    monkeypatch.setattr(glyphs_module, "GLYPHS_VERSION", glyphs_module.GLYPHS_VERSION - 1)
    assert load_glyphs(24, cache_dir=cache_dir).images.shape == (2, 16, 24, 24)
    assert len(rendered) == 4
    assert not list(cache_dir.glob("*.tmp"))  # written atomically, nothing left over


def test_default_cache_dir_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MBDL_CACHE", str(tmp_path))
    assert glyphs_module.default_cache_dir() == tmp_path
    monkeypatch.delenv("MBDL_CACHE")
    assert glyphs_module.default_cache_dir() == Path.home() / ".cache" / "mbdl"


def test_default_splits(glyphs: GlyphSet, cache_dir: Path) -> None:
    splits = load_splits("glyphs", cache_dir)
    num_classes = len(glyphs.codepoints)
    position_of_a = int(np.flatnonzero(glyphs.codepoints == ord("A"))[0])
    num_test = round(0.5 * num_classes)
    assert splits.test.num_classes == num_test
    assert splits.val.num_classes == round(0.15 * (num_classes - num_test))
    assert splits.train.num_classes + splits.val.num_classes + num_test == num_classes
    names = [set(d.class_names) for d in (splits.train, splits.val, splits.test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    for dataset in (splits.train, splits.val, splits.test):
        assert np.array_equal(np.bincount(dataset.labels), np.full(dataset.num_classes, 16))
    assert (splits.channels, splits.image_size, splits.source) == (1, 32, "glyphs")
    x, y = splits.train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y == 0
    (holder,) = [
        d for d in (splits.train, splits.val, splits.test) if "U+0041 'A'" in d.class_names
    ]
    first = int(np.flatnonzero(holder.labels == holder.class_names.index("U+0041 'A'"))[0])
    assert holder.describe(first + 1) == "U+0041 'A' DejaVuSans-Bold"
    assert np.array_equal(np.asarray(holder.load_image(first)), glyphs.images[position_of_a, 0])
    assert splits.test.describe(0).endswith(" DejaVuSans")
    image = splits.test.load_image(3)
    assert image.mode == "L" and image.size == (32, 32)


def test_test_classes_do_not_depend_on_the_training_seed(cache_dir: Path) -> None:
    first = load_splits("glyphs", cache_dir, seed=0)
    second = load_splits("glyphs", cache_dir, seed=1)
    assert first.test.class_names == second.test.class_names
    assert first.val.class_names != second.val.class_names
    assert set(first.train.class_names) | set(first.val.class_names) == set(
        second.train.class_names
    ) | set(second.val.class_names)


def test_max_classes_is_a_consistent_subset(cache_dir: Path) -> None:
    full = load_splits("glyphs", cache_dir)
    small = load_splits("glyphs", cache_dir, max_classes=40, val_fraction=0.25)
    assert (small.test.num_classes, small.val.num_classes, small.train.num_classes) == (20, 5, 15)
    assert set(small.test.class_names) <= set(full.test.class_names)
    assert not set(small.train.class_names) & set(full.test.class_names)
    again = load_splits("glyphs", cache_dir, max_classes=40, val_fraction=0.25)
    assert again.train.class_names == small.train.class_names


def test_three_channel_option_and_augmentation(cache_dir: Path) -> None:
    splits = load_splits("glyphs", cache_dir, channels=3, max_classes=10)
    x, _ = splits.train[0]
    assert x.shape == (3, 32, 32) and splits.channels == 3
    torch.manual_seed(0)
    assert any(not torch.equal(splits.train[0][0], x) for _ in range(4))  # small affine jitter
    assert torch.equal(splits.test[0][0], splits.test[0][0])


def test_split_classes_and_bad_options(cache_dir: Path) -> None:
    train, test = split_classes(100, 0.3, None)
    assert (len(train), len(test)) == (70, 30) and not set(train) & set(test)
    with pytest.raises(ValueError, match="test_fraction"):
        split_classes(100, 1.0, None)
    with pytest.raises(ValueError, match=r"max_classes must be in 4\.\.100"):
        split_classes(100, 0.5, 2)
    with pytest.raises(ValueError, match="unknown glyphs option"):
        load_splits("glyphs", cache_dir, colour=True)
    with pytest.raises(ValueError, match="glyph image size"):
        rendering_params(4)


def test_describe_glyphs(glyphs: GlyphSet, cache_dir: Path) -> None:
    text = describe_glyphs(cache_dir)
    num_classes = len(glyphs.codepoints)
    assert f"{num_classes} classes x 16 faces = {num_classes * 16} images" in text
    assert str(glyphs.path) in text
    assert "rendered in" in text
