"""Near-duplicates and clusters of a catalog, without an N x N distance matrix.

Both walk the catalog once, a batch of items at a time, asking the index for every item within
``threshold`` of each item of the batch (:meth:`Catalog.range_search`); memory is O(N) for the
duplicates and O(N + pairs found) for the clusters, never O(N^2), and the time is that of N range
searches on the catalog's index (sub-quadratic with an IVF or HNSW index).

- **Duplicates** (:func:`find_duplicates`) are the connected components of the graph whose edges
  join two items at distance ``<= threshold`` (union-find over the edges as they stream in): a
  chain of near-copies (a, a resized, a resized and recompressed) is one group.
- **Clusters** (:func:`cluster_catalog`) do not chain: leader clustering ("community detection",
  as in sentence-transformers), densest first. The item with the most neighbours within
  ``threshold`` leads the first cluster, which takes every not yet clustered item within
  ``threshold`` of the leader; then the next densest unclustered item, and so on. Every member
  is within ``threshold`` of its leader, so a cluster's diameter is at most ``2 * threshold``.
  Clusters smaller than ``min_size`` are dropped (their items stay unclustered).

The default threshold is the model's validated verification threshold (:attr:`Catalog.threshold`:
two images at or below it were judged "the same" on held-out validation classes).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mbdl.data.files import read_image
from mbdl.errors import UserError, terminal_safe

RangeSearch = Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray, np.ndarray]]


class Indexed(Protocol):
    """What the grouping needs of a catalog (``mbdl.catalog.Catalog`` has it)."""

    threshold: float | None
    distance: str

    def __len__(self) -> int: ...
    def ids(self) -> np.ndarray: ...
    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray: ...
    def range_search(
        self, queries: np.ndarray, radius: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
    def items(self, ids: Sequence[int]) -> list[Any]: ...


@dataclass(frozen=True)
class Groups:
    """Groups of catalog items, largest first (ties: smallest first id).

    ``groups[i]`` holds item ids, ``paths[i]`` their paths in the same order (ids ascending).
    ``pairs_examined`` counts the (item, neighbour) pairs the index returned and the grouping
    looked at (each pair seen from both ends counts twice, an item as its own neighbour once);
    ``pairs_within`` the distinct pairs of different items at distance ``<= threshold``;
    ``quadratic_pairs`` the ``N (N - 1) / 2`` pairs an all-pairs comparison would examine.
    (The index computes more distances than it returns; how many depends on its kind: all N per
    query for a flat index, about ``nprobe / nlist`` of them for IVF.)
    """

    kind: str  # "duplicates" | "clusters"
    threshold: float
    distance: str
    count: int
    groups: list[list[int]]
    paths: list[list[str]] = field(default_factory=list)
    pairs_examined: int = 0
    pairs_within: int = 0

    @property
    def quadratic_pairs(self) -> int:
        return self.count * (self.count - 1) // 2

    @property
    def grouped_items(self) -> int:
        return sum(len(group) for group in self.groups)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "threshold": self.threshold,
            "distance": self.distance,
            "count": self.count,
            "pairs_examined": self.pairs_examined,
            "pairs_within": self.pairs_within,
            "groups": [list(paths) for paths in self.paths],
            "ids": [[int(i) for i in ids] for ids in self.groups],
        }


DuplicateGroups = Groups
Clusters = Groups


def check_threshold(threshold: float | None, catalog_threshold: float | None) -> float:
    """The threshold to group at: ``threshold``, else the catalog's validated one; a missing,
    negative or non-finite value is refused with one line."""
    if threshold is None:
        if catalog_threshold is None:
            raise UserError(
                "the catalog's model has no validated verification threshold; give one with "
                "--threshold D (a distance, e.g. from mbdl verify)"
            )
        threshold = catalog_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise UserError(f"threshold must be a number, got {threshold!r}")
    if not math.isfinite(threshold) or threshold < 0:
        raise UserError(f"threshold must be a finite distance >= 0, got {threshold}")
    return float(threshold)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")


class UnionFind:
    """Disjoint sets over ``0..n-1``; :meth:`union_pairs` merges many pairs at once (the pairs
    already in one set are filtered with vectorised root lookups, so the Python loop runs at
    most ``n - 1`` times over a whole catalog)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def roots(self, nodes: np.ndarray) -> np.ndarray:
        roots = self.parent[nodes]
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                return roots
            roots = up

    def _find(self, node: int) -> int:
        parent = self.parent
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = int(parent[node])
        return node

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        ra, rb = self.roots(a), self.roots(b)
        differ = ra != rb
        for x, y in zip(ra[differ].tolist(), rb[differ].tolist(), strict=True):
            x, y = self._find(x), self._find(y)
            if x != y:  # the larger root joins the smaller: deterministic representatives
                self.parent[max(x, y)] = min(x, y)
        self.compress()

    def compress(self) -> None:
        """Point every node straight at its root (pointer jumping)."""
        while True:
            up = self.parent[self.parent]
            if np.array_equal(up, self.parent):
                return
            self.parent = up

    def components(self) -> np.ndarray:
        self.compress()
        return self.parent


def _neighbour_batches(
    ids: np.ndarray,
    vectors: Callable[[np.ndarray], np.ndarray],
    range_search: RangeSearch,
    threshold: float,
    batch_size: int,
):
    """For each batch of items: (positions of the batch, lims, neighbour positions) with the
    neighbours as positions into ``ids`` (sorted); neighbours unknown to ``ids`` are dropped."""
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        lims, _, found = range_search(np.ascontiguousarray(vectors(batch), np.float32), threshold)
        found = np.asarray(found, dtype=np.int64)
        lims = np.asarray(lims, dtype=np.int64)
        positions = np.searchsorted(ids, found)
        positions = np.minimum(positions, len(ids) - 1)
        known = ids[positions] == found
        rows = np.repeat(np.arange(start, start + len(batch)), np.diff(lims))
        yield rows[known], positions[known], len(found)


def duplicate_components(
    ids: np.ndarray,
    vectors: Callable[[np.ndarray], np.ndarray],
    range_search: RangeSearch,
    threshold: float,
    *,
    batch_size: int = 4096,
) -> tuple[list[np.ndarray], int, int]:
    """The connected components (size >= 2) of the "distance <= threshold" graph of the items
    ``ids`` (sorted int64), as arrays of ids, largest first; and the pairs examined and found.

    ``range_search(queries, radius) -> (lims, distances, ids)`` returns every item within
    ``radius`` of each query (faiss's range search layout, in the model's distance)."""
    _check_batch_size(batch_size)
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and np.any(np.diff(ids) <= 0):
        raise UserError("catalog ids must be unique and sorted")
    sets = UnionFind(len(ids))
    examined = within = 0
    for rows, neighbours, returned in _neighbour_batches(
        ids, vectors, range_search, threshold, batch_size
    ):
        examined += returned
        other = rows < neighbours  # each pair once, no self pairs
        within += int(other.sum())
        sets.union_pairs(rows[other], neighbours[other])
    return _components(sets.components(), ids), examined, within


def _components(labels: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[starts, len(labels)])
    groups = [ids[order[s : s + n]] for s, n in zip(starts, sizes, strict=True) if n >= 2]
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups


def leader_clusters(
    ids: np.ndarray,
    vectors: Callable[[np.ndarray], np.ndarray],
    range_search: RangeSearch,
    threshold: float,
    *,
    min_size: int = 2,
    batch_size: int = 4096,
) -> tuple[list[np.ndarray], int, int]:
    """Leader clusters (see the module docstring) of the items ``ids`` (sorted int64) with at
    least ``min_size`` members, largest first; and the pairs examined and found."""
    _check_batch_size(batch_size)
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise UserError(f"min_size must be an integer >= 1, got {min_size!r}")
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    rows_parts, cols_parts = [], []
    examined = 0
    for rows, neighbours, returned in _neighbour_batches(
        ids, vectors, range_search, threshold, batch_size
    ):
        examined += returned
        other = rows != neighbours
        dtype = np.int32 if n < 2**31 else np.int64
        rows_parts.append(rows[other].astype(dtype))
        cols_parts.append(neighbours[other].astype(dtype))
    rows = np.concatenate(rows_parts) if rows_parts else np.empty(0, np.int64)
    cols = np.concatenate(cols_parts) if cols_parts else np.empty(0, np.int64)
    # symmetric adjacency (an approximate index may find a pair from one end only), deduplicated
    pairs = np.unique(np.stack([np.r_[rows, cols], np.r_[cols, rows]]).astype(np.int64), axis=1)
    rows, cols = pairs[0], pairs[1]
    lims = np.searchsorted(rows, np.arange(n + 1))
    degree = np.diff(lims)
    taken = np.zeros(n, dtype=bool)
    clusters = []
    for leader in np.lexsort((np.arange(n), -degree)).tolist():  # densest first, then by position
        if taken[leader]:
            continue
        members = cols[lims[leader] : lims[leader + 1]]
        members = np.r_[leader, members[~taken[members]]]
        if len(members) < min_size:
            continue
        taken[members] = True
        clusters.append(ids[np.sort(members)])
    clusters.sort(key=lambda g: (-len(g), int(g[0])))
    return clusters, examined, len(rows) // 2


def _with_paths(catalog: Indexed, kind: str, threshold: float, found: tuple) -> Groups:
    groups, examined, within = found
    id_lists = [[int(i) for i in group] for group in groups]
    paths = [[item.path for item in catalog.items(group)] for group in id_lists]
    return Groups(
        kind=kind,
        threshold=threshold,
        distance=catalog.distance,
        count=len(catalog),
        groups=id_lists,
        paths=paths,
        pairs_examined=examined,
        pairs_within=within,
    )


def find_duplicates(
    catalog: Indexed, threshold: float | None = None, *, batch_size: int = 4096
) -> DuplicateGroups:
    """The groups of near-duplicates of ``catalog``: connected components of the pairs at distance
    ``<= threshold`` (default: the catalog's validated verification threshold), largest first."""
    radius = check_threshold(threshold, catalog.threshold)
    ids = np.sort(np.asarray(catalog.ids(), dtype=np.int64))
    found = duplicate_components(
        ids, catalog.vectors, catalog.range_search, radius, batch_size=batch_size
    )
    return _with_paths(catalog, "duplicates", radius, found)


def cluster_catalog(
    catalog: Indexed,
    threshold: float | None = None,
    *,
    min_size: int = 2,
    batch_size: int = 4096,
) -> Clusters:
    """Leader clusters of ``catalog`` (every member within ``threshold`` of its cluster's leader,
    densest leaders first; default threshold: the catalog's validated one), largest first."""
    radius = check_threshold(threshold, catalog.threshold)
    ids = np.sort(np.asarray(catalog.ids(), dtype=np.int64))
    found = leader_clusters(
        ids,
        catalog.vectors,
        catalog.range_search,
        radius,
        min_size=min_size,
        batch_size=batch_size,
    )
    return _with_paths(catalog, "clusters", radius, found)


# ---------------------------------------------------------------------------------------------
# The output folder: groups.csv, groups.json, index.html and its thumbnails

MARKER = "mbdl-groups"  # groups.json's "format": what marks a folder as a previous output
THUMBNAIL_SIZE = 128


def _is_previous_output(folder: Path) -> bool:
    try:
        with open(folder / "groups.json", encoding="utf-8") as file:
            return json.load(file).get("format") == MARKER
    except (OSError, ValueError, AttributeError):
        return False


def check_output_folder(out: str | Path) -> Path:
    """``out`` as a Path, refused with one line when it is a file, or a non-empty folder that is
    not a previous dedup/cluster output (which is replaced)."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output {terminal_safe(folder)} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not _is_previous_output(folder):
        raise UserError(
            f"output folder {terminal_safe(folder)} is not empty and is not a previous "
            "mbdl dedup/cluster output; choose an empty or new folder"
        )
    return folder


def write_thumbnail(source: str | Path, target: Path, size: int = THUMBNAIL_SIZE) -> bool:
    """A JPEG thumbnail (longer side ``size``) of the image ``source`` at ``target``; False when
    the image cannot be read (the page shows its path instead)."""
    try:
        image = read_image(source, "RGB")
    except (UserError, OSError):
        return False
    image.thumbnail((size, size))
    image.save(target, format="JPEG", quality=85)
    return True


def _common_folder(paths: list[str]) -> str:
    """The deepest folder holding every path ('' when none or only the root)."""
    if not paths:
        return ""
    try:
        common = os.path.commonpath([os.path.dirname(path) for path in paths])
    except ValueError:
        return ""
    return "" if common in ("", os.sep) else common


def _page(groups: Groups, thumbnails: dict[int, str], shown: int) -> str:
    title = "Near-duplicates" if groups.kind == "duplicates" else "Clusters"
    lines = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title>",
        "<style>body{font-family:sans-serif;margin:1em}section{border-top:1px solid #ccc;"
        "padding:.5em 0}figure{display:inline-block;margin:4px;width:140px;vertical-align:top}"
        "figcaption{font-size:11px;word-break:break-all}img{width:128px;height:128px;"
        "object-fit:contain;background:#f4f4f4}"
        "</style></head><body>",
        f"<h1>{title}</h1>",
        f"<p>{len(groups.groups)} groups of {groups.grouped_items} items among {groups.count} "
        f"({groups.distance} distance &lt;= {groups.threshold:.4g}); {groups.pairs_examined} "
        f"pairs examined of the {groups.quadratic_pairs} an all-pairs comparison would.</p>",
    ]
    shown_paths = [path for paths in groups.paths[:shown] for path in paths]
    root = _common_folder(shown_paths)
    if root:
        lines.append(f"<p>Paths below {html.escape(terminal_safe(root))}/</p>")
    if shown < len(groups.groups):
        lines.append(
            f"<p>The {shown} largest groups are shown; groups.csv and groups.json hold all.</p>"
        )
    for number, (ids, paths) in enumerate(
        zip(groups.groups[:shown], groups.paths[:shown], strict=True), start=1
    ):
        lines.append(f'<section id="group-{number}"><h2>Group {number} ({len(ids)} items)</h2>')
        for item_id, path in zip(ids, paths, strict=True):
            shown_name = path[len(root) + 1 :] if root else path
            name = html.escape(terminal_safe(shown_name))
            thumb = thumbnails.get(item_id)
            image = f'<img src="{thumb}" alt="{name}">' if thumb else "<div>(unreadable)</div>"
            lines.append(f"<figure>{image}<figcaption>{name}</figcaption></figure>")
        lines.append("</section>")
    lines.append("</body></html>")
    return "\n".join(lines) + "\n"


def write_groups(groups: Groups, out: str | Path, *, max_groups_shown: int = 500) -> Path:
    """Write ``groups`` into the folder ``out``: ``groups.csv`` (group,id,path; group 1 is the
    largest), ``groups.json`` (:meth:`Groups.to_json` with a ``format`` marker: ``groups`` a list
    of lists of paths, ``ids`` the same with item ids), ``index.html``
    with a thumbnail (generated into ``out/thumbnails/``) of every item of the
    ``max_groups_shown`` largest groups. Atomic: written into a staging folder beside ``out``,
    then renamed over it; a previous output in ``out`` is replaced, anything else refused."""
    target = check_output_folder(out).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerow(["group", "id", "path"])
        for number, (ids, paths) in enumerate(zip(groups.groups, groups.paths, strict=True), 1):
            for item_id, path in zip(ids, paths, strict=True):
                writer.writerow([number, item_id, path])
        (staging / "groups.csv").write_text(rows.getvalue(), encoding="utf-8")
        document = {"format": MARKER, **groups.to_json()}
        (staging / "groups.json").write_text(json.dumps(document, indent=1), encoding="utf-8")
        shown = min(len(groups.groups), max(0, max_groups_shown))
        thumbnails: dict[int, str] = {}
        (staging / "thumbnails").mkdir()
        for ids, paths in zip(groups.groups[:shown], groups.paths[:shown], strict=True):
            for item_id, path in zip(ids, paths, strict=True):
                name = f"thumbnails/{int(item_id)}.jpg"
                if write_thumbnail(path, staging / name):
                    thumbnails[item_id] = name
        (staging / "index.html").write_text(_page(groups, thumbnails, shown), encoding="utf-8")
        check_output_folder(target)  # still safe to replace
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def group_images(
    source: str | Path,
    out: str | Path,
    *,
    kind: str = "duplicates",
    model: str | Path | None = None,
    threshold: float | None = None,
    min_size: int = 2,
    device: str = "cpu",
    progress: bool = True,
) -> Groups:
    """``mbdl dedup`` / ``mbdl cluster``: group the catalog ``source`` (an index directory, or a
    folder of images indexed first with ``model`` into a temporary catalog) into near-duplicates
    (``kind="duplicates"``) or clusters (``kind="clusters"``) and write them into ``out``
    (:func:`write_groups`). Bad arguments are refused before any work."""
    if kind not in ("duplicates", "clusters"):
        raise UserError(f"kind must be duplicates or clusters, got {kind!r}")
    if threshold is not None:
        check_threshold(threshold, None)
    check_output_folder(out)
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"{terminal_safe(folder)} is not an index or a folder of images")
    from mbdl.catalog import Catalog, build_catalog
    from mbdl.catalog.store import MANIFEST

    grouping = find_duplicates if kind == "duplicates" else cluster_catalog
    options: dict[str, Any] = {} if kind == "duplicates" else {"min_size": min_size}
    if (folder / MANIFEST).is_file():
        catalog = Catalog.open(folder)
        groups = grouping(catalog, threshold, **options)
    else:
        if model is None:
            raise UserError(
                f"{terminal_safe(folder)} is a folder of images, not an index: give --model MODEL "
                "to index it first (or build an index with mbdl index build)"
            )
        with tempfile.TemporaryDirectory(prefix="mbdl-groups-") as temporary:
            report = build_catalog(
                model, Path(temporary) / "index", images=folder, device=device, progress=progress
            )
            check_threshold(threshold, report.catalog.threshold)
            groups = grouping(report.catalog, threshold, **options)
            report.catalog.close()
    write_groups(groups, out)
    return groups
