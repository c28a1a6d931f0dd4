"""What an image goes through before a model: the preprocessing record, as plain values.

The record travels with the weights (checkpoints, model directories, exported files, catalog
indexes) and every consumer rebuilds the transform from it with :func:`transform_from_spec`,
so no path recomputes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


def preprocessing_spec(image_size: int, channels: int, imagenet_norm: bool) -> dict[str, Any]:
    """The evaluation preprocessing of :func:`mbdl.data.build_transforms` as plain values.

    An image is converted to ``color_mode``, its shorter side resized to ``resize`` (bilinear),
    centre-cropped to ``crop`` x ``crop``, scaled to ``[0, 1]`` (``/ 255``), then each channel
    normalised as ``(x - mean) / std``; the model takes ``float32`` ``[batch, channels, crop, crop]``.
    """
    from mbdl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, NATURAL_IMAGE_MIN_SIZE

    natural = image_size >= NATURAL_IMAGE_MIN_SIZE
    if imagenet_norm:
        mean = list(IMAGENET_MEAN) if channels == 3 else [sum(IMAGENET_MEAN) / 3]
        std = list(IMAGENET_STD) if channels == 3 else [sum(IMAGENET_STD) / 3]
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    return {
        "image_size": int(image_size),
        "channels": int(channels),
        "color_mode": "RGB" if channels == 3 else "L",
        "resize": round(image_size * 256 / 224) if natural else int(image_size),
        "resize_rule": "shorter side, bilinear",
        "crop": int(image_size),
        "crop_rule": "centre",
        "scale": 1 / 255,
        "mean": mean,
        "std": std,
        "input_layout": "NCHW float32",
    }


def transform_from_spec(spec: dict[str, Any]) -> Callable[[Any], Tensor]:
    """A PIL image -> tensor transform doing what ``spec`` (:func:`preprocessing_spec`) says."""
    from torchvision import transforms as T

    from mbdl.data.transforms import _ToMode

    return T.Compose(
        [
            _ToMode(str(spec["color_mode"])),
            T.Resize(int(spec["resize"])),
            T.CenterCrop(int(spec["crop"])),
            T.ToTensor(),
            T.Normalize(list(spec["mean"]), list(spec["std"])),
        ]
    )
