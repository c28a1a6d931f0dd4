"""Search a catalog: load the model once, query many (image paths, PIL images, tensors or
embeddings), each query's neighbours in rank order with their distance and match flag."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mbdl.catalog.store import Catalog
from mbdl.errors import UserError, terminal_safe


@dataclass(frozen=True)
class Neighbour:
    """One catalog item found for a query."""

    rank: int  # 1-based
    id: int
    path: str
    distance: float  # the model's distance (euclidean on L2-normalised embeddings, not squared)
    label: str | None
    match: bool | None  # distance <= threshold when a threshold applies, else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rank": self.rank,
            "id": self.id,
            "path": self.path,
            "distance": self.distance,
            "label": self.label,
        }
        if self.match is not None:
            out["match"] = self.match
        return out


@dataclass(frozen=True)
class QueryResult:
    """A query and its neighbours, nearest first."""

    query: str  # the query's path, or "embedding[i]" / "image[i]"
    neighbours: list[Neighbour]

    def to_json(self) -> dict[str, Any]:
        """``{"query": ..., "neighbours": [...]}``: the shape ``mbdl search --json`` prints (a
        list of these) and ``POST /search`` returns."""
        return {"query": self.query, "neighbours": [n.to_json() for n in self.neighbours]}


class Searcher:
    """A catalog and the model that built it, loaded once to answer many queries.

    The model is loaded on the first image query (a search by embeddings needs none) and must
    be the one that built the catalog (its weights' fingerprint is checked).
    """

    def __init__(self, catalog: Catalog, model: str | os.PathLike[str] | None, device: str):
        self.catalog = catalog
        self.threshold: float | None = catalog.threshold
        self.dim: int = catalog.dim
        self._model_path = model
        self._device = device
        self._embedder: Any = None

    @classmethod
    def open(
        cls,
        index: str | os.PathLike[str] | Catalog,
        *,
        model: str | os.PathLike[str] | None = None,
        device: str = "cpu",
    ) -> Searcher:
        """Open the catalog ``index``; ``model`` (default: where the catalog's model was loaded
        from at build) is loaded now when given, else on the first image query."""
        catalog = index if isinstance(index, Catalog) else Catalog.open(index)
        searcher = cls(catalog, model, device)
        if model is not None:
            searcher.embedder  # noqa: B018 - load and check now
        return searcher

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from mbdl.catalog.build import Embedder

            where = self._model_path if self._model_path is not None else self.catalog.model
            embedder = Embedder.load(where, self._device)
            if embedder.fingerprint != self.catalog.model_fingerprint:
                raise UserError(
                    f"the model {terminal_safe(where)} (weights {embedder.fingerprint}) is not the "
                    f"one that built {terminal_safe(self.catalog.path)} "
                    f"({self.catalog.model_fingerprint}); use that model or rebuild the index"
                )
            self._embedder = embedder
        return self._embedder

    def embed(self, queries: Sequence[Any]) -> np.ndarray:
        """Embeddings ``float32 [Q, dim]`` of image paths, PIL images or image tensors
        (``[C, H, W]``, already preprocessed as the model's transform returns them)."""
        import torch
        from PIL import Image

        from mbdl.data.files import read_image

        embedder = self.embedder
        mode = str(embedder.spec.get("color_mode", "RGB"))
        tensors = []
        for query in queries:
            if isinstance(query, (str, os.PathLike)):
                tensors.append(embedder.transform(read_image(Path(query), mode)))
            elif isinstance(query, Image.Image):
                from mbdl.data.files import to_mode

                tensors.append(embedder.transform(to_mode(query, mode)))
            elif isinstance(query, torch.Tensor) and query.ndim == 3:
                tensors.append(query.float())
            else:
                raise UserError(
                    f"a query must be an image path, a PIL image or a [C, H, W] tensor; got "
                    f"{type(query).__name__}"
                )
        if not tensors:
            return np.zeros((0, self.dim), np.float32)
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise UserError(f"query tensors of different shapes: {sorted(shapes)}")
        out: list[np.ndarray] = []
        for start in range(0, len(tensors), 256):
            out.append(embedder.embed(torch.stack(tensors[start : start + 256])))
        return np.concatenate(out)

    def resolve_threshold(self, threshold: float | str | None) -> float | None:
        """``None``, a distance, or ``"model"``: the model's validated threshold."""
        if threshold is None:
            return None
        if isinstance(threshold, str):
            if threshold != "model":
                raise UserError(f"threshold must be a distance or 'model'; got {threshold!r}")
            if self.threshold is None:
                raise UserError(
                    f"the catalog {terminal_safe(self.catalog.path)}'s model has no validated "
                    "verification threshold: give one as a distance"
                )
            return self.threshold
        if isinstance(threshold, bool) or not math.isfinite(float(threshold)):
            raise UserError(f"threshold must be a finite distance; got {threshold!r}")
        return float(threshold)

    def search(
        self, queries: Any, *, k: int = 5, threshold: float | str | None = None
    ) -> list[QueryResult]:
        """The ``k`` nearest catalog items of each query.

        ``queries``: image paths, PIL images, image tensors ``[C, H, W]``, or an embeddings
        array ``[Q, dim]`` (NumPy, or a 2-D tensor). ``threshold``: ``None`` (no match flags),
        a distance, or ``"model"`` (the validated threshold).
        """
        import torch

        limit = self.resolve_threshold(threshold)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UserError(f"k must be a positive integer; got {k!r}")
        if isinstance(queries, np.ndarray) or (
            isinstance(queries, torch.Tensor) and queries.ndim == 2
        ):
            vectors = (
                queries.detach().float().cpu().numpy()
                if isinstance(queries, torch.Tensor)
                else np.asarray(queries, dtype=np.float32)
            )
            if vectors.ndim == 1:
                vectors = vectors[None]
            names = [f"embedding[{i}]" for i in range(len(vectors))]
        else:
            if isinstance(queries, (str, os.PathLike)):
                queries = [queries]
            queries = list(queries)
            names = [
                str(q) if isinstance(q, (str, os.PathLike)) else f"image[{i}]"
                for i, q in enumerate(queries)
            ]
            vectors = self.embed(queries)
        distances, ids = self.catalog.search_embeddings(vectors, k)
        live = ids[ids >= 0]
        items = {item.id: item for item in self.catalog.items(np.unique(live))} if len(live) else {}
        results = []
        for name, row_d, row_i in zip(names, distances, ids, strict=True):
            neighbours = []
            for rank, (distance, item_id) in enumerate(zip(row_d, row_i, strict=True), start=1):
                if item_id < 0:
                    break
                item = items[int(item_id)]
                value = float(distance)
                neighbours.append(
                    Neighbour(
                        rank,
                        item.id,
                        item.path,
                        value,
                        item.label,
                        None if limit is None else value <= limit,
                    )
                )
            results.append(QueryResult(name, neighbours))
        return results


def search(
    index: str | os.PathLike[str] | Catalog,
    queries: Any,
    *,
    k: int = 5,
    threshold: float | str | None = None,
    model: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> list[QueryResult]:
    """Search the catalog ``index`` once (:class:`Searcher` keeps the model for many calls)."""
    return Searcher.open(index, model=model, device=device).search(
        queries, k=k, threshold=threshold
    )


def query_files(
    queries: Sequence[str], images: str | os.PathLike[str] | None, list_file: str | None
) -> list[str]:
    """The query image paths of ``mbdl search``: the given ones, then every file below
    ``images``, then those listed in ``list_file``."""
    from mbdl.catalog.build import list_sources

    paths = [str(q) for q in queries]
    if images is not None:
        paths += [s.path for s in list_sources(images=images)]
    if list_file is not None:
        paths += [s.path for s in list_sources(list_file=list_file)]
    if not paths:
        raise UserError("give at least one query: QUERY paths, --images DIR or --list FILE")
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"query {terminal_safe(path)}: no such file")
    return paths
