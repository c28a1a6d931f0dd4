"""Image transforms: PIL image -> float tensor ``(channels, image_size, image_size)``.

Augmentation (``train=True``) is one of:

- ``"crop"``: ``RandomResizedCrop(image_size)`` (torchvision's default scale 0.08-1 and ratio
  3/4-4/3) and a horizontal flip: the usual recipe for natural images (CUB, Cars, SOP, In-Shop).
- ``"affine"``: a small affine jitter (rotation up to 5 degrees, translation up to
  ``max(1, round(image_size / 16))`` pixels, i.e. 2 px at 32x32, scale 0.9-1.1), no flip: for small
  images such as glyphs or digits, whose identity a flip could change.
- ``True`` / ``"auto"``: ``"crop"`` when ``image_size >= 64``, else ``"affine"``.
- ``False`` / ``"none"``: no augmentation (the evaluation transform).

Evaluation resizes the shorter side to ``round(image_size * 256 / 224)`` and centre-crops
``image_size`` when ``image_size >= 64`` (the ImageNet convention); small images are resized to
``image_size`` and centre-cropped. Grey images are repeated to 3 channels when ``channels == 3``
(torchvision backbones); colour images are converted to grey when ``channels == 1``. Values are in
``[0, 1]``, or normalised with the statistics the backbone's weights expect
(:class:`mbdl.model.preprocessing.ImageStatistics`: mean, std, resize interpolation and
evaluation crop fraction; ``imagenet_norm``: ImageNet's, mean 0.485, 0.456, 0.406 and std
0.229, 0.224, 0.225, for one channel their averages 0.449 and 0.226). Training and evaluation use
the same statistics and interpolation.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from mbdl.model.preprocessing import (
    IMAGENET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NATURAL_IMAGE_MIN_SIZE,
    UNIT_RANGE,
    ImageStatistics,
    eval_resize,
    for_channels,
)

AUGMENTATIONS = ("auto", "crop", "affine", "none")

__all__ = [
    "AUGMENTATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NATURAL_IMAGE_MIN_SIZE",
    "build_transforms",
    "interpolation_mode",
    "resolve_augment",
]


def interpolation_mode(name: str) -> T.InterpolationMode:
    """torchvision's ``InterpolationMode`` of a record's interpolation name (``"bicubic"``)."""
    return T.InterpolationMode(name)


def resolve_augment(augment: bool | str, image_size: int) -> str:
    """The augmentation name (``"crop"``, ``"affine"`` or ``"none"``) for ``augment``."""
    if augment is True or augment == "auto":
        return "crop" if image_size >= NATURAL_IMAGE_MIN_SIZE else "affine"
    if augment is False or augment == "none":
        return "none"
    if augment in ("crop", "affine"):
        return str(augment)
    raise ValueError(f"augment must be a bool or one of {AUGMENTATIONS}, got {augment!r}")


class _ToMode:
    """Convert a PIL image to mode ``"L"`` or ``"RGB"`` (grey is repeated to 3 channels)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def build_transforms(
    train: bool,
    image_size: int,
    channels: int,
    *,
    augment: bool | str = True,
    imagenet_norm: bool = False,
    statistics: ImageStatistics | None = None,
) -> Callable[[Image.Image], Tensor]:
    """The transform for a split: ``train`` applies ``augment`` (see the module docstring);
    ``statistics`` (mean, std, interpolation, crop fraction) replace ``imagenet_norm``."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if statistics is None:
        statistics = IMAGENET if imagenet_norm else UNIT_RANGE
    mean = for_channels(statistics.mean, channels)
    std = for_channels(statistics.std, channels)
    normalise = any(m != 0 for m in mean) or any(s != 1 for s in std)
    interpolation = interpolation_mode(statistics.interpolation)
    kind = resolve_augment(augment, image_size) if train else "none"
    steps: list[Callable] = [_ToMode("L" if channels == 1 else "RGB")]
    if kind == "crop":
        steps += [
            T.RandomResizedCrop(image_size, interpolation=interpolation),
            T.RandomHorizontalFlip(),
        ]
    else:
        resize = eval_resize(image_size, statistics.crop_fraction)
        steps += [T.Resize(resize, interpolation=interpolation), T.CenterCrop(image_size)]
        if kind == "affine":
            shift = max(1, round(image_size / 16)) / image_size
            steps.append(T.RandomAffine(degrees=5, translate=(shift, shift), scale=(0.9, 1.1)))
    steps.append(T.ToTensor())
    if normalise:
        steps.append(T.Normalize(mean, std))
    composed = T.Compose(steps)
    # what this transform does, for the batched in-memory path (mbdl.data.batched)
    composed.spec = {
        "kind": kind,
        "image_size": image_size,
        "channels": channels,
        "imagenet_norm": normalise,
        "mean": mean if normalise else None,
        "std": std if normalise else None,
        "interpolation": statistics.interpolation,
        "crop_fraction": statistics.crop_fraction,
    }
    return composed
