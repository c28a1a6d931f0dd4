"""Data: sources, class-disjoint splits, transforms and the class-balanced batch sampler.

``load_splits(source, root, ...)`` names a source the same way the config (``data.source``,
``data.root``) and the CLI do; each source lives in ``mbdl.data.<source>`` and is imported only
when used.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from mbdl.data.base import ImageDataset, Splits
from mbdl.data.sampler import ClassBalancedBatchSampler
from mbdl.data.transforms import build_transforms

#: every ``data.source`` value; each is a module ``mbdl.data.<source>`` with ``load_splits``
SOURCES = ("glyphs", "folder", "csv", "idx", "cub", "cars", "sop", "inshop")

#: sources that work without ``root`` (glyphs are rendered locally; ``root`` is then its cache)
SOURCES_WITHOUT_ROOT = ("glyphs",)

#: the ``image_size`` used when ``load_splits`` gets ``image_size=None``
DEFAULT_IMAGE_SIZES = {source: 224 for source in SOURCES} | {"glyphs": 32, "idx": 32}


def load_splits(
    source: str,
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    **options: Any,
) -> Splits:
    """Load ``source``'s class-disjoint train / validation / test splits (and query / gallery
    where the source has them), with default transforms attached.

    ``image_size=None`` takes the source's default (:data:`DEFAULT_IMAGE_SIZES`); validation
    classes are carved from the training classes with ``val_fraction`` and ``seed``; ``options``
    go to the source's own ``load_splits``.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    if root is None and source not in SOURCES_WITHOUT_ROOT:
        raise ValueError(f"data source {source!r} needs a root directory (data.root=PATH)")
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZES[source]
    module = importlib.import_module(f"mbdl.data.{source}")
    return module.load_splits(
        root, image_size=image_size, val_fraction=val_fraction, seed=seed, **options
    )


__all__ = [
    "DEFAULT_IMAGE_SIZES",
    "SOURCES",
    "ClassBalancedBatchSampler",
    "ImageDataset",
    "Splits",
    "build_transforms",
    "load_splits",
]
