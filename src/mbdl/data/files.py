"""Images stored as files on disk (the official benchmarks, image folders, CSV lists).

:class:`FileImageDataset` checks every image when it is built (:func:`inspect_image`: a regular
file, a header PIL recognises, at most :data:`MAX_PIXELS` pixels, a supported mode, a cheap
decode of the first frame) and decodes each on demand by the table :data:`DECODING`
(:func:`to_mode`). Any bad image raises one :class:`ImageReadError` that names the first and
counts them all, before training starts. With ``skip_corrupt=True``:

- images that fail the check are dropped up front, with one warning; ``skipped_files`` lists
  them and ``skipped`` counts them;
- a file that breaks after the check (replaced on disk mid-run) is replaced, from its first load
  on, by the next readable image of the same class (the batch keeps its class composition and
  the label stays right), with one warning; it is added to ``skipped_files`` and counted in
  ``skipped``. So a ``DataLoader`` never crashes mid-epoch (unless every image of a class is
  unreadable: then a clear error). With ``num_workers > 0`` load-time skips are counted in the
  worker processes, not in the main process's ``skipped``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mbdl.data.base import ImageDataset, Splits
from mbdl.data.splits import carve_validation_classes, relabel_contiguous
from mbdl.errors import UserError, terminal_safe

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
PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

#: the largest image (width x height) read; larger ones are refused before decoding
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)

# PIL's warnings (a large image, odd EXIF or palette data) would print on stderr beside mbdl's
# one-line errors; what they warn about is checked and reported here (MAX_PIXELS, DECODING).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", module=r"PIL\.")

#: the background that transparent pixels are composited on (how a browser shows them)
BACKGROUND = (255, 255, 255)

#: modes mbdl reads, and how (the decoding table; see :func:`to_mode`)
DECODING = {
    "L": "8-bit grey: as stored",
    "RGB": "8-bit colour: as stored (Pillow reduces 16-bit colour PNGs to their high bytes)",
    "1": "1-bit: 0 and 255",
    "I;16": "16-bit grey: value / 257, rounded (0..65535 -> 0..255)",
    "I;16L": "16-bit grey: value / 257, rounded",
    "I;16B": "16-bit grey: value / 257, rounded",
    "I;16N": "16-bit grey: value / 257, rounded",
    "I": "32-bit integer grey (16-bit PNG/TIFF): clipped to 0..65535, then value / 257",
    "P": "palette: expanded to its colours; a transparent index composited on white",
    "PA": "palette + alpha: composited on white",
    "LA": "grey + alpha: composited on white",
    "La": "grey + premultiplied alpha: composited on white",
    "RGBA": "colour + alpha: composited on white",
    "RGBa": "colour + premultiplied alpha: composited on white",
    "RGBX": "colour + padding: the padding dropped",
    "CMYK": "Pillow's CMYK -> RGB conversion (no ICC colour management)",
    "YCbCr": "converted to RGB",
    "LAB": "converted to RGB",
    "HSV": "converted to RGB",
}


class ImageReadError(UserError):
    """An image file that does not exist, cannot be read, does not decode, or is not supported."""


#: rows of a 16-bit image scaled at a time (bounds the scaling's working memory)
_SCALE_CHUNK_PIXELS = 1 << 20


def _scale_16_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grey image as 8-bit grey: ``round(v / 257)``, ``v`` clipped
    to ``0..65535``, so 0 -> 0 and 65535 -> 255 (Pillow's own ``convert("L")`` clips at 255).

    ``round(v / 257) = (v + 128) // 257`` exactly (257 is odd: no ties), computed a band of rows
    at a time, so the working memory beyond the decoded image and its 8-bit result is bounded
    (about :data:`_SCALE_CHUNK_PIXELS` x 8 bytes) whatever the image size.
    """
    width, height = image.size
    scaled = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _SCALE_CHUNK_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(height, top + rows)))
        if image.mode == "I;16B":  # big-endian 16-bit: read the raw bytes
            values = np.frombuffer(band.tobytes(), dtype=">u2").reshape(band.height, width)
        else:
            values = np.asarray(band)
        values = np.clip(values, 0, 65535).astype(np.uint32)
        scaled[top : top + band.height] = ((values + 128) // 257).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """The decoded first frame of ``image`` as 8-bit ``mode`` (``"RGB"`` or ``"L"``) by the
    :data:`DECODING` table: the EXIF orientation applied, 16-bit values scaled (not clipped),
    palettes expanded, alpha composited on :data:`BACKGROUND`. Other modes (32-bit float ``F``)
    raise ``ValueError``: their range is not defined, so any conversion would guess."""
    from PIL import ImageOps

    if image.mode not in DECODING:
        raise ValueError(
            f"pixel mode {image.mode} is not supported (supported: {', '.join(DECODING)}); "
            "convert the file to 8- or 16-bit grey or colour"
        )
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        image = _scale_16_bit(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode in ("PA", "La"):  # Pillow converts La only to LA
        image = image.convert("RGBA" if image.mode == "PA" else "LA")
    if image.mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == mode else image.convert(mode)


@contextlib.contextmanager
def open_image_file(path: str | os.PathLike[str]) -> Iterator[Image.Image]:
    """``Image.open`` of ``path`` once it is known to be a regular file: opened without blocking
    (a named pipe, a device or a socket would block or never end) and checked with ``fstat``
    on the opened descriptor (no window between the check and the read); the image and its file
    are closed on leaving. Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for
    anything not a regular file or empty, PIL's errors otherwise."""
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(handle)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size == 0:
            raise ValueError("empty file")
        os.set_blocking(handle, True)
        file = os.fdopen(handle, "rb")
    except BaseException:
        os.close(handle)
        raise
    with file, Image.open(file) as image:
        yield image


def read_image(path: str | os.PathLike[str], mode: str = "RGB") -> Image.Image:
    """Open and fully decode ``path`` with PIL, converted to ``mode`` (``"RGB"`` or ``"L"``) by
    :func:`to_mode` (the first frame of an animation).

    Raises :class:`ImageReadError` naming the file when it is missing, not a regular file (a
    named pipe, a device: refused before reading), corrupt, larger than :data:`MAX_PIXELS`
    (checked from the header, before decoding; PIL's decompression-bomb error included) or of an
    unsupported mode.
    """
    try:
        with open_image_file(path) as image:
            check_header(image)
            image.load()
            return to_mode(image, mode)
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {terminal_safe(path)}") from None
    except PIL_ERRORS as error:
        raise ImageReadError(
            f"cannot read image {terminal_safe(path)}: {read_error_reason(error, path)}"
        ) from None


def check_header(image: Image.Image) -> None:
    """Refuse (ValueError) an image whose header gives an empty size or more than
    :data:`MAX_PIXELS` pixels, before it is decoded."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"it has an empty size {width} x {height}")
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"{width} x {height} pixels is more than the limit of {MAX_PIXELS} "
            "(mbdl.data.files.MAX_PIXELS); resize the image"
        )
    if image.mode not in DECODING:
        raise ValueError(
            f"pixel mode {image.mode} is not supported; convert the file to 8- or 16-bit grey "
            "or colour"
        )


def inspect_image(path: str | Path) -> str | None:
    """``None`` when ``path`` is a regular file holding a readable, supported image within
    :data:`MAX_PIXELS`, else the reason it is not. Checks the header first (size, mode, no
    pixel data read), then decodes the first frame (JPEGs at 1/8 scale, which is cheap)."""
    try:
        with open_image_file(path) as image:
            check_header(image)
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except FileNotFoundError:
        return "file not found" + (" (broken symbolic link)" if os.path.islink(path) else "")
    except PIL_ERRORS as error:
        return read_error_reason(error, path)
    return None


_FILE_OBJECT = re.compile(r" ?<_io\.\w+ name=[^>]*>")


def read_error_reason(error: BaseException, path: str | os.PathLike[str]) -> str:
    """PIL's message without the path it repeats."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    reason = str(error).replace(f" {str(path)!r}", "").replace(f" {path!r}", "")
    reason = _FILE_OBJECT.sub("", reason)  # PIL names the open file object it was given
    return reason or type(error).__name__


def inspect_images(paths: Sequence[str | Path], workers: int | None = None) -> list[str | None]:
    """:func:`inspect_image` of each path, decoded in threads (Pillow decodes outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 64:
        return [inspect_image(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(inspect_image, paths, chunksize=64))


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
        """Inspect every image up front (:func:`inspect_images`: header, size limit, mode, a
        cheap decode). Any bad one fails with one error that names the first and counts them
        all; with ``skip_corrupt`` they are dropped instead, with one warning."""
        reasons = inspect_images([self.full_path(i) for i in range(len(self.paths))])
        bad = [i for i, reason in enumerate(reasons) if reason is not None]
        if not bad:
            return
        if not self.skip_corrupt:
            first = bad[0]
            missing = sum(str(reasons[i]).startswith("file not found") for i in bad)
            reason = str(reasons[first])
            what = "not found" if reason.startswith("file not found") else "cannot be read"
            raise ImageReadError(
                f"image {what}: {terminal_safe(self.full_path(first))} ({reason}); {len(bad)} of "
                f"{len(self.paths)} listed images under {terminal_safe(self.root)} cannot be used "
                f"({missing} missing); fix or remove them, or set data.skip_corrupt=true"
            )
        for i in bad:
            self.skipped_files.append(f"{self.full_path(i)} ({reasons[i]})")
            self._skipped_class_names.append(self.class_names[self.labels[i]])
        warnings.warn(
            f"skipped {len(bad)} unreadable image(s) under {terminal_safe(self.root)}, "
            f"first: {terminal_safe(self.skipped_files[0])}",
            stacklevel=3,
        )
        keep = np.ones(len(self.paths), dtype=bool)
        keep[bad] = False
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
    check_no_shared_files(dataset, {"train": train_idx, "val": val_idx, "test": test_idx})
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
    return splits


def check_no_shared_files(dataset: FileImageDataset, splits: dict[str, np.ndarray]) -> None:
    """Refuse splits that share a file (the same resolved path listed in two of them, e.g. a
    CSV row repeated with another label, or a link): a test image seen in training."""
    owner: dict[str, tuple[str, int]] = {}
    for split, indices in splits.items():
        for i in indices.tolist():
            real = os.path.realpath(dataset.full_path(i))
            first_split, first = owner.setdefault(real, (split, i))
            if first_split != split:
                raise UserError(
                    f"{terminal_safe(dataset.describe(i))} ({split}) and "
                    f"{terminal_safe(dataset.describe(first))} ({first_split}) are the same file; "
                    "the splits must not share a file: remove one of them"
                )


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
