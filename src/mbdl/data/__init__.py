"""Data: sources, class-disjoint splits, transforms and the class-balanced batch sampler.

``load_splits(source, root, ...)`` names a source the same way the config (``data.source``,
``data.root``) and the CLI do: a name of the :data:`SOURCES` registry (:mod:`mbdl.data.sources`;
each built-in source lives in ``mbdl.data.<source>`` and is imported only when used) or a
plugin's import path.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mbdl.data.base import ImageDataset, Splits
from mbdl.data.sources import SOURCES, Source, check_splits
from mbdl.data.transforms import build_transforms
from mbdl.model.preprocessing import ImageStatistics

#: how many training images :func:`typical_image_side` reads the header of
SIDE_SAMPLE = 256


def typical_image_side(dataset: Any, *, sample: int = SIDE_SAMPLE, seed: int = 0) -> int | None:
    """The median shorter side, in pixels, of up to ``sample`` images of a file dataset (read
    from the file headers, not decoded); None when the dataset has no readable file paths."""
    from mbdl.data.files import open_image_file

    full_path = getattr(dataset, "full_path", None)
    if full_path is None or len(dataset) == 0:
        return None
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(dataset), size=min(sample, len(dataset)), replace=False)
    sides = []
    for index in chosen:
        try:
            with open_image_file(full_path(int(index))) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, SyntaxError):
            continue
    return int(np.median(sides)) if sides else None


def auto_image_size(side: int, backbone: str) -> int:
    """The network input size for images whose shorter side is ``side`` pixels: the backbone's
    native size (:func:`mbdl.models.native_input_size`) or, for smaller images, their own size
    rounded down to a multiple of 16 (at least 32): small images are never upscaled to 224."""
    from mbdl.models import native_input_size

    native = native_input_size(backbone)
    return max(32, min(native, side - side % 16))


def load_splits(
    source: str,
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    backbone: str | None = None,
    statistics: ImageStatistics | None = None,
    **options: Any,
) -> Splits:
    """Load ``source``'s class-disjoint train / validation / test splits (and query / gallery
    where the source has them), with default transforms attached.

    ``source`` is a name or import path of :data:`SOURCES` (:mod:`mbdl.data.sources`).
    ``image_size=None`` takes the source's default (:attr:`Source.image_size`); for a file
    source with a ``backbone`` named, it is picked from the training images instead
    (:func:`auto_image_size` of :func:`typical_image_side`) and ``info["image_size"]`` says how;
    validation
    classes are carved from the training classes with ``val_fraction`` and ``seed``; ``options``
    go to the source's own ``load_splits``. ``statistics`` (what the model's weights expect:
    mean, std, interpolation, crop fraction) replace the default transforms' normalisation of a
    source that takes ``imagenet_norm`` (one that attaches :func:`build_transforms`); their
    mean and std must fit the data's channels.
    """
    if source not in SOURCES:
        raise ValueError(
            f"unknown data source {source!r}; allowed: {', '.join(SOURCES)} "
            "or an import path package.module:load_splits"
        )
    declared = SOURCES.get(source)
    if root is None and declared.needs_root:
        raise ValueError(f"data source {source!r} needs a root directory (data.root=PATH)")
    pick_size = image_size is None and backbone is not None and not declared.fixed_size
    if image_size is None:
        image_size = declared.image_size
    splits = declared.function()(
        root, image_size=image_size, val_fraction=val_fraction, seed=seed, **options
    )
    splits = check_splits(splits, source)
    takes_statistics = statistics is not None and declared.accepts("imagenet_norm")
    if takes_statistics and statistics is not None:
        from mbdl.model.preprocessing import check_values

        check_values(
            statistics.mean,
            statistics.std,
            statistics.interpolation,
            statistics.crop_fraction,
            where=f"preprocessing ({statistics.origin})",
            channels=splits.channels if len(statistics.mean) != 3 else None,
        )
    reattach = {
        "augment": options.get("augment", True),
        "imagenet_norm": options.get("imagenet_norm", False),
        "statistics": statistics if takes_statistics else None,
    }
    if takes_statistics:
        from mbdl.data.splits import attach_transforms

        attach_transforms(splits, **reattach)
    if pick_size and backbone is not None:
        side = typical_image_side(splits.train, seed=seed)
        if side is not None:
            from mbdl.data.splits import attach_transforms

            splits.image_size = auto_image_size(side, backbone)
            attach_transforms(splits, **reattach)
            splits.info = {
                **(splits.info or {}),
                "image_size": f"{splits.image_size} px, picked for {backbone} from the training "
                f"images' median shorter side ({side} px)",
            }
    return splits


__all__ = [
    "SOURCES",
    "ClassBalancedBatchSampler",
    "ImageDataset",
    "Source",
    "Splits",
    "auto_image_size",
    "build_transforms",
    "load_splits",
    "typical_image_side",
]


def __getattr__(name: str) -> Any:
    # the training sampler loads on first use: inference commands never import it
    if name == "ClassBalancedBatchSampler":
        from mbdl.data.sampler import ClassBalancedBatchSampler

        return ClassBalancedBatchSampler
    raise AttributeError(f"module 'mbdl.data' has no attribute {name!r}")
