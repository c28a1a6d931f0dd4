"""A gallery index for search: faiss exact (default), IVF or HNSW, stored without pickle.

An index directory holds ``index.faiss`` (faiss's own format), ``meta.json`` (model identity,
distance, kind, dimension, class names, paths) and ``labels.npy`` (read with
``allow_pickle=False``), so opening an index received from someone else cannot run code.
The model identity is a fingerprint of the model's weights: queries embedded by another model
are refused, since their distances to the gallery would mean nothing.

An index directory received from someone else is read within bounds (:meth:`GalleryIndex.load`):
``meta.json`` is size-limited and its fields type-checked; ``labels.npy``'s header (dtype,
shape) is checked against ``meta.json`` and the file's size before the array is read; the faiss
file must be large enough for the vectors ``meta.json`` announces, and is read under an
address-space limit (a few times its size, on Linux), so a header asking for hundreds of GB
fails cleanly; the result must agree with ``meta.json`` (dimension, count, metric, kind).
Every failure is a :class:`mbdl.errors.UserError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mbdl.errors import UserError, terminal_safe
from mbdl.fileio import check_not_mid_replacement, read_json_bounded, replace_directory

KINDS = ("flat", "ivf", "hnsw")
FORMAT_VERSION = 1
#: the largest meta.json read (it lists every gallery item's path)
MAX_META_BYTES = 1 << 30
#: the largest embedding dimension accepted from an index
MAX_DIM = 16_384


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - exercised only without faiss
        raise ImportError(
            "the gallery index needs faiss: pip install 'mbdl[faiss]' (faiss-cpu)"
        ) from error
    return faiss


def model_fingerprint(state_dict: Mapping[str, Tensor]) -> str:
    """A short SHA-256 fingerprint of a model's weights (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class GalleryIndex:
    """A faiss index over gallery embeddings, with their labels, paths and the model's identity."""

    index: Any
    labels: np.ndarray
    model_id: str
    distance: str = "euclidean"
    kind: str = "flat"
    paths: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    build_report: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # free JSON metadata (checkpoint, split)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(
        cls,
        embeddings: Tensor | np.ndarray,
        labels: Tensor | np.ndarray,
        *,
        model_id: str,
        distance: str = "euclidean",
        kind: str = "flat",
        paths: list[str] | None = None,
        class_names: list[str] | None = None,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        recall_k: int = 10,
        recall_queries: int = 1000,
        seed: int = 0,
    ) -> GalleryIndex:
        """Index ``embeddings``; for IVF/HNSW, measure recall@``recall_k`` against exact search
        on up to ``recall_queries`` gallery items (``build_report``)."""
        faiss = _faiss()
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"index distance must be euclidean or cosine; got {distance!r}")
        vectors = _as_float32(embeddings, distance)
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
        if vectors.shape[0] != label_array.shape[0]:
            raise ValueError(
                f"{vectors.shape[0]} embeddings but {label_array.shape[0]} labels for the index"
            )
        if paths is not None and len(paths) != vectors.shape[0]:
            raise ValueError(f"{vectors.shape[0]} embeddings but {len(paths)} paths for the index")
        count, dim = vectors.shape
        metric = faiss.METRIC_INNER_PRODUCT if distance == "cosine" else faiss.METRIC_L2
        report: dict[str, Any] = {"kind": kind, "items": count}
        if kind == "flat":
            index = faiss.IndexFlat(dim, metric)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, metric)
            report["hnsw_m"] = hnsw_m
        else:
            nlist = nlist or max(1, int(4 * np.sqrt(count)))
            if nlist > count:
                raise ValueError(f"nlist={nlist} is larger than the gallery ({count} items)")
            index = faiss.IndexIVFFlat(faiss.IndexFlat(dim, metric), dim, nlist, metric)
            index.cp.seed = seed
            index.train(vectors)
            index.nprobe = min(nprobe, nlist)
            report.update(nlist=nlist, nprobe=index.nprobe)
        index.add(vectors)
        result = cls(
            index, label_array, model_id, distance, kind, list(paths or []), list(class_names or [])
        )
        if kind != "flat":
            exact = faiss.IndexFlat(dim, metric)
            exact.add(vectors)
            rng = np.random.default_rng(seed)
            probe = rng.choice(count, size=min(recall_queries, count), replace=False)
            k = min(recall_k, count)
            _, approx_ids = index.search(vectors[probe], k)
            _, exact_ids = exact.search(vectors[probe], k)
            hits = sum(len(set(a) & set(e)) for a, e in zip(approx_ids, exact_ids, strict=True))
            report[f"recall@{k}_vs_exact"] = hits / (len(probe) * k)
        result.build_report = report
        return result

    def search(
        self, queries: Tensor | np.ndarray, k: int, *, model_id: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, indices)`` of the ``k`` nearest gallery items of each query.

        Refuses queries embedded by another model (``model_id``) or of another dimension.
        """
        if model_id != self.model_id:
            raise ValueError(
                f"the queries come from model {model_id} but the index was built with model "
                f"{self.model_id}; rebuild the index with this checkpoint"
            )
        vectors = _as_float32(queries, self.distance)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {vectors.shape[1]}, the index {self.dim}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be between 1 and the gallery size {len(self)}; got {k}")
        scores, indices = self.index.search(vectors, k)
        if self.distance == "cosine":
            distances = 1.0 - scores
        else:
            distances = np.sqrt(np.maximum(scores, 0.0))
        return distances, indices

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index directory atomically (a temporary directory, then a rename)."""
        faiss = _faiss()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_staging(target)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.{_writer_id()}.", dir=target.parent)
        )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; an index is shared
        try:
            faiss.write_index(self.index, str(staging / "index.faiss"))
            np.save(staging / "labels.npy", self.labels, allow_pickle=False)
            meta = {
                "format_version": FORMAT_VERSION,
                "model_id": self.model_id,
                "distance": self.distance,
                "kind": self.kind,
                "dim": self.dim,
                "items": len(self),
                "paths": self.paths,
                "class_names": self.class_names,
                "build_report": self.build_report,
                "info": self.info,
            }
            (staging / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            replace_directory(staging, target, target.with_name(f".{target.name}.old"))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GalleryIndex:
        """Open an index directory written by :meth:`save`, within bounds (see the module
        docstring); no pickle is involved."""
        faiss = _faiss()
        folder = Path(path)
        check_not_mid_replacement(folder)
        for name in ("index.faiss", "meta.json", "labels.npy"):
            if not (folder / name).is_file():
                raise UserError(f"{terminal_safe(folder)} is not an mbdl index: {name} is missing")
        meta = _read_meta(folder / "meta.json")
        items, dim = meta["items"], meta["dim"]
        labels = _read_labels(folder / "labels.npy", items)
        names = meta.get("class_names", [])
        if names and len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise UserError(f"{terminal_safe(folder)}: labels.npy has labels without class names")
        vectors_file = folder / "index.faiss"
        size = vectors_file.stat().st_size
        if size < items * dim * 4:
            raise UserError(
                f"{terminal_safe(vectors_file)} has {size} bytes, fewer than the {items} x {dim} "
                "vectors meta.json announces; the index is truncated: rebuild it"
            )
        try:
            with bounded_address_space(4 * size + (256 << 20)):
                index = faiss.read_index(str(vectors_file))
        except (RuntimeError, MemoryError) as error:
            text = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
            first = text.rsplit("Error: ", 1)[-1]
            raise UserError(
                f"cannot read {terminal_safe(vectors_file)} ({first[:120]}); it is damaged or "
                "was altered: rebuild the index"
            ) from None
        expected_metric = (
            faiss.METRIC_INNER_PRODUCT if meta["distance"] == "cosine" else faiss.METRIC_L2
        )
        expected_type = {
            "flat": faiss.IndexFlat,
            "ivf": faiss.IndexIVFFlat,
            "hnsw": faiss.IndexHNSW,
        }
        if (
            int(index.d) != dim
            or int(index.ntotal) != items
            or int(index.metric_type) != expected_metric
            or not isinstance(index, expected_type[meta["kind"]])
        ):
            raise UserError(
                f"{terminal_safe(vectors_file)} ({type(index).__name__}, {index.ntotal} x "
                f"{index.d}) does not match meta.json ({meta['kind']}, {items} x {dim}, "
                f"{meta['distance']}): rebuild the index"
            )
        return cls(
            index,
            labels,
            meta["model_id"],
            meta["distance"],
            meta["kind"],
            meta.get("paths", []),
            names,
            meta.get("build_report", {}),
            meta.get("info", {}),
        )


def _writer_id() -> str:
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_dead_staging(target: Path) -> None:
    """Remove the staging folders ``.NAME.HOST-PID.XXXX`` next to ``target`` whose writer (on
    this host) is dead: what a write killed midway leaves."""
    import re
    import socket

    from mbdl.train.runlock import process_alive

    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?P<host>.+)-(?P<pid>\d+)\.[^.]+$")
    for entry in target.parent.glob(f".{target.name}.*"):
        match = pattern.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        if match["host"] == socket.gethostname() and not process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def bounded_address_space(extra_bytes: int) -> Iterator[None]:
    """Within the block, limit this process's address space to what it uses now plus
    ``extra_bytes`` (``RLIMIT_AS``, Linux), so that reading a file whose header asks for an
    absurd allocation raises ``MemoryError`` instead of exhausting the machine. A no-op where
    the limit or the current size cannot be read."""
    try:
        import resource

        with open("/proc/self/status", encoding="ascii") as status:
            line = next(x for x in status if x.startswith("VmSize:"))
        current = int(line.split()[1]) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, StopIteration, ValueError):
        yield
        return
    limit = current + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _read_meta(file: Path) -> dict[str, Any]:
    """meta.json, size-limited, with every field type-checked."""
    # it lists every gallery item's path: up to one value per two bytes
    meta = read_json_bounded(file, max_bytes=MAX_META_BYTES, max_items=MAX_META_BYTES // 2)
    if not isinstance(meta, dict) or not {"model_id", "distance", "kind"} <= set(meta):
        raise UserError(f"{terminal_safe(file)} lacks model_id, distance or kind")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{terminal_safe(file.parent)} has index format {meta.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}"
        )

    def bad(key: str, what: str) -> UserError:
        return UserError(f"{terminal_safe(file)}: {key} must be {what}; got {meta.get(key)!r:.80}")

    if not isinstance(meta["model_id"], str):
        raise bad("model_id", "a string")
    if meta["distance"] not in ("euclidean", "cosine"):
        raise bad("distance", "euclidean or cosine")
    if meta["kind"] not in KINDS:
        raise bad("kind", " or ".join(KINDS))
    for key, upper in (("dim", MAX_DIM), ("items", 1 << 40)):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= upper:
            raise bad(key, f"an integer in 0..{upper}")
    for key in ("paths", "class_names"):
        value = meta.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(key, "a list of strings")
    if meta.get("paths") and len(meta["paths"]) != meta["items"]:
        raise bad("paths", f"one per item ({meta['items']})")
    for key in ("build_report", "info"):
        if not isinstance(meta.get(key, {}), dict):
            raise bad(key, "an object")
    return meta


def _read_labels(file: Path, items: int) -> np.ndarray:
    """labels.npy, its header checked (integer dtype, shape ``(items,)``, the file's size)
    before the array is read."""
    try:
        with open(file, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(handle)
            offset = handle.tell()
    except (ValueError, OSError, SyntaxError) as error:
        raise UserError(f"{terminal_safe(file)} is not a NumPy array file: {error}") from None
    if dtype.kind not in "iu" or dtype.hasobject or shape != (items,):
        raise UserError(
            f"{terminal_safe(file)} holds {dtype} {shape}; expected {items} integer labels "
            "(one per indexed item)"
        )
    if file.stat().st_size != offset + items * dtype.itemsize:
        raise UserError(f"{terminal_safe(file)} is truncated or padded: rebuild the index")
    return np.asarray(np.load(file, allow_pickle=False), dtype=np.int64)


def _as_float32(embeddings: Tensor | np.ndarray, distance: str) -> np.ndarray:
    array = (
        embeddings.detach().float().cpu().numpy()
        if isinstance(embeddings, Tensor)
        else np.asarray(embeddings, dtype=np.float32)
    )
    if array.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N x d); got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("embeddings contain NaN or Inf")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if distance == "cosine":
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        array = array / np.maximum(norms, 1e-12)
    return array
