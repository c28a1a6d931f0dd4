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

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mbdl.functional.checks import check_embeddings, check_labels
from mbdl.functional.clustering import adjusted_mutual_info, normalized_mutual_info, pair_f1
from mbdl.functional.kmeans import DEFAULT_RESTARTS, kmeans_fit
from mbdl.functional.knn import check_knn_options, knn
from mbdl.functional.retrieval import map_at_r, neighbour_matches, r_precision, recall_at_k
from mbdl.functional.verification import (
    DEFAULT_FARS,
    DEFAULT_MAX_PAIRS,
    pair_distances,
    verification_metrics,
)

METRIC_NAMES: tuple[str, ...] = (
    "recall@K",
    "precision@1",
    "r_precision",
    "map@r",
    "nmi",
    "ami",
    "f1",
    "verification",
)
_OTHERS = ("precision@1", "r_precision", "map@r", "nmi", "ami", "f1", "verification")
_CLUSTERING = {"nmi", "ami", "f1"}
_RECALL = re.compile(r"recall(@(\d+))?$", re.IGNORECASE)


def _as_tensor(x: Any, name: str, *, floating: bool) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array; got {type(x).__name__}")
    x = x.detach()
    if floating and x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x


def _parse_metrics(metrics: Iterable[str] | None, ks: Sequence[int]) -> tuple[list[int], set[str]]:
    """Split the requested metric names into the recall Ks and the other metric names."""
    if isinstance(metrics, str):
        metrics = [metrics]
    if metrics is None:
        return sorted(set(ks)), set(_OTHERS)
    recall_ks: set[int] = set()
    others: set[str] = set()
    for name in metrics:
        match = _RECALL.match(name)
        if match:
            recall_ks.update([int(match.group(2))] if match.group(2) else ks)
        elif name.lower() in _OTHERS:
            others.add(name.lower())
        else:
            raise ValueError(
                f"unknown metric {name!r}; allowed: recall (every K in ks), recall@<K>, "
                + ", ".join(_OTHERS)
            )
    return sorted(recall_ks), others


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
    kmeans_restarts: int = DEFAULT_RESTARTS,
    verify_fars: Sequence[float] = DEFAULT_FARS,
    verify_max_pairs: int = DEFAULT_MAX_PAIRS,
) -> dict[str, float]:
    """The metric suite on ``embeddings`` (``N x d``) with integer ``labels`` (``N``).

    Keys: ``recall@K`` for each K in ``ks``, ``precision@1``, ``r_precision``, ``map@r``
    (Musgrave et al. 2020), ``nmi``, ``ami``, ``f1`` (pair-counting F1, Song et al. 2016) with
    ``kmeans/backend=<name>``, ``kmeans/restarts``, ``kmeans/seed``; and the verification keys
    ``tar@far=<f>``, ``far@far=<f>``, ``threshold@far=<f>`` for each FAR in ``verify_fars``,
    ``eer``, ``eer_threshold``, ``genuine_pairs``, ``impostor_pairs``. ``metrics`` selects a
    subset (``None``: all; ``"verification"`` names the verification keys); k-means only runs
    when ``nmi``, ``ami`` or ``f1`` is asked for. ``backend`` (``"auto"``, ``"torch"``,
    ``"faiss"``) picks the kNN search and k-means' Lloyd iterations; ``"auto"`` is torch for
    both, so the numbers never depend on whether faiss is installed. Returns a flat
    ``dict[str, float]``.
    """
    check_knn_options(distance, backend)
    ks = list(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers; got {ks}")
    recall_ks, others = _parse_metrics(metrics, ks)
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
    retrieval = bool(recall_ks) or bool(others & {"precision@1", "r_precision", "map@r"})
    if retrieval:
        leave_one_out = queries is None or labels_of_queries is None
        results.update(
            _retrieval(
                gallery if queries is None else queries,
                gallery_labels if labels_of_queries is None else labels_of_queries,
                gallery,
                gallery_labels,
                leave_one_out=leave_one_out,
                recall_ks=recall_ks,
                others=others,
                distance=distance,
                budget=memory_budget_bytes,
                backend=backend,
                per_class=per_class,
            )
        )
    if others & _CLUSTERING:
        clustering = kmeans_fit(
            gallery,
            num_classes,
            seed=seed,
            backend="faiss" if backend == "faiss" else "torch",
            memory_budget_bytes=memory_budget_bytes,
            restarts=kmeans_restarts,
        )
        clusters = clustering.assignment
        if "nmi" in others:
            results["nmi"] = normalized_mutual_info(gallery_labels, clusters)
        if "ami" in others:
            results["ami"] = adjusted_mutual_info(gallery_labels, clusters)
        if "f1" in others:
            results["f1"] = pair_f1(gallery_labels, clusters)
        results[f"kmeans/backend={clustering.backend}"] = 1.0
        results["kmeans/restarts"] = float(clustering.restarts)
        results["kmeans/seed"] = float(clustering.seed)
    if "verification" in others:
        genuine, impostor, _ = pair_distances(
            gallery,
            gallery_labels,
            query_embeddings=queries,
            query_labels=labels_of_queries,
            distance=distance,
            max_pairs=verify_max_pairs,
            seed=seed,
        )
        results.update(verification_metrics(genuine, impostor, tuple(verify_fars)))
    return results


def _retrieval(
    queries: Tensor,
    labels_of_queries: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    *,
    leave_one_out: bool,
    recall_ks: list[int],
    others: set[str],
    distance: str,
    budget: int,
    backend: str,
    per_class: bool,
) -> dict[str, float]:
    available = gallery.shape[0] - int(leave_one_out)
    if recall_ks and max(recall_ks) > available:
        raise ValueError(
            f"K={max(recall_ks)} in ks is larger than the {available} gallery items available"
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
    need_r = bool(others & {"r_precision", "map@r"})
    k = max([*recall_ks, 1, int(num_relevant.max()) if need_r else 1])
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
        for name, scores in _per_query_scores(matches, relevant, recall_ks, others).items():
            parts.setdefault(name, []).append(scores)
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


def _per_query_scores(
    matches: Tensor, num_relevant: Tensor, recall_ks: list[int], others: set[str]
) -> dict[str, Tensor]:
    per_query: dict[str, Tensor] = {f"recall@{k_}": recall_at_k(matches, k_) for k_ in recall_ks}
    if "precision@1" in others:
        per_query["precision@1"] = recall_at_k(matches, 1)
    if "r_precision" in others:
        per_query["r_precision"] = r_precision(matches, num_relevant)
    if "map@r" in others:
        per_query["map@r"] = map_at_r(matches, num_relevant)
    return per_query


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
