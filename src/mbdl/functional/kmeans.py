"""Seeded k-means (Lloyd's algorithm) for the clustering metrics: faiss when installed, else torch.

Both backends start from ``num_clusters`` distinct data points drawn at random with ``seed``
(faiss's initialisation; k-means++ is sequential in k and too slow for k in the thousands) and
run Lloyd iterations: assign each point to its nearest centroid, move each centroid to the mean
of its points. The torch version stops early when no assignment changes and keeps an empty
cluster's previous centroid; it computes assignments in chunks of points under
``memory_budget_bytes`` with one matrix multiply per chunk (``argmin_j |c_j|^2 - 2 x.c_j``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mbdl.functional.knn import (
    TOPK_BLOCK,
    blockwise_topk_smallest,
    faiss_available,
    query_chunk_size,
)

KMEANS_BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss")


def kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = 20,
    backend: str = "auto",
    memory_budget_bytes: int = 2**30,
) -> Tensor:
    """Cluster the rows of ``x`` (``N x d``) into ``num_clusters``; returns ``int64[N]`` assignments.

    ``backend``: ``"faiss"`` (``faiss.Kmeans``, ``niter=max_iter``, ``nredo=1``; faiss trains on a
    random subsample of 256 points per cluster when N is larger than that), ``"torch"``, or
    ``"auto"`` (faiss when installed, else torch). Deterministic for a given seed and backend.
    """
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(KMEANS_BACKENDS)}; got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu)")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N x d); got shape {tuple(x.shape)}")
    if not 1 <= num_clusters <= x.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} must be between 1 and N={x.shape[0]}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1; got {max_iter}")
    if backend == "faiss" or (backend == "auto" and faiss_available()):
        return _faiss_kmeans(x, num_clusters, seed=seed, max_iter=max_iter)
    return _torch_kmeans(x, num_clusters, seed=seed, max_iter=max_iter, budget=memory_budget_bytes)


def _faiss_kmeans(x: Tensor, num_clusters: int, *, seed: int, max_iter: int) -> Tensor:
    import faiss  # optional dependency
    import numpy as np

    data = np.ascontiguousarray(x.detach().float().cpu().numpy())
    model = faiss.Kmeans(
        data.shape[1],
        num_clusters,
        niter=max_iter,
        nredo=1,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
    )
    model.train(data)
    _, assignment = model.index.search(data, 1)
    return torch.from_numpy(assignment[:, 0].astype(np.int64)).to(x.device)


def two_nearest_centroids(
    x: Tensor, centroids: Tensor, budget: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest centroid index, its distance and the second-nearest distance of each row, in chunks.

    Squared distances come from ``|x|^2 + |c|^2 - 2 x.c`` (one matrix multiply per chunk); the
    two smallest per row from :func:`~mbdl.functional.knn.blockwise_topk_smallest`.
    """
    num_centroids = centroids.shape[0]
    padded = -(-num_centroids // TOPK_BLOCK) * TOPK_BLOCK
    pad = padded - num_centroids
    bias = torch.cat([centroids.pow(2).sum(dim=1), centroids.new_full((pad,), float("inf"))])
    centroids_t = torch.cat(
        [centroids, centroids.new_zeros(pad, centroids.shape[1])]
    ).T.contiguous()
    nearest = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    first = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    second = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    chunk = query_chunk_size(padded, budget, x.element_size())
    for start in range(0, x.shape[0], chunk):
        rows = x[start : start + chunk]
        scores = torch.addmm(bias, rows, centroids_t, alpha=-2.0)
        best, best_index = blockwise_topk_smallest(scores, min(2, num_centroids))
        distances = (best + rows.pow(2).sum(dim=1, keepdim=True)).clamp_min(0).sqrt()
        nearest[start : start + chunk] = best_index[:, 0]
        first[start : start + chunk] = distances[:, 0]
        if num_centroids > 1:
            second[start : start + chunk] = distances[:, 1]
    return nearest, first, second


def _torch_kmeans(x: Tensor, num_clusters: int, *, seed: int, max_iter: int, budget: int) -> Tensor:
    """Lloyd's algorithm with Hamerly's bounds (Hamerly, "Making k-means even faster", SDM 2010).

    Each point keeps an upper bound on the distance to its centroid and a lower bound on the
    distance to every other centroid; after centroids move by ``shift``, the bounds move by at
    most ``shift``, and a point whose upper bound stays below its lower bound cannot change
    cluster, so only the other points are re-assigned. The result is that of plain Lloyd.
    """
    x = x.detach().float()
    generator = torch.Generator().manual_seed(seed)
    start_rows = torch.randperm(x.shape[0], generator=generator)[:num_clusters].to(x.device)
    centroids = x[start_rows].clone()
    assignment, upper, lower = two_nearest_centroids(x, centroids, budget)
    for _ in range(max_iter):
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=num_clusters).to(x.dtype)
        filled = counts > 0
        moved = centroids.clone()
        moved[filled] = sums[filled] / counts[filled].unsqueeze(1)
        shift = (moved - centroids).norm(dim=1)
        centroids = moved
        upper = upper + shift[assignment]
        lower = lower - shift.max()
        # A small slack keeps float32 rounding from skipping a point that should move.
        slack = 1e-4 * upper + 1e-6
        check = (upper + slack >= lower).nonzero().flatten()
        if check.numel():
            upper[check] = (x[check] - centroids[assignment[check]]).norm(dim=1)
            check = check[upper[check] + slack[check] >= lower[check]]
        if check.numel() == 0:
            break
        new_assignment, new_upper, new_lower = two_nearest_centroids(x[check], centroids, budget)
        changed = bool((new_assignment != assignment[check]).any())
        assignment[check], upper[check], lower[check] = new_assignment, new_upper, new_lower
        if not changed:
            break
    return assignment
