"""Embed a large gallery into files that numpy and faiss memory-map: no pickle, no images held.

``embed_to_files(model, dataset, "gallery.npy")`` writes

- ``gallery.npy``: ``float32 [N, d]`` embeddings (``np.load(path, mmap_mode="r")``, or
  ``faiss.IndexFlatL2(d).add(...)`` chunk by chunk), in the dataset's order;
- ``gallery.labels.npy``: ``int64 [N]`` labels (``-1``: an image without a class folder);
- ``gallery.paths.txt``: one image path (or item description) per line, in the same order;
- ``gallery.json``: ``count``, ``dim``, ``class_names``, ``distance``, ``preprocessing``, ``model``.

Images are read batch by batch by a ``DataLoader`` and each batch's embeddings go straight into
the memory-mapped file, so memory stays flat whatever the number of images. Under ``torchrun``
every rank embeds a contiguous shard of the items into the same pre-allocated file (the output
must be on a file system all ranks see); rank 0 moves the finished files into place. Files are
written under temporary names and renamed at the end: an interrupted run leaves the previous
output (or none), never half of one.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from mbdl.data.files import IMAGE_EXTENSIONS, read_image
from mbdl.distributed import (
    DistributedInfo,
    barrier,
    broadcast_object,
    distributed_info,
    is_distributed,
)
from mbdl.fileio import atomic_write_text


def list_images(root: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """``(paths relative to root, labels, class names)`` of every image below ``root``, sorted.

    An image inside a first-level subfolder gets that folder's class (classes numbered in sorted
    order); an image directly in ``root`` gets label ``-1``. Hidden files and folders are skipped.
    """
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"image folder {str(base)!r} does not exist or is not a directory")
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.startswith(".") and filename.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.relpath(os.path.join(dirpath, filename), base))
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found below {str(base)!r}")
    folders = [Path(p).parts[0] if len(Path(p).parts) > 1 else None for p in paths]
    class_names = sorted({f for f in folders if f is not None})
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[f] if f is not None else -1 for f in folders], dtype=np.int64)
    return paths, labels, class_names


class ImageFiles(Dataset[tuple[Tensor, int]]):
    """Image files read on demand: ``dataset[i] = (transform(image i), label i)``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], Tensor],
        mode: str = "RGB",
    ) -> None:
        self.root = Path(root)
        self.paths, self.labels, self.class_names = list_images(root)
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = read_image(self.root / self.paths[index], self.mode)
        return self.transform(image), int(self.labels[index])

    def describe(self, index: int) -> str:
        return self.paths[index]


def output_paths(path: str | os.PathLike[str]) -> dict[str, Path]:
    """The files of an embedding output ``path`` (``X.npy``): embeddings, labels, paths, info."""
    target = Path(path)
    if target.suffix != ".npy":
        raise ValueError(f"the embeddings file must end in .npy, got {str(target)!r}")
    stem = target.with_suffix("")
    return {
        "embeddings": target,
        "labels": stem.with_name(stem.name + ".labels.npy"),
        "paths": stem.with_name(stem.name + ".paths.txt"),
        "info": stem.with_name(stem.name + ".json"),
    }


def shard(count: int, rank: int, world_size: int) -> range:
    """The contiguous items ``[count * rank / W, count * (rank + 1) / W)`` of one rank."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)


def _temp(path: Path, token: str) -> Path:
    return path.with_name(f".{path.name}.{token}.tmp")


def embed_to_files(
    model: nn.Module,
    dataset: Any,
    output: str | os.PathLike[str],
    *,
    dim: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    describe: Callable[[int], str] | None = None,
) -> dict[str, Path]:
    """Embed ``dataset`` (``(image, label)`` items) into ``output`` and its side files.

    Under an initialised process group every rank calls this with the same arguments and
    embeds its :func:`shard`. ``dim`` is the embedding dimension; ``info`` is stored in the
    ``.json`` file; ``describe(i)`` gives item ``i``'s line in ``.paths.txt`` (default: the
    dataset's ``describe``). Returns the written paths.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    files = output_paths(output)
    dist = distributed_info() if is_distributed() else DistributedInfo()
    count = len(dataset)
    if count == 0:
        raise ValueError("there is nothing to embed (no items)")
    token = broadcast_object(f"{os.getpid()}") if dist.enabled else str(os.getpid())
    temps = {name: _temp(path, token) for name, path in files.items()}
    if dist.is_main:
        files["embeddings"].parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(temps["embeddings"], "w+", np.float32, (count, dim)).flush()
        np.lib.format.open_memmap(temps["labels"], "w+", np.int64, (count,)).flush()
    barrier()
    embeddings = np.load(temps["embeddings"], mmap_mode="r+")
    labels = np.load(temps["labels"], mmap_mode="r+")
    mine = shard(count, dist.rank, dist.world_size)
    loader = DataLoader(
        Subset(dataset, list(mine)), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(mine) * (dist.world_size if dist.enabled else 1),
        desc="embedding",
        unit="img",
        disable=not (progress and dist.is_main),
        file=sys.stderr,
        dynamic_ncols=True,
    )
    was_training = model.training
    model.eval()
    position = mine.start
    try:
        with torch.inference_mode():
            for images, batch_labels in loader:
                output_rows = model(images.to(device)).float().cpu().numpy()
                if output_rows.shape[1] != dim:
                    raise ValueError(
                        f"the model gives {output_rows.shape[1]} dimensions, not {dim}"
                    )
                end = position + len(output_rows)
                embeddings[position:end] = output_rows
                labels[position:end] = np.asarray(batch_labels, dtype=np.int64)
                position = end
                bar.update(len(output_rows) * (dist.world_size if dist.enabled else 1))
        embeddings.flush()
        labels.flush()
        del embeddings, labels
        if position != mine.stop:  # pragma: no cover (a DataLoader always yields every item)
            raise RuntimeError(f"embedded {position - mine.start} of {len(mine)} items")
        barrier()
        if dist.is_main:
            describe = describe or getattr(dataset, "describe", None) or str
            lines = "".join(describe(i).replace("\n", " ") + "\n" for i in range(count))
            atomic_write_text(files["paths"], lines)
            meta = {"count": count, "dim": dim, **(info or {})}
            atomic_write_text(files["info"], json.dumps(meta, indent=2) + "\n")
            os.replace(temps["labels"], files["labels"])
            os.replace(temps["embeddings"], files["embeddings"])
        barrier()
    except BaseException:
        if dist.is_main:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        model.train(was_training)
    return files


def load_embeddings(
    path: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """``(embeddings (memory-mapped), labels, paths, info)`` written by :func:`embed_to_files`."""
    files = output_paths(path)
    for name, file in files.items():
        if not file.is_file():
            raise ValueError(f"{str(file)!r} ({name}) does not exist")
    embeddings = np.load(files["embeddings"], mmap_mode="r", allow_pickle=False)
    labels = np.load(files["labels"], allow_pickle=False)
    paths = files["paths"].read_text(encoding="utf-8").splitlines()
    info = json.loads(files["info"].read_text(encoding="utf-8"))
    return embeddings, labels, paths, info


def model_dim(model: nn.Module, example: Tensor) -> int:
    """The embedding dimension of ``model`` (its ``embedding_dim``, else one forward pass)."""
    dim = getattr(model, "embedding_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.inference_mode():
        return int(model(example.unsqueeze(0)).shape[1])


__all__: Sequence[str] = [
    "ImageFiles",
    "embed_to_files",
    "list_images",
    "load_embeddings",
    "model_dim",
    "output_paths",
    "shard",
]
