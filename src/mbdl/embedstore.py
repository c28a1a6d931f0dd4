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
written under temporary names and committed as one unit (:func:`mbdl.fileio.commit_files`): an
interrupted run leaves the previous output (or none), never half of one.
"""

from __future__ import annotations

import errno
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

from mbdl.data.fastpath import EvaluationImages
from mbdl.data.files import IMAGE_EXTENSIONS, read_image
from mbdl.distributed import (
    DistributedInfo,
    barrier,
    broadcast_object,
    distributed_info,
    is_distributed,
)
from mbdl.errors import UserError, terminal_safe
from mbdl.fileio import (
    commit_files,
    finish_commit,
    journal_path,
    naming,
    read_json_bounded,
    refuse_foreign,
    remove_stale_temps,
    temp_sibling,
)

#: bounds on what :func:`load_embeddings` reads back
INFO_MAX_BYTES = 64 << 20
PATHS_MAX_BYTES_PER_ITEM = 4096


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


class FolderImages(EvaluationImages):
    """The images below ``root`` (:func:`list_images`: labels from first-level folders) through
    the evaluation transform of ``spec`` by the fast path
    (:class:`mbdl.data.fastpath.EvaluationImages`): ``dataset[i] = (uint8 [C, crop, crop],
    label i)``, turned into the model's input on the device by :meth:`model_input`; the same
    input as :class:`ImageFiles` with ``transform_from_spec(spec)``, bit for bit."""

    def __init__(self, root: str | os.PathLike[str], spec: dict[str, Any]) -> None:
        self.root = Path(root)
        relative, labels, self.class_names = list_images(root)
        super().__init__([self.root / path for path in relative], spec, labels)
        self.relative = relative

    def describe(self, index: int) -> str:
        return self.relative[index]


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


def _is_npy(path: Path) -> bool:
    """Whether ``path`` is a numpy ``.npy`` file (what an earlier embed wrote)."""
    try:
        with open(path, "rb") as file:
            return file.read(6) == b"\x93NUMPY"
    except OSError:
        return False


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

    A dataset with a ``model_input(batch, device)`` method
    (:class:`mbdl.data.fastpath.EvaluationImages`, :class:`FolderImages`) gives ``uint8``
    batches (pinned on a GPU) that this method turns into the model's input on the device;
    other datasets' batches are the model's input. Under an initialised process group every
    rank calls this with the same arguments and embeds its :func:`shard`. ``dim`` is the embedding dimension; ``info`` is stored in the
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
    anchor = files["embeddings"]
    temps: dict[str, Path] = {}
    if dist.is_main:
        refuse_foreign(anchor, _is_npy, "an embeddings file (.npy)")
        anchor.parent.mkdir(parents=True, exist_ok=True)
        finish_commit(anchor)  # an earlier embed killed after its commit point
        for path in files.values():
            remove_stale_temps(path)
        temps = {name: temp_sibling(path) for name, path in files.items()}
    if dist.enabled:
        shared = broadcast_object({name: str(temp) for name, temp in temps.items()})
        temps = {name: Path(temp) for name, temp in shared.items()}
    if dist.is_main:
        try:
            for name, dtype, shape in (
                ("embeddings", np.float32, (count, dim)),
                ("labels", np.int64, (count,)),
            ):
                np.lib.format.open_memmap(temps[name], "w+", dtype, shape).flush()
                _reserve(temps[name])
        except BaseException as error:
            mapped = naming(error, anchor)
            for temp in temps.values():
                temp.unlink(missing_ok=True)
            raise mapped from None
    barrier()
    embeddings = np.load(temps["embeddings"], mmap_mode="r+")
    labels = np.load(temps["labels"], mmap_mode="r+")
    mine = shard(count, dist.rank, dist.world_size)
    prepare = getattr(dataset, "model_input", None)
    loader = DataLoader(
        Subset(dataset, list(mine)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=prepare is not None and torch.device(device).type == "cuda",
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
                inputs = images.to(device) if prepare is None else prepare(images, device)
                output_rows = model(inputs).float().cpu().numpy()
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
            meta = {"count": count, "dim": dim, **(info or {})}
            _write_synced(temps["paths"], lines)
            _write_synced(temps["info"], json.dumps(meta, indent=2) + "\n")
            for name in ("embeddings", "labels"):
                _fsync(temps[name])
            commit_files({temps[name]: files[name] for name in files}, anchor)
        barrier()
    except BaseException as error:
        mapped = naming(error, anchor)  # before the unlink frees the space it judges by
        if dist.is_main:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
        raise mapped from None
    finally:
        bar.close()
        model.train(was_training)
    return files


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of a memory-mapped file now: on a full disk this is an
    ``OSError`` here, where writing into a sparse mapping later would kill the process
    (``SIGBUS``)."""
    with open(path, "rb+") as file:
        size = os.fstat(file.fileno()).st_size
        try:
            os.posix_fallocate(file.fileno(), 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def load_embeddings(
    path: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """``(embeddings (memory-mapped), labels, paths, info)`` written by :func:`embed_to_files`."""
    files = output_paths(path)
    if journal_path(files["embeddings"]).exists():
        finish_commit(files["embeddings"])  # an embed killed after its commit point
    for name, file in files.items():
        if not file.is_file():
            raise ValueError(f"{str(file)!r} ({name}) does not exist")
    where = terminal_safe(files["embeddings"])
    info = read_json_bounded(files["info"], max_bytes=INFO_MAX_BYTES)
    if not isinstance(info, dict):
        raise UserError(f"{terminal_safe(files['info'])} is not a JSON object")
    try:
        embeddings = np.load(files["embeddings"], mmap_mode="r", allow_pickle=False)
        labels = np.load(files["labels"], mmap_mode="r", allow_pickle=False)
    except Exception as error:  # numpy parses the header with tokenize/ast: TokenError too
        if isinstance(error, MemoryError):
            raise
        message = " ".join(str(error).split())[:200]
        raise UserError(
            f"{where} (or its .labels.npy) is not a valid .npy file ({message})"
        ) from None
    if embeddings.ndim != 2 or embeddings.dtype != np.float32:
        raise UserError(f"{where} is not a float32 [N, d] array")
    if labels.ndim != 1 or labels.dtype != np.int64 or len(labels) != len(embeddings):
        raise UserError(f"{where}: its .labels.npy is not int64 [{len(embeddings)}]")
    if info.get("count") != len(embeddings) or info.get("dim") != embeddings.shape[1]:
        raise UserError(f"{where} does not match its .json (count, dim); write it again")
    if files["paths"].stat().st_size > PATHS_MAX_BYTES_PER_ITEM * max(len(embeddings), 1):
        raise UserError(f"{terminal_safe(files['paths'])} is too large for {len(embeddings)} items")
    paths = files["paths"].read_text(encoding="utf-8", errors="replace").splitlines()
    if len(paths) != len(embeddings):
        raise UserError(f"{where}: its .paths.txt has {len(paths)} lines, not {len(embeddings)}")
    return embeddings, np.asarray(labels), paths, info


def model_dim(model: nn.Module, example: Tensor) -> int:
    """The embedding dimension of ``model`` (its ``embedding_dim``, else one forward pass)."""
    dim = getattr(model, "embedding_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.inference_mode():
        return int(model(example.unsqueeze(0)).shape[1])


__all__: Sequence[str] = [
    "FolderImages",
    "ImageFiles",
    "embed_to_files",
    "list_images",
    "load_embeddings",
    "model_dim",
    "output_paths",
    "shard",
]
