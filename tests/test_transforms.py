"""build_transforms: output shapes, dtypes, channels, augmentation choice, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mbdl.data import build_transforms
from mbdl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resolve_augment

RNG = np.random.default_rng(0)
GREY = Image.fromarray(RNG.integers(0, 256, size=(40, 30), dtype=np.uint8))
RGB = Image.fromarray(RNG.integers(0, 256, size=(300, 250, 3), dtype=np.uint8))


@pytest.mark.parametrize("image", [GREY, RGB], ids=["grey", "rgb"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 64, 224])
def test_output_shape_and_dtype(image: Image.Image, train: bool, channels: int, size: int) -> None:
    out = build_transforms(train, size, channels)(image)
    assert out.shape == (channels, size, size)
    assert out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_grey_repeated_to_three_channels() -> None:
    out = build_transforms(False, 32, 3)(GREY)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    single = build_transforms(False, 32, 1)(GREY)
    assert torch.equal(single[0], out[0])


def test_small_eval_is_identity_up_to_scaling() -> None:
    image = Image.fromarray(RNG.integers(0, 256, size=(32, 32), dtype=np.uint8))
    out = build_transforms(False, 32, 1)(image)
    assert torch.equal(out[0], torch.from_numpy(np.array(image)).float() / 255)


def test_eval_is_deterministic_and_train_is_random() -> None:
    evaluate = build_transforms(False, 64, 3)
    assert torch.equal(evaluate(RGB), evaluate(RGB))
    for size in (32, 64):
        train = build_transforms(True, size, 3)
        torch.manual_seed(0)
        outs = [train(RGB) for _ in range(4)]
        assert any(not torch.equal(outs[0], other) for other in outs[1:])


def test_augment_choice() -> None:
    assert resolve_augment(True, 32) == "affine"
    assert resolve_augment(True, 64) == "crop"
    assert resolve_augment("auto", 224) == "crop"
    assert resolve_augment("affine", 224) == "affine"
    assert resolve_augment(False, 224) == resolve_augment("none", 32) == "none"
    names = [type(t).__name__ for t in build_transforms(True, 32, 1).transforms]  # type: ignore[attr-defined]
    assert "RandomAffine" in names and "RandomHorizontalFlip" not in names
    names = [type(t).__name__ for t in build_transforms(True, 224, 3).transforms]  # type: ignore[attr-defined]
    assert "RandomResizedCrop" in names and "RandomHorizontalFlip" in names
    names = [type(t).__name__ for t in build_transforms(True, 224, 3, augment=False).transforms]  # type: ignore[attr-defined]
    assert not any(name.startswith("Random") for name in names)


def test_imagenet_normalisation() -> None:
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    out = build_transforms(False, 64, 3, imagenet_norm=True)(white)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[:, 0, 0], expected)
    grey = build_transforms(False, 32, 1, imagenet_norm=True)(Image.new("L", (32, 32), 0))
    assert torch.allclose(grey, torch.full_like(grey, -0.449 / 0.226))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((True, 32, 2), {}, "channels must be 1 or 3"),
        ((True, 4, 1), {}, "image_size must be an integer >= 8"),
        ((True, 32.0, 1), {}, "image_size"),
        ((True, 32, 1), {"augment": "mixup"}, "augment must be"),
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_transforms(*args, **kwargs)
