"""What an image goes through before a model: the preprocessing record, as plain values.

The record travels with the weights (checkpoints, model directories, exported files, catalog
indexes) and every consumer rebuilds the transform from it with :func:`transform_from_spec`,
so no path recomputes it.

The values (mean, std, interpolation, crop fraction) come from where the weights come from
(:class:`ImageStatistics`, given by each backbone family: torchvision weights' transforms, timm's
``pretrained_cfg``, a Hugging Face image processor's config, open_clip's ``preprocess_cfg``),
then the ``data.mean``, ``data.std``, ``data.interpolation`` and ``data.crop_fraction`` keys
override them (:func:`apply_overrides`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from mbdl.errors import UserError

#: the resampling filters a record may name (PIL's, as torchvision names them)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

#: the ImageNet statistics torchvision's classification weights (and timm's default) expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: the evaluation crop fraction of the ImageNet convention (resize 256, crop 224)
DEFAULT_CROP_FRACTION = 224 / 256

#: below this side, images are resized to the input side without a margin (crop fraction 1)
NATURAL_IMAGE_MIN_SIZE = 64


class PreprocessingError(UserError):
    """A preprocessing value (mean, std, interpolation, crop fraction) that is not valid."""


@dataclass(frozen=True)
class ImageStatistics:
    """What a backbone's weights expect of an image, as that library states it.

    Attributes:
        mean, std: per channel, of images scaled to ``[0, 1]`` (3 values, or 1 for grey).
        interpolation: the resize filter, one of :data:`INTERPOLATIONS`.
        crop_fraction: evaluation crop side / resized shorter side (timm's ``crop_pct``,
            torchvision's ``crop_size / resize_size``); None: 224/256 from 64 px up, else 1.
        input_size: the input side the weights were trained at, if the library says.
        origin: where the values come from (for messages and the stored record).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_fraction: float | None = None
    input_size: int | None = None
    origin: str = "imagenet"

    def __post_init__(self) -> None:
        check_values(self.mean, self.std, self.interpolation, self.crop_fraction, where=self.origin)


def _numbers(values: object, name: str, where: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise PreprocessingError(f"{where}: {name} must be a non-empty list of numbers")
    numbers = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PreprocessingError(f"{where}: {name} must hold numbers; got {value!r}")
        if not math.isfinite(float(value)):
            raise PreprocessingError(f"{where}: {name} must be finite; got {value!r}")
        numbers.append(float(value))
    return tuple(numbers)


def check_values(
    mean: object,
    std: object,
    interpolation: object,
    crop_fraction: object,
    *,
    where: str = "preprocessing",
    channels: int | None = None,
) -> None:
    """Refuse a mean or std that is not a list of finite numbers (std > 0) of one length (1 or
    3, or ``channels``), an unknown interpolation or a crop fraction outside (0, 1]."""
    means, stds = _numbers(mean, "mean", where), _numbers(std, "std", where)
    if len(means) != len(stds):
        raise PreprocessingError(
            f"{where}: mean has {len(means)} values but std {len(stds)}; give one per channel"
        )
    allowed = (channels,) if channels is not None else (1, 3)
    if len(means) not in allowed:
        raise PreprocessingError(
            f"{where}: mean and std need {' or '.join(map(str, allowed))} values (one per "
            f"channel); got {len(means)}"
        )
    if any(s <= 0 for s in stds):
        raise PreprocessingError(f"{where}: std must be > 0; got {list(stds)}")
    if interpolation not in INTERPOLATIONS:
        raise PreprocessingError(
            f"{where}: interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
        )
    if crop_fraction is not None and (
        isinstance(crop_fraction, bool)
        or not isinstance(crop_fraction, (int, float))
        or not 0 < float(crop_fraction) <= 1
    ):
        raise PreprocessingError(f"{where}: crop_fraction must be in (0, 1]; got {crop_fraction!r}")


#: ImageNet statistics, bilinear, 224/256: torchvision's classic recipe and timm's default
IMAGENET = ImageStatistics(IMAGENET_MEAN, IMAGENET_STD)

#: no normalisation: values in [0, 1] (a network trained from scratch)
UNIT_RANGE = ImageStatistics((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), origin="none")


def apply_overrides(
    statistics: ImageStatistics,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_fraction: float | None = None,
) -> ImageStatistics:
    """``statistics`` with the values the user set (``data.mean``, ...) in their place."""
    changes: dict[str, Any] = {}
    if mean is not None:
        changes["mean"] = tuple(float(v) for v in mean)
    if std is not None:
        changes["std"] = tuple(float(v) for v in std)
    if interpolation is not None:
        changes["interpolation"] = interpolation
    if crop_fraction is not None:
        changes["crop_fraction"] = float(crop_fraction)
    if not changes:
        return statistics
    asked = list(changes)
    for name, other in (("mean", "std"), ("std", "mean")):
        if name in changes and other not in changes:  # the other one follows the channel count
            changes[other] = tuple(for_channels(getattr(statistics, other), len(changes[name])))
    overridden = [
        f"data.{name} {_shown(changes[name])} (was {_shown(getattr(statistics, name))})"
        for name in asked
        if changes[name] != getattr(statistics, name)
    ]
    if not overridden:
        return statistics
    origin = f"{statistics.origin}; overridden: {', '.join(overridden)}"
    return replace(statistics, **changes, origin=origin)


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def for_channels(values: Sequence[float], channels: int) -> list[float]:
    """Per-channel values for ``channels`` channels: three averaged to one for grey input,
    one repeated for three; already ``channels`` long: as they are."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if channels == 1:
        return [sum(values) / len(values)]
    if len(values) == 1:
        return values * channels
    raise PreprocessingError(f"{len(values)} mean/std values do not fit {channels} channels")


def eval_resize(image_size: int, crop_fraction: float | None) -> int:
    """The shorter side an evaluation image is resized to before the centre crop of
    ``image_size``: ``round(image_size / crop_fraction)`` (default crop fraction 224/256 from
    :data:`NATURAL_IMAGE_MIN_SIZE` up, 1 below)."""
    if crop_fraction is None:
        crop_fraction = DEFAULT_CROP_FRACTION if image_size >= NATURAL_IMAGE_MIN_SIZE else 1.0
    return max(int(image_size), round(image_size / crop_fraction))


def preprocessing_spec(
    image_size: int,
    channels: int,
    imagenet_norm: bool = False,
    statistics: ImageStatistics | None = None,
) -> dict[str, Any]:
    """The evaluation preprocessing of :func:`mbdl.data.build_transforms` as plain values.

    An image is converted to ``color_mode``, its shorter side resized to ``resize``
    (``interpolation``), centre-cropped to ``crop`` x ``crop``, scaled to ``[0, 1]`` (``/ 255``),
    then each channel normalised as ``(x - mean) / std``; the model takes ``float32``
    ``[batch, channels, crop, crop]``. ``statistics`` gives mean, std, interpolation and crop
    fraction; without it, ImageNet's when ``imagenet_norm`` else none (mean 0, std 1).
    """
    if statistics is None:
        statistics = IMAGENET if imagenet_norm else UNIT_RANGE
    resize = eval_resize(image_size, statistics.crop_fraction)
    return {
        "image_size": int(image_size),
        "channels": int(channels),
        "color_mode": "RGB" if channels == 3 else "L",
        "resize": resize,
        "resize_rule": f"shorter side, {statistics.interpolation}",
        "interpolation": statistics.interpolation,
        "crop": int(image_size),
        "crop_rule": "centre",
        "crop_fraction": round(int(image_size) / resize, 6),
        "scale": 1 / 255,
        "mean": for_channels(statistics.mean, channels),
        "std": for_channels(statistics.std, channels),
        "statistics_from": statistics.origin,
        "input_layout": "NCHW float32",
    }


def check_spec(spec: object, where: str = "preprocessing") -> dict[str, Any]:
    """``spec`` if it is a usable preprocessing record (a stored one is read from files that
    may be damaged), else a one-line :class:`PreprocessingError`. Records written before
    ``interpolation`` existed mean bilinear."""
    if not isinstance(spec, Mapping):
        raise PreprocessingError(f"{where}: the preprocessing record is not a mapping")
    spec = dict(spec)
    for name in ("resize", "crop"):
        value = spec.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
            raise PreprocessingError(f"{where}: preprocessing {name} {value!r} is not a size")
    if spec.get("color_mode") not in ("RGB", "L"):
        raise PreprocessingError(f"{where}: color_mode {spec.get('color_mode')!r} is not RGB or L")
    channels = 3 if spec["color_mode"] == "RGB" else 1
    check_values(
        spec.get("mean"),
        spec.get("std"),
        spec.get("interpolation", "bilinear"),
        None,
        where=where,
        channels=channels,
    )
    return spec


def transform_from_spec(spec: dict[str, Any]) -> Callable[[Any], Tensor]:
    """A PIL image -> tensor transform doing what ``spec`` (:func:`preprocessing_spec`) says."""
    from torchvision import transforms as T

    from mbdl.data.transforms import _ToMode, interpolation_mode

    spec = check_spec(spec)
    return T.Compose(
        [
            _ToMode(str(spec["color_mode"])),
            T.Resize(
                int(spec["resize"]),
                interpolation=interpolation_mode(str(spec.get("interpolation", "bilinear"))),
            ),
            T.CenterCrop(int(spec["crop"])),
            T.ToTensor(),
            T.Normalize(list(spec["mean"]), list(spec["std"])),
        ]
    )


def model_statistics(
    backbone: str,
    pretrained: str | None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_fraction: float | None = None,
) -> ImageStatistics:
    """The statistics a model built from ``backbone`` with weights ``pretrained`` gets: those
    its weights expect (:meth:`statistics` of the backbone's declaration: the library's own
    record), else none for random weights, then the user's overrides."""
    from mbdl.models.backbones import weights_statistics

    # model.backbone=auto before mbdl.recipe resolves it: no weights chosen yet
    found = None if backbone == "auto" else weights_statistics(backbone, pretrained)
    return apply_overrides(
        found if found is not None else UNIT_RANGE,
        mean=mean,
        std=std,
        interpolation=interpolation,
        crop_fraction=crop_fraction,
    )


def config_statistics(config: Any) -> ImageStatistics:
    """:func:`model_statistics` of a :class:`mbdl.config.Config`'s model and data keys; with
    ``model.init``, the stored model's values in place of the backbone's."""
    if getattr(config.model, "init", None) is not None:
        from mbdl.models.warmstart import init_statistics

        return apply_overrides(
            init_statistics(config.model.init),
            mean=config.data.mean,
            std=config.data.std,
            interpolation=None
            if config.data.interpolation == "auto"
            else config.data.interpolation,
            crop_fraction=config.data.crop_fraction,
        )
    return model_statistics(
        config.model.backbone,
        config.model.pretrained,
        mean=config.data.mean,
        std=config.data.std,
        interpolation=None if config.data.interpolation == "auto" else config.data.interpolation,
        crop_fraction=config.data.crop_fraction,
    )


def check_data_channels(config: Any, channels: int) -> None:
    """Refuse ``data.mean`` / ``data.std`` whose value count is not the images' channel count
    (``channels``): the values are used as given, never averaged or repeated."""
    for name in ("mean", "std"):
        values = getattr(config.data, name)
        if values is not None and len(values) != channels:
            source = config.data.source
            raise PreprocessingError(
                f"data.{name} has {len(values)} value(s) but the images of data.source={source} "
                f"have {channels} channel(s); give {channels} (one per channel)"
            )


def describe_statistics(statistics: ImageStatistics, image_size: int) -> str | None:
    """The data line's note of where the preprocessing comes from and what the data keys
    override, and an input size other than the weights'; None for random weights as they
    are (no normalisation, nothing to say)."""
    if statistics.origin == UNIT_RANGE.origin:
        return None
    note = f"preprocessing: {statistics.origin}"
    if statistics.input_size is not None and statistics.input_size != image_size:
        note += f"; input {image_size} px, the weights' {statistics.input_size} px"
    return note


def config_preprocessing(config: Any, splits: Any) -> dict[str, Any]:
    """The preprocessing record (:func:`preprocessing_spec`) of a run: the config's statistics
    (:func:`config_statistics`) at the splits' image size and channels."""
    return preprocessing_spec(
        int(splits.image_size), int(splits.channels), statistics=config_statistics(config)
    )
