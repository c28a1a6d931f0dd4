"""Data: sources, class-disjoint splits, transforms and the class-balanced batch sampler.

``load_splits(source, root, ...)`` names a source the same way the config (``data.source``,
``data.root``) and the CLI do: a name of the :data:`SOURCES` registry (:mod:`mbdl.data.sources`;
each built-in source lives in ``mbdl.data.<source>`` and is imported only when used) or a
plugin's import path. Sources return splits without transforms (:func:`load_source`);
:func:`load_splits` attaches them once the image size and the preprocessing statistics are
known (:func:`attach_default_transforms`). The builders of local data sets (the glyphs'
renderer, the icons) live apart, in :mod:`mbdl.data.builders`.
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


def load_source(
    source: str,
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    augment: bool | str = True,
    imagenet_norm: bool = False,
    **options: Any,
) -> Splits:
    """``source``'s splits as its loading function returns them, checked
    (:func:`mbdl.data.sources.check_splits`): a built-in source attaches no transforms (every
    dataset's ``transform`` is None); :func:`load_splits` attaches them.

    ``image_size=None`` takes the source's default (:attr:`Source.image_size`); ``options`` go
    to the source's own ``load_splits``. ``augment`` and ``imagenet_norm`` reach only a plugin
    that still names them among its keyword parameters (the contract before transforms were
    attached in one place; see :mod:`mbdl.data.sources`).
    """
    if source not in SOURCES:
        raise ValueError(
            f"unknown data source {source!r}; allowed: {', '.join(SOURCES)} "
            "or an import path package.module:load_splits"
        )
    declared = SOURCES.get(source)
    if root is None and declared.needs_root:
        raise ValueError(f"data source {source!r} needs a root directory (data.root=PATH)")
    legacy = {"augment": augment, "imagenet_norm": imagenet_norm}
    options.update({name: value for name, value in legacy.items() if declared.accepts(name)})
    splits = declared.function()(
        root,
        image_size=declared.image_size if image_size is None else image_size,
        val_fraction=val_fraction,
        seed=seed,
        **options,
    )
    return check_splits(splits, source)


def attach_default_transforms(
    splits: Splits,
    *,
    augment: bool | str = True,
    imagenet_norm: bool = False,
    statistics: ImageStatistics | None = None,
    replace: bool = False,
) -> Splits:
    """Attach :func:`build_transforms` at ``splits.image_size`` and ``splits.channels`` to every
    dataset whose ``transform`` is None (all of them with ``replace``): the training split
    augmented (``augment``), the others with the evaluation transform; normalised with
    ``statistics`` (mean, std, interpolation, crop fraction; their mean and std must fit the
    data's channels), else ImageNet's when ``imagenet_norm``, else not at all. A dataset a plugin
    source gave its own transform keeps it."""
    from mbdl.data.transforms import resolve_augment

    if statistics is not None:
        from mbdl.model.preprocessing import check_values

        check_values(
            statistics.mean,
            statistics.std,
            statistics.interpolation,
            statistics.crop_fraction,
            where=f"preprocessing ({statistics.origin})",
            channels=splits.channels if len(statistics.mean) != 3 else None,
        )
    resolve_augment(augment, splits.image_size)  # a bad value: refused even when nothing is set
    size, channels = splits.image_size, splits.channels
    if replace or splits.train.transform is None:
        splits.train.transform = build_transforms(
            True,
            size,
            channels,
            augment=augment,
            imagenet_norm=imagenet_norm,
            statistics=statistics,
        )
    evaluation = None
    for dataset in (splits.val, splits.test, splits.query, splits.gallery):
        if dataset is not None and (replace or dataset.transform is None):
            if evaluation is None:  # one transform shared by the evaluation splits
                evaluation = build_transforms(
                    False, size, channels, imagenet_norm=imagenet_norm, statistics=statistics
                )
            dataset.transform = evaluation
    return splits


def load_splits(
    source: str,
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    backbone: str | None = None,
    augment: bool | str = True,
    imagenet_norm: bool = False,
    statistics: ImageStatistics | None = None,
    **options: Any,
) -> Splits:
    """Load ``source``'s class-disjoint train / validation / test splits (and query / gallery
    where the source has them), with the default transforms attached: the one place they are.

    ``source`` is a name or import path of :data:`SOURCES` (:mod:`mbdl.data.sources`), loaded by
    :func:`load_source` (``options`` go to the source's own ``load_splits``).
    ``image_size=None`` takes the source's default (:attr:`Source.image_size`); for a file
    source with a ``backbone`` named, it is picked from the training images instead
    (:func:`auto_image_size` of :func:`typical_image_side`) and ``info["image_size"]`` says how.
    Validation classes are carved from the training classes with ``val_fraction`` and ``seed``.
    Then :func:`attach_default_transforms` with ``augment`` (the training augmentation, see
    :func:`build_transforms`) and ``statistics`` (what the model's weights expect: mean, std,
    interpolation, crop fraction; without them ImageNet's when ``imagenet_norm``). A plugin
    source that attached its own transforms keeps them (and its image size).
    """
    splits = load_source(
        source,
        root,
        image_size=image_size,
        val_fraction=val_fraction,
        seed=seed,
        augment=augment,
        imagenet_norm=imagenet_norm,
        **options,
    )
    declared = SOURCES.get(source)
    pick_size = image_size is None and backbone is not None and not declared.fixed_size
    if pick_size and backbone is not None and splits.train.transform is None:
        side = typical_image_side(splits.train, seed=seed)
        if side is not None:
            splits.image_size = auto_image_size(side, backbone)
            splits.info = {
                **(splits.info or {}),
                "image_size": f"{splits.image_size} px, picked for {backbone} from the training "
                f"images' median shorter side ({side} px)",
            }
    return attach_default_transforms(
        splits, augment=augment, imagenet_norm=imagenet_norm, statistics=statistics
    )


__all__ = [
    "SOURCES",
    "ClassBalancedBatchSampler",
    "ImageDataset",
    "Source",
    "Splits",
    "attach_default_transforms",
    "auto_image_size",
    "build_transforms",
    "load_source",
    "load_splits",
    "typical_image_side",
]


def __getattr__(name: str) -> Any:
    # the training sampler loads on first use: inference commands never import it
    if name == "ClassBalancedBatchSampler":
        from mbdl.data.sampler import ClassBalancedBatchSampler

        return ClassBalancedBatchSampler
    raise AttributeError(f"module 'mbdl.data' has no attribute {name!r}")
