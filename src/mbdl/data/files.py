"""Images stored as files on disk (the official benchmarks, image folders, CSV lists).

:class:`FileImageDataset` opens each image with PIL on demand. An unreadable or corrupt image
raises :class:`ImageReadError` naming the file. With ``skip_corrupt=True``:

- missing files and files that fail PIL's cheap ``verify()`` are dropped up front, with one
  warning; ``skipped_files`` lists them and ``skipped`` counts them;
- a file that passes ``verify()`` but still fails to decode (e.g. corrupt compressed pixel data)
  is replaced, from its first load on, by the next readable image of the same class (the batch
  keeps its class composition and the label stays right), with one warning; it is added to
  ``skipped_files`` and counted in ``skipped``. So a ``DataLoader`` never crashes mid-epoch
  (unless every image of a class is unreadable: then a clear error). With ``num_workers > 0`` load-time skips are counted in
  the worker processes, not in the main process's ``skipped``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mbdl.data.base import ImageDataset, Splits
from mbdl.data.splits import attach_transforms, carve_validation_classes, relabel_contiguous

#: file name endings recognised as images by the folder source
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)

#: exceptions PIL raises on unreadable, truncated or malformed files
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageReadError(ValueError):
    """An image file that does not exist, cannot be read, or does not decode."""


def read_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open and fully decode ``path`` with PIL, converted to ``mode`` (``"RGB"`` or ``"L"``).

    Raises :class:`ImageReadError` naming the file when it is missing or corrupt.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except _PIL_ERRORS as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from None


def verify_image(path: str | Path) -> str | None:
    """``None`` when ``path`` opens and passes PIL's ``verify()``, else the reason it does not."""
    try:
        with Image.open(path) as image:
            image.verify()
    except FileNotFoundError:
        return "file not found"
    except _PIL_ERRORS as error:
        return str(error) or type(error).__name__
    return None


class FileImageDataset(ImageDataset):
    """Images on disk: ``paths`` (relative to ``root`` or absolute) with contiguous ``labels``
    ``0..len(class_names)-1``.

    ``bbox`` (optional, ``float[N, 4]``) crops each image to ``(left, upper, right, lower)`` pixel
    coordinates (PIL's convention, clipped to the image). ``mode`` is ``"RGB"`` or ``"L"``.
    ``attributes`` holds extra per-item arrays (e.g. SOP super-class ids), subset with the items.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        *,
        root: str | Path,
        bbox: np.ndarray | None = None,
        skip_corrupt: bool = False,
        mode: str = "RGB",
        attributes: dict[str, np.ndarray] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        _verified: bool = False,
    ) -> None:
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
        path_list = [str(p) for p in paths]
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(label_array) != len(path_list):
            raise ValueError(f"{len(path_list)} image paths but {len(label_array)} labels")
        if len(label_array) and (label_array.min() < 0 or label_array.max() >= len(class_names)):
            raise ValueError(f"labels must lie in 0..{len(class_names) - 1} (one per class name)")
        bbox_array = None
        if bbox is not None:
            bbox_array = np.asarray(bbox, dtype=np.float64)
            if bbox_array.shape != (len(path_list), 4):
                raise ValueError(
                    f"bbox must have shape ({len(path_list)}, 4), got {bbox_array.shape}"
                )
        extra = {k: np.asarray(v) for k, v in (attributes or {}).items()}
        for name, values in extra.items():
            if len(values) != len(path_list):
                raise ValueError(
                    f"attribute {name!r} has {len(values)} values for {len(path_list)} images"
                )
        self.root = Path(root)
        self.paths = path_list
        self.labels = label_array
        self.class_names = [str(c) for c in class_names]
        self.bbox = bbox_array
        self.mode = mode
        self.skip_corrupt = skip_corrupt
        self.attributes = extra
        self.transform = transform
        self.skipped_files: list[str] = []
        self._skipped_class_names: list[str] = []
        self._replacements: dict[int, int] = {}  # unreadable item -> same-class stand-in
        if not _verified:
            self._check_files()

    # -- file checks -------------------------------------------------------------------------

    def full_path(self, index: int) -> Path:
        """The absolute path of item ``index``."""
        return self.root / self.paths[index]

    def _check_files(self) -> None:
        """Fail on the first missing file, or (``skip_corrupt``) drop missing and corrupt files."""
        if not self.skip_corrupt:
            for i in range(len(self.paths)):
                path = self.full_path(i)
                if not path.is_file():
                    missing = sum(
                        not self.full_path(j).is_file() for j in range(i, len(self.paths))
                    )
                    raise ImageReadError(
                        f"image file not found: {path} ({missing} of {len(self.paths)} listed "
                        f"images are missing under {self.root})"
                    )
            return
        keep = np.ones(len(self.paths), dtype=bool)
        for i in range(len(self.paths)):
            reason = verify_image(self.full_path(i))
            if reason is not None:
                keep[i] = False
                self.skipped_files.append(f"{self.full_path(i)} ({reason})")
                self._skipped_class_names.append(self.class_names[self.labels[i]])
        if not keep.all():
            warnings.warn(
                f"skipped {len(self.skipped_files)} unreadable image(s) under {self.root}, "
                f"first: {self.skipped_files[0]}",
                stacklevel=3,
            )
            self._keep_only(np.flatnonzero(keep))

    def _keep_only(self, indices: np.ndarray) -> None:
        self.paths = [self.paths[i] for i in indices]
        self.labels = self.labels[indices]
        if self.bbox is not None:
            self.bbox = self.bbox[indices]
        self.attributes = {k: v[indices] for k, v in self.attributes.items()}

    @property
    def skipped(self) -> int:
        """How many images were skipped as unreadable (up front, plus those replaced on load)."""
        return len(self.skipped_files)

    # -- the ImageDataset contract -----------------------------------------------------------

    def describe(self, index: int) -> str:
        return str(self.full_path(index))

    def load_image(self, index: int) -> Image.Image:
        if index in self._replacements:
            return self._load(self._replacements[index])
        try:
            return self._load(index)
        except ImageReadError as error:
            if not self.skip_corrupt:
                raise
            replacement = self._replacement(index)
            self._replacements[index] = replacement
            self.skipped_files.append(f"{self.full_path(index)} ({error})")
            self._skipped_class_names.append(self.class_names[self.labels[index]])
            warnings.warn(f"{error}; using {self.describe(replacement)} instead", stacklevel=2)
            return self._load(replacement)

    def _load(self, index: int) -> Image.Image:
        image = read_image(self.full_path(index), self.mode)
        if self.bbox is not None:
            left, upper, right, lower = self.bbox[index]
            left, upper = max(0.0, left), max(0.0, upper)
            right, lower = min(float(image.width), right), min(float(image.height), lower)
            if right - left >= 1 and lower - upper >= 1:
                image = image.crop((round(left), round(upper), round(right), round(lower)))
        return image

    def _replacement(self, index: int) -> int:
        """The next readable item of the same class as ``index`` (cyclically)."""
        same = np.flatnonzero(self.labels == self.labels[index])
        start = int(np.searchsorted(same, index))
        for offset in range(1, len(same)):
            candidate = int(same[(start + offset) % len(same)])
            if candidate in self._replacements:
                continue
            try:
                self._load(candidate)
            except ImageReadError:
                continue
            return candidate
        raise ImageReadError(
            f"cannot read image {self.describe(index)}, and no other image of class "
            f"{self.class_names[self.labels[index]]!r} is readable"
        )

    def subset(
        self, indices: Sequence[int] | np.ndarray, label_space: np.ndarray | None = None
    ) -> FileImageDataset:
        """A view restricted to ``indices``, labels relabelled to ``0..C'-1``; the up-front
        skipped files of the kept classes stay listed in ``skipped_files``.

        ``label_space`` (sorted labels of this dataset) fixes the classes of the view, so that two
        views (In-Shop's query and gallery) share labels and class names.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if label_space is None:
            new_labels, originals = relabel_contiguous(self.labels[idx])
        else:
            originals = np.asarray(label_space, dtype=np.int64)
            position = np.searchsorted(originals, self.labels[idx])
            new_labels = np.minimum(position, max(len(originals) - 1, 0))
            if len(idx) and not np.array_equal(originals[new_labels], self.labels[idx]):
                raise ValueError("label_space does not contain every label of the subset")
        names = [self.class_names[int(c)] for c in originals]
        part = FileImageDataset(
            [self.paths[i] for i in idx],
            new_labels,
            names,
            root=self.root,
            bbox=None if self.bbox is None else self.bbox[idx],
            skip_corrupt=self.skip_corrupt,
            mode=self.mode,
            attributes={k: v[idx] for k, v in self.attributes.items()},
            transform=self.transform,
            _verified=True,
        )
        kept = set(names)
        pairs = zip(self.skipped_files, self._skipped_class_names, strict=True)
        skipped = [(f, c) for f, c in pairs if c in kept]
        part.skipped_files = [f for f, _ in skipped]
        part._skipped_class_names = [c for _, c in skipped]
        return part


def file_dataset(
    paths: Sequence[str | Path],
    class_ids: Sequence[Any] | np.ndarray,
    *,
    root: str | Path,
    class_names: dict[Any, str] | None = None,
    bbox: np.ndarray | None = None,
    skip_corrupt: bool = False,
    mode: str = "RGB",
    attributes: dict[str, np.ndarray] | None = None,
) -> FileImageDataset:
    """A :class:`FileImageDataset` over raw class ids (any sortable values), relabelled to
    ``0..C-1`` in sorted id order; ``class_names`` maps an id to its name (default ``str(id)``).

    With ``skip_corrupt`` the files are verified once here; subsets keep the result.
    """
    labels, originals = relabel_contiguous(np.asarray(class_ids))
    names = [class_names.get(c, str(c)) if class_names else str(c) for c in originals.tolist()]
    return FileImageDataset(
        paths,
        labels,
        names,
        root=root,
        bbox=bbox,
        skip_corrupt=skip_corrupt,
        mode=mode,
        attributes=attributes,
    )


def class_disjoint_splits(
    dataset: FileImageDataset,
    train_classes: Sequence[Any] | np.ndarray,
    test_classes: Sequence[Any] | np.ndarray,
    *,
    source: str,
    image_size: int,
    val_fraction: float,
    seed: int,
    val_classes: Sequence[Any] | np.ndarray | None = None,
    info: dict[str, Any] | None = None,
    augment: bool | str = True,
    imagenet_norm: bool = False,
) -> Splits:
    """Train / validation / test views of ``dataset`` by class name.

    The test classes are ``test_classes``; the validation classes are ``val_classes`` when given,
    else carved from ``train_classes`` with :func:`mbdl.data.splits.carve_validation_classes`.
    """
    names = np.asarray(dataset.class_names, dtype=object)
    item_names = names[dataset.labels] if len(dataset) else np.asarray([], dtype=object)
    train_set, test_set = {str(c) for c in train_classes}, {str(c) for c in test_classes}
    val_set = {str(c) for c in val_classes} if val_classes is not None else set()
    overlap = (train_set & test_set) | (val_set & (train_set | test_set))
    if overlap:
        raise ValueError(f"classes are in more than one split: {sorted(overlap)[:5]}")
    train_idx = np.flatnonzero(np.isin(item_names, list(train_set))).astype(np.int64)
    test_idx = np.flatnonzero(np.isin(item_names, list(test_set))).astype(np.int64)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise ValueError(
            f"{source}: the split has {len(train_idx)} training and {len(test_idx)} test images; "
            "both must be non-empty"
        )
    if val_classes is not None:
        val_idx = np.flatnonzero(np.isin(item_names, list(val_set))).astype(np.int64)
    else:
        keep, val_pos = carve_validation_classes(dataset.labels[train_idx], val_fraction, seed)
        train_idx, val_idx = train_idx[keep], train_idx[val_pos]
    details = {"skipped": dataset.skipped, "skipped_files": list(dataset.skipped_files)}
    details.update(info or {})
    splits = Splits(
        train=dataset.subset(train_idx),
        val=dataset.subset(val_idx),
        test=dataset.subset(test_idx),
        channels=1 if dataset.mode == "L" else 3,
        image_size=image_size,
        source=source,
        info=details,
    )
    return attach_transforms(splits, augment=augment, imagenet_norm=imagenet_norm)


def find_root(root: str | os.PathLike[str], marker: str, subfolder: str) -> Path:
    """``root`` itself when it holds ``marker``, else ``root/subfolder`` when that does; else a
    ``FileNotFoundError`` naming both places."""
    base = Path(os.path.expanduser(str(root)))
    for candidate in (base, base / subfolder):
        if (candidate / marker).exists():
            return candidate
    raise FileNotFoundError(
        f"{marker} not found in {base} or {base / subfolder}; point data.root at the extracted "
        f"{subfolder} folder (or its parent), or download it first"
    )
