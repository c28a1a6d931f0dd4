"""Batched training augmentation for images held in memory (glyphs, IDX, small arrays).

The per-image path (``dataset[i]``: a PIL image through :func:`mbdl.data.build_transforms`) costs
tens of microseconds of Python per image, a sixth of a small CNN's step on glyphs. For an
:class:`~mbdl.data.splits.ArrayImageDataset` the trainer instead loads a whole batch as one
``uint8`` tensor and augments it with tensor operations on the training device:

- ``"affine"``: the parameters of ``RandomAffine(degrees=5, translate=(t, t), scale=(0.9, 1.1))``
  drawn as torchvision draws them (angle and scale uniform, the shift uniform in pixels then
  rounded), applied to the whole batch with one ``affine_grid`` + ``grid_sample`` (nearest, zero
  fill): the grid torchvision's tensor ``affine`` builds, image by image;
- ``"crop"``: ``RandomResizedCrop(size)`` boxes drawn as torchvision draws them (scale 0.08-1,
  ratio 3/4-4/3, ten tries, then the centre crop), each cropped and resized with antialiasing
  (torchvision's tensor ``resized_crop``), and a horizontal flip with probability 1/2;
- ``"none"``: no augmentation;

then scaled to ``[0, 1]`` and, for pretrained backbones, ImageNet-normalised. The parameters of a
batch are a pure function of its items' seeds (:class:`mbdl.train.seeding.SeededBatches`), drawn
in the loader (worker processes or the main process), so a resumed run repeats an uninterrupted
one and the result does not depend on ``data.num_workers``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mbdl.data.splits import ArrayImageDataset
from mbdl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, NATURAL_IMAGE_MIN_SIZE

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
AFFINE_DEGREES = 5.0
AFFINE_SCALE = (0.9, 1.1)


@dataclass(frozen=True)
class BatchAugment:
    """One training augmentation (``kind``: ``"affine"``, ``"crop"`` or ``"none"``) of ``uint8``
    batches ``[B, C, H, W]`` to float ``[B, channels, image_size, image_size]``."""

    kind: str
    image_size: int
    channels: int
    imagenet_norm: bool = False

    def draw(self, seeds: np.ndarray, height: int, width: int) -> Tensor:
        """The per-image parameters (``float64 [B, P]``) from the items' seeds."""
        rng = np.random.default_rng([int(s) for s in seeds])
        count = len(seeds)
        if self.kind == "affine":
            shift = max(1, round(self.image_size / 16)) / self.image_size
            angle = rng.uniform(-AFFINE_DEGREES, AFFINE_DEGREES, count)
            tx = np.round(rng.uniform(-shift * width, shift * width, count))
            ty = np.round(rng.uniform(-shift * height, shift * height, count))
            scale = rng.uniform(*AFFINE_SCALE, count)
            return torch.from_numpy(np.stack([angle, tx, ty, scale], axis=1))
        if self.kind == "crop":
            rows = [(*crop_box(rng, height, width), float(rng.random() < 0.5)) for _ in seeds]
            return torch.tensor(rows, dtype=torch.float64).reshape(count, 5)
        return torch.zeros(count, 0, dtype=torch.float64)

    def __call__(self, images: Tensor, params: Tensor) -> Tensor:
        """Augment ``images`` (``uint8``, on any device) with ``params`` from :meth:`draw`."""
        return self.scale(self.geometry(images, params))

    def geometry(self, images: Tensor, params: Tensor) -> Tensor:
        """The geometric part: ``uint8`` out for ``crop`` and ``none`` (a quarter of the bytes
        to pass between processes), float in ``[0, 1]`` for ``affine``."""
        if images.shape[1] != self.channels:  # grey stored, three channels wanted
            images = images.expand(-1, self.channels, -1, -1)
        if self.kind == "crop":
            return crop_resize_flip(images, params, self.image_size)
        if self.kind == "affine":
            return affine_nearest(images.float().div_(255), params.to(images.device))
        return images

    def scale(self, images: Tensor) -> Tensor:
        """:meth:`geometry`'s output as float in ``[0, 1]``, ImageNet-normalised if asked."""
        out = images.float().div_(255) if images.dtype == torch.uint8 else images
        if self.imagenet_norm:
            mean: tuple[float, ...] = IMAGENET_MEAN
            std: tuple[float, ...] = IMAGENET_STD
            if self.channels == 1:
                mean, std = (sum(mean) / 3,), (sum(std) / 3,)
            shape = (1, self.channels, 1, 1)
            out = (out - torch.tensor(mean, device=out.device).view(shape)) / torch.tensor(
                std, device=out.device
            ).view(shape)
        return out


def crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as ``RandomResizedCrop.get_params`` draws it (scale 0.08-1, ratio
    3/4-4/3, ten tries, then the centre crop of the nearest allowed ratio)."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def affine_nearest(images: Tensor, params: Tensor) -> Tensor:
    """Rotate (degrees, counter-clockwise), shift (pixels) and scale each image about its centre,
    nearest neighbour, zero fill: torchvision's tensor ``affine`` (no shear), batched.

    ``params[i] = (angle, tx, ty, scale)``. The inverse map of an output pixel ``p`` (centred
    coordinates) is ``R(-angle) (p - t) / scale``, normalised by half the image size.
    """
    batch, _, height, width = images.shape
    angle = torch.deg2rad(params[:, 0])
    tx, ty, scale = params[:, 1], params[:, 2], params[:, 3]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, sin, -cos * tx - sin * ty], dim=1),
            torch.stack([-sin, cos, sin * tx - cos * ty], dim=1),
        ],
        dim=1,
    ).float()  # [B, 2, 3], in pixels about the centre
    xs = torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, width, device=images.device)
    ys = torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, height, device=images.device)
    base = torch.stack(
        [
            xs.expand(height, width),
            ys.unsqueeze(1).expand(height, width),
            xs.new_ones(height, width),
        ],
        dim=-1,
    ).view(height * width, 3)
    halves = torch.tensor([0.5 * width, 0.5 * height], device=images.device)
    # one [HW, 3] x [3, 2B] product for the whole batch (a batched bmm with an inner size of 3 is
    # ten times slower on CPUs); equal to the per-image grids up to the float rounding of a sum
    # of three products
    per_image = (theta.transpose(1, 2) / halves).permute(1, 0, 2).reshape(3, batch * 2)
    grid = (base @ per_image).view(height, width, batch, 2).permute(2, 0, 1, 3)
    return torch.nn.functional.grid_sample(
        images,
        grid,
        mode="nearest",
        padding_mode="zeros",
        align_corners=False,
    )


def crop_resize_flip(images: Tensor, params: Tensor, size: int) -> Tensor:
    """Each image's box ``params[i, :4] = (top, left, h, w)`` resized to ``size x size`` with
    antialiasing (torchvision's tensor ``resized_crop``), flipped where ``params[i, 4] == 1``.

    The resize is torchvision's, without its per-call dispatch: ``uint8`` bilinear antialiased
    ``interpolate`` on CPUs; elsewhere in float, rounded back to ``uint8``. The flips are one
    indexing of the whole batch.
    """
    # in the images' memory format: RGB squares stored [N, H, W, 3] come out channels-last, the
    # format the trainer feeds a convolutional network (no conversion copy on its critical path)
    channels_last = images.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty(
        (images.shape[0], images.shape[1], size, size),
        dtype=images.dtype,
        device=images.device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )
    for k, (top, left, h, w) in enumerate(params[:, :4].long().tolist()):
        crop = images[k : k + 1, :, top : top + h, left : left + w]
        if (h, w) != (size, size):
            crop = _resize_bilinear(crop, size)
        out[k : k + 1] = crop
    flips = params[:, 4].to(images.device) == 1
    if bool(flips.any()):
        out[flips] = out[flips].flip(-1)
    return out


def _resize_bilinear(images: Tensor, size: int) -> Tensor:
    """``uint8 [N, C, h, w] -> [N, C, size, size]``, bilinear with antialiasing, as torchvision's
    ``resize`` computes it (native ``uint8`` on CPUs, float then rounded elsewhere)."""
    interpolate = torch.nn.functional.interpolate
    options: dict[str, Any] = {"mode": "bilinear", "align_corners": False, "antialias": True}
    if images.device.type == "cpu":
        return interpolate(images, size=[size, size], **options)
    return interpolate(images.float(), size=[size, size], **options).round_().to(images.dtype)


class InMemoryBatches(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """``batches[[(index, seed), ...]] -> (uint8 images [B, C, H, W], labels [B], params [B, P])``
    of an :class:`ArrayImageDataset`, for ``DataLoader(batch_size=None, sampler=SeededBatches)``;
    the trainer's :meth:`finish` applies :attr:`augment` to the images on its device.

    With :attr:`augment_in_loader` (training on a CPU) the geometric part of the augmentation is
    done here instead, in the loader, so that worker processes overlap it with the training step;
    :meth:`finish` then only scales it to float. Same numbers either way.
    """

    augment_in_loader: bool = False

    def __init__(self, dataset: ArrayImageDataset, augment: BatchAugment) -> None:
        with warnings.catch_warnings():  # a read-only memory map (mbdl.data.cache) is not written
            warnings.simplefilter("ignore", UserWarning)
            images = torch.from_numpy(np.ascontiguousarray(dataset.images))
        self.images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(np.asarray(dataset.labels, dtype=np.int64))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        pairs = np.asarray(batch, dtype=np.int64).reshape(-1, 2)  # seeds are below 2**63
        indices = torch.from_numpy(pairs[:, 0])
        seeds = pairs[:, 1].astype(np.uint64)
        height, width = self.images.shape[-2:]
        params = self.augment.draw(seeds, int(height), int(width))
        images = self.images[indices]
        if self.augment_in_loader:
            images = self.augment.geometry(images, params)
        return images, self.labels[indices], params

    def finish(self, images: Tensor, params: Tensor) -> Tensor:
        """The augmented batch from a loaded one (with :attr:`augment_in_loader`, its geometry
        was done in the loader: only the scaling is left)."""
        if self.augment_in_loader:
            return self.augment.scale(images)
        return self.augment(images, params)


def batched_training_data(dataset: Any) -> InMemoryBatches | None:
    """:class:`InMemoryBatches` for ``dataset`` when its training transform can be done on whole
    batches with the same result distribution, else None (the per-image path stays).

    That is: an :class:`ArrayImageDataset` whose transform is one that
    :func:`mbdl.data.build_transforms` made (it records its ``spec``), with grey images for one
    channel or grey or RGB images for three; ``affine`` and ``none`` need images already at the
    training size below :data:`NATURAL_IMAGE_MIN_SIZE` (where that transform does no resizing).
    """
    spec = getattr(dataset.transform, "spec", None)
    if not isinstance(dataset, ArrayImageDataset) or not isinstance(spec, dict):
        return None
    kind, size, channels = spec["kind"], spec["image_size"], spec["channels"]
    if dataset.channels not in ((1,) if channels == 1 else (1, 3)):
        return None
    height, width = dataset.images.shape[1:3]
    if kind in ("affine", "none") and not (height == width == size < NATURAL_IMAGE_MIN_SIZE):
        return None
    augment = BatchAugment(kind, size, channels, imagenet_norm=bool(spec["imagenet_norm"]))
    return InMemoryBatches(dataset, augment)
