"""A catalog in an established vector engine: export it (Qdrant, Milvus) and search it there.

mbdl does not grow its own distributed store: where a catalog outgrows one machine, its
embeddings and item metadata (``id``, ``path``, ``label``, ``size``, ``sha256``) are written
through the engine's official client, and :func:`search_engine` answers queries from it in the
same :class:`~mbdl.catalog.QueryResult` shape as :meth:`Searcher.search`.

An engine is named ``ENGINE:LOCATION``: ``qdrant:DIR`` (qdrant-client's local mode, a folder),
``qdrant:http://host:6333`` (a server), ``milvus:FILE.db`` (Milvus Lite), ``milvus:http://host:19530``.
Distances come back in the catalog's distance: euclidean (Qdrant ``Euclid`` gives it directly,
Milvus ``L2`` its square, which is rooted) or cosine (``1 - similarity``). Needs
``pip install 'mbdl[qdrant]'`` or ``pip install 'mbdl[milvus]'``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from mbdl.errors import UserError, terminal_safe

ENGINES = ("qdrant", "milvus")
DISTANCES = ("euclidean", "cosine")
PAYLOAD = ("id", "path", "label", "size", "sha256")


@dataclass(frozen=True)
class EngineExport:
    """What :func:`export_catalog` wrote."""

    engine: str
    location: str
    collection: str
    count: int
    dim: int
    distance: str


def parse_engine(spec: str) -> tuple[str, str]:
    """``"ENGINE:LOCATION"`` -> ``(engine, location)``; an unknown engine is refused."""
    engine, _, location = str(spec).partition(":")
    if engine not in ENGINES or not location:
        raise UserError(
            f"an engine is ENGINE:LOCATION with ENGINE one of {', '.join(ENGINES)} "
            f"(e.g. qdrant:./vectors or milvus:catalog.db), got {terminal_safe(spec)!r}"
        )
    return engine, location


def _remote(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise UserError(
            f"exporting a catalog with distance {distance!r} is not supported "
            f"(only {', '.join(DISTANCES)})"
        )


def _check_collection(name: str) -> None:
    if not name or not name.replace("_", "a").replace("-", "a").isalnum() or len(name) > 200:
        raise UserError(
            f"a collection name is letters, digits, '_' and '-', got {terminal_safe(name)!r}"
        )


@contextmanager
def _qdrant(location: str) -> Iterator[Any]:
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        raise UserError("Qdrant needs qdrant-client: pip install 'mbdl[qdrant]'") from None
    client = QdrantClient(url=location) if _remote(location) else QdrantClient(path=location)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def _milvus(location: str) -> Iterator[Any]:
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise UserError("Milvus needs pymilvus: pip install 'mbdl[milvus]'") from None
    client = MilvusClient(location)
    try:
        yield client
    finally:
        client.close()


def _payloads(items: list[Any]) -> list[dict[str, Any]]:
    return [
        {"id": int(i.id), "path": i.path, "label": i.label, "size": int(i.size), "sha256": i.sha256}
        for i in items
    ]


def export_catalog(
    catalog: Any,
    to: str,
    *,
    collection: str = "mbdl",
    replace: bool = False,
    batch_size: int = 1024,
) -> EngineExport:
    """Write every item of ``catalog`` (its exact vector and metadata) into ``collection`` of the
    engine ``to`` (``ENGINE:LOCATION``). An existing collection is refused unless ``replace``."""
    engine, location = parse_engine(to)
    _check_collection(collection)
    _check_distance(catalog.distance)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ids = np.sort(np.asarray(catalog.ids(), dtype=np.int64))
    dim = int(catalog.dim)
    batches = (ids[s : s + batch_size] for s in range(0, len(ids), batch_size))
    if engine == "qdrant":
        from qdrant_client import models

        with _qdrant(location) as client:
            if client.collection_exists(collection):
                if not replace:
                    raise _exists(collection, to)
                client.delete_collection(collection)
            metric = (
                models.Distance.EUCLID
                if catalog.distance == "euclidean"
                else models.Distance.COSINE
            )
            client.create_collection(
                collection, vectors_config=models.VectorParams(size=dim, distance=metric)
            )
            for batch in batches:
                vectors = np.asarray(catalog.vectors(batch), dtype=np.float32)
                client.upsert(
                    collection,
                    points=models.Batch(
                        ids=batch.tolist(),
                        vectors=vectors.tolist(),
                        payloads=_payloads(catalog.items(batch.tolist())),
                    ),
                    wait=True,
                )
    else:
        with _milvus(location) as client:
            if client.has_collection(collection):
                if not replace:
                    raise _exists(collection, to)
                client.drop_collection(collection)
            milvus_metric = "L2" if catalog.distance == "euclidean" else "COSINE"
            schema = client.create_schema(auto_id=False, enable_dynamic_field=True)
            from pymilvus import DataType

            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            index = client.prepare_index_params()
            index.add_index("vector", index_type="FLAT", metric_type=milvus_metric)
            client.create_collection(collection, schema=schema, index_params=index)
            for batch in batches:
                vectors = np.asarray(catalog.vectors(batch), dtype=np.float32)
                rows = [
                    {**payload, "vector": vector.tolist()}
                    for payload, vector in zip(
                        _payloads(catalog.items(batch.tolist())), vectors, strict=True
                    )
                ]
                client.insert(collection, rows)
            client.flush(collection)
    return EngineExport(engine, location, collection, len(ids), dim, catalog.distance)


def _exists(collection: str, to: str) -> UserError:
    return UserError(
        f"collection {collection!r} already exists in {terminal_safe(to)}; choose another "
        "--collection or pass --replace"
    )


def _check_queries(embeddings: Any, k: int) -> np.ndarray:
    queries = np.asarray(embeddings, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or not len(queries):
        raise UserError(f"queries must be an array [Q, dim], got shape {queries.shape}")
    if not np.isfinite(queries).all():
        raise UserError("queries must be finite (no NaN or infinity)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"k must be an integer >= 1, got {k!r}")
    return queries


def search_engine(
    url: str,
    collection: str,
    embeddings: Any,
    k: int,
    *,
    threshold: float | None = None,
    names: list[str] | None = None,
) -> list[Any]:
    """The ``k`` nearest items of each embedding (``[Q, dim]``) in ``collection`` of the engine
    ``url`` (``ENGINE:LOCATION``), as :class:`~mbdl.catalog.QueryResult` (queries named by
    ``names``, else ``embedding[i]``), distances in the catalog's distance; ``match`` set when ``threshold``
    is given."""
    from mbdl.catalog import Neighbour, QueryResult

    engine, location = parse_engine(url)
    _check_collection(collection)
    queries = _check_queries(embeddings, k)
    if names is not None and len(names) != len(queries):
        raise UserError(f"{len(names)} names for {len(queries)} queries")
    if threshold is not None and (not math.isfinite(threshold) or threshold < 0):
        raise UserError(f"threshold must be a finite distance >= 0, got {threshold}")
    hits: list[list[tuple[int, float, dict[str, Any]]]] = []
    if engine == "qdrant":
        with _qdrant(location) as client:
            if not client.collection_exists(collection):
                raise _missing(collection, url)
            params = client.get_collection(collection).config.params.vectors
            _check_dim(params.size, queries.shape[1], collection)
            cosine = str(params.distance).lower().endswith("cosine")
            for query in queries:
                points = client.query_points(
                    collection, query=query.tolist(), limit=k, with_payload=True
                ).points
                hits.append(
                    [
                        (int(p.id), 1.0 - p.score if cosine else p.score, p.payload or {})
                        for p in points
                    ]
                )
    else:
        with _milvus(location) as client:
            if not client.has_collection(collection):
                raise _missing(collection, url)
            described = client.describe_collection(collection)
            field = next(f for f in described["fields"] if f["name"] == "vector")
            _check_dim(int(field["params"]["dim"]), queries.shape[1], collection)
            metric = client.describe_index(collection, "vector").get("metric_type", "L2")
            found = client.search(
                collection, data=queries.tolist(), limit=k, output_fields=list(PAYLOAD[1:])
            )
            for row in found:
                hits.append(
                    [
                        (
                            int(h["id"]),
                            math.sqrt(max(h["distance"], 0.0))
                            if metric == "L2"
                            else 1.0 - h["distance"],
                            h.get("entity", {}),
                        )
                        for h in row
                    ]
                )
    results = []
    for number, row in enumerate(hits):
        row.sort(key=lambda hit: (hit[1], hit[0]))
        neighbours = [
            Neighbour(
                rank=rank,
                id=item_id,
                path=str(payload.get("path", "")),
                distance=float(distance),
                label=payload.get("label"),
                match=None if threshold is None else bool(distance <= threshold),
            )
            for rank, (item_id, distance, payload) in enumerate(row, start=1)
        ]
        name = names[number] if names is not None else f"embedding[{number}]"
        results.append(QueryResult(query=name, neighbours=neighbours))
    return results


def _check_dim(stored: int, given: int, collection: str) -> None:
    if stored != given:
        raise UserError(
            f"the queries have dimension {given} but collection {collection!r} holds {stored}"
        )


def _missing(collection: str, url: str) -> UserError:
    return UserError(
        f"no collection {collection!r} in {terminal_safe(url)}; export one with "
        "mbdl index export INDEX --to ENGINE:LOCATION"
    )
