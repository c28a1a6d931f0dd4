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
    crop_boxes,
    item_uniforms,
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
    ours = crop_boxes(item_uniforms(np.arange(3000, dtype=np.uint64) * 7919, 22), 60, 80)
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


def splitmix64(state: int, count: int) -> list[int]:
    """SplitMix64 (Steele, Lea, Flood 2014) by plain integer arithmetic, ``count`` outputs."""
    mask, out = 2**64 - 1, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def test_item_uniforms_are_splitmix64_per_item_seed() -> None:
    seeds = np.array([0, 1, 2**63 - 1, 123456789, 2**64 - 1], dtype=np.uint64)
    u = item_uniforms(seeds, 7)
    for seed, row in zip(seeds.tolist(), u, strict=True):
        expected = [(z >> 11) * 2.0**-53 for z in splitmix64(seed, 7)]
        assert row.tolist() == expected
    # each row depends on its own seed only: permuting the seeds permutes the rows
    order = np.array([3, 0, 4, 2, 1])
    assert np.array_equal(item_uniforms(seeds[order], 7), u[order])


def test_item_uniforms_are_uniform_and_independent() -> None:
    u = item_uniforms(np.arange(20000, dtype=np.uint64) * 7919 + 5, 3)
    assert u.min() >= 0 and u.max() < 1
    for column in u.T:  # Kolmogorov-Smirnov distance to U(0, 1): 1.63 / sqrt(n) is p = 0.01
        ecdf = np.arange(1, len(column) + 1) / len(column)
        assert np.abs(np.sort(column) - ecdf).max() < 1.63 / math.sqrt(len(column))
    assert abs(np.corrcoef(u.T)[np.triu_indices(3, 1)]).max() < 0.03


def crop_box_loop(u: list[float], height: int, width: int) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` (torchvision) written out, its draws taken from ``u``."""
    area = height * width
    for t in range(10):
        target = area * (0.08 + 0.92 * u[2 * t])
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[2 * t + 1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return math.floor(u[20] * (height - h + 1)), math.floor(u[21] * (width - w + 1)), h, w
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        h, w = height, round(height * 4 / 3)
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height, width", [(60, 80), (20, 100), (100, 15), (32, 32)])
def test_crop_boxes_equal_the_torchvision_loop_on_the_same_draws(height: int, width: int) -> None:
    u = item_uniforms(np.arange(2000, dtype=np.uint64) * 104729 + 3, 22)
    u[:5, 0:20:2] = 1 - 1e-12  # whole-image area ...
    u[:5, 1:20:2] = 0.0  # ... at ratio 3/4: too tall for a wide image, every try fails
    ours = crop_boxes(u, height, width)
    expected = np.array([crop_box_loop(row.tolist(), height, width) for row in u], dtype=float)
    assert np.array_equal(ours, expected)
