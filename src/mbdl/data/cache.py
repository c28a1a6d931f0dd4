"""Decode once: a file source's training images, decoded and resized a single time, as ``uint8``.

Without it every epoch decodes every JPEG/PNG again with PIL (``data.source=folder`` of 64-px
PNGs: under 30 images/s with one process). :func:`decoded_training_split` decodes the training
split once, with worker processes sized to the machine, into an
:class:`~mbdl.data.splits.ArrayImageDataset` that the batched path (:mod:`mbdl.data.batched`)
then loads and augments by whole batches:

- images are loaded as the source loads them (``load_image``: the same decoding rules, corrupt
  file handling and stand-ins), converted to grey or RGB, their shorter side resized (bilinear,
  antialiased) to ``S`` and centre-cropped to ``S x S``, where ``S = image_size`` below 64 px
  (then the ``affine`` / ``none`` augmentation sees exactly the image the per-image path would)
  and ``S = round(image_size * 256 / 224)`` from 64 px (the ``crop`` augmentation then draws its
  random-resized crops from that centred square rather than from the full-resolution image);
- they are kept in memory when they take at most :data:`MEMORY_FRACTION` of the machine's
  available memory, else in a memory-mapped file ``decoded-<key>.u8`` in the cache directory
  (``$MBDL_CACHE`` or ``~/.cache/mbdl``), the key hashing the files (paths, sizes, modification
  times), ``S``, the channels and :data:`CACHE_VERSION`; a later run with the same data and
  parameters maps it at once. The file is written under a temporary name, then renamed.

The evaluation splits (validation, test, query, gallery) are decoded again at every evaluation
without it. Their transform is deterministic, so :func:`decoded_evaluation_split` caches its whole
image part (grey/RGB conversion, resize, centre crop: ``uint8`` at the network's input size,
keyed by the files and that part's parameters) and applies only ``ToTensor`` (and the
normalisation) per item: the same tensors as the per-image path, bit for bit.
:func:`decode_splits` does both for the trainer.

``data.cache``: ``auto`` (the above), ``memory``, ``disk``, or ``off`` (decode per image, every
epoch and every evaluation). Sources already in memory (glyphs, IDX) are not touched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset
from torchvision import transforms as T

from mbdl.data.base import ImageDataset
from mbdl.data.splits import ArrayImageDataset
from mbdl.data.transforms import NATURAL_IMAGE_MIN_SIZE

#: bump when the decoding or resizing changes
CACHE_VERSION = 2

#: what a disk cache leaves free on its file system besides itself (bytes)
DISK_MARGIN = 256 * 2**20

#: in memory when the decoded images take at most this fraction of the available memory
MEMORY_FRACTION = 0.25

CACHE_MODES = ("auto", "memory", "disk", "off")


def cache_side(image_size: int) -> int:
    """``S``: the side of the cached squares (see the module docstring)."""
    if image_size < NATURAL_IMAGE_MIN_SIZE:
        return image_size
    return round(image_size * 256 / 224)


def decode_resized(image: Any, side: int, channels: int) -> np.ndarray:
    """A PIL image or a ``uint8 [H, W, C]`` array as ``uint8 [side, side]`` (grey) or
    ``[side, side, 3]``: the shorter side resized to ``side`` (bilinear, antialiased), then
    centre-cropped. Below :data:`NATURAL_IMAGE_MIN_SIZE` with PIL (the per-image path's pixels
    exactly), from there on with torch's ``uint8`` resize
    (:func:`mbdl.data.fastpath.resize_crop_uint8`: a fifth of PIL's time, at most one grey level
    apart)."""
    from torchvision.transforms import functional as F

    if isinstance(image, np.ndarray):
        if image.shape[2] == channels and side >= NATURAL_IMAGE_MIN_SIZE:
            array = image
        else:
            image = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    if not isinstance(image, np.ndarray):
        image = image.convert("L" if channels == 1 else "RGB")
        if side < NATURAL_IMAGE_MIN_SIZE:
            image = F.center_crop(F.resize(image, side), [side, side])
            return np.asarray(image, dtype=np.uint8)
        array = np.asarray(image, dtype=np.uint8)
    from mbdl.data.fastpath import resize_crop_uint8

    out = resize_crop_uint8(array, side, side)
    return out[0].numpy() if channels == 1 else out.permute(1, 2, 0).numpy()


#: a picklable ``PIL image -> uint8 array`` (run in worker processes)
Prepare = Callable[[Image.Image], Any]


def load_for_cache(dataset: Any, index: int, min_side: int | None) -> Any:
    """Item ``index`` as the source loads it (a PIL image), or, for files without a bounding
    box, as :func:`mbdl.data.decode.read_array` reads it (a ``uint8 [H, W, C]`` array; the same
    checks; JPEGs with DCT scaling down to a shorter side of at least ``min_side``); an unreadable
    file is left to the source's own handling (``skip_corrupt`` stand-ins or its error)."""
    from mbdl.data.decode import read_array
    from mbdl.data.files import FileImageDataset, ImageReadError

    direct = (
        isinstance(dataset, FileImageDataset)
        and dataset.bbox is None
        and index not in dataset._replacements
    )
    if direct:
        try:
            return read_array(dataset.full_path(index), dataset.mode, min_side)
        except ImageReadError:
            pass
    return dataset.load_image(index)


def _prepared(dataset: Any, index: int, prepare: Prepare, min_side: int | None) -> np.ndarray:
    """``prepare`` of item ``index``: :func:`decode_resized` takes the decoded array as it is,
    any other ``prepare`` (an evaluation transform's PIL steps) a PIL image of it."""
    image = load_for_cache(dataset, index, min_side)
    takes_arrays = isinstance(prepare, functools.partial) and prepare.func is decode_resized
    if isinstance(image, np.ndarray) and not takes_arrays:
        image = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    return np.asarray(prepare(image), dtype=np.uint8)


def _decode_range(job: tuple[Any, range, Prepare, int | None]) -> np.ndarray:
    dataset, indices, prepare, min_side = job
    return np.stack([_prepared(dataset, i, prepare, min_side) for i in indices])


def available_memory() -> int:
    """Bytes of memory available (``MemAvailable``), or 4 GiB when it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def decode_workers(count: int) -> int:
    """Processes for decoding ``count`` images: the machine's CPUs, none for small sets."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 0 if count < 256 else max(1, min(cpus or 1, 32))


def cache_key(dataset: Any, *params: Any) -> str:
    """A hash of the items (their descriptions; for files also size and modification time) and
    of ``params`` (JSON values: what the decoding does)."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, *params]).encode())
    for i in range(len(dataset)):
        name = dataset.describe(i)
        digest.update(name.encode("utf-8", "surrogateescape"))
        try:
            stat = os.stat(name)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        except OSError:
            pass
        digest.update(f"{int(dataset.labels[i])};".encode())
    return digest.hexdigest()[:20]


def decode_all(
    dataset: Any, prepare: Prepare, out: np.ndarray, min_side: int | None = None
) -> None:
    """``prepare(load_for_cache(dataset, i, min_side))`` of every item into ``out``
    (``[N, H, W(, 3)]``)."""
    count = len(dataset)
    workers = decode_workers(count)
    # a few chunks per worker: each job carries the dataset (its file list) once
    chunk = max(64, -(-count // (4 * max(1, workers))))
    ranges = [range(s, min(s + chunk, count)) for s in range(0, count, chunk)]
    if workers == 0:
        for r in ranges:
            out[r.start : r.stop] = _decode_range((dataset, r, prepare, min_side))
        return
    with ProcessPoolExecutor(workers) as pool:
        jobs = [(dataset, r, prepare, min_side) for r in ranges]
        for r, block in zip(ranges, pool.map(_decode_range, jobs), strict=True):
            out[r.start : r.stop] = block


def decoded_training_split(
    dataset: Any,
    image_size: int,
    channels: int,
    *,
    mode: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    notes: list[str] | None = None,
) -> Any:
    """``dataset`` decoded once (see the module docstring), or ``dataset`` itself when ``mode``
    is ``off`` (or ``auto`` finds no room: :func:`plan_cache`), when it is already in memory,
    or when its transform is not one of :func:`mbdl.data.build_transforms` (a custom transform
    must see the original image). Where the images went and why is appended to ``notes``."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {', '.join(CACHE_MODES)}; got {mode!r}")
    spec = getattr(dataset.transform, "spec", None)
    if isinstance(dataset, IterableDataset):  # a stream (e.g. WebDataset shards)
        if notes is not None:
            notes.append("streamed, decoded per image")
        return dataset
    if isinstance(dataset, ArrayImageDataset):
        if notes is not None:
            notes.append("images in memory already")
        return dataset
    if mode == "off" or not isinstance(spec, dict):
        if notes is not None:
            notes.append(
                "data.cache=off: decoded per image"
                if mode == "off"
                else "custom transform: decoded per image"
            )
        return dataset
    side = cache_side(image_size)
    shape = (len(dataset), side, side) + (() if channels == 1 else (3,))
    prepare = functools.partial(decode_resized, side=side, channels=channels)
    # photographs much larger than the cached square: JPEG DCT scaling while decoding
    min_side = side if image_size >= NATURAL_IMAGE_MIN_SIZE else None
    images = _decoded(
        dataset, prepare, shape, mode, cache_dir, [side, channels], min_side=min_side, notes=notes
    )
    if images is None:
        return dataset
    describe = [dataset.describe(i) for i in range(len(dataset))]
    return ArrayImageDataset(
        images, dataset.labels, dataset.class_names, describe, dataset.transform
    )


class DecodedEvaluationSplit(ImageDataset):
    """An evaluation split with the image part of its transform done once: ``dataset[i]`` is
    ``tensor_steps(images[i])``, the same tensor as ``source[i]``; labels, class names,
    :meth:`describe` and :meth:`load_image` (the original image) are the source's."""

    def __init__(self, source: Any, images: np.ndarray, tensor_steps: Callable[..., Tensor]):
        self.source = source
        self.images = images
        self.labels = source.labels
        self.class_names = source.class_names
        self.transform = source.transform
        self.tensor_steps = tensor_steps

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        # a copy: a read-only memory map is never handed to torch.from_numpy
        return self.tensor_steps(np.array(self.images[index])), int(self.labels[index])

    def load_image(self, index: int) -> Image.Image:
        return self.source.load_image(index)

    def describe(self, index: int) -> str:
        return str(self.source.describe(index))


def split_evaluation_transform(transform: Any) -> tuple[Prepare, Callable[..., Tensor]] | None:
    """``(image_steps, tensor_steps)`` of an evaluation transform of
    :func:`mbdl.data.build_transforms` (everything before ``ToTensor``, then the rest), or None
    when ``transform`` is not one (a custom or random transform must see every image)."""
    spec = getattr(transform, "spec", None)
    if not isinstance(transform, T.Compose) or not isinstance(spec, dict):
        return None
    if spec.get("kind") != "none":
        return None
    steps = list(transform.transforms)
    cut = next((i for i, step in enumerate(steps) if isinstance(step, T.ToTensor)), None)
    if cut is None:
        return None
    return T.Compose(steps[:cut]), T.Compose(steps[cut:])


def decoded_evaluation_split(
    dataset: Any,
    *,
    mode: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """``dataset`` with its evaluation transform's image part done once (see the module
    docstring), or ``dataset`` itself when ``mode`` is ``off``, when it is in memory already,
    is empty, or when its transform is not an evaluation transform of
    :func:`mbdl.data.build_transforms`."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {', '.join(CACHE_MODES)}; got {mode!r}")
    parts = split_evaluation_transform(getattr(dataset, "transform", None))
    if mode == "off" or isinstance(dataset, ArrayImageDataset) or parts is None or not len(dataset):
        return dataset
    image_steps, tensor_steps = parts
    first = np.asarray(image_steps(dataset.load_image(0)), dtype=np.uint8)
    shape = (len(dataset), *first.shape)
    images = _decoded(dataset, image_steps, shape, mode, cache_dir, ["eval", repr(image_steps)])
    if images is None:
        return dataset
    return DecodedEvaluationSplit(dataset, images, tensor_steps)


def decode_splits(splits: Any, mode: str = "auto", num_workers: int | str = "auto") -> None:
    """Decode once, in place, what a run reads more than once: the training split
    (:func:`decoded_training_split`) and the evaluation splits (:func:`decoded_evaluation_split`).
    Where the images went and why, and the training loader's workers (``num_workers``, sized by
    :func:`mbdl.data.workers.loader_workers_reason`), go to ``splits.info["data_path"]`` (the
    data line)."""
    from mbdl.data.batched import batched_training_data
    from mbdl.data.workers import loader_workers_reason

    notes: list[str] = []
    splits.train = decoded_training_split(
        splits.train, splits.image_size, splits.channels, mode=mode, notes=notes
    )
    for name in ("val", "test", "query", "gallery"):
        dataset = getattr(splits, name, None)
        if dataset is not None:
            setattr(splits, name, decoded_evaluation_split(dataset, mode=mode))
    batched = batched_training_data(splits.train)
    workers, why = loader_workers_reason(
        num_workers, batched if batched is not None else splits.train, training=True
    )
    notes.append(f"{workers} loader worker(s): {why}")
    if splits.info is None:
        splits.info = {}
    splits.info["data_path"] = "; ".join(notes)


def _gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB"


def disk_free(folder: Path) -> int:
    """Free bytes on the file system of ``folder`` (or of its nearest existing parent)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def plan_cache(mode: str, size: int, folder: Path, *, cached: bool = False) -> tuple[str, str]:
    """``(where, reason)``: ``"memory"``, ``"disk"`` or ``"off"`` for ``size`` bytes of decoded
    images under ``mode``, from the available memory and the free space of ``folder``
    (``cached``: a matching cache file is there already). ``disk`` on a file system without
    ``size`` + :data:`DISK_MARGIN` free is refused before anything is written (a
    :class:`~mbdl.errors.UserError` with the size it needs); ``auto`` then decodes per image."""
    from mbdl.errors import UserError, terminal_safe

    if mode == "off":
        return "off", "data.cache=off: decoded per image"
    if mode == "memory":
        return "memory", f"data.cache=memory: {_gib(size)} decoded in memory"
    available = available_memory()
    if mode == "auto" and size <= MEMORY_FRACTION * available:
        return "memory", (
            f"cache in memory: {_gib(size)} decoded fit in a quarter of {_gib(available)} available"
        )
    if cached:
        return (
            "disk",
            f"cache on disk: {_gib(size)} mapped from {terminal_safe(folder)} (built before)",
        )
    free, needed = disk_free(folder), size + DISK_MARGIN
    if free < needed:
        if mode == "disk":
            raise UserError(
                f"the decoded-image cache needs {_gib(needed)} free in {terminal_safe(folder)} "
                f"but only {_gib(free)} is free; free space, set MBDL_CACHE to a larger disk, or "
                "set data.cache=off"
            )
        return "off", (
            f"no cache: {_gib(size)} decoded exceed a quarter of {_gib(available)} available "
            f"memory and the {_gib(free)} free in {terminal_safe(folder)}; decoded per image"
        )
    how = (
        "data.cache=disk"
        if mode == "disk"
        else f"{_gib(size)} exceed a quarter of {_gib(available)} available memory"
    )
    return "disk", f"cache on disk ({how}): memory-mapped from {terminal_safe(folder)}"


def _cache_folder(cache_dir: str | os.PathLike[str] | None) -> Path:
    from mbdl.data.glyphs import default_cache_dir

    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _decoded(
    dataset: Any,
    prepare: Prepare,
    shape: tuple[int, ...],
    mode: str,
    cache_dir: str | os.PathLike[str] | None,
    key: list[Any],
    *,
    min_side: int | None = None,
    notes: list[str] | None = None,
) -> np.ndarray | None:
    """The ``uint8`` array of ``prepare`` over ``dataset``: in memory or memory-mapped from the
    cache directory as :func:`plan_cache` decides (its reason appended to ``notes``), or None
    when it decides ``off``."""
    size = int(np.prod(shape))
    folder = _cache_folder(cache_dir)
    path = folder / f"decoded-{cache_key(dataset, *key, min_side)}.u8"
    where, reason = plan_cache(mode, size, folder, cached=_valid_cache(path, shape))
    if notes is not None:
        notes.append(reason)
    if where == "off":
        return None
    if where == "memory":
        images = np.empty(shape, dtype=np.uint8)
        decode_all(dataset, prepare, images, min_side)
        return images
    return _disk_cache(dataset, prepare, shape, path, min_side, [*key, min_side])


def _sources_digest(dataset: Any, params: list[Any]) -> str:
    """A hash of the items' names and the decoding ``params`` (not the files' sizes and times,
    nor :data:`CACHE_VERSION`): a cache of the same files before they changed, or written by
    another version, has the same."""
    digest = hashlib.sha256(json.dumps(params).encode())
    for i in range(len(dataset)):
        digest.update(dataset.describe(i).encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:20]


def _valid_cache(path: Path, shape: tuple[int, ...]) -> bool:
    """``path`` and its ``.json`` record exist and agree: this version, this shape, its size."""
    record = path.with_suffix(".json")
    try:
        meta = json.loads(record.read_text(encoding="utf-8"))
        return (
            isinstance(meta, dict)
            and meta.get("version") == CACHE_VERSION
            and meta.get("shape") == list(shape)
            and path.stat().st_size == int(np.prod(shape))
        )
    except (OSError, ValueError):
        return False


def _remove_stale(folder: Path, sources: str, keep: Path) -> None:
    """Delete the caches of the same files written before they changed (or by another version)."""
    for record in folder.glob("decoded-*.json"):
        if record.with_suffix(".u8") == keep:
            continue
        try:
            meta = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("sources") == sources:
            record.with_suffix(".u8").unlink(missing_ok=True)
            record.unlink(missing_ok=True)


def _disk_cache(
    dataset: Any,
    prepare: Prepare,
    shape: tuple[int, ...],
    path: Path,
    min_side: int | None,
    params: list[Any],
) -> np.ndarray:
    """The memory map of ``path``, decoded into it first unless :func:`_valid_cache` (a file of
    another version, shape or size, or without its record, is rebuilt, never read)."""
    from mbdl.fileio import atomic_write_text

    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    if not _valid_cache(path, shape):
        sources = _sources_digest(dataset, params)
        handle, temp = tempfile.mkstemp(dir=folder, prefix=path.name, suffix=".tmp")
        os.close(handle)
        try:
            raw = np.memmap(temp, dtype=np.uint8, mode="w+", shape=shape)
            decode_all(dataset, prepare, raw, min_side)
            raw.flush()
            del raw
            path.with_suffix(".json").unlink(missing_ok=True)
            os.replace(temp, path)
        finally:
            Path(temp).unlink(missing_ok=True)
        record = {"version": CACHE_VERSION, "shape": list(shape), "sources": sources}
        atomic_write_text(path.with_suffix(".json"), json.dumps(record) + "\n")
        _remove_stale(folder, sources, path)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
