"""Class-disjoint split helpers shared by every data source.

Note for source writers (``files``, ``folder``, ``csv``, ``idx``, ``cub``, ``cars``, ``sop``,
``inshop``): reuse these rather than re-implementing them.

- :func:`relabel_contiguous` maps any label values to ``0..C-1`` (sorted order) and returns the
  original values, so ``class_names = [str(v) for v in originals]`` stays aligned.
- :func:`carve_validation_classes` picks the validation classes out of the training classes
  (seeded, class-disjoint) and returns ``(train_indices, val_indices)``; :func:`carve_validation`
  does the same on any :class:`ImageDataset` and returns two relabelled views.
- :func:`split_classes` splits indices into class-disjoint groups by a per-class assignment
  (e.g. CUB classes 1-100 train, 101-200 test); :class:`SubsetImageDataset` is a relabelled view
  of any :class:`ImageDataset` restricted to some indices (own ``transform``; ``load_image`` and
  ``describe`` delegate to the base).
- :class:`ArrayImageDataset` holds ``uint8`` images in memory (``N x H x W`` grey or
  ``N x H x W x C``), e.g. IDX files and the glyphs.
- :func:`attach_transforms` sets :func:`mbdl.data.build_transforms` defaults on every dataset of a
  :class:`Splits` (train: augmented; val/test/query/gallery: deterministic). A source does not
  call it: it returns its splits with no transforms, and :func:`mbdl.data.load_splits` attaches
  them once the image size and the preprocessing statistics are known; a plugin that wants other
  transforms sets its own (they are kept).

``mbdl.data.load_splits`` always passes an ``int`` ``image_size`` to a source's ``load_splits``
(``None`` is resolved to the source's default first) and checks ``root`` is given for every source
that needs one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mbdl.data.base import ImageDataset, Splits

if TYPE_CHECKING:
    from mbdl.model.preprocessing import ImageStatistics


def relabel_contiguous(labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map label values to ``0..C-1`` in sorted order of their values.

    Returns ``(new_labels int64[N], originals[C])`` with ``originals[new_labels] == labels``.
    """
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {array.shape}")
    originals, inverse = np.unique(array, return_inverse=True)
    return inverse.astype(np.int64).reshape(-1), originals


def carve_validation_classes(
    train_labels: Sequence[int] | np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Choose ``round(val_fraction * C)`` of the ``C`` training classes (at least one when
    ``val_fraction > 0``) by a permutation seeded with ``seed``; return
    ``(train_indices, val_indices)``, sorted ``int64`` positions into ``train_labels``.

    ``val_fraction == 0`` gives an empty validation set. At least one training class always stays.
    """
    labels = np.asarray(train_labels)
    if labels.ndim != 1:
        raise ValueError(f"train_labels must be one-dimensional, got shape {labels.shape}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    classes = np.unique(labels)
    num_val = 0 if val_fraction == 0 else max(1, round(val_fraction * len(classes)))
    if num_val >= len(classes):
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training class out of {len(classes)} classes"
        )
    rng = np.random.default_rng(seed)
    val_classes = classes[rng.permutation(len(classes))[:num_val]]
    is_val = np.isin(labels, val_classes)
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def split_classes(
    labels: Sequence[int] | np.ndarray, class_groups: Sequence[Sequence[int] | np.ndarray]
) -> list[np.ndarray]:
    """Indices of the items whose label is in each group of classes (groups must be disjoint)."""
    array = np.asarray(labels)
    seen: set[int] = set()
    out = []
    for group in class_groups:
        members = {int(c) for c in np.asarray(group).reshape(-1)}
        if members & seen:
            raise ValueError(f"class groups overlap on classes {sorted(members & seen)[:5]}")
        seen |= members
        out.append(np.flatnonzero(np.isin(array, list(members))).astype(np.int64))
    return out


class ArrayImageDataset(ImageDataset):
    """In-memory ``uint8`` images (``N x H x W`` grey or ``N x H x W x C`` with C in 1, 3).

    ``labels`` must already be contiguous ``0..len(class_names)-1``; ``describe`` is a list of
    per-item strings, a callable ``index -> str``, or ``None`` (then ``"<class name> #<index>"``).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        describe: Sequence[str] | Callable[[int], str] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(f"images must be N x H x W or N x H x W x 3, got shape {images.shape}")
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(label_array) != len(images):
            raise ValueError(f"{len(images)} images but {len(label_array)} labels")
        if len(label_array) and (label_array.min() < 0 or label_array.max() >= len(class_names)):
            raise ValueError(f"labels must lie in 0..{len(class_names) - 1} (one per class name)")
        if isinstance(describe, Sequence) and not isinstance(describe, str):
            if len(describe) != len(images):
                raise ValueError(f"{len(images)} images but {len(describe)} descriptions")
        self.images = images
        self.labels = label_array
        self.class_names = list(class_names)
        self._describe = describe
        self.transform = transform

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else 3

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def describe(self, index: int) -> str:
        if self._describe is None:
            return f"{self.class_names[self.labels[index]]} #{index}"
        if callable(self._describe):
            return self._describe(index)
        return self._describe[index]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrayImageDataset:
        """A copy restricted to ``indices``, labels relabelled to ``0..C'-1``."""
        idx = np.asarray(indices, dtype=np.int64)
        new_labels, originals = relabel_contiguous(self.labels[idx])
        describe: list[str] = [self.describe(int(i)) for i in idx]
        return ArrayImageDataset(
            self.images[idx],
            new_labels,
            [self.class_names[int(c)] for c in originals],
            describe,
            self.transform,
        )


class SubsetImageDataset(ImageDataset):
    """A view of ``base`` restricted to ``indices``, labels relabelled to ``0..C'-1`` (in the order
    of the base labels); ``class_names`` follow. Has its own ``transform`` (base's is ignored)."""

    def __init__(
        self,
        base: ImageDataset,
        indices: Sequence[int] | np.ndarray,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(base)):
            raise ValueError(f"subset indices out of range for a dataset of {len(base)} items")
        self.base = base
        self.indices = idx
        self.labels, originals = relabel_contiguous(np.asarray(base.labels)[idx])
        self.class_names = [base.class_names[int(c)] for c in originals]
        self.transform = transform

    def load_image(self, index: int) -> Image.Image:
        return self.base.load_image(int(self.indices[index]))

    def describe(self, index: int) -> str:
        return self.base.describe(int(self.indices[index]))


def carve_validation(
    train: ImageDataset, val_fraction: float, seed: int
) -> tuple[ImageDataset, ImageDataset]:
    """Split ``train`` into (train, validation) class-disjoint relabelled views
    (see :func:`carve_validation_classes`)."""
    train_idx, val_idx = carve_validation_classes(train.labels, val_fraction, seed)
    if isinstance(train, ArrayImageDataset):
        return train.subset(train_idx), train.subset(val_idx)
    return SubsetImageDataset(train, train_idx), SubsetImageDataset(train, val_idx)


def attach_transforms(
    splits: Splits,
    *,
    augment: bool | str = True,
    imagenet_norm: bool = False,
    statistics: ImageStatistics | None = None,
) -> Splits:
    """Set ``build_transforms`` on every split, replacing any: train augmented (``augment``), the
    rest not; both with the same ``statistics`` (mean, std, interpolation; else
    ``imagenet_norm``). :func:`mbdl.data.attach_default_transforms` with ``replace=True``."""
    from mbdl.data import attach_default_transforms

    return attach_default_transforms(
        splits, augment=augment, imagenet_norm=imagenet_norm, statistics=statistics, replace=True
    )
