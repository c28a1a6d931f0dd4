"""Sources return splits without transforms; ``mbdl.data.load_splits`` attaches them once, after
the image size and the preprocessing statistics are known. Plugins written for the earlier
contract (``augment`` / ``imagenet_norm`` parameters, their own transforms) keep working. The
data-set builders (glyph renderer, icons) are not imported by the loaders."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mbdl.data import Splits, build_transforms, load_source, load_splits
from mbdl.data.glyphs import load_glyphs
from mbdl.data.sources import BUILTIN_SOURCES
from mbdl.data.splits import ArrayImageDataset, carve_validation_classes
from mbdl.model.preprocessing import IMAGENET

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("glyph-cache")
    load_glyphs(cache_dir=cache)  # rendered once: the loaders below only read it
    return cache


def make_photo_folder(root: Path, num_classes: int = 4, per_class: int = 3) -> Path:
    """``root/c<k>/<i>.png``: 80 x 72 px RGB noise, so the picked size is 64 px (crop)."""
    rng = np.random.default_rng(7)
    for label in range(num_classes):
        (root / f"c{label}").mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{label}" / f"{index}.png")
    return root


def sample(dataset: Any, index: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # the training transform draws from torch's global generator
    return dataset[index][0]


def expected(transform: Any, image: Image.Image, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(image)


def test_builtin_sources_return_splits_without_transforms(tmp_path: Path, glyph_cache: Path):
    for name, source in BUILTIN_SOURCES.items():
        parameters = inspect.signature(source.function()).parameters
        assert "augment" not in parameters and "imagenet_norm" not in parameters, name
    folder = make_photo_folder(tmp_path / "photos")
    for splits in (
        load_source("glyphs", glyph_cache, max_classes=8),
        load_source("folder", folder, val_fraction=0.3),
    ):
        for dataset in (splits.train, splits.val, splits.test):
            assert dataset.transform is None
            with pytest.raises(RuntimeError, match="no transform"):
                dataset[0]


def test_glyph_samples_are_the_transforms_of_the_rendered_images(glyph_cache: Path):
    glyphs = load_glyphs(cache_dir=glyph_cache)
    splits = load_splits(
        "glyphs", glyph_cache, max_classes=8, channels=3, augment="affine", imagenet_norm=True
    )
    assert splits.image_size == 32 and splits.channels == 3
    train_tf = build_transforms(True, 32, 3, augment="affine", imagenet_norm=True)
    eval_tf = build_transforms(False, 32, 3, imagenet_norm=True)
    for dataset, transform in ((splits.train, train_tf), (splits.test, eval_tf)):
        for index in (0, len(dataset) - 1):
            name, face = dataset.describe(index).rsplit(" ", 1)
            assert name == dataset.class_names[dataset.labels[index]]
            rendered = glyphs.images[glyphs.class_names.index(name), glyphs.faces.index(face)]
            image = Image.fromarray(rendered)
            got = sample(dataset, index, seed=index + 3)
            assert got.shape == (3, 32, 32)
            assert torch.equal(got, expected(transform, image, seed=index + 3))
    assert splits.val.transform is splits.test.transform  # one evaluation transform


def test_folder_samples_are_the_transforms_of_the_files(tmp_path: Path):
    folder = make_photo_folder(tmp_path / "photos")
    splits = load_splits(
        "folder", folder, val_fraction=0.3, seed=1, backbone="resnet18", statistics=IMAGENET
    )
    assert splits.image_size == 64  # picked from the 72 px shorter side, below resnet18's 224
    assert splits.test.class_names == ["c2", "c3"]  # the last half of the sorted class names
    keep, val = carve_validation_classes(np.repeat([0, 1], 3), 0.3, 1)
    assert sorted(splits.train.class_names + splits.val.class_names) == ["c0", "c1"]
    assert len(splits.train) == len(keep) and len(splits.val) == len(val)
    train_tf = build_transforms(True, 64, 3, augment="auto", statistics=IMAGENET)
    eval_tf = build_transforms(False, 64, 3, statistics=IMAGENET)
    assert train_tf.spec["kind"] == "crop" and train_tf.spec["mean"] is not None  # type: ignore[attr-defined]
    for dataset, transform in ((splits.train, train_tf), (splits.test, eval_tf)):
        for index in range(len(dataset)):
            with Image.open(dataset.describe(index)) as file:
                image = file.convert("RGB")
            got = sample(dataset, index, seed=index)
            assert got.shape == (3, 64, 64)
            assert torch.equal(got, expected(transform, image, seed=index))


# -- plugins -----------------------------------------------------------------------------------

RECEIVED: dict[str, Any] = {}


def stripes_splits(image_size: int, val_fraction: float, seed: int) -> Splits:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 3)
    images = rng.integers(0, 256, (len(labels), image_size, image_size), dtype=np.uint8)
    full = ArrayImageDataset(images, labels, [f"s{c}" for c in range(6)])
    train_idx, test_idx = np.flatnonzero(labels < 4), np.flatnonzero(labels >= 4)
    keep, val = carve_validation_classes(labels[train_idx], val_fraction, seed)
    return Splits(
        train=full.subset(train_idx[keep]),
        val=full.subset(train_idx[val]),
        test=full.subset(test_idx),
        channels=1,
        image_size=image_size,
        source="stripes",
    )


def own_transform(image: Image.Image) -> torch.Tensor:
    """A plugin's own transform: the pixels as they are, times two."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).unsqueeze(0) * 2


def legacy_source(
    root: Any,
    *,
    image_size: int,
    val_fraction: float = 0.15,
    seed: int = 0,
    augment: bool | str = True,
    imagenet_norm: bool = False,
) -> Splits:
    """Written for the earlier contract: takes augment / imagenet_norm, sets its own transforms
    on the training and test splits (not on the validation split)."""
    RECEIVED.update(augment=augment, imagenet_norm=imagenet_norm)
    splits = stripes_splits(image_size, val_fraction, seed)
    splits.train.transform = splits.test.transform = own_transform
    return splits


def plain_source(
    root: Any, *, image_size: int, val_fraction: float = 0.15, seed: int = 0
) -> Splits:
    return stripes_splits(image_size, val_fraction, seed)


def test_plugin_declaring_augment_and_imagenet_norm_still_receives_them():
    RECEIVED.clear()
    load_splits(f"{__name__}:legacy_source", image_size=16, augment="affine", imagenet_norm=True)
    assert RECEIVED == {"augment": "affine", "imagenet_norm": True}
    RECEIVED.clear()
    load_splits(f"{__name__}:legacy_source", image_size=16)
    assert RECEIVED == {"augment": True, "imagenet_norm": False}


def test_plugin_transforms_are_kept_and_only_missing_ones_attached():
    splits = load_splits(
        f"{__name__}:legacy_source", image_size=16, val_fraction=0.25, statistics=IMAGENET
    )
    assert splits.train.transform is own_transform and splits.test.transform is own_transform
    image = splits.test.load_image(0)
    assert torch.equal(splits.test[0][0], own_transform(image))
    evaluation = build_transforms(False, 16, 1, statistics=IMAGENET)
    assert splits.val.transform.spec == evaluation.spec  # type: ignore[union-attr]
    assert torch.equal(splits.val[0][0], evaluation(splits.val.load_image(0)))


def test_plugin_without_transforms_gets_the_defaults():
    splits = load_splits(f"{__name__}:plain_source", image_size=16, augment="none")
    for dataset in (splits.train, splits.val, splits.test):
        image = dataset.load_image(0)
        assert torch.equal(dataset[0][0], build_transforms(False, 16, 1)(image))


# -- builders apart from loaders ---------------------------------------------------------------


def test_loading_glyphs_and_an_icons_folder_imports_no_builder(
    tmp_path: Path, glyph_cache: Path
) -> None:
    folder = make_photo_folder(tmp_path / "icons")  # what `mbdl data icons` writes: a folder
    (folder / "split.txt").write_text("c0 train\nc1 train\nc2 test\nc3 test\n")
    script = (
        "import sys\n"
        "from mbdl.data import load_splits\n"
        f"load_splits('glyphs', {str(glyph_cache)!r}, max_classes=8).train[0]\n"
        f"splits = load_splits('folder', {str(folder)!r}, image_size=32)\n"
        "splits.train[0]\n"
        "loaded = [m for m in sys.modules if m.startswith('mbdl.data.builders')\n"
        "          or m in ('mbdl.data.icons', 'cairosvg', 'fontTools')]\n"
        "print(loaded)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_builder_names_stay_importable_from_their_old_paths():
    import mbdl.data.builders.glyphs as renderer
    import mbdl.data.builders.icons as icons_builder
    import mbdl.data.glyphs as glyphs_loader
    from mbdl.data.icons import build_icons

    assert build_icons is icons_builder.build_icons
    assert glyphs_loader.build_glyphs is renderer.build_glyphs
    assert glyphs_loader.common_codepoints is renderer.common_codepoints
    with pytest.raises(AttributeError):
        glyphs_loader.no_such_name  # noqa: B018
