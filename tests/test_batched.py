"""Batched in-memory augmentation (mbdl.data.batched) against torchvision's per-image transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from mbdl.data.batched import (
    BatchAugment,
    InMemoryBatches,
    affine_nearest,
    batched_training_data,
    crop_box,
)
from mbdl.data.splits import ArrayImageDataset
from mbdl.data.transforms import build_transforms


def glyph_like(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Grey images with strokes (not noise), so that a wrong geometry changes many pixels."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, size, size), dtype=np.uint8)
    for image in images:
        for _ in range(3):
            r, c = rng.integers(2, size - 2, 2)
            image[r, 2 : size - 2] = rng.integers(100, 256)
            image[2 : size - 2, c] = rng.integers(100, 256)
    return images


def test_affine_equals_torchvision_tensor_affine_image_by_image() -> None:
    images = torch.from_numpy(glyph_like(12, 32)).unsqueeze(1).float() / 255
    rng = np.random.default_rng(1)
    params = torch.tensor(
        [
            [rng.uniform(-5, 5), round(rng.uniform(-2, 2)), round(rng.uniform(-2, 2)), s]
            for s in rng.uniform(0.9, 1.1, 12)
        ],
        dtype=torch.float64,
    )
    params[0] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # the identity
    params[1] = torch.tensor([90.0, 0.0, 0.0, 1.0])  # a quarter turn: the direction must match
    params[2] = torch.tensor([0.0, 2.0, -1.0, 1.0])  # a pure shift
    out = affine_nearest(images, params)
    assert torch.equal(out[0], images[0])
    for image, row, got in zip(images, params.tolist(), out, strict=True):
        angle, tx, ty, scale = row
        expected = TF.affine(
            image,
            angle=angle,
            translate=[int(tx), int(ty)],
            scale=scale,
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.NEAREST,
            fill=0,
        )
        # nearest sampling: a grid coordinate on a pixel boundary may round either way
        assert (got == expected).float().mean() > 0.995


def test_affine_is_close_to_the_pil_path_the_per_image_loader_uses() -> None:
    images = glyph_like(8, 32, seed=3)
    params = torch.tensor([[3.0, 1.0, -2.0, 1.05]] * 8, dtype=torch.float64)
    out = affine_nearest(torch.from_numpy(images).unsqueeze(1).float() / 255, params)
    from PIL import Image

    for image, got in zip(images, out, strict=True):
        pil = TF.affine(
            Image.fromarray(image), angle=3.0, translate=[1, -2], scale=1.05, shear=[0.0, 0.0]
        )
        expected = TF.to_tensor(pil)
        assert (got == expected).float().mean() > 0.97  # PIL places the centre half a pixel apart


def test_parameters_are_drawn_as_torchvision_draws_them() -> None:
    augment = BatchAugment("affine", 32, 1)
    params = augment.draw(np.arange(4000, dtype=np.uint64) * 7919, 32, 32).numpy()
    angle, tx, ty, scale = params.T
    assert angle.min() >= -5 and angle.max() <= 5 and abs(angle.mean()) < 0.2
    assert set(np.unique(tx)) == {-2.0, -1.0, 0.0, 1.0, 2.0}  # round(uniform(-2, 2))
    assert np.mean(tx == 0) == pytest.approx(0.25, abs=0.03)  # |u| < 0.5 of [-2, 2]
    assert scale.min() >= 0.9 and scale.max() <= 1.1
    assert np.corrcoef(tx, ty)[0, 1] == pytest.approx(0, abs=0.05)
    # a pure function of the seeds: same seeds, same parameters; other seeds, others
    again = augment.draw(np.arange(4000, dtype=np.uint64) * 7919, 32, 32).numpy()
    assert np.array_equal(params, again)
    assert not np.array_equal(params[:10], augment.draw(np.arange(10, dtype=np.uint64), 32, 32))


def test_crop_boxes_follow_random_resized_crop() -> None:
    rng = np.random.default_rng(0)
    ours = np.array([crop_box(rng, 60, 80) for _ in range(3000)], dtype=float)
    torch.manual_seed(0)
    image = torch.zeros(1, 60, 80)
    theirs = np.array(
        [RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)],
        dtype=float,
    )
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= 60).all() and (left + w <= 80).all()
    area_ours = (ours[:, 2] * ours[:, 3]).mean() / 4800
    area_theirs = (theirs[:, 2] * theirs[:, 3]).mean() / 4800
    assert area_ours == pytest.approx(area_theirs, abs=0.03)
    log_ratio = np.log(ours[:, 3] / ours[:, 2])
    assert log_ratio.min() >= math.log(3 / 4) - 0.1 and log_ratio.max() <= math.log(4 / 3) + 0.1


def test_crop_resize_flip_is_torchvision_resized_crop() -> None:
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 3, 70, 90))).to(
        torch.uint8
    )
    augment = BatchAugment("crop", 64, 3)
    params = torch.tensor([[5, 7, 50, 60, 0], [0, 0, 70, 90, 1], [10, 20, 30, 30, 1]]).double()
    out = augment(images, params)
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.float32
    for image, row, got in zip(images, params.long().tolist(), out, strict=True):
        top, left, h, w, flip = row
        expected = TF.resized_crop(image, top, left, h, w, [64, 64], antialias=True)
        if flip:
            expected = TF.hflip(expected)
        # v1 and v2 functional round uint8 results differently: within one grey level
        torch.testing.assert_close(got, expected.float() / 255, atol=1.01 / 255, rtol=0)


def test_imagenet_norm_and_grey_to_three_channels() -> None:
    images = torch.full((2, 1, 16, 16), 255, dtype=torch.uint8)
    out = BatchAugment("none", 16, 3, imagenet_norm=True)(images, torch.zeros(2, 0))
    assert out.shape == (2, 3, 16, 16)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def dataset(size: int, count: int = 16, rgb: bool = False) -> ArrayImageDataset:
    images = glyph_like(count, size)
    if rgb:
        images = np.repeat(images[..., None], 3, axis=-1)
    return ArrayImageDataset(images, np.arange(count) % 4, ["a", "b", "c", "d"])


def test_which_datasets_take_the_batched_path() -> None:
    small = dataset(32)
    small.transform = build_transforms(True, 32, 1, augment="affine")
    batches = batched_training_data(small)
    assert isinstance(batches, InMemoryBatches) and batches.augment.kind == "affine"
    images, labels, params = batches[[(3, 11), (5, 12)]]
    assert images.dtype == torch.uint8 and images.shape == (2, 1, 32, 32)
    assert labels.tolist() == [3, 1] and params.shape == (2, 4)
    # the same items and seeds give the same batch (exact resume, any number of workers)
    assert torch.equal(batches[[(3, 11), (5, 12)]][2], params)
    big = dataset(80, rgb=True)
    big.transform = build_transforms(True, 64, 3, augment="crop")
    assert batched_training_data(big) is not None
    big.transform = build_transforms(True, 64, 3, augment="affine")  # resizes first: per image
    assert batched_training_data(big) is None
    colour_to_grey = dataset(32, rgb=True)
    colour_to_grey.transform = build_transforms(True, 32, 1, augment="affine")
    assert batched_training_data(colour_to_grey) is None  # PIL's grey conversion: per image
    custom = dataset(32)
    custom.transform = lambda image: TF.to_tensor(image)
    assert batched_training_data(custom) is None


@pytest.mark.parametrize(
    ("size", "stored", "rgb", "norm"), [(32, 32, False, False), (64, 73, True, True)]
)
def test_augmenting_in_the_loader_gives_the_same_batches(
    size: int, stored: int, rgb: bool, norm: bool
) -> None:
    source = dataset(stored, count=16, rgb=rgb)
    source.transform = build_transforms(True, size, 3 if rgb else 1, imagenet_norm=norm)
    in_main, in_loader = batched_training_data(source), batched_training_data(source)
    assert in_main is not None and in_loader is not None
    in_loader.augment_in_loader = True
    batch = [(i, 1000 + 7 * i) for i in (3, 0, 5, 5, 9, 12)]
    images, labels, params = in_main[batch]
    loaded, loaded_labels, loaded_params = in_loader[batch]
    assert torch.equal(labels, loaded_labels) and torch.equal(params, loaded_params)
    expected = in_main.finish(images, params)
    assert expected.shape == (6, 3 if rgb else 1, size, size)
    assert torch.equal(in_loader.finish(loaded, loaded_params), expected)
    if in_loader.augment.kind == "crop":
        assert loaded.dtype == torch.uint8  # a quarter of the bytes between processes
        # stored [N, H, W, 3]: channels-last out, as the trainer feeds the network
        assert expected.is_contiguous(memory_format=torch.channels_last)
