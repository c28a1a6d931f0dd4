"""A stand-in with the Searcher's methods (until mbdl.catalog lands): embeddings are the images'
normalised mean colours, exact euclidean search."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Item:
    id: int
    path: str
    label: str | None
    size: int
    mtime: float
    sha256: str


@dataclass(frozen=True)
class Neighbour:
    rank: int
    id: int
    path: str
    distance: float
    label: str | None
    match: bool | None

    def to_json(self) -> dict[str, Any]:
        out = {
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
    query: str
    neighbours: list[Neighbour]

    def to_json(self) -> dict[str, Any]:
        return {"query": self.query, "neighbours": [n.to_json() for n in self.neighbours]}


def embed_image(image: Image.Image) -> np.ndarray:
    v = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3).mean(0) + 1.0
    return v / np.linalg.norm(v)


class Catalog:
    distance = "euclidean"
    factory = "Flat"
    model = "standin"
    threshold = 0.05

    def __init__(self, paths: list[Path]) -> None:
        self._items = [
            Item(i, str(p), None, p.stat().st_size, 0.0, "") for i, p in enumerate(paths)
        ]
        self._vectors = np.stack([embed_image(Image.open(p)) for p in paths])
        self.dim = 3

    def __len__(self) -> int:
        return len(self._items)

    def items(self, ids):
        return [self._items[i] for i in ids if 0 <= i < len(self._items)]


class Searcher:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.threshold = catalog.threshold
        self.dim = catalog.dim

    def search(self, queries, *, k=5, threshold=None):
        if isinstance(queries, np.ndarray):
            q = queries
        else:
            q = np.stack([embed_image(image) for image in queries])
        if threshold == "model":
            threshold = self.threshold
        d = np.sqrt(((q[:, None] - self.catalog._vectors[None]) ** 2).sum(-1))
        results = []
        for i, row in enumerate(d):
            order = np.argsort(row, kind="stable")[:k]
            results.append(
                QueryResult(
                    f"image[{i}]",
                    [
                        Neighbour(
                            r + 1,
                            int(j),
                            self.catalog._items[j].path,
                            float(row[j]),
                            None,
                            None if threshold is None else bool(row[j] <= threshold),
                        )
                        for r, j in enumerate(order)
                    ],
                )
            )
        return results
