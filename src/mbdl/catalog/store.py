"""The catalog index directory: faiss index, SQLite item metadata, exact vectors, a manifest.

An index directory ``INDEX/`` holds

- ``catalog.json``: the manifest, written once at build: format and version, the model (where
  it was loaded from and a fingerprint of its weights), distance, dimension, faiss factory
  string, the model's preprocessing and validated threshold, the recall measured at build;
- ``items.sqlite``: one row per item (``id``, ``path``, ``size``, ``mtime``, ``sha256``,
  ``label``; indexes on path and sha256), the files skipped as unreadable, and the current
  state (``generation``, ``rows``, ``next_id``, the faiss file's size and hash);
- ``vectors.f32``: the exact float32 embeddings, row ``i`` is item id ``i`` (ids are given in
  order and never reused, so removed items leave a dead row);
- ``index.<generation>.faiss``: the faiss index (faiss's own format) over the live ids.

Every change is one SQLite transaction, the commit point: new vectors are appended past the
committed ``rows`` and the new faiss index is written as ``index.<generation+1>.faiss`` first,
then the transaction switches ``generation``; a crash before it leaves the previous catalog
whole (the leftovers are cleaned by the next writer), a crash after it the new one.
Writers hold an exclusive lock (``flock`` on ``.lock``), so a second concurrent writer is
refused.

Opening reads only the manifest and a few SQLite rows (constant time and memory for any
number of items); the faiss index is read on the first search. Nothing read runs code: no
pickle, the manifest is size-limited and type-checked, the SQLite schema must be exactly
mbdl's (no triggers or views), the faiss file must have the size and SHA-256 recorded at commit
and is read under an address-space limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mbdl.errors import UserError, terminal_safe
from mbdl.fileio import check_not_mid_replacement, read_json_bounded

FORMAT = "mbdl-catalog"
VERSION = 1
MANIFEST, DATABASE, VECTORS, LOCK = "catalog.json", "items.sqlite", "vectors.f32", ".lock"
MAX_MANIFEST_BYTES = 1 << 20
MAX_DIM = 16_384
DISTANCES = ("euclidean", "cosine")

SCHEMA = {
    "items": "CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, "
    "size INTEGER NOT NULL, mtime REAL NOT NULL, sha256 TEXT NOT NULL, label TEXT)",
    "items_sha256": "CREATE INDEX items_sha256 ON items (sha256)",
    "skipped": "CREATE TABLE skipped (path TEXT PRIMARY KEY, reason TEXT NOT NULL)",
    "state": "CREATE TABLE state (key TEXT PRIMARY KEY, value)",
}
STATE_KEYS = ("generation", "rows", "next_id", "count", "index_bytes", "index_sha256")


@dataclass(frozen=True)
class Item:
    """One catalog entry (a row of the SQLite ``items`` table)."""

    id: int
    path: str
    label: str | None
    size: int
    mtime: float
    sha256: str


def _bad(folder: Path, what: str) -> UserError:
    return UserError(f"{terminal_safe(folder)}: {what}")


def faiss_metric(distance: str) -> str:
    """The faiss metric that ranks as ``distance`` on L2-normalised embeddings."""
    return "ip" if distance == "cosine" else "l2"


def to_model_distance(raw: np.ndarray, distance: str) -> np.ndarray:
    """faiss scores (squared L2, or inner product) as the model's distance."""
    if distance == "cosine":
        return (1.0 - raw).astype(np.float32)
    return np.sqrt(np.maximum(raw, 0.0)).astype(np.float32)


def create_database(path: Path) -> sqlite3.Connection:
    """A new, empty items database with mbdl's schema."""
    connection = connect(path)
    with transaction(connection):
        for statement in SCHEMA.values():
            connection.execute(statement)
        connection.executemany(
            "INSERT INTO state VALUES (?, ?)",
            [
                ("generation", 0),
                ("rows", 0),
                ("next_id", 0),
                ("count", 0),
                ("index_bytes", 0),
                ("index_sha256", ""),
            ],
        )
    return connection


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """An autocommit connection (transactions are explicit) that trusts no stored schema code."""
    mode = "ro" if readonly else "rwc"
    connection = sqlite3.connect(
        f"file:{path}?mode={mode}", uri=True, isolation_level=None, check_same_thread=False
    )
    connection.execute("PRAGMA trusted_schema = OFF")
    return connection


@contextlib.contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def read_state(connection: sqlite3.Connection) -> dict[str, Any]:
    return dict(connection.execute("SELECT key, value FROM state").fetchall())


def _check_sqlite_file(folder: Path, file: Path) -> None:
    """The header's magic and page count against the file's size (truncation)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        raise _bad(folder, f"{DATABASE} is not an SQLite database (damaged): rebuild the index")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    valid = header[24:28] == header[92:96]  # the in-header size is trustworthy
    if valid and pages and size < pages * page_size:
        raise _bad(folder, f"{DATABASE} is truncated ({size} of {pages * page_size} bytes)")


def _check_schema(folder: Path, connection: sqlite3.Connection) -> None:
    rows = connection.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_autoindex%'"
    ).fetchall()
    found = {name: " ".join(str(sql).split()) for _, name, sql in rows}
    expected = {name: " ".join(sql.split()) for name, sql in SCHEMA.items()}
    if found != expected:
        extra = sorted(set(found) ^ set(expected)) or sorted(
            n for n in found if found[n] != expected.get(n)
        )
        raise _bad(folder, f"{DATABASE} has an unexpected schema ({', '.join(extra)[:80]})")


def _read_manifest(folder: Path) -> dict[str, Any]:
    file = folder / MANIFEST
    manifest = read_json_bounded(file, max_bytes=MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _bad(folder, f"{MANIFEST} is not an mbdl catalog manifest")
    if manifest.get("version") != VERSION:
        raise _bad(folder, f"catalog version {manifest.get('version')!r}; expected {VERSION}")

    def need(key: str, kind: type | tuple[type, ...], ok: Any = lambda v: True) -> None:
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or not ok(value):
            raise _bad(folder, f"{MANIFEST}: {key} is invalid ({value!r:.60})")

    need("dim", int, lambda v: 1 <= v <= MAX_DIM)
    need("distance", str, lambda v: v in DISTANCES)
    need("factory", str, lambda v: 0 < len(v) <= 200)
    need("model", str)
    need("model_fingerprint", str, lambda v: len(v) <= 64)
    need("preprocessing", dict)
    if manifest.get("threshold") is not None:
        need("threshold", (int, float), math.isfinite)
    if not isinstance(manifest.get("build", {}), dict):
        raise _bad(folder, f"{MANIFEST}: build is invalid")
    return manifest


class Catalog:
    """An index directory, opened for reading (see the module docstring for its files)."""

    def __init__(self, path: Path, manifest: dict[str, Any], connection: sqlite3.Connection):
        self.path = path
        self.manifest = manifest
        self.dim: int = int(manifest["dim"])
        self.distance: str = str(manifest["distance"])
        self.factory: str = str(manifest["factory"])
        self.model: str = str(manifest["model"])
        self.model_fingerprint: str = str(manifest["model_fingerprint"])
        threshold = manifest.get("threshold")
        self.threshold: float | None = None if threshold is None else float(threshold)
        self.preprocessing: dict[str, Any] = dict(manifest["preprocessing"])
        self._db = connection
        self._index: Any = None
        self._vectors: np.ndarray | None = None
        self._state = self._checked_state()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Catalog:
        """Open an index directory; refuses a non-catalog, old-format or damaged one."""
        folder = Path(path)
        check_not_mid_replacement(folder)
        if not folder.is_dir():
            raise UserError(f"{terminal_safe(folder)} is not an mbdl index (no such directory)")
        if (folder / "meta.json").is_file() and not (folder / MANIFEST).is_file():
            raise UserError(
                f"{terminal_safe(folder)} is an index in mbdl's old format (meta.json): rebuild "
                "it with mbdl index build MODEL --images DIR -o INDEX"
            )
        for name in (MANIFEST, DATABASE, VECTORS):
            if not (folder / name).is_file():
                raise UserError(f"{terminal_safe(folder)} is not an mbdl index: {name} is missing")
        manifest = _read_manifest(folder)
        _check_sqlite_file(folder, folder / DATABASE)
        try:
            writable = os.access(folder / DATABASE, os.W_OK) and os.access(folder, os.W_OK)
            connection = connect(folder / DATABASE, readonly=not writable)
            _check_schema(folder, connection)
            return cls(folder.resolve(), manifest, connection)
        except sqlite3.DatabaseError as error:
            raise _bad(folder, f"{DATABASE} is damaged ({error}): rebuild the index") from None

    def _checked_state(self) -> dict[str, Any]:
        state = read_state(self._db)
        for key in STATE_KEYS:
            value = state.get(key)
            kind = str if key == "index_sha256" else int
            if not isinstance(value, kind) or (isinstance(value, int) and value < 0):
                raise _bad(self.path, f"{DATABASE}: state {key} is invalid ({value!r:.40})")
        vectors = self.path / VECTORS
        need = state["rows"] * self.dim * 4
        if vectors.stat().st_size < need:
            raise _bad(
                self.path,
                f"{VECTORS} has {vectors.stat().st_size} bytes, fewer than the {state['rows']} "
                f"x {self.dim} vectors recorded: it is truncated; rebuild the index",
            )
        if state["generation"] > 0:
            file = self.index_file(state["generation"])
            if not file.is_file():
                raise _bad(self.path, f"{file.name} is missing: rebuild the index")
            if file.stat().st_size != state["index_bytes"]:
                raise _bad(
                    self.path,
                    f"{file.name} has {file.stat().st_size} bytes, not the {state['index_bytes']}"
                    " recorded: it is truncated or was altered; rebuild the index",
                )
        return state

    def index_file(self, generation: int | None = None) -> Path:
        generation = self._state["generation"] if generation is None else generation
        return self.path / f"index.{generation}.faiss"

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- items -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of items (kept in the state table: no scan)."""
        return int(self._state["count"])

    @property
    def generation(self) -> int:
        return int(self._state["generation"])

    @property
    def rows(self) -> int:
        return int(self._state["rows"])

    @property
    def recall(self) -> dict[str, Any]:
        """The recall of the faiss index against exact search, measured at build."""
        return dict(self.manifest.get("build", {}).get("recall") or {})

    def _item(self, row: tuple[Any, ...]) -> Item:
        id_, path, size, mtime, sha, label = row
        if not (isinstance(id_, int) and isinstance(path, str) and isinstance(size, int)):
            raise _bad(self.path, f"{DATABASE}: item {id_!r:.20} is malformed")
        return Item(
            int(id_), path, None if label is None else str(label), size, float(mtime), str(sha)
        )

    def items(self, ids: Sequence[int] | np.ndarray) -> list[Item]:
        """The items of ``ids``, in that order; an id not in the catalog is refused."""
        wanted = [int(i) for i in ids]
        found: dict[int, Item] = {}
        for start in range(0, len(wanted), 500):
            chunk = sorted(set(wanted[start : start + 500]))
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT id, path, size, mtime, sha256, label FROM items WHERE id IN ({marks})",
                chunk,
            ).fetchall()
            found.update((row[0], self._item(row)) for row in rows)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise UserError(f"id {missing[0]} is not in the catalog {terminal_safe(self.path)}")
        return [found[i] for i in wanted]

    def item_by_path(self, path: str | os.PathLike[str]) -> Item | None:
        """The item of ``path`` (resolved to an absolute path), or ``None``."""
        row = self._db.execute(
            "SELECT id, path, size, mtime, sha256, label FROM items WHERE path = ?",
            (resolve_path(path),),
        ).fetchone()
        return None if row is None else self._item(row)

    def iter_items(self, batch: int = 10_000) -> Iterator[Item]:
        """Every item in id order, read ``batch`` rows at a time."""
        last = -1
        while True:
            rows = self._db.execute(
                "SELECT id, path, size, mtime, sha256, label FROM items WHERE id > ? "
                "ORDER BY id LIMIT ?",
                (last, batch),
            ).fetchall()
            if not rows:
                return
            for row in rows:
                yield self._item(row)
            last = rows[-1][0]

    def ids(self) -> np.ndarray:
        """All live ids, int64, ascending."""
        rows = self._db.execute("SELECT id FROM items ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def skipped(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of the files that were not indexed because they are unreadable."""
        rows = self._db.execute("SELECT path, reason FROM skipped").fetchall()
        return [(str(path), str(reason)) for path, reason in rows]

    # -- vectors and search ----------------------------------------------------------------

    def all_vectors(self) -> np.ndarray:
        """The memory-mapped ``float32 [rows, dim]`` vectors (dead rows included)."""
        if self._vectors is None:
            if self.rows == 0:
                return np.zeros((0, self.dim), np.float32)
            self._vectors = np.memmap(
                self.path / VECTORS, np.float32, "r", shape=(self.rows, self.dim)
            )
        return self._vectors

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The exact embeddings of ``ids``: ``float32 [n, dim]``."""
        index = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= self.rows):
            raise UserError(f"ids must be within 0..{self.rows - 1}")
        return np.array(self.all_vectors()[index], dtype=np.float32)

    @property
    def index(self) -> Any:
        """The faiss index, read (and checked) on first use."""
        if self._index is None:
            self._index = read_faiss(self.path, self.index_file(), self._state, self.dim)
            from mbdl.catalog.factory import check_factory, set_search_defaults

            set_search_defaults(self._index, check_factory(self.factory, self.dim))
            if int(self._index.ntotal) != len(self):
                raise _bad(
                    self.path,
                    f"{self.index_file().name} holds {self._index.ntotal} vectors but "
                    f"{DATABASE} {len(self)} items: rebuild the index",
                )
        return self._index

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        array = np.asarray(queries, dtype=np.float32)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise UserError(
                f"queries have dimension {array.shape[-1] if array.ndim else 0}, the catalog "
                f"{terminal_safe(self.path)} {self.dim}: embed them with the catalog's model"
            )
        if not np.isfinite(array).all():
            raise UserError("the query embeddings contain NaN or Inf")
        if self.distance == "cosine":
            array = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(array, dtype=np.float32)

    def _exact(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The model distance of each query to each of its candidate ``ids``, recomputed from
        the stored vectors (exact even where the index stores compressed codes; a direct
        difference, so two near-identical embeddings read ~1e-7, not the ~3e-4 of faiss's
        ``|q|^2 + |x|^2 - 2 q.x`` expansion in float32)."""
        out = np.full(ids.shape, np.inf, dtype=np.float64)
        valid = ids >= 0
        if not valid.any():
            return out
        rows = self.all_vectors()[ids[valid]]
        q = np.repeat(queries, valid.sum(axis=1), axis=0)
        if self.distance == "cosine":
            out[valid] = 1.0 - np.einsum("ij,ij->i", q, rows, dtype=np.float64)
        else:
            diff = rows - q
            out[valid] = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
        return out

    def search_embeddings(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances float32 [Q, k], ids int64 [Q, k])`` of the ``k`` nearest items of each
        query, in the model's distance (recomputed exactly from the stored vectors) and ranked
        by it; missing neighbours (fewer than ``k`` items found): id ``-1``, distance ``inf``."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UserError(f"k must be a positive integer; got {k!r}")
        vectors = self._queries(queries)
        if self.index.ntotal == 0:
            return (
                np.full((len(vectors), k), np.inf, np.float32),
                np.full((len(vectors), k), -1, np.int64),
            )
        _, ids = self.index.search(vectors, k)
        ids = ids.astype(np.int64)
        distances = self._exact(vectors, ids)
        order = np.argsort(distances, axis=1, kind="stable")
        return (
            np.take_along_axis(distances, order, 1).astype(np.float32),
            np.take_along_axis(ids, order, 1),
        )

    def range_search(
        self, queries: np.ndarray, radius: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """faiss-style ``(lims [Q+1], distances, ids)`` of every item within ``radius`` (the
        model's distance) of each query; query ``i``'s results are ``lims[i]:lims[i+1]``, sorted
        by distance. Where the faiss index has no range search, a growing k-NN search."""
        if not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
            raise UserError(f"the radius must be a finite distance >= 0; got {radius!r}")
        vectors = self._queries(queries)
        slack = 1e-4  # faiss's float32 scores: keep borderline items, decide exactly below
        if self.distance == "cosine":
            raw_radius = 1.0 - radius - slack
        else:
            raw_radius = (radius + slack) ** 2
        lims_out = [0]
        dist_out: list[np.ndarray] = []
        ids_out: list[np.ndarray] = []
        try:
            if self.index.ntotal == 0:
                raise NotImplementedError
            lims, _, found = self.index.range_search(vectors, float(raw_radius))
            groups = [found[lims[i] : lims[i + 1]].astype(np.int64) for i in range(len(vectors))]
        except RuntimeError:
            groups = [self._knn_within(v, radius) for v in vectors]
        except NotImplementedError:
            groups = [np.zeros(0, np.int64) for _ in vectors]
        for query, group in zip(vectors, groups, strict=True):
            exact = self._exact(query[None], group[None])[0]
            keep = exact <= radius
            order = np.argsort(exact[keep], kind="stable")
            dist_out.append(exact[keep][order].astype(np.float32))
            ids_out.append(group[keep][order])
            lims_out.append(lims_out[-1] + int(keep.sum()))
        return (
            np.asarray(lims_out, dtype=np.int64),
            np.concatenate(dist_out) if dist_out else np.zeros(0, np.float32),
            np.concatenate(ids_out) if ids_out else np.zeros(0, np.int64),
        )

    def _knn_within(self, query: np.ndarray, radius: float) -> np.ndarray:
        k, total = 16, int(self.index.ntotal)
        while True:
            k = min(k, total)
            distances, ids = self.search_embeddings(query[None], k)
            if k >= total or distances[0, -1] > radius:
                return ids[0][ids[0] >= 0]
            k *= 4


def resolve_path(path: str | os.PathLike[str]) -> str:
    """The absolute, normalised form of ``path`` under which an item is stored (no file system
    access: the folders given are resolved once, the files below them are stored as found)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_faiss(folder: Path, file: Path, state: dict[str, Any], dim: int) -> Any:
    """The faiss index in ``file``, checked against its recorded size and SHA-256 and read under
    an address-space limit."""
    import faiss

    from mbdl.index import bounded_address_space

    if file.stat().st_size != state["index_bytes"] or file_sha256(file) != state["index_sha256"]:
        raise _bad(
            folder,
            f"{file.name} does not match the hash recorded at commit: it was "
            "altered or damaged; rebuild the index",
        )
    size = file.stat().st_size
    try:
        with bounded_address_space(4 * size + (256 << 20)):
            index = faiss.read_index(str(file))
    except (RuntimeError, MemoryError) as error:
        text = str(error).strip().splitlines()
        first = text[0].rsplit("Error: ", 1)[-1] if text else "out of memory"
        raise _bad(folder, f"cannot read {file.name} ({first[:120]}): rebuild the index") from None
    if int(index.d) != dim:
        raise _bad(folder, f"{file.name} has dimension {index.d}, the manifest {dim}")
    return index


@contextlib.contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Exclusive update rights on a catalog (or its staging directory); refuses at once when
    another process holds them. Released when the process ends, however it ends."""
    import fcntl

    handle = open(folder / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{terminal_safe(folder)} is being updated by another mbdl process (build, add "
                "or remove); wait for it to finish"
            ) from None
        yield
    finally:
        handle.close()


def write_faiss(index: Any, file: Path) -> tuple[int, str]:
    """Write ``index`` to ``file`` (fsynced); returns its size and SHA-256."""
    import faiss

    faiss.write_index(index, str(file))
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())
    return file.stat().st_size, file_sha256(file)


def append_vectors(folder: Path, rows: int, dim: int, vectors: np.ndarray) -> None:
    """Append ``vectors`` after the first ``rows`` committed rows of ``vectors.f32`` (what an
    interrupted writer left past them is cut first)."""
    file = folder / VECTORS
    with open(file, "r+b" if file.exists() else "w+b") as handle:
        handle.truncate(rows * dim * 4)
        handle.seek(rows * dim * 4)
        handle.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
        handle.flush()
        os.fsync(handle.fileno())


def remove_stale_index_files(folder: Path, generation: int) -> None:
    """Delete ``index.*.faiss`` files other than the committed generation's."""
    keep = f"index.{generation}.faiss"
    for file in folder.glob("index.*.faiss"):
        if file.name != keep:
            file.unlink(missing_ok=True)
