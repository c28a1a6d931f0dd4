"""Embed a dataset and compute the metric suite: Recall@K, P@1, R-Precision, MAP@R, NMI, AMI,
F1 and open-set verification (TAR at FAR, EER).

Protocol (see docs/design.md):

- Leave-one-out by default: each item queries all the others, the query excluded by its index
  (never by dropping the first neighbour, which breaks on duplicates). With ``query_embeddings``
  the queries search the gallery ``embeddings`` (In-Shop style) and nothing is excluded.
- R = number of *other* gallery items of the query's class. Queries with R = 0 (a class with
  one item in leave-one-out, or a query class absent from the gallery) have no correct answer
  and are left out of every retrieval metric, as pytorch-metric-learning does.
- NMI, AMI and F1 come from one seeded k-means (k-means++ seeding, the lowest-inertia of
  ``kmeans_restarts`` runs) with k = number of classes, run on the gallery ``embeddings`` (the
  whole set in leave-one-out mode) against their ``labels``. The result records how:
  ``kmeans/backend=<torch|faiss>`` (1.0), ``kmeans/restarts`` and ``kmeans/seed``.
- Verification: the genuine and impostor pairs of the gallery (or query-gallery pairs),
  all of them or a seeded sample of ``verify_max_pairs`` of each kind; TAR, the FAR reached and
  the distance threshold at each FAR in ``verify_fars``, and the EER
  (:mod:`mbdl.functional.verification`).
- ``per_class=True`` adds, for every retrieval metric and every class ``c`` with at least one
  scored query, the key ``"<metric>/class=<c>"`` (mean over that class's queries); the result
  stays a flat ``dict[str, float]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mbdl.functional.checks import check_embeddings, check_labels
from mbdl.functional.kmeans import DEFAULT_RESTARTS, KMeansResult, kmeans_fit
from mbdl.functional.knn import check_knn_options, knn
from mbdl.functional.retrieval import neighbour_matches
from mbdl.functional.verification import DEFAULT_FARS, DEFAULT_MAX_PAIRS, pair_distances
from mbdl.metrics import NEEDS, Metric, registered_metrics
from mbdl.runtime import torch_tuning

#: A requested metric and, for a family (``recall@K``), the Ks asked for.
Request = tuple[Metric, list[int]]


def _as_tensor(x: Any, name: str, *, floating: bool) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array; got {type(x).__name__}")
    x = x.detach()
    if floating and x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x


def _match_metric(name: str, registry: Sequence[Metric]) -> tuple[Metric, list[int] | None] | None:
    """The metric ``name`` (lower case) asks for and its K (``None``: every K in ``ks``)."""
    for metric in registry:
        base = metric.base.lower()
        if not metric.is_family:
            if name == metric.name.lower():
                return metric, []
        elif name in (base, metric.name.lower()):
            return metric, None
        elif name.startswith(f"{base}@") and name[len(base) + 1 :].isdigit():
            return metric, [int(name[len(base) + 1 :])]
    return None


def _parse_metrics(metrics: Iterable[str] | None, ks: Sequence[int]) -> list[Request]:
    """The registered metrics ``metrics`` names (None: all), each family with its Ks, in
    registry order. A family ``<base>@K`` is asked for as ``<base>`` or ``<base>@K`` (every K in
    ``ks``) or as ``<base>@<K>``; names are case-insensitive."""
    registry = registered_metrics()
    if metrics is None:
        return [(m, sorted(set(ks)) if m.is_family else []) for m in registry]
    if isinstance(metrics, str):
        metrics = [metrics]
    asked: dict[str, set[int]] = {}
    for name in metrics:
        found = _match_metric(name.lower(), registry)
        if found is None:
            allowed = [
                f"{m.base} (every K in ks), {m.base}@<K>" if m.is_family else m.name
                for m in registry
            ]
            raise ValueError(f"unknown metric {name!r}; allowed: " + ", ".join(allowed))
        metric, metric_ks = found
        asked.setdefault(metric.name, set()).update(ks if metric_ks is None else metric_ks)
    return [(m, sorted(asked[m.name])) for m in registry if m.name in asked]


def evaluate(
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    *,
    query_embeddings: Tensor | np.ndarray | None = None,
    query_labels: Tensor | np.ndarray | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metrics: Iterable[str] | None = None,
    distance: str = "euclidean",
    seed: int = 0,
    memory_budget_bytes: int = 2**30,
    backend: str = "auto",
    per_class: bool = False,
    kmeans_restarts: int | str = DEFAULT_RESTARTS,
    verify_fars: Sequence[float] = DEFAULT_FARS,
    verify_max_pairs: int = DEFAULT_MAX_PAIRS,
    kmeans: Callable[[Tensor, int], Any] | None = None,
) -> dict[str, float]:
    """The metric suite on ``embeddings`` (``N x d``) with integer ``labels`` (``N``).

    Keys: ``recall@K`` for each K in ``ks``, ``precision@1``, ``r_precision``, ``map@r``
    (Musgrave et al. 2020), ``nmi``, ``ami``, ``f1`` (pair-counting F1, Song et al. 2016) with
    ``kmeans/backend=<name>``, ``kmeans/restarts``, ``kmeans/seed``; and the verification keys
    ``tar@far=<f>``, ``far@far=<f>``, ``threshold@far=<f>`` for each FAR in ``verify_fars``,
    ``eer``, ``eer_threshold``, ``genuine_pairs``, ``impostor_pairs``. ``metrics`` selects a
    subset (``None``: all; ``"verification"`` names the verification keys); k-means only runs
    when a clustering metric is asked for. The metrics are those of :mod:`mbdl.metrics`'
    registry. ``distance`` is ``"euclidean"``, ``"squared_euclidean"`` (the same ranking, so
    the same retrieval and clustering numbers as euclidean; verification thresholds in squared
    units) or ``"cosine"`` (``1 - cos``). ``backend`` (``"auto"``, ``"torch"``, ``"faiss"``)
    picks the kNN search and k-means' Lloyd iterations; ``"auto"`` is torch for both, so the
    numbers never depend on whether faiss is installed. Returns a flat ``dict[str, float]``.

    ``kmeans``: the clustering step, ``kmeans(embeddings, num_clusters)`` returning the
    ``int64[N]`` assignment or a :class:`mbdl.functional.kmeans.KMeansResult` (as
    pytorch-metric-learning's ``AccuracyCalculator(kmeans_func=...)``); None: mbdl's seeded
    k-means (:func:`mbdl.functional.kmeans.kmeans_fit` with ``seed``, ``kmeans_restarts`` and
    ``backend``, run inside :func:`mbdl.runtime.torch_tuning`). A callable's result is recorded
    as ``kmeans/backend=<its name>`` without restarts or seed, unless it returns a
    ``KMeansResult``.
    """
    check_knn_options(distance, backend)
    ks = list(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers; got {ks}")
    requests = _parse_metrics(metrics, ks)
    gallery = _as_tensor(embeddings, "embeddings", floating=True)
    gallery_labels = _as_tensor(labels, "labels", floating=False)
    check_embeddings(gallery, "embeddings")
    check_labels(gallery_labels, gallery.shape[0], "labels")
    gallery_labels = gallery_labels.long()
    if (query_embeddings is None) != (query_labels is None):
        raise ValueError("query_embeddings and query_labels must be given together")
    queries: Tensor | None = None
    labels_of_queries: Tensor | None = None
    if query_embeddings is not None and query_labels is not None:
        queries = _as_tensor(query_embeddings, "query_embeddings", floating=True)
        labels_of_queries = _as_tensor(query_labels, "query_labels", floating=False)
        check_embeddings(queries, "query_embeddings")
        check_labels(labels_of_queries, queries.shape[0], "query_labels")
        labels_of_queries = labels_of_queries.long()
        if queries.shape[1] != gallery.shape[1]:
            raise ValueError(
                f"query_embeddings have dimension {queries.shape[1]} but embeddings have "
                f"{gallery.shape[1]}"
            )
    num_classes = int(torch.unique(gallery_labels).numel())
    if num_classes < 2:
        raise ValueError(f"labels must contain at least two classes; got {num_classes}")

    results: dict[str, float] = {}
    by_need = {need: [(m, m_ks) for m, m_ks in requests if m.needs == need] for need in NEEDS}
    if by_need["knn"]:
        leave_one_out = queries is None or labels_of_queries is None
        results.update(
            _retrieval(
                gallery if queries is None else queries,
                gallery_labels if labels_of_queries is None else labels_of_queries,
                gallery,
                gallery_labels,
                leave_one_out=leave_one_out,
                requests=by_need["knn"],
                distance=distance,
                budget=memory_budget_bytes,
                backend=backend,
                per_class=per_class,
            )
        )
    if by_need["kmeans"]:
        if kmeans is None:
            with torch_tuning():
                clustering: Any = kmeans_fit(
                    gallery,
                    num_classes,
                    seed=seed,
                    backend="faiss" if backend == "faiss" else "torch",
                    memory_budget_bytes=memory_budget_bytes,
                    restarts=kmeans_restarts,
                )
        else:
            clustering = kmeans(gallery, num_classes)
        if isinstance(clustering, KMeansResult):
            assignment = clustering.assignment
        else:
            assignment = torch.as_tensor(clustering).reshape(-1).long().to(gallery_labels.device)
            if assignment.numel() != gallery.shape[0]:
                raise ValueError(
                    f"kmeans returned {assignment.numel()} assignments for {gallery.shape[0]} rows"
                )
        for metric, _ in by_need["kmeans"]:
            results[metric.name] = float(metric.resolve()(gallery_labels, assignment))
        if isinstance(clustering, KMeansResult):
            results[f"kmeans/backend={clustering.backend}"] = 1.0
            results["kmeans/restarts"] = float(clustering.restarts)
            results["kmeans/seed"] = float(clustering.seed)
        else:
            name = getattr(kmeans, "__name__", type(kmeans).__name__)
            results[f"kmeans/backend={name}"] = 1.0
    if by_need["pairs"]:
        genuine, impostor, _ = pair_distances(
            gallery,
            gallery_labels,
            query_embeddings=queries,
            query_labels=labels_of_queries,
            distance=distance,
            max_pairs=verify_max_pairs,
            seed=seed,
        )
        for metric, _ in by_need["pairs"]:
            results.update(metric.resolve()(genuine, impostor, tuple(verify_fars)))
    return results


#: keys of :func:`evaluate`'s result that say how the metrics were computed, not how good the
#: model is (the k-means backend is the key ``kmeans/backend=<name>``)
META_KEYS = ("kmeans/restarts", "kmeans/seed", "genuine_pairs", "impostor_pairs")


def split_metrics(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """``(metrics, meta)`` of :func:`evaluate`'s flat result: the metric table, and the run
    metadata (``kmeans/backend``: its name, ``kmeans/restarts``, ``kmeans/seed``,
    ``genuine_pairs``, ``impostor_pairs``: integers)."""
    metrics: dict[str, float] = {}
    meta: dict[str, Any] = {}
    for key, value in results.items():
        if key.startswith("kmeans/backend="):
            meta["kmeans/backend"] = key.partition("=")[2]
        elif key == "kmeans/backend":
            meta[key] = value
        elif key in META_KEYS:
            meta[key] = int(value)
        else:
            metrics[key] = value
    return metrics, meta


def metrics_document(metrics: dict[str, Any]) -> dict[str, Any]:
    """What ``metrics.json`` holds for a run's ``{"validation": ..., "test": ..., ...}``: each
    split's metric table (:func:`split_metrics`) under its old key, other blocks
    (``verification``) as they are, and the run metadata per split in a ``meta`` block."""
    document: dict[str, Any] = {}
    meta: dict[str, Any] = dict(metrics.get("meta") or {})
    for key, value in metrics.items():
        if key in ("validation", "test") and isinstance(value, dict):
            document[key], split_meta = split_metrics(value)
            if split_meta:
                meta[key] = {**meta.get(key, {}), **split_meta}
        elif key != "meta":
            document[key] = value
    if meta:
        document["meta"] = meta
    return document


def _retrieval(
    queries: Tensor,
    labels_of_queries: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    *,
    leave_one_out: bool,
    requests: list[Request],
    distance: str,
    budget: int,
    backend: str,
    per_class: bool,
) -> dict[str, float]:
    available = gallery.shape[0] - int(leave_one_out)
    fixed_depth = max(
        [k for m, m_ks in requests if m.is_family for k in m_ks]
        + [m.depth for m, _ in requests if isinstance(m.depth, int)],
        default=1,
    )
    if fixed_depth > available:
        raise ValueError(
            f"K={fixed_depth} in ks is larger than the {available} gallery items available"
            + (" (leave-one-out excludes the query)" if leave_one_out else "")
        )
    # R = other gallery items of the query's class.
    classes, gallery_counts = torch.unique(gallery_labels.cpu(), return_counts=True)
    query_cpu = labels_of_queries.cpu().contiguous()
    position = torch.searchsorted(classes, query_cpu).clamp_max(classes.numel() - 1)
    in_gallery = classes[position] == query_cpu
    num_relevant = torch.where(in_gallery, gallery_counts[position], 0) - int(leave_one_out)
    scored = num_relevant > 0
    if not bool(scored.any()):
        raise ValueError("no query has another item of its class in the gallery")
    need_r = any(m.depth == "R" for m, _ in requests)
    k = max(fixed_depth, int(num_relevant.max()) if need_r else 1)
    scorers = _per_query_scorers(requests)
    device = queries.device
    gallery = gallery.to(device)
    gallery_labels_here = gallery_labels.to(device)
    # queries in blocks whose k neighbours (distance, index, label, match: 21 bytes each) fit
    block = max(1, budget // (24 * k))
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, queries.shape[0], block):
        stop = min(start + block, queries.shape[0])
        _, indices = knn(
            queries[start:stop],
            gallery,
            k,
            distance=distance,
            exclude_self=leave_one_out,
            memory_budget_bytes=budget,
            backend=backend,
            query_offset=start if leave_one_out else None,
        )
        neighbour_labels = gallery_labels_here[indices]
        block_labels = labels_of_queries[start:stop].to(indices.device)
        matches = neighbour_matches(neighbour_labels, block_labels).cpu()
        keep = scored[start:stop]
        matches, relevant = matches[keep], num_relevant[start:stop][keep]
        for name, score in scorers.items():
            parts.setdefault(name, []).append(torch.as_tensor(score(matches, relevant)).double())
    per_query = {name: torch.cat(chunks) for name, chunks in parts.items()}
    results = {name: float(scores.mean()) for name, scores in per_query.items()}
    if per_class:
        query_classes = labels_of_queries.cpu()[scored]
        unique_classes, inverse = torch.unique(query_classes, return_inverse=True)
        class_counts = torch.bincount(inverse, minlength=unique_classes.numel()).double()
        for name, scores in per_query.items():
            sums = torch.zeros(unique_classes.numel(), dtype=torch.float64)
            means = sums.index_add_(0, inverse, scores) / class_counts
            for label, value in zip(unique_classes.tolist(), means.tolist(), strict=True):
                results[f"{name}/class={label}"] = value
    return results


def _per_query_scorers(requests: list[Request]) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """Result key -> ``score(matches, num_relevant) -> Tensor[Q]`` for each requested kNN
    metric, calling its function as its ``depth`` says (see :mod:`mbdl.metrics`)."""
    scorers: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}
    for metric, metric_ks in requests:
        function = metric.resolve()
        if metric.depth == "R":
            scorers[metric.name] = function
        elif metric.is_family:
            for k in metric_ks:
                scorers[f"{metric.base}@{k}"] = _at_depth(function, k)
        else:
            scorers[metric.name] = _at_depth(function, None)
    return scorers


def _at_depth(function: Callable[..., Tensor], k: int | None) -> Callable[[Tensor, Tensor], Tensor]:
    """``function(matches, k)`` (a family's K) or ``function(matches)`` as a scorer."""

    def score(matches: Tensor, num_relevant: Tensor) -> Tensor:
        return function(matches) if k is None else function(matches, k)

    return score


def embed_dataset(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> tuple[Tensor, Tensor]:
    """Embed every item of ``dataset`` (``(image, label)`` pairs) in order.

    Runs ``model`` in eval mode under ``torch.inference_mode()`` (restoring its previous mode
    afterwards); returns CPU ``float32`` embeddings ``[N, d]`` and ``int64`` labels ``[N]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    was_training = model.training
    model.eval()
    chunks: list[Tensor] = []
    label_chunks: list[Tensor] = []
    try:
        with torch.inference_mode():
            for images, batch_labels in loader:
                output = model(images.to(device))
                chunks.append(output.float().cpu())
                label_chunks.append(torch.as_tensor(batch_labels).long().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("dataset is empty")
    return torch.cat(chunks), torch.cat(label_chunks)
