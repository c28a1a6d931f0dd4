"""Build a catalog from a folder, a list of files or ``mbdl embed`` output; add and remove items.

Building writes into a staging directory next to the output (``.INDEX.building``): the images
are read and embedded batch by batch (bounded memory), and every few thousand items the
vectors are appended to ``vectors.f32`` and their rows committed to ``items.sqlite`` in one
transaction. An interrupted build (even by SIGKILL) continues from the last committed chunk
when run again with the same model and source; the finished index is moved into place with one
rename, so ``INDEX`` is never half-written. Adding and removing update a catalog in place with
the commit protocol of :mod:`mbdl.catalog.store`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mbdl.catalog import factory as factories
from mbdl.catalog.store import (
    DATABASE,
    FORMAT,
    MANIFEST,
    VECTORS,
    VERSION,
    Catalog,
    append_vectors,
    create_database,
    faiss_metric,
    file_sha256,
    read_state,
    remove_stale_index_files,
    resolve_path,
    transaction,
    write_faiss,
    writer_lock,
)
from mbdl.errors import UserError, terminal_safe
from mbdl.fileio import read_json_bounded

#: items embedded between two commits of a build
COMMIT_EVERY = 2048
#: queries of the recall measurement (held out of the training sample)
RECALL_QUERIES, RECALL_K = 1000, 10
SKIPPED_FILE = "skipped.txt"
ON_BAD = ("skip", "refuse")


@dataclass(frozen=True)
class Source:
    """A file to index and its optional label."""

    path: str  # absolute, resolved
    label: str | None = None


@dataclass
class BuildReport:
    """What a build, add or remove did."""

    catalog: Catalog
    added: int = 0  # items embedded and indexed (new files, and changed files re-embedded)
    changed: int = 0  # of which changed files (their old ids retired)
    unchanged: int = 0  # files already indexed as they are
    touched: int = 0  # files whose mtime changed but content (sha256) did not: metadata updated
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    skipped_file: Path | None = None
    factory: str = ""
    factory_reason: str = ""
    recall: dict[str, Any] = field(default_factory=dict)
    resumed: int = 0  # items a resumed build found already committed
    seconds: float = 0.0
    embed_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds of each build step

    def to_json(self) -> dict[str, Any]:
        return {
            "index": str(self.catalog.path),
            "items": len(self.catalog),
            "added": self.added,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "touched": self.touched,
            "removed": self.removed,
            "skipped": len(self.skipped),
            "skipped_file": None if self.skipped_file is None else str(self.skipped_file),
            "factory": self.factory,
            "factory_reason": self.factory_reason,
            "recall": self.recall,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------------------------
# sources


def _walk(root: Path) -> Iterator[Path]:
    """Every regular, non-hidden file below ``root``, in sorted order (symlinks not followed
    into directories)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _label_csv(file: Path, root: Path | None) -> dict[str, str]:
    """``path,label`` rows (a header row ``path,label`` is allowed); paths relative to ``root``."""
    if not file.is_file():
        raise UserError(f"--labels {terminal_safe(file)}: no such CSV file (or folders|none)")
    labels: dict[str, str] = {}
    with open(file, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or (number == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2:
                raise UserError(f"{terminal_safe(file)} line {number}: expected path,label")
            path = Path(row[0])
            labels[resolve_path(path if path.is_absolute() or root is None else root / path)] = row[
                1
            ]
    return labels


def list_sources(
    *,
    images: str | os.PathLike[str] | None = None,
    list_file: str | os.PathLike[str] | None = None,
    labels: str = "none",
) -> list[Source]:
    """The files to index: every file below ``images`` (recursive), or the paths in
    ``list_file`` (one a line, relative to the list file's folder), without duplicates.

    ``labels``: ``"none"``; ``"folders"`` (the first-level sub-folder below ``images``); or a
    CSV file of ``path,label`` rows (paths relative to ``images``, or to the CSV's folder).
    """
    if (images is None) == (list_file is None):
        raise UserError("give exactly one of --images DIR and --list FILE")
    if labels == "folders" and images is None:
        raise UserError("--labels folders needs --images DIR")
    paths: list[Path]
    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise UserError(f"--images {terminal_safe(root)}: no such directory")
        paths = list(_walk(root.resolve()))
    else:
        assert list_file is not None
        listing = Path(list_file)
        if not listing.is_file():
            raise UserError(f"--list {terminal_safe(listing)}: no such file")
        base = listing.parent.resolve()
        lines = listing.read_text(encoding="utf-8").splitlines()
        paths = [base / line.strip() for line in lines if line.strip()]
    if not paths:
        raise UserError(f"no files found in {terminal_safe(images or list_file)}")
    table: dict[str, str] = {}
    if labels not in ("none", "folders"):
        csv_file = Path(labels)
        table = _label_csv(csv_file, Path(images) if images is not None else csv_file.parent)
    root_resolved = Path(images).resolve() if images is not None else None
    seen: set[str] = set()
    sources: list[Source] = []
    for path in paths:
        resolved = resolve_path(path)
        if resolved in seen:
            continue
        seen.add(resolved)
        label: str | None = None
        if labels == "folders" and root_resolved is not None:
            relative = os.path.relpath(resolved, root_resolved).split(os.sep)
            label = relative[0] if len(relative) > 1 and relative[0] != ".." else None
        elif table:
            label = table.get(resolved)
        sources.append(Source(resolved, label))
    return sources


# ---------------------------------------------------------------------------------------------
# the model


@dataclass
class Embedder:
    """A loaded model and what a catalog records of it."""

    model: Any
    transform: Any
    spec: dict[str, Any]
    fingerprint: str
    distance: str
    threshold: float | None
    dim: int
    device: Any
    where: str

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> Embedder:
        import torch

        from mbdl.embedstore import model_dim
        from mbdl.export import load_state, state_preprocessing, transform_from_spec
        from mbdl.index import model_fingerprint
        from mbdl.train.checkpoint import model_from_state

        state = load_state(path)
        target = torch.device(device)
        model = model_from_state(state, target)
        spec = state_preprocessing(state)
        config_distance = ((state.get("config") or {}).get("eval") or {}).get("distance")
        distance = "cosine" if config_distance == "cosine" else "euclidean"
        threshold = stored_threshold(state, distance)
        transform = transform_from_spec(spec)
        channels = int(spec.get("channels", 3))
        example = torch.zeros(channels, int(spec["crop"]), int(spec["crop"]))
        where = str(path) if str(path).startswith("hf://") else resolve_path(path)
        return cls(
            model,
            transform,
            spec,
            model_fingerprint(model.state_dict()),
            distance,
            threshold,
            model_dim(model, example.to(target)),
            target,
            where,
        )

    def embed_images(self, images: Any) -> np.ndarray:
        """:meth:`embed` of a ``uint8`` batch of :class:`mbdl.data.fastpath.EvaluationImages`
        (normalised on the model's device by :func:`mbdl.data.fastpath.model_input`)."""
        from mbdl.data.fastpath import model_input

        return self.embed(model_input(images, self.spec["mean"], self.spec["std"], self.device))

    def images(self, paths: Sequence[str], labels: Any = None) -> Any:
        """The :class:`mbdl.data.fastpath.EvaluationImages` of ``paths`` under this model's
        preprocessing (the same pixels as :attr:`transform`, bit for bit)."""
        from mbdl.data.fastpath import EvaluationImages

        return EvaluationImages(paths, self.spec, labels)

    def embed(self, batch: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(batch.to(self.device)).float().cpu().numpy()
        if out.shape[1] != self.dim:
            raise UserError(f"the model gives {out.shape[1]} dimensions, not {self.dim}")
        return np.ascontiguousarray(out, dtype=np.float32)


def stored_threshold(state: dict[str, Any], distance: str) -> float | None:
    """The model's validated verification threshold in ``distance`` (``None`` if it has none
    or it is in another distance)."""
    import math

    stored = state.get("verification")
    if not isinstance(stored, dict) or "threshold" not in stored:
        return None
    value = float(stored["threshold"])
    kind = stored.get("distance", distance)
    if kind == "squared_euclidean" and distance == "euclidean":
        return math.sqrt(max(value, 0.0))
    return value if kind == distance and math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# reading and embedding files


class _Files:
    """Dataset of sources: ``(position, uint8 image | None, size, mtime, sha256, reason | None)``
    (the image of :class:`mbdl.data.fastpath.EvaluationImages`)."""

    def __init__(self, sources: Sequence[Source], images: Any) -> None:
        self.sources, self.images = sources, images

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, position: int) -> tuple[int, Any, int, float, str, str | None]:
        path = self.sources[position].path
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                return position, None, 0, 0.0, "", "not a regular file"
            tensor = self.images.image(position)
            return position, tensor, info.st_size, info.st_mtime, file_sha256(path), None
        except FileNotFoundError:
            return position, None, 0, 0.0, "", "file not found"
        except (ValueError, OSError) as error:
            reason = str(error).replace(f" {terminal_safe(path)}", "").replace(path, "")
            return position, None, 0, 0.0, "", " ".join(reason.split())[:200] or "unreadable"


def _as_batch(batch: list[Any]) -> list[Any]:
    return batch


@dataclass
class Chunk:
    """Embedded items of one commit: their sources, vectors and file facts."""

    sources: list[Source]
    vectors: np.ndarray
    facts: list[tuple[int, float, str]]  # size, mtime, sha256
    bad: list[tuple[str, str]]


def embed_sources(
    embedder: Embedder,
    sources: Sequence[Source],
    *,
    batch_size: int,
    workers: int,
    progress: bool,
    on_bad: str,
    chunk: int | None = None,
    desc: str = "embedding",
) -> Iterator[Chunk]:
    """Embed ``sources`` in order, yielding a :class:`Chunk` every ``chunk`` files (default:
    :data:`COMMIT_EVERY`); an
    unreadable file is reported in ``Chunk.bad`` (``on_bad="skip"``) or refused."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    chunk = COMMIT_EVERY if chunk is None else chunk
    dataset = _Files(sources, embedder.images([s.path for s in sources]))
    loader: DataLoader[Any] = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_batch,
    )
    bar = tqdm(
        total=len(sources),
        desc=desc,
        unit="img",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    pending = Chunk([], np.zeros((0, embedder.dim), np.float32), [], [])
    parts: list[np.ndarray] = []
    try:
        for batch in loader:
            good = [row for row in batch if row[5] is None]
            for row in batch:
                if row[5] is not None:
                    path = sources[row[0]].path
                    if on_bad == "refuse":
                        raise UserError(
                            f"cannot read {terminal_safe(path)} ({row[5]}); --on-bad refuse "
                            "stops here: fix or remove the file, or use --on-bad skip"
                        )
                    pending.bad.append((path, str(row[5])))
            if good:
                parts.append(embedder.embed_images(torch.stack([row[1] for row in good])))
                pending.sources.extend(sources[row[0]] for row in good)
                pending.facts.extend((int(row[2]), float(row[3]), str(row[4])) for row in good)
            bar.update(len(batch))
            if len(pending.sources) + len(pending.bad) >= chunk:
                pending.vectors = np.concatenate(parts) if parts else pending.vectors
                yield pending
                pending, parts = Chunk([], np.zeros((0, embedder.dim), np.float32), [], []), []
        if pending.sources or pending.bad:
            pending.vectors = np.concatenate(parts) if parts else pending.vectors
            yield pending
    finally:
        bar.close()


def refuse_bad_files(sources: Sequence[Source]) -> None:
    """``--on-bad refuse``: check every file before any work; one line naming the bad ones."""
    from mbdl.data.files import inspect_images

    reasons = inspect_images([s.path for s in sources])
    bad = [(s.path, r) for s, r in zip(sources, reasons, strict=True) if r is not None]
    if bad:
        first, reason = bad[0]
        raise UserError(
            f"{len(bad)} of {len(sources)} files are not readable images, e.g. "
            f"{terminal_safe(first)} ({reason}); --on-bad refuse: nothing was indexed (use "
            "--on-bad skip to index the others and list these)"
        )


# ---------------------------------------------------------------------------------------------
# the faiss index


def train_and_fill(
    spec: factories.FactorySpec,
    vectors: np.ndarray,
    ids: np.ndarray,
    metric: str,
    *,
    held_out: np.ndarray | None = None,
    seed: int = 0,
) -> Any:
    """A faiss index of ``spec`` holding ``vectors[ids]`` under ``ids``, trained (when it needs
    it) on a random sample of them that leaves out ``held_out``."""
    dim = vectors.shape[1]
    index = factories.make_index(spec, dim, metric)
    if spec.trained:
        rng = np.random.default_rng(seed)
        pool = ids if held_out is None else np.setdiff1d(ids, held_out, assume_unique=True)
        if len(pool) == 0:
            pool = ids
        size = factories.training_sample(len(pool), spec)
        sample = np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))
        train = np.ascontiguousarray(vectors[sample], dtype=np.float32)
        if spec.lists > len(train):
            raise UserError(
                f"--factory {spec.text}: {spec.lists} IVF lists need at least as many training "
                f"vectors; the catalog has {len(train)}"
            )
        try:
            index.train(train)
        except RuntimeError as error:
            raise UserError(
                f"--factory {spec.text}: faiss could not train it ({factories.faiss_reason(error)})"
            ) from None
    for start in range(0, len(ids), 100_000):
        part = ids[start : start + 100_000]
        index.add_with_ids(np.ascontiguousarray(vectors[part], dtype=np.float32), part)
    factories.set_search_defaults(index, spec)
    return index


def exact_knn(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, metric: str
) -> np.ndarray:
    """The ids of the exact ``k`` nearest of ``vectors[ids]`` to each query (chunked scan)."""
    import faiss

    best_d = np.full((len(queries), 0), 0.0, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    sign = -1.0 if metric == "ip" else 1.0
    for start in range(0, len(ids), 200_000):
        part = ids[start : start + 200_000]
        flat = faiss.IndexFlat(
            vectors.shape[1], faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        )
        flat.add(np.ascontiguousarray(vectors[part], dtype=np.float32))
        d, i = flat.search(queries, min(k, len(part)))
        best_d = np.concatenate([best_d, sign * d], axis=1)
        best_i = np.concatenate([best_i, np.where(i >= 0, part[np.maximum(i, 0)], -1)], axis=1)
        order = np.argsort(best_d, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(best_d, order, 1)
        best_i = np.take_along_axis(best_i, order, 1)
    return best_i


def measure_recall(
    index: Any,
    vectors: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    metric: str,
    k: int = RECALL_K,
) -> dict[str, Any]:
    """recall@k of ``index`` against exact search for ``vectors[queries]``."""
    k = min(k, len(ids))
    q = np.ascontiguousarray(vectors[queries], dtype=np.float32)
    _, approx = index.search(q, k)
    exact = exact_knn(vectors, ids, q, k, metric)
    return {"k": k, "queries": len(queries), "recall": factories.recall_at_k(approx, exact)}


# ---------------------------------------------------------------------------------------------
# build


def check_output(target: Path, overwrite: bool) -> None:
    """Refuse an output that is a file or a non-empty directory other than an mbdl index, and an
    existing index without ``overwrite``."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"-o {terminal_safe(target)} exists and is not a directory; refused")
    if not target.is_dir() or not any(target.iterdir()):
        return
    is_index = (target / MANIFEST).is_file() or (
        (target / "meta.json").is_file() and (target / "index.faiss").is_file()
    )
    if not is_index:
        raise UserError(
            f"-o {terminal_safe(target)} is a non-empty directory that is not an mbdl index; "
            "refused (nothing was changed): choose a new directory"
        )
    if not overwrite:
        raise UserError(
            f"-o {terminal_safe(target)} is an existing index: give --overwrite to "
            "replace it, or use mbdl index add to update it"
        )


def _staging(target: Path) -> Path:
    return target.with_name(f".{target.name}.building")


def build_catalog(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    list_file: str | os.PathLike[str] | None = None,
    embeddings: str | os.PathLike[str] | None = None,
    labels: str = "none",
    factory: str | None = None,
    on_bad: str = "skip",
    device: str = "cpu",
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    seed: int = 0,
) -> BuildReport:
    """Build the catalog index ``output`` from image files (``images`` folder or ``list_file``)
    embedded by ``model``, or from ``mbdl embed`` output (``embeddings``, ``X.npy``).

    Resumable: a build interrupted before its end continues from its last committed chunk when
    called again with the same model, source and factory. Returns a :class:`BuildReport` whose
    ``catalog`` is the opened result.
    """
    started = time.perf_counter()
    if on_bad not in ON_BAD:
        raise UserError(f"--on-bad must be skip or refuse; got {on_bad!r}")
    if batch_size < 1 or workers < 0:
        raise UserError(f"batch size must be >= 1 and workers >= 0; got {batch_size}, {workers}")
    if (
        sum(x is not None for x in (list_file, embeddings))
        + (images is not None and embeddings is None)
        != 1
    ):
        raise UserError("give exactly one source: --images DIR, --list FILE or --embeddings X.npy")
    target = Path(output)
    check_output(target, overwrite)
    if embeddings is not None:
        sources, stored = _embedding_sources(embeddings, images, labels)
    else:
        sources = list_sources(images=images, list_file=list_file, labels=labels)
        stored = None
    embedder = Embedder.load(model, device)
    if stored is not None and stored.shape[1] != embedder.dim:
        raise UserError(
            f"--embeddings {terminal_safe(embeddings)} has dimension {stored.shape[1]} but the "
            f"model {embedder.dim}: give the model that wrote them"
        )
    if factory is not None:
        factories.check_factory(factory, embedder.dim, len(sources))
    from mbdl.distributed import is_distributed

    skipped: list[tuple[str, str]] = []
    if stored is None and is_distributed():
        return _build_distributed(
            embedder,
            target,
            sources,
            factory=factory,
            on_bad=on_bad,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            overwrite=overwrite,
            seed=seed,
            started=started,
            key_source=str(resolve_path(images or list_file or "")),
            labels=labels,
        )
    return _build_staged(
        embedder,
        target,
        sources,
        stored,
        skipped,
        factory=factory,
        on_bad=on_bad,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        overwrite=overwrite,
        seed=seed,
        started=started,
        key_source=str(resolve_path(embeddings or images or list_file or "")),
        labels=labels,
    )


def _build_staged(
    embedder: Embedder,
    target: Path,
    sources: list[Source],
    stored: np.ndarray | None,
    skipped: list[tuple[str, str]],
    *,
    factory: str | None,
    on_bad: str,
    batch_size: int,
    workers: int,
    progress: bool,
    overwrite: bool,
    seed: int,
    started: float,
    key_source: str,
    labels: str,
) -> BuildReport:
    """Build into the staging directory (resuming what it holds), then move it into place."""
    staging = _staging(target)
    key = {
        "model_fingerprint": embedder.fingerprint,
        "source": key_source,
        "labels": labels,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    resumable = False
    if staging.is_dir():
        previous = _read_build_key(staging) if (staging / DATABASE).is_file() else None
        resumable = previous == key
        if previous is not None and not resumable and not overwrite:
            raise UserError(
                f"{terminal_safe(staging)} holds an interrupted build of another model or "
                "source: give --overwrite to discard it, or rerun that build to finish it"
            )
        if not resumable:
            with writer_lock(staging):
                shutil.rmtree(staging)
    if not resumable and on_bad == "refuse" and stored is None:
        refuse_bad_files(sources)
    staging.mkdir(exist_ok=True)
    with writer_lock(staging):
        if not resumable:
            (staging / "build.json").write_text(json.dumps(key), encoding="utf-8")
            connection = create_database(staging / DATABASE)
            (staging / VECTORS).touch()
            with transaction(connection):
                connection.executemany("INSERT OR REPLACE INTO skipped VALUES (?, ?)", skipped)
        else:
            from mbdl.catalog.store import connect

            connection = connect(staging / DATABASE)
        report = BuildReport(catalog=None)  # type: ignore[arg-type]
        try:
            _fill_staging(
                staging,
                connection,
                embedder,
                sources,
                stored,
                report,
                batch_size=batch_size,
                workers=workers,
                progress=progress,
                on_bad=on_bad,
            )
            _finish(staging, connection, embedder, factory, report, seed=seed)
        finally:
            connection.close()
        (staging / "build.json").unlink()
    _replace(staging, target)
    report.catalog = Catalog.open(target)
    if report.skipped:
        report.skipped_file = target / SKIPPED_FILE
    report.seconds = time.perf_counter() - started
    return report


def _read_build_key(staging: Path) -> dict[str, Any] | None:
    try:
        key = json.loads((staging / "build.json").read_text(encoding="utf-8"))
        return key if isinstance(key, dict) else None
    except (OSError, ValueError):
        return None


def _embedding_sources(
    embeddings: str | os.PathLike[str], images: str | os.PathLike[str] | None, labels: str
) -> tuple[list[Source], np.ndarray]:
    """The items and vectors of ``mbdl embed ... -o X.npy`` output (paths resolved against
    ``images`` when given, else the current directory)."""
    from mbdl.embedstore import output_paths

    try:
        files = output_paths(embeddings)
    except ValueError as error:
        raise UserError(f"--embeddings: {error}") from None
    for name, file in files.items():
        if not file.is_file():
            raise UserError(f"--embeddings: {terminal_safe(file)} ({name}) does not exist")
    try:
        vectors = np.load(files["embeddings"], mmap_mode="r", allow_pickle=False)
        label_ids = np.load(files["labels"], allow_pickle=False)
        info = read_json_bounded(files["info"])
    except (ValueError, OSError) as error:
        raise UserError(f"--embeddings {terminal_safe(embeddings)}: unreadable ({error})") from None
    paths = files["paths"].read_text(encoding="utf-8").splitlines()
    if (
        vectors.ndim != 2
        or vectors.dtype != np.float32
        or len(paths) != len(vectors)
        or len(label_ids) != len(vectors)
    ):
        raise UserError(
            f"--embeddings {terminal_safe(embeddings)}: {vectors.shape} float32 embeddings, "
            f"{len(paths)} paths and {len(label_ids)} labels do not agree"
        )
    names = info.get("class_names") if isinstance(info, dict) else None
    root = str(Path(images).resolve() if images is not None else Path.cwd())
    sources = []
    for path, label in zip(paths, label_ids.tolist(), strict=True):
        label_name: str | None = None
        if labels == "folders" and isinstance(names, list) and 0 <= label < len(names):
            label_name = str(names[label])
        sources.append(Source(os.path.normpath(os.path.join(root, path)), label_name))
    if len({s.path for s in sources}) != len(sources):
        raise UserError(f"--embeddings {terminal_safe(embeddings)} lists a path twice")
    return sources, vectors


def _committed(connection: Any, sources: Sequence[Source]) -> list[bool]:
    """Whether each source is already in the staging database (embedded or skipped)."""
    done: list[bool] = []
    for start in range(0, len(sources), 500):
        chunk = [s.path for s in sources[start : start + 500]]
        marks = ",".join("?" * len(chunk))
        found = {
            r[0]
            for r in connection.execute(
                f"SELECT path FROM items WHERE path IN ({marks}) UNION "
                f"SELECT path FROM skipped WHERE path IN ({marks})",
                chunk + chunk,
            )
        }
        done.extend(p in found for p in chunk)
    return done


def _commit_chunk(
    folder: Path, connection: Any, dim: int, chunk: Chunk, *, update_skipped: bool = True
) -> None:
    """Append a chunk's vectors and commit its rows (build staging)."""
    state = read_state(connection)
    rows, next_id = int(state["rows"]), int(state["next_id"])
    append_vectors(folder, rows, dim, chunk.vectors)
    with transaction(connection):
        connection.executemany(
            "INSERT INTO items (id, path, size, mtime, sha256, label) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (next_id + i, s.path, size, mtime, sha, s.label)
                for i, (s, (size, mtime, sha)) in enumerate(
                    zip(chunk.sources, chunk.facts, strict=True)
                )
            ],
        )
        if update_skipped:
            connection.executemany("INSERT OR REPLACE INTO skipped VALUES (?, ?)", chunk.bad)
        count = len(chunk.sources)
        connection.execute("UPDATE state SET value = ? WHERE key = 'rows'", (rows + count,))
        connection.execute("UPDATE state SET value = ? WHERE key = 'next_id'", (next_id + count,))
        connection.execute("UPDATE state SET value = value + ? WHERE key = 'count'", (count,))


def _fill_staging(
    staging: Path,
    connection: Any,
    embedder: Embedder,
    sources: list[Source],
    stored: np.ndarray | None,
    report: BuildReport,
    **options: Any,
) -> None:
    done = _committed(connection, sources)
    report.resumed = sum(done)
    todo = [s for s, d in zip(sources, done, strict=True) if not d]
    embed_started = time.perf_counter()
    if stored is not None:
        positions = [i for i, d in enumerate(done) if not d]
        for start in range(0, len(positions), COMMIT_EVERY * 8):
            part = positions[start : start + COMMIT_EVERY * 8]
            facts = [_file_facts(sources[i].path) for i in part]
            chunk = Chunk(
                [sources[i] for i in part], np.asarray(stored[part], np.float32), facts, []
            )
            _commit_chunk(staging, connection, embedder.dim, chunk)
    elif todo:
        for chunk in embed_sources(
            embedder,
            todo,
            batch_size=options["batch_size"],
            workers=options["workers"],
            progress=options["progress"],
            on_bad=options["on_bad"],
        ):
            _commit_chunk(staging, connection, embedder.dim, chunk)
    report.embed_seconds = time.perf_counter() - embed_started
    report.skipped = [
        (str(p), str(r)) for p, r in connection.execute("SELECT path, reason FROM skipped")
    ]
    report.added = int(connection.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    if report.added == 0:
        raise UserError(
            f"none of the {len(sources)} files could be read as an image (e.g. "
            f"{terminal_safe(report.skipped[0][0]) if report.skipped else '?'}); nothing to index"
        )


def _file_facts(path: str) -> tuple[int, float, str]:
    try:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode):
            return info.st_size, info.st_mtime, file_sha256(path)
    except OSError:
        pass
    return 0, 0.0, ""


def _finish(
    staging: Path,
    connection: Any,
    embedder: Embedder,
    factory: str | None,
    report: BuildReport,
    *,
    seed: int,
) -> None:
    """Train and fill the faiss index, measure its recall, write the manifest (in staging)."""
    state = read_state(connection)
    rows = int(state["rows"])
    ids = np.fromiter(
        (r[0] for r in connection.execute("SELECT id FROM items ORDER BY id")), dtype=np.int64
    )
    if factory is None:
        text, reason = factories.default_factory(len(ids), embedder.dim)
    else:
        text, reason = factory, "given with --factory"
    spec = factories.check_factory(text, embedder.dim, len(ids))
    vectors = np.memmap(staging / VECTORS, np.float32, "r", shape=(rows, embedder.dim))
    metric = faiss_metric(embedder.distance)
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(ids, size=min(RECALL_QUERIES, len(ids)), replace=False))
    held_out = queries if len(ids) > 2 * len(queries) else None
    clock = time.perf_counter()
    index = train_and_fill(spec, vectors, ids, metric, held_out=held_out, seed=seed)
    report.timings["faiss_train_add"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if spec.exact:
        recall = {"k": min(RECALL_K, len(ids)), "queries": 0, "recall": 1.0, "exact": True}
    else:
        recall = measure_recall(index, vectors, ids, queries, metric)
    report.timings["recall"] = time.perf_counter() - clock
    generation = int(state["generation"]) + 1
    clock = time.perf_counter()
    size, sha = write_faiss(index, staging / f"index.{generation}.faiss")
    report.timings["faiss_write_hash"] = time.perf_counter() - clock
    report.factory, report.factory_reason, report.recall = spec.text, reason, recall
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": embedder.where,
        "model_fingerprint": embedder.fingerprint,
        "distance": embedder.distance,
        "dim": embedder.dim,
        "factory": spec.text,
        "preprocessing": embedder.spec,
        "threshold": embedder.threshold,
        "build": {"factory_reason": reason, "recall": recall, "items": len(ids)},
    }
    from mbdl.fileio import atomic_write_text

    atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    skipped = connection.execute("SELECT path, reason FROM skipped ORDER BY path").fetchall()
    if skipped:
        atomic_write_text(staging / SKIPPED_FILE, "".join(f"{p}\t{r}\n" for p, r in skipped))
    with transaction(connection):
        for key, value in (
            ("generation", generation),
            ("index_bytes", size),
            ("index_sha256", sha),
        ):
            connection.execute("UPDATE state SET value = ? WHERE key = ?", (value, key))
    remove_stale_index_files(staging, generation)


def _replace(staging: Path, target: Path) -> None:
    """Move the finished staging directory to ``target`` (an existing index is replaced)."""
    from mbdl.fileio import replace_directory

    (staging / ".lock").unlink(missing_ok=True)
    replace_directory(staging, target, target.with_name(f".{target.name}.old"))


# ---------------------------------------------------------------------------------------------
# add and remove


def _without(index: Any, catalog: Catalog, retired: np.ndarray, keep: np.ndarray) -> Any:
    """``index`` less the ``retired`` ids; where faiss cannot remove from it (HNSW), a new index
    of the same factory over the ``keep`` ids."""
    if len(retired) == 0:
        return index
    try:
        index.remove_ids(np.ascontiguousarray(retired, dtype=np.int64))
        return index
    except RuntimeError:
        spec = factories.check_factory(catalog.factory, catalog.dim)
        return train_and_fill(spec, catalog.all_vectors(), keep, faiss_metric(catalog.distance))


def _commit(
    catalog: Catalog,
    index: Any,
    *,
    new_items: Sequence[tuple[int, Source, tuple[int, float, str]]] = (),
    retired: Sequence[int] = (),
    touched: Sequence[tuple[int, int, float]] = (),
    skipped: Sequence[tuple[str, str]] = (),
    rows: int,
    next_id: int,
) -> None:
    """Write the next generation's faiss file, then switch to it in one SQLite transaction."""
    from mbdl.catalog.store import connect

    generation = catalog.generation + 1
    size, sha = write_faiss(index, catalog.index_file(generation))
    connection = connect(catalog.path / DATABASE)
    try:
        with transaction(connection):
            if read_state(connection)["generation"] != catalog.generation:
                raise UserError(f"{terminal_safe(catalog.path)} changed while updating; retry")
            connection.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in retired])
            connection.executemany(
                "INSERT INTO items (id, path, size, mtime, sha256, label) VALUES (?,?,?,?,?,?)",
                [(i, s.path, f[0], f[1], f[2], s.label) for i, s, f in new_items],
            )
            connection.executemany(
                "UPDATE items SET size = ?, mtime = ? WHERE id = ?",
                [(size_, mtime, i) for i, size_, mtime in touched],
            )
            connection.executemany(
                "DELETE FROM skipped WHERE path = ?", [(s.path,) for _, s, _ in new_items]
            )
            connection.executemany("INSERT OR REPLACE INTO skipped VALUES (?, ?)", skipped)
            count = len(catalog) + len(new_items) - len(retired)
            for key, value in (
                ("count", count),
                ("generation", generation),
                ("rows", rows),
                ("next_id", next_id),
                ("index_bytes", size),
                ("index_sha256", sha),
            ):
                connection.execute("UPDATE state SET value = ? WHERE key = ?", (value, key))
    except BaseException:
        catalog.index_file(generation).unlink(missing_ok=True)
        raise
    finally:
        connection.close()
    _keep_generations(catalog.path, generation)


def _keep_generations(folder: Path, generation: int) -> None:
    """Delete faiss files other than this generation's and the previous one (a reader that
    opened the catalog just before the switch still finds its file)."""
    keep = {f"index.{generation}.faiss", f"index.{generation - 1}.faiss"}
    for file in folder.glob("index.*.faiss"):
        if file.name not in keep:
            file.unlink(missing_ok=True)


def add_to_catalog(
    index: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    list_file: str | os.PathLike[str] | None = None,
    labels: str = "none",
    on_bad: str = "skip",
    model: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = True,
) -> BuildReport:
    """Add the files below ``images`` (or listed in ``list_file``) to the catalog ``index``.

    A path already indexed is left as it is when its size and mtime (or, when they changed, its
    SHA-256) are unchanged; a changed file is re-embedded under a new id (its old id is retired,
    ids are never reused). One atomic change: a crash leaves the catalog as it was.
    """
    started = time.perf_counter()
    if on_bad not in ON_BAD:
        raise UserError(f"--on-bad must be skip or refuse; got {on_bad!r}")
    if batch_size < 1 or workers < 0:
        raise UserError(f"batch size must be >= 1 and workers >= 0; got {batch_size}, {workers}")
    folder = Path(index)
    Catalog.open(folder).close()  # refuses a non-catalog before taking a lock in it
    with writer_lock(folder):
        catalog = Catalog.open(folder)
        report = BuildReport(catalog=catalog, factory=catalog.factory)
        sources = list_sources(images=images, list_file=list_file, labels=labels)
        embedder = Embedder.load(model if model is not None else catalog.model, device)
        if embedder.fingerprint != catalog.model_fingerprint:
            raise UserError(
                f"the model {terminal_safe(embedder.where)} (weights {embedder.fingerprint}) is "
                f"not the one that built {terminal_safe(folder)} ({catalog.model_fingerprint}); "
                "use that model or build a new index"
            )
        todo: list[Source] = []
        retiring: dict[str, int] = {}
        touched: list[tuple[int, int, float]] = []
        for source in sources:
            item = catalog.item_by_path(source.path)
            if item is None:
                todo.append(source)
                continue
            try:
                info = os.stat(source.path)
            except OSError:
                todo.append(source)  # reported as unreadable by the embedding
                continue
            if info.st_size == item.size and info.st_mtime == item.mtime:
                report.unchanged += 1
            elif info.st_size == item.size and file_sha256(source.path) == item.sha256:
                touched.append((item.id, info.st_size, info.st_mtime))
            else:
                todo.append(source)
                retiring[source.path] = item.id
        if on_bad == "refuse" and todo:
            refuse_bad_files(todo)
        rows, next_id = catalog.rows, int(read_state(catalog._db)["next_id"])
        new_items: list[tuple[int, Source, tuple[int, float, str]]] = []
        parts: list[np.ndarray] = []
        embed_started = time.perf_counter()
        end = rows
        for chunk in embed_sources(
            embedder,
            todo,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            on_bad=on_bad,
            desc="adding",
        ):
            append_vectors(folder, end, catalog.dim, chunk.vectors)
            end += len(chunk.vectors)
            for source, facts in zip(chunk.sources, chunk.facts, strict=True):
                new_items.append((next_id, source, facts))
                next_id += 1
            report.skipped.extend(chunk.bad)
            parts.append(chunk.vectors)
        report.embed_seconds = time.perf_counter() - embed_started
        retired = np.asarray(
            [retiring[s.path] for _, s, _ in new_items if s.path in retiring], dtype=np.int64
        )
        # a changed file that is now unreadable keeps its old entry, and is listed as skipped
        if not new_items and not touched:
            report.seconds = time.perf_counter() - started
            report.catalog = Catalog.open(folder)
            return report
        faiss_index = catalog.index
        new_ids = np.asarray([i for i, _, _ in new_items], dtype=np.int64)
        keep = np.setdiff1d(catalog.ids(), retired)
        faiss_index = _without(faiss_index, catalog, retired, keep)
        if len(new_ids):
            vectors = np.concatenate(parts)
            faiss_index.add_with_ids(vectors, new_ids)
        _commit(
            catalog,
            faiss_index,
            new_items=new_items,
            retired=retired.tolist(),
            touched=touched,
            skipped=report.skipped,
            rows=end,
            next_id=next_id,
        )
        catalog.close()
        report.added, report.changed, report.touched = len(new_items), len(retired), len(touched)
    report.catalog = Catalog.open(folder)
    report.seconds = time.perf_counter() - started
    return report


def remove_from_catalog(
    index: str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]] = (),
    *,
    missing: bool = False,
) -> BuildReport:
    """Remove the items of ``paths`` (a folder removes every item below it), and with
    ``missing`` every item whose file no longer exists, from the catalog ``index`` (one atomic
    change). A path that is not in the catalog is refused before anything changes."""
    started = time.perf_counter()
    if not paths and not missing:
        raise UserError("give the PATHs to remove, or --missing")
    folder = Path(index)
    Catalog.open(folder).close()
    with writer_lock(folder):
        catalog = Catalog.open(folder)
        retired: list[int] = []
        for path in paths:
            resolved = resolve_path(path)
            item = catalog.item_by_path(resolved)
            if item is not None:
                retired.append(item.id)
                continue
            below = [
                r[0]
                for r in catalog._db.execute(
                    "SELECT id FROM items WHERE substr(path, 1, ?) = ?",
                    (len(resolved) + 1, resolved.rstrip("/") + "/"),
                )
            ]
            if not below:
                raise UserError(
                    f"{terminal_safe(path)} is not in the catalog {terminal_safe(folder)}"
                )
            retired.extend(below)
        if missing:
            retired.extend(
                item.id for item in catalog.iter_items() if not os.path.exists(item.path)
            )
        gone = np.unique(np.asarray(retired, dtype=np.int64))
        report = BuildReport(catalog=catalog, factory=catalog.factory, removed=len(gone))
        if len(gone):
            keep = np.setdiff1d(catalog.ids(), gone)
            faiss_index = _without(catalog.index, catalog, gone, keep)
            _commit(
                catalog,
                faiss_index,
                retired=gone.tolist(),
                rows=catalog.rows,
                next_id=int(read_state(catalog._db)["next_id"]),
            )
        catalog.close()
    report.catalog = Catalog.open(folder)
    report.seconds = time.perf_counter() - started
    return report


def _build_distributed(
    embedder: Embedder,
    target: Path,
    sources: list[Source],
    *,
    started: float,
    **options: Any,
) -> BuildReport:
    """Under ``torchrun``: rank 0 checks every file, each rank embeds a shard into one shared
    memory-mapped file (:func:`mbdl.embedstore.embed_to_files`), rank 0 indexes it. Not
    resumable (a single-process build is)."""
    from mbdl.data.files import inspect_images
    from mbdl.distributed import barrier, broadcast_object, distributed_info
    from mbdl.embedstore import embed_to_files, output_paths
    from mbdl.errors import one_line

    info = distributed_info()
    verdict: tuple[list[tuple[str, str]], str | None] | None = None
    if info.is_main:
        reasons = inspect_images([s.path for s in sources])
        bad = [(s.path, r) for s, r in zip(sources, reasons, strict=True) if r is not None]
        message = None
        if bad and options["on_bad"] == "refuse":
            message = (
                f"{len(bad)} of {len(sources)} files are not readable images, e.g. "
                f"{terminal_safe(bad[0][0])} ({bad[0][1]}); --on-bad refuse: nothing was indexed"
            )
        elif len(bad) == len(sources):
            message = f"none of the {len(sources)} files could be read as an image"
        verdict = (bad, message)
    bad, message = broadcast_object(verdict)
    if message is not None:
        raise UserError(message)
    unreadable = {path for path, _ in bad}
    good = [s for s in sources if s.path not in unreadable]
    embedded = target.with_name(f".{target.name}.embedded.npy")
    dataset = embedder.images([s.path for s in good], np.full(len(good), -1, np.int64))
    embed_to_files(
        embedder.model,
        dataset,
        embedded,
        dim=embedder.dim,
        batch_size=options["batch_size"],
        device=embedder.device,
        num_workers=options["workers"],
        progress=options["progress"],
        describe=lambda i: good[i].path,
    )
    outcome: str | None = None
    report: BuildReport | None = None
    if info.is_main:
        try:
            stored = np.load(embedded, mmap_mode="r", allow_pickle=False)
            report = _build_staged(embedder, target, good, stored, bad, started=started, **options)
        except (ValueError, OSError) as error:
            outcome = one_line(error)
        finally:
            for file in output_paths(embedded).values():
                file.unlink(missing_ok=True)
    outcome = broadcast_object(outcome)
    if outcome is not None:
        raise UserError(outcome)
    barrier()
    if report is None:
        report = BuildReport(catalog=Catalog.open(target))
        report.seconds = time.perf_counter() - started
    return report
