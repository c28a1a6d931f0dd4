"""WebDataset tar shards as a source: ``data.source=webdataset data.root=DIR|PATTERN``.

``DIR`` holds uncompressed ``.tar`` shards (searched recursively, in sorted order) and the label
list ``classes.txt``; ``PATTERN`` names shards with braces (``/data/shard-{000000..000099}.tar``)
and the label list is ``classes.txt`` beside them. A sample is the consecutive members sharing a
key (WebDataset's grouping: ``<key>.<extension>``): one image (``jpg``, ``jpeg``, ``png``,
``webp``, ``bmp``, ``ppm``, ``pgm``, ``tif``, ``tiff``, ``gif``) and a label, ``<key>.cls`` (an
integer) or ``<key>.json`` (an object whose ``data.label_column`` field, ``label`` by default,
is an integer or a class name). The label list has one class name per line; line ``i`` (from 0)
is label ``i``.

Splits are class-disjoint and come from the label list alone: the last half of the listed
classes are the test classes, validation classes are carved from the others with
``data.val_fraction`` and the seed (:func:`mbdl.data.splits.carve_validation_classes`). The
training split is a stream (:class:`ShardStream`, an ``IterableDataset``: shards split between
ranks and loader workers, read forward, shuffled through a buffer), its images never held in
memory; the validation and test splits are map-style views (:class:`ShardImageDataset`). Both
read each image at the byte offset the header pass found, so only one tar parser (Python's
``tarfile``) decides what a sample is; the ``webdataset`` package is needed only to expand brace
patterns (its ``braceexpand``) and to write shards.

Checked up front (:func:`index_shards`): every shard's tar headers (a corrupt or truncated shard
is refused), every sample's members (one image and one label) and every label (read from the
small ``.cls`` / ``.json`` members, never from decoding an image): in the range of the label list
or a name it holds, and every listed class with a sample. Image bytes are decoded when used: an
undecodable image stops training with its shard and byte offset.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mbdl.data.base import ImageDataset, Splits
from mbdl.data.files import PIL_ERRORS, check_header, to_mode
from mbdl.data.splits import SubsetImageDataset, carve_validation_classes
from mbdl.errors import UserError, terminal_safe

#: the label list's file name, in the shards' directory
LABEL_LIST = "classes.txt"
#: member extensions read as the sample's image
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
#: the largest ``.cls`` / ``.json`` member read for a label
MAX_LABEL_BYTES = 1 << 20
#: samples held by the training stream's shuffle buffer (undecoded bytes)
SHUFFLE_BUFFER = 1000
#: training samples that ``ShardStream.load_image`` previews
PREVIEW_SAMPLES = 256


class WebDatasetError(UserError):
    """Shards or a label list that cannot be used (corrupt shard, sample without label, ...)."""


def _braceexpand() -> Any:
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise WebDatasetError(
            "a shard pattern with braces needs the braceexpand package (webdataset's): "
            "pip install 'mbdl[webdataset]'"
        ) from None
    return braceexpand


def shard_paths(root: str | os.PathLike[str]) -> tuple[list[Path], Path]:
    """``(shards, label list path)`` of ``root``: a directory (its ``.tar`` files, recursively,
    sorted), one ``.tar`` file, or a brace pattern of files."""
    text = os.path.expanduser(str(root))
    if "{" in text:
        shards = [Path(p) for p in _braceexpand()(text)]
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise WebDatasetError(
                f"data.root={terminal_safe(text)}: {len(missing)} shard(s) not found, e.g. "
                f"{terminal_safe(missing[0])}"
            )
        return shards, shards[0].parent / LABEL_LIST
    base = Path(text)
    if base.is_file():
        return [base], base.parent / LABEL_LIST
    if not base.is_dir():
        raise WebDatasetError(f"data.root={terminal_safe(base)} is not a directory or shard")
    shards = sorted(p for p in base.rglob("*.tar") if p.is_file())
    if not shards:
        raise WebDatasetError(f"{terminal_safe(base)} holds no .tar shards")
    return shards, base / LABEL_LIST


def read_label_list(path: Path) -> list[str]:
    """The class names of a label list (one per line, line ``i`` is label ``i``)."""
    if not path.is_file():
        raise WebDatasetError(
            f"no label list {terminal_safe(path)}: write the class names there, one per line "
            "(line i, from 0, is label i)"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise WebDatasetError(
            f"cannot read the label list {terminal_safe(path)}: {error}"
        ) from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()  # a trailing blank line
    for number, name in enumerate(names):
        if not name:
            raise WebDatasetError(f"{terminal_safe(path)} line {number + 1} is empty")
    twice = [name for name, count in Counter(names).items() if count > 1]
    if twice:
        raise WebDatasetError(f"{terminal_safe(path)} lists {terminal_safe(twice[0])!r} twice")
    if len(names) < 2:
        raise WebDatasetError(f"{terminal_safe(path)} lists {len(names)} class(es); need 2+")
    return names


def split_key(name: str) -> tuple[str | None, str]:
    """WebDataset's ``(key, extension)`` of a member name: the extension is everything after the
    first dot of the base name, lower-cased."""
    head, sep, tail = name.rpartition("/")
    stem, dot, extension = tail.partition(".")
    if not dot or not stem:
        return None, ""
    return head + sep + stem, extension.lower()


def parse_label(
    data: bytes, extension: str, names: Sequence[str], lookup: dict[str, int], field: str
) -> int:
    """The label index of a ``.cls`` member (an integer) or a ``.json`` member (``field``: an
    integer or a class name of the list). Raises ``ValueError`` with the reason."""
    if extension == "cls":
        text = data.decode("utf-8", errors="replace").strip()
        try:
            value: Any = int(text)
        except ValueError:
            raise ValueError(f".cls holds {text[:40]!r}, not an integer") from None
    else:
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f".json is not valid JSON ({error})") from None
        if not isinstance(document, dict) or field not in document:
            raise ValueError(f".json has no field {field!r} (set data.label_column=NAME)")
        value = document[field]
    if isinstance(value, str) and extension == "json":
        if value not in lookup:
            raise ValueError(f"label {value!r} is not in the label list")
        return lookup[value]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"label {value!r} is neither an integer nor a class name")
    if not 0 <= value < len(names):
        raise ValueError(f"label {value} is outside the label list's 0..{len(names) - 1}")
    return value


@dataclass(frozen=True)
class ShardIndex:
    """What the header pass found in one shard: per sample its key, label (index into the label
    list) and its image member's byte offset and size."""

    path: Path
    keys: list[str]
    labels: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def index_shard(
    path: Path, names: Sequence[str], field: str = "label", lookup: dict[str, int] | None = None
) -> ShardIndex:
    """The header pass over one shard (see the module docstring); a :class:`WebDatasetError`
    naming the shard (and the key) for anything unusable."""
    lookup = lookup if lookup is not None else {n: i for i, n in enumerate(names)}
    where = terminal_safe(path)
    keys: list[str] = []
    labels: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    try:
        total = path.stat().st_size
        with tarfile.open(path, mode="r:") as archive:
            current: str | None = None
            members: dict[str, tarfile.TarInfo] = {}

            def finish() -> None:
                if current is None:
                    return
                sample = f"{where}: sample {terminal_safe(current)!r}"
                images = [e for e in members if e in IMAGE_EXTENSIONS]
                if not images:
                    raise WebDatasetError(f"{sample} has no image ({', '.join(IMAGE_EXTENSIONS)})")
                if len(images) > 1:
                    raise WebDatasetError(f"{sample} has {len(images)} images; one is read")
                label_ext = "cls" if "cls" in members else "json" if "json" in members else None
                if label_ext is None:
                    raise WebDatasetError(f"{sample} has no label (.cls or .json)")
                member = members[label_ext]
                if member.size > MAX_LABEL_BYTES:
                    raise WebDatasetError(f"{sample}: .{label_ext} is over {MAX_LABEL_BYTES} bytes")
                handle = archive.extractfile(member)
                data = handle.read() if handle is not None else b""
                try:
                    labels.append(parse_label(data, label_ext, names, lookup, field))
                except ValueError as error:
                    raise WebDatasetError(f"{sample}: {error}") from None
                image = members[images[0]]
                keys.append(current)
                offsets.append(image.offset_data)
                sizes.append(image.size)

            for member in archive:
                if member.offset_data + member.size > total:
                    raise WebDatasetError(
                        f"shard {where} is truncated: member {terminal_safe(member.name)!r} "
                        f"ends past the end of the file"
                    )
                if not member.isreg():
                    continue
                key, extension = split_key(member.name)
                if key is None or member.name.startswith("__"):
                    continue  # WebDataset's metadata members (skipped by its reader too)
                if key != current:
                    finish()
                    current, members = key, {}
                if extension in members:
                    raise WebDatasetError(
                        f"{where}: sample {terminal_safe(key)!r} has two .{extension} members"
                    )
                members[extension] = member
            finish()
            end = archive.offset  # tarfile stops silently at a cut header: the end marker tells
        with open(path, "rb") as file:
            file.seek(end)
            if file.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                raise WebDatasetError(
                    f"shard {where} is truncated or damaged: no end-of-archive marker after "
                    f"{len(keys)} samples"
                )
    except (tarfile.TarError, EOFError) as error:
        raise WebDatasetError(f"shard {where} is not a readable tar file: {error}") from None
    except OSError as error:
        raise WebDatasetError(f"cannot read shard {where}: {error.strerror or error}") from None
    return ShardIndex(
        path,
        keys,
        np.asarray(labels, dtype=np.int64),
        np.asarray(offsets, dtype=np.int64),
        np.asarray(sizes, dtype=np.int64),
    )


def index_shards(shards: Sequence[Path], names: Sequence[str], field: str) -> list[ShardIndex]:
    """:func:`index_shard` of every shard; refuses a label list with classes no shard holds."""
    lookup = {n: i for i, n in enumerate(names)}
    index = [index_shard(path, names, field, lookup) for path in shards]
    counts = np.bincount(
        np.concatenate([s.labels for s in index] or [np.zeros(0, np.int64)]), minlength=len(names)
    )
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        shown = ", ".join(repr(names[int(i)]) for i in empty[:3])
        raise WebDatasetError(
            f"the label list names {len(empty)} class(es) that no shard holds ({shown}"
            f"{', ...' if len(empty) > 3 else ''}); the label list and the shards disagree"
        )
    return index


def decode_image(data: bytes, mode: str, where: str) -> Image.Image:
    """The image in ``data`` converted to ``mode``, with the reader's checks (size, pixel mode)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_header(image)
            image.load()
            return to_mode(image, mode)
    except PIL_ERRORS as error:
        raise WebDatasetError(f"{where}: not a readable image ({error})") from None


class ShardImageDataset(ImageDataset):
    """Map-style: the samples at ``(shard, offset, size)``, each image read at its offset."""

    def __init__(
        self,
        shards: Sequence[Path],
        shard_of: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
        keys: Sequence[str],
        labels: np.ndarray,
        class_names: Sequence[str],
        mode: str,
    ) -> None:
        self.shards = list(shards)
        self.shard_of = shard_of
        self.offsets = offsets
        self.sizes = sizes
        self.keys = list(keys)
        self.labels = labels
        self.class_names = list(class_names)
        self.mode = mode
        self.transform = None

    def load_image(self, index: int) -> Image.Image:
        path = self.shards[int(self.shard_of[index])]
        try:
            with open(path, "rb") as file:
                file.seek(int(self.offsets[index]))
                data = file.read(int(self.sizes[index]))
        except OSError as error:
            raise WebDatasetError(f"cannot read {self.describe(index)}: {error}") from None
        return decode_image(data, self.mode, self.describe(index))

    def describe(self, index: int) -> str:
        return f"{self.shards[int(self.shard_of[index])]}:{self.keys[int(index)]}"


def worker_part(rank: int, world_size: int) -> tuple[int, int]:
    """``(part, parts)``: this loader worker's share of the stream among every rank's workers."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def pass_assignment(
    shard_sizes: Sequence[int], part: int, parts: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """``(shard, first sample, step)`` to read for one pass of part ``part`` of ``parts``: with at
    least as many shards as parts, whole shards (shuffled, dealt round-robin: every sample of a
    shard, ``step`` 1); else every shard, each part keeping every ``parts``-th sample. Every
    sample is read by exactly one part per pass."""
    order = rng.permutation(len(shard_sizes))
    if len(shard_sizes) >= parts:
        return [(int(s), 0, 1) for s in order[part::parts]]
    out = []
    start = 0
    for shard in range(len(shard_sizes)):  # samples numbered across shards, dealt round-robin
        first = (part - start) % parts
        out.append((shard, first, parts))
        start += int(shard_sizes[shard])
    return [out[int(s)] for s in order]


class ShardStream(IterableDataset[tuple[torch.Tensor, int]]):
    """The training split as a stream: one pass over this rank's and worker's share of the
    training samples (:func:`pass_assignment`), shard after shard in a seeded order, each image's
    bytes read at its offset (forward through each shard, found by the header pass: the other
    classes' samples are not read), through a shuffle buffer of undecoded samples. Iterating
    yields ``(transformed image, label)``; :meth:`raw_samples` yields the undecoded ``(bytes,
    label, where)`` that the P x K batcher holds.

    Held in memory: per training sample its shard, byte offset, size and label (24 bytes), never
    an image. ``labels`` are the split's labels in class order (a stream has no item order):
    ``len()`` and the per-class counts the preflight checks read. A stream has no random access:
    ``load_image(i)`` / ``describe(i)`` read sample ``preview[i % len(preview)]``, one of up to
    :data:`PREVIEW_SAMPLES` training samples spread over the shards, for what looks at a few
    images (the image size and colour of ``model.backbone=auto``).
    """

    def __init__(
        self,
        shards: Sequence[Path],
        shard_of: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        mode: str,
        *,
        seed: int = 0,
        shuffle_buffer: int = SHUFFLE_BUFFER,
    ) -> None:
        order = np.argsort(shard_of, kind="stable")  # shard after shard, in file order
        self.shards = list(shards)
        self.shard_of = np.asarray(shard_of, dtype=np.int32)[order]
        self.offsets = np.asarray(offsets, dtype=np.int64)[order]
        self.sizes = np.asarray(sizes, dtype=np.int32)[order]
        self.sample_labels = np.asarray(labels, dtype=np.int32)[order]
        self.class_names = list(class_names)
        self.mode = mode
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = 0, 1
        self.epoch = 0
        self.transform: Any = None
        counts = np.bincount(self.shard_of, minlength=len(self.shards))
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        count = min(PREVIEW_SAMPLES, len(self.offsets))
        self.preview = np.linspace(0, len(self.offsets) - 1, count).astype(np.int64)

    @property
    def labels(self) -> np.ndarray:
        counts = np.bincount(self.sample_labels, minlength=len(self.class_names))
        return np.repeat(np.arange(len(self.class_names), dtype=np.int64), counts)

    def __len__(self) -> int:
        return len(self.offsets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _where(self, row: int) -> str:
        return f"{self.shards[int(self.shard_of[row])]} at byte {int(self.offsets[row])}"

    def load_image(self, index: int) -> Image.Image:
        """A preview image (see the class docstring), untransformed."""
        row = int(self.preview[int(index) % len(self.preview)])
        with open(self.shards[int(self.shard_of[row])], "rb") as file:
            file.seek(int(self.offsets[row]))
            data = file.read(int(self.sizes[row]))
        return decode_image(data, self.mode, self._where(row))

    def describe(self, index: int) -> str:
        return self._where(int(self.preview[int(index) % len(self.preview)]))

    def raw_samples(
        self, pass_number: int, part: int, parts: int
    ) -> Iterator[tuple[bytes, int, str]]:
        """One pass of part ``part`` of ``parts``: ``(image bytes, label, where)`` of the training
        samples, shuffled by shard order and a buffer (seeded by the pass)."""
        rng = np.random.default_rng([self.seed, pass_number])
        assignment = pass_assignment(np.diff(self._starts).tolist(), part, parts, rng)
        buffer: list[tuple[bytes, int, str]] = []
        shuffle = np.random.default_rng([self.seed, pass_number, part])
        for sample in self._read(assignment):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            slot = int(shuffle.integers(len(buffer)))
            buffer[slot], sample = sample, buffer[slot]
            yield sample
        for slot in shuffle.permutation(len(buffer)):
            yield buffer[int(slot)]

    def _read(self, assignment: list[tuple[int, int, int]]) -> Iterator[tuple[bytes, int, str]]:
        for shard, first, step in assignment:
            rows = range(int(self._starts[shard]) + first, int(self._starts[shard + 1]), step)
            if not rows:
                continue
            path = self.shards[shard]
            try:
                with open(path, "rb") as file:
                    for row in rows:
                        file.seek(int(self.offsets[row]))
                        data = file.read(int(self.sizes[row]))
                        if len(data) != int(self.sizes[row]):
                            raise WebDatasetError(f"{self._where(row)}: the shard changed")
                        yield data, int(self.sample_labels[row]), self._where(row)
            except OSError as error:
                raise WebDatasetError(f"cannot read shard {path}: {error}") from None

    def load(self, data: bytes, where: str) -> Any:
        """The transformed image of one sample's bytes."""
        image = decode_image(data, self.mode, where)
        return self.transform(image) if self.transform is not None else image

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        part, parts = worker_part(self.rank, self.world_size)
        for data, label, where in self.raw_samples(self.epoch, part, parts):
            yield self.load(data, where), label


def load_splits(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    val_fraction: float = 0.15,
    seed: int = 0,
    label_column: str = "label",
    test_fraction: float = 0.5,
    channels: int = 3,
) -> Splits:
    """The class-disjoint splits of WebDataset shards, without transforms (``mbdl.data.load_splits``
    attaches them; see the module docstring)."""
    if root is None:
        raise WebDatasetError(
            "data.source=webdataset needs data.root (a shard directory or pattern)"
        )
    shards, list_path = shard_paths(root)
    names = read_label_list(list_path)
    index = index_shards(shards, names, label_column)
    num_test = min(len(names) - 1, max(1, round(test_fraction * len(names))))
    pool = np.arange(len(names) - num_test, dtype=np.int64)
    train_pos, val_pos = carve_validation_classes(pool, val_fraction, seed)
    train_classes, val_classes = pool[train_pos], pool[val_pos]
    mode = "L" if channels == 1 else "RGB"
    labels = np.concatenate([s.labels for s in index])
    shard_of = np.concatenate([np.full(len(s), i, dtype=np.int64) for i, s in enumerate(index)])
    offsets = np.concatenate([s.offsets for s in index])
    sizes = np.concatenate([s.sizes for s in index])
    keys = [k for s in index for k in s.keys]
    trained = np.flatnonzero(np.isin(labels, train_classes))
    label_of = np.full(len(names), -1, dtype=np.int64)
    label_of[train_classes] = np.arange(len(train_classes))
    stream = ShardStream(
        shards,
        shard_of[trained],
        offsets[trained],
        sizes[trained],
        label_of[labels[trained]],
        [names[int(c)] for c in train_classes],
        mode,
        seed=seed,
    )
    held_out = np.flatnonzero(np.isin(labels, val_classes) | (labels >= len(names) - num_test))
    evaluated = ShardImageDataset(  # only the validation and test samples
        shards,
        shard_of[held_out],
        offsets[held_out],
        sizes[held_out],
        [keys[int(i)] for i in held_out],
        labels[held_out],
        names,
        mode,
    )
    is_test = evaluated.labels >= len(names) - num_test
    splits = Splits(
        train=stream,  # type: ignore[arg-type]  # a stream: labels, class_names, transform, len
        val=SubsetImageDataset(evaluated, np.flatnonzero(~is_test)),
        test=SubsetImageDataset(evaluated, np.flatnonzero(is_test)),
        channels=channels,
        image_size=image_size,
        source="webdataset",
        info={
            "root": str(root),
            "shards": len(shards),
            "split": f"last {num_test} of the {len(names)} listed classes for test",
        },
    )
    return splits


__all__ = [
    "LABEL_LIST",
    "ShardImageDataset",
    "ShardIndex",
    "ShardStream",
    "WebDatasetError",
    "index_shard",
    "index_shards",
    "load_splits",
    "pass_assignment",
    "read_label_list",
    "shard_paths",
]
