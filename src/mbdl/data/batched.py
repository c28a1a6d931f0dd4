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

then scaled to ``[0, 1]`` and, for pretrained backbones, ImageNet-normalised. Each image's
parameters are a pure function of its own seed (:class:`mbdl.train.seeding.SeededBatches`), its
uniform numbers a SplitMix64 stream from that seed (:func:`item_uniforms`, vectorised over the
batch), drawn in the loader (worker processes or the main process), so a resumed run repeats an
uninterrupted one and the result does not depend on ``data.num_workers``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mbdl.data.splits import ArrayImageDataset
from mbdl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, NATURAL_IMAGE_MIN_SIZE

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
AFFINE_DEGREES = 5.0
AFFINE_SCALE = (0.9, 1.1)
CROP_TRIES = 10
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class BatchAugment:
    """One training augmentation (``kind``: ``"affine"``, ``"crop"`` or ``"none"``) of ``uint8``
    batches ``[B, C, H, W]`` to float ``[B, channels, image_size, image_size]``."""

    kind: str
    image_size: int
    channels: int
    imagenet_norm: bool = False
    mean: tuple[float, ...] | None = None  # with std: replaces imagenet_norm's statistics
    std: tuple[float, ...] | None = None

    def draw(self, seeds: np.ndarray, height: int, width: int) -> Tensor:
        """The per-image parameters (``float64 [B, P]``): row ``i`` a pure function of ``seeds[i]``
        alone (:func:`item_uniforms`), vectorised over the batch."""
        count = len(seeds)
        if self.kind == "affine":
            shift = max(1, round(self.image_size / 16)) / self.image_size
            u = item_uniforms(seeds, 4)
            angle = AFFINE_DEGREES * (2 * u[:, 0] - 1)
            tx = np.round(shift * width * (2 * u[:, 1] - 1))
            ty = np.round(shift * height * (2 * u[:, 2] - 1))
            scale = AFFINE_SCALE[0] + (AFFINE_SCALE[1] - AFFINE_SCALE[0]) * u[:, 3]
            return torch.from_numpy(np.stack([angle, tx, ty, scale], axis=1))
        if self.kind == "crop":
            u = item_uniforms(seeds, 2 * CROP_TRIES + 3)
            boxes = crop_boxes(u[:, : 2 * CROP_TRIES + 2], height, width)
            flips = (u[:, -1] < 0.5).astype(np.float64)
            return torch.from_numpy(np.concatenate([boxes, flips[:, None]], axis=1))
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
            return affine_nearest(images.float().div_(255), params)
        return images

    def scale(self, images: Tensor) -> Tensor:
        """:meth:`geometry`'s output as float in ``[0, 1]``, normalised with ``mean`` and
        ``std`` (or ImageNet's, if ``imagenet_norm``) when given."""
        out = images.float().div_(255) if images.dtype == torch.uint8 else images
        if self.mean is not None and self.std is not None:
            mean, std = self.mean, self.std
        elif self.imagenet_norm:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
            if self.channels == 1:
                mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        else:
            return out
        shape = (1, self.channels, 1, 1)
        return (out - torch.tensor(mean, device=out.device).view(shape)) / torch.tensor(
            std, device=out.device
        ).view(shape)


def item_uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """``float64 [B, count]`` uniform on ``[0, 1)``: row ``i`` is the first ``count`` outputs of
    SplitMix64 (Steele, Lea, Flood, OOPSLA 2014) started at ``seeds[i]``, 53 bits each.

    A counter-based stream: each item's numbers depend on its own seed only, and a whole batch
    is a few vectorised operations (seeding a NumPy generator per batch cost more than the
    augmentation itself).
    """
    state = np.asarray(seeds, dtype=np.uint64)[:, None] + _GOLDEN_GAMMA * np.arange(
        1, count + 1, dtype=np.uint64
    )
    state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    state ^= state >> np.uint64(31)
    return (state >> np.uint64(11)).astype(np.float64) * 2.0**-53


def crop_boxes(u: np.ndarray, height: int, width: int) -> np.ndarray:
    """``float64 [B, 4]`` boxes ``(top, left, h, w)`` as ``RandomResizedCrop.get_params`` draws
    them (scale 0.08-1, ratio 3/4-4/3, ten tries, then the centre crop of the nearest allowed
    ratio), from uniforms ``u [B, 2 * tries + 2]``: each try's scale and log-ratio, then the
    position of the box."""
    tries = (u.shape[1] - 2) // 2
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    target = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[:, 0 : 2 * tries : 2])
    aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, 1 : 2 * tries : 2])
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)  # the first try that fits
    rows = np.arange(len(u))
    h, w = h[rows, first], w[rows, first]
    found = fits[rows, first]
    # no try fitted: the centre crop of the nearest allowed ratio
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        fallback = (float(round(width / CROP_RATIO[0])), float(width))
    elif ratio > CROP_RATIO[1]:
        fallback = (float(height), float(round(height * CROP_RATIO[1])))
    else:
        fallback = (float(height), float(width))
    h = np.where(found, h, fallback[0])
    w = np.where(found, w, fallback[1])
    top = np.where(found, np.floor(u[:, -2] * (height - h + 1)), (height - h) // 2)
    left = np.where(found, np.floor(u[:, -1] * (width - w + 1)), (width - w) // 2)
    return np.stack([top, left, h, w], axis=1)


def affine_nearest(images: Tensor, params: Tensor) -> Tensor:
    """Rotate (degrees, counter-clockwise), shift (pixels) and scale each image about its centre,
    nearest neighbour, zero fill: torchvision's tensor ``affine`` (no shear), batched.

    ``params[i] = (angle, tx, ty, scale)``. The inverse map of an output pixel ``p`` (centred
    coordinates) is ``R(-angle) (p - t) / scale``, normalised by half the image size.
    """
    _, _, height, width = images.shape
    # the grid, normalised by half the image size: x' = (cos x + sin y - cos tx - sin ty) / (W/2),
    # y' = (-sin x + cos y + sin tx - cos ty) / (H/2) with cos, sin over the scale. Each point is
    # a complex number x' + i y', the broadcast sum of a [B, 1, W] and a [B, H, 1] term (those
    # from a few hundred numbers, in NumPy), whose real view is the interleaved [B, H, W, 2] grid:
    # one pass, where stacking two coordinate planes cost 13x more on one thread, and a matrix
    # product with an inner size of 3 or grid_sample on a permuted grid cost more again
    values = params.detach().cpu().numpy()
    angle, tx, ty, scale = np.radians(values[:, 0]), values[:, 1], values[:, 2], values[:, 3]
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    xs = np.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, width)  # centred pixel coordinates
    ys = np.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, height)
    half_w, half_h = 0.5 * width, 0.5 * height
    along_x = cos[:, None] * xs / half_w - 1j * (sin[:, None] * xs / half_h)  # [B, W]
    along_y = (sin[:, None] * ys - (cos * tx + sin * ty)[:, None]) / half_w + 1j * (
        (cos[:, None] * ys + (sin * tx - cos * ty)[:, None]) / half_h
    )  # [B, H]
    x_terms, y_terms = (
        torch.from_numpy(terms.astype(np.complex64)).to(images.device)
        for terms in (along_x, along_y)
    )
    grid = torch.view_as_real(x_terms[:, None, :] + y_terms[:, :, None])  # [B, H, W, 2]
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
        self.stored = images  # [N, H, W] or [N, H, W, C], as the dataset holds them
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
        # index_select (ten times faster than images[indices]) of the stored rows, then the
        # same view: RGB stays channels-last
        rows = self.stored.index_select(0, indices)
        images = rows.unsqueeze(1) if rows.dim() == 3 else rows.permute(0, 3, 1, 2)
        if self.augment_in_loader:
            images = self.augment.geometry(images, params)
        return images, self.labels.index_select(0, indices), params

    def finish(self, images: Tensor, params: Tensor) -> Tensor:
        """The augmented batch from a loaded one (with :attr:`augment_in_loader`, its geometry
        was done in the loader: only the scaling is left)."""
        if self.augment_in_loader:
            return self.augment.scale(images)
        return self.augment(images, params)


class InProcessBatches:
    """``batches[key]`` for each key of ``sampler``, in this process: what ``DataLoader(batches,
    sampler=sampler, batch_size=None, num_workers=0)`` yields, without its per-batch machinery
    (a tenth of a glyph batch's data path on a CPU)."""

    def __init__(self, batches: InMemoryBatches, sampler: Any) -> None:
        self.batches = batches
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for key in self.sampler:
            yield self.batches[key]


def batch_loader(
    batches: InMemoryBatches,
    sampler: Any,
    *,
    workers: int,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
    """The loader of whole in-memory batches: a :class:`DataLoader` with ``workers`` persistent
    worker processes (or pinning memory for a GPU), else :class:`InProcessBatches`."""
    if workers == 0 and not pin_memory:
        return InProcessBatches(batches, sampler)
    return DataLoader(
        batches,
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,  # not started again every epoch
        pin_memory=pin_memory,
        generator=generator,
    )


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
    if kind == "crop" and spec.get("interpolation", "bilinear") != "bilinear":
        return None  # the batched crop resizes bilinearly only
    if kind in ("affine", "none") and spec.get("crop_fraction") not in (None, 1, 1.0):
        return None  # the batched path assumes images already at the input size
    mean, std = spec.get("mean"), spec.get("std")
    augment = BatchAugment(
        kind,
        size,
        channels,
        imagenet_norm=bool(spec["imagenet_norm"]),
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )
    return InMemoryBatches(dataset, augment)
