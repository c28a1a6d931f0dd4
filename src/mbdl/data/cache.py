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
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from mbdl.data.base import ImageDataset
from mbdl.data.splits import ArrayImageDataset
from mbdl.data.transforms import NATURAL_IMAGE_MIN_SIZE

#: bump when the decoding or resizing changes
CACHE_VERSION = 1

#: in memory when the decoded images take at most this fraction of the available memory
MEMORY_FRACTION = 0.25

CACHE_MODES = ("auto", "memory", "disk", "off")


def cache_side(image_size: int) -> int:
    """``S``: the side of the cached squares (see the module docstring)."""
    if image_size < NATURAL_IMAGE_MIN_SIZE:
        return image_size
    return round(image_size * 256 / 224)


def decode_resized(image: Any, side: int, channels: int) -> np.ndarray:
    """A PIL image as ``uint8 [side, side]`` (grey) or ``[side, side, 3]``: the shorter side
    resized to ``side`` (bilinear, antialiased), then centre-cropped."""
    from torchvision.transforms import functional as F

    image = image.convert("L" if channels == 1 else "RGB")
    image = F.center_crop(F.resize(image, side), [side, side])
    return np.asarray(image, dtype=np.uint8)


#: a picklable ``PIL image -> uint8 array`` (run in worker processes)
Prepare = Callable[[Image.Image], Any]


def _decode_range(job: tuple[Any, range, Prepare]) -> np.ndarray:
    dataset, indices, prepare = job
    return np.stack([np.asarray(prepare(dataset.load_image(i)), dtype=np.uint8) for i in indices])


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


def decode_all(dataset: Any, prepare: Prepare, out: np.ndarray) -> None:
    """``prepare(dataset.load_image(i))`` of every item into ``out`` (``[N, H, W(, 3)]``)."""
    count = len(dataset)
    workers = decode_workers(count)
    # a few chunks per worker: each job carries the dataset (its file list) once
    chunk = max(64, -(-count // (4 * max(1, workers))))
    ranges = [range(s, min(s + chunk, count)) for s in range(0, count, chunk)]
    if workers == 0:
        for r in ranges:
            out[r.start : r.stop] = _decode_range((dataset, r, prepare))
        return
    with ProcessPoolExecutor(workers) as pool:
        jobs = [(dataset, r, prepare) for r in ranges]
        for r, block in zip(ranges, pool.map(_decode_range, jobs), strict=True):
            out[r.start : r.stop] = block


def decoded_training_split(
    dataset: Any,
    image_size: int,
    channels: int,
    *,
    mode: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """``dataset`` decoded once (see the module docstring), or ``dataset`` itself when ``mode``
    is ``off``, when it is already in memory, or when its transform is not one of
    :func:`mbdl.data.build_transforms` (a custom transform must see the original image)."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {', '.join(CACHE_MODES)}; got {mode!r}")
    spec = getattr(dataset.transform, "spec", None)
    if mode == "off" or isinstance(dataset, ArrayImageDataset) or not isinstance(spec, dict):
        return dataset
    side = cache_side(image_size)
    shape = (len(dataset), side, side) + (() if channels == 1 else (3,))
    prepare = functools.partial(decode_resized, side=side, channels=channels)
    images = _decoded(dataset, prepare, shape, mode, cache_dir, [side, channels])
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
    return DecodedEvaluationSplit(dataset, images, tensor_steps)


def decode_splits(splits: Any, mode: str = "auto") -> None:
    """Decode once, in place, what a run reads more than once: the training split
    (:func:`decoded_training_split`) and the evaluation splits (:func:`decoded_evaluation_split`)."""
    splits.train = decoded_training_split(
        splits.train, splits.image_size, splits.channels, mode=mode
    )
    for name in ("val", "test", "query", "gallery"):
        dataset = getattr(splits, name, None)
        if dataset is not None:
            setattr(splits, name, decoded_evaluation_split(dataset, mode=mode))


def _decoded(
    dataset: Any,
    prepare: Prepare,
    shape: tuple[int, ...],
    mode: str,
    cache_dir: str | os.PathLike[str] | None,
    key: list[Any],
) -> np.ndarray:
    """The ``uint8`` array of ``prepare`` over ``dataset``: in memory when ``mode`` says so (or,
    for ``auto``, when it fits), else memory-mapped from the cache directory."""
    size = int(np.prod(shape))
    if mode == "memory" or (mode == "auto" and size <= MEMORY_FRACTION * available_memory()):
        images = np.empty(shape, dtype=np.uint8)
        decode_all(dataset, prepare, images)
        return images
    return _disk_cache(dataset, prepare, shape, cache_dir, key)


def _disk_cache(
    dataset: Any,
    prepare: Prepare,
    shape: tuple[int, ...],
    cache_dir: str | os.PathLike[str] | None,
    key: list[Any],
) -> np.ndarray:
    from mbdl.data.glyphs import default_cache_dir

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"decoded-{cache_key(dataset, *key)}.u8"
    size = int(np.prod(shape))
    if not (path.is_file() and path.stat().st_size == size):
        handle, temp = tempfile.mkstemp(dir=folder, prefix=path.name, suffix=".tmp")
        os.close(handle)
        try:
            raw = np.memmap(temp, dtype=np.uint8, mode="w+", shape=shape)
            decode_all(dataset, prepare, raw)
            raw.flush()
            del raw
            os.replace(temp, path)
        finally:
            Path(temp).unlink(missing_ok=True)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
