"""Seeded k-means for the clustering metrics: k-means++ seeding, Lloyd iterations, restarts.

Each restart seeds ``num_clusters`` centres by greedy k-means++ (Arthur and Vassilvitskii,
"k-means++: The Advantages of Careful Seeding", SODA 2007; the greedy variant of scikit-learn):
the first centre is a random row, each next one the best (lowest potential) of a few rows drawn
with probability proportional to their squared distance ``D(x)^2`` to the nearest centre so
far. The draws are batched by rejection sampling: a pool of proposals drawn from the potential
at the pool's start gets its distances to all rows from one GEMM, and each step accepts a
proposal with probability ``D^2 / D_0^2``, which leaves the seeds distributed exactly as
sequential k-means++. That GEMM only scores the candidates: on a CPU with bf16 matrix units it
may round its inputs to bf16 (float32 sums), while ``D^2`` stays float32 (see
:func:`kmeans_plus_plus`). Lloyd's algorithm then runs from those centres and the seeding's
nearest-seed assignment, in torch (exact, chunked, Hamerly's bounds, only moved centroids
measured, stops when no assignment changes) or in faiss (``niter`` iterations, no
subsampling). Of ``restarts`` runs the one with the lowest inertia
(within-cluster sum of squares) is kept.

The seeding is the same for both backends (torch, from one generator seeded by ``seed``), so
they differ only by floating-point rounding in Lloyd's iterations. Rows are scaled by a power
of two when their magnitude would overflow or underflow float32 squares; the clustering is
invariant to that scaling.

Nothing here changes torch's global state on its own: the per-operation thread counts and the
bf16-rounded scoring products apply only inside the caller's :func:`mbdl.runtime.torch_tuning`
(which :func:`mbdl.evaluate.evaluate` enters), and each is restored as its operation ends.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mbdl.functional.knn import (
    TOPK_BLOCK,
    blockwise_topk_smallest,
    faiss_available,
    query_chunk_size,
    safe_scale,
)
from mbdl.runtime import reduced_precision_products, reduced_precision_switch, torch_threads

KMEANS_BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss")
DEFAULT_RESTARTS: int | str = "auto"
#: ``restarts="auto"``: this many runs while one run's work N x k stays within AUTO_RESTARTS_WORK
AUTO_RESTARTS = 3
AUTO_RESTARTS_WORK = 10**8


def resolve_restarts(restarts: int | str, num_points: int, num_clusters: int) -> int:
    """``restarts`` itself, or for ``"auto"``: 3 runs while ``N x k <= 1e8``, else 1.

    Measured (``benchmarks/evaluate.py``, docs/benchmarks.md): restarts matter when k is small
    (one unlucky seeding moves NMI/F1 visibly); at N = 60,000 and k = 12,000 (N x k = 7.2e8) the
    best of 3 runs gained +0.001 NMI for 3x the time (33 s against 10.7 s), while one run took
    0.66x the time of pytorch-metric-learning's NMI and scored higher (0.858 against 0.835).
    Below 1e8 (e.g. N = 10,000, k = 2,000: 2e7; CUB's and Cars' test sets) 3 runs cost seconds.
    """
    if restarts == "auto":
        return AUTO_RESTARTS if num_points * num_clusters <= AUTO_RESTARTS_WORK else 1
    if isinstance(restarts, bool) or not isinstance(restarts, int):
        raise ValueError(f"restarts must be a count >= 1 or 'auto'; got {restarts!r}")
    if restarts < 1:
        raise ValueError(f"restarts must be at least 1; got {restarts}")
    return restarts


DEFAULT_MAX_ITER = 50


@dataclass(frozen=True)
class KMeansResult:
    """The kept clustering: ``assignment`` (``int64[N]``), its ``inertia`` (within-cluster sum of
    squared euclidean distances, in the input's units), the ``backend`` that ran Lloyd's
    iterations (``"torch"`` or ``"faiss"``), ``restarts``, ``seed`` and ``max_iter``."""

    assignment: Tensor
    inertia: float
    backend: str
    restarts: int
    seed: int
    max_iter: int


def resolve_kmeans_backend(backend: str) -> str:
    """``"torch"`` or ``"faiss"`` for a backend name: ``"auto"`` is torch, so that the clustering
    metrics never depend on whether the optional faiss package is installed."""
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(KMEANS_BACKENDS)}; got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu)")
    return "faiss" if backend == "faiss" else "torch"


def kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = DEFAULT_MAX_ITER,
    backend: str = "auto",
    memory_budget_bytes: int = 2**30,
    restarts: int | str = DEFAULT_RESTARTS,
) -> Tensor:
    """Cluster the rows of ``x`` (``N x d``) into ``num_clusters``; returns ``int64[N]`` assignments.

    The assignment of :func:`kmeans_fit` (k-means++ seeding, Lloyd, best of ``restarts``).
    """
    return kmeans_fit(
        x,
        num_clusters,
        seed=seed,
        max_iter=max_iter,
        backend=backend,
        memory_budget_bytes=memory_budget_bytes,
        restarts=restarts,
    ).assignment


def kmeans_fit(
    x: Tensor,
    num_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = DEFAULT_MAX_ITER,
    backend: str = "auto",
    memory_budget_bytes: int = 2**30,
    restarts: int | str = DEFAULT_RESTARTS,
) -> KMeansResult:
    """k-means of the rows of ``x``: the lowest-inertia run of ``restarts`` k-means++ seedings
    (``"auto"``: :func:`resolve_restarts`).

    ``backend``: ``"torch"`` (exact Lloyd with Hamerly's bounds, CPU or GPU, chunked under
    ``memory_budget_bytes``), ``"faiss"`` (``faiss.Kmeans`` with ``niter=max_iter`` from the
    same seeds, CPU) or ``"auto"`` (= torch). Deterministic for a given seed and backend.
    """
    resolved = resolve_kmeans_backend(backend)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N x d); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point; got dtype {x.dtype}")
    if not 1 <= num_clusters <= x.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} must be between 1 and N={x.shape[0]}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1; got {max_iter}")
    restarts = resolve_restarts(restarts, x.shape[0], num_clusters)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf")
    scale = safe_scale(x)
    data = (x.detach() * scale if scale != 1.0 else x.detach()).float()
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, Tensor] | None = None
    for _ in range(restarts):
        seeds, nearest = kmeans_plus_plus_assigned(data, num_clusters, generator)
        if resolved == "faiss":
            assignment = _faiss_lloyd(data, data[seeds], max_iter=max_iter)
        else:
            assignment = lloyd(
                data, data[seeds], max_iter=max_iter, budget=memory_budget_bytes, assignment=nearest
            )
        inertia = within_cluster_sum_of_squares(data, assignment)
        if best is None or inertia < best[0]:
            best = (inertia, assignment)
    assert best is not None
    return KMeansResult(
        assignment=best[1],
        inertia=best[0] / scale / scale,
        backend=resolved,
        restarts=restarts,
        seed=seed,
        max_iter=max_iter,
    )


def within_cluster_sum_of_squares(x: Tensor, assignment: Tensor) -> float:
    """``sum_i |x_i - mean of x_i's cluster|^2`` (k-means' objective), accumulated in float64."""
    x64 = x.double()
    num = int(assignment.max()) + 1
    sums = torch.zeros(num, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, assignment, x64)
    counts = torch.bincount(assignment, minlength=num).double().clamp_min(1)
    means = sums / counts.unsqueeze(1)
    return float((x64 - means[assignment]).pow(2).sum())


SEEDING_BUFFER_BYTES = 2**28


def seeding_pool_size(n: int, trials: int) -> int:
    """Proposals per pool of :func:`kmeans_plus_plus` for ``n`` rows: up to 1,024 (enough for
    an efficient GEMM) while the ``pool x n`` float32 distances fit in 256 MiB, never fewer
    than ``trials``. It depends on ``n`` alone, so the memory budget never changes the seeds."""
    return max(trials, min(1024, SEEDING_BUFFER_BYTES // (4 * max(n, 1))))


def kmeans_plus_plus(
    x: Tensor,
    num_clusters: int,
    generator: torch.Generator,
    trials: int | None = None,
    *,
    pool_size: int | None = None,
    fast_scoring: bool = True,
) -> Tensor:
    """Row indices of ``num_clusters`` greedy k-means++ seeds of ``x`` (float32, ``N x d``).

    Each step takes ``trials`` candidates (default ``2 + floor(ln k)``, as scikit-learn) drawn
    with probability proportional to ``D(x)^2``, the squared distance to the nearest seed so
    far, and keeps the one that lowers the potential ``sum_x D(x)^2`` most.

    Batched by rejection sampling, so that the distances come from one GEMM per pool instead
    of one thin GEMM per seed: a pool of ``pool_size`` proposals is drawn at once from the
    potential ``D_0^2`` at the pool's start, together with one uniform ``u`` each, and their
    distances to every row are computed in one matrix multiply. A step scans the pool in order
    and accepts a proposal ``p`` when ``u * D_0^2(p) < D^2(p)`` (``D`` the current distances);
    an accepted proposal is then distributed exactly as ``D^2`` now (``D <= D_0``: rejection
    sampling), so the seeds are those of sequential greedy k-means++, with a different random
    stream. The first ``trials`` accepted proposals are the step's candidates; a new pool (of
    at most ``2 * trials * seeds left`` proposals) is drawn when fewer are left. Draws from
    ``generator`` (a CPU generator). Once every point coincides with a seed (duplicates), the
    remaining seeds are drawn uniformly among the rows not yet chosen.

    ``fast_scoring`` (float32 ``x`` of at least ``REDUCED_SCORING_MIN_ELEMENTS`` values, e.g.
    8,192 x 128): the pool's GEMM, which only scores the candidates
    (the greedy choice is a heuristic among candidates drawn from the exact ``D^2``), may round
    its inputs to bf16 (:func:`reduced_precision_products`; about 2.6x faster on an
    AVX512-BF16 CPU). ``D^2`` itself stays float32: at the proposals from their float32 Gram
    matrix (the acceptance test), at every row from a float32 GEMM against the pool's chosen
    seeds when the pool ends, so the seeds are still drawn exactly from ``D^2``. Where the
    products cannot be reduced, or with ``fast_scoring=False``, the pool's float32 products
    give ``D^2`` directly.
    """
    return kmeans_plus_plus_assigned(
        x, num_clusters, generator, trials, pool_size=pool_size, fast_scoring=fast_scoring
    )[0]


def kmeans_plus_plus_assigned(
    x: Tensor,
    num_clusters: int,
    generator: torch.Generator,
    trials: int | None = None,
    *,
    pool_size: int | None = None,
    fast_scoring: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`kmeans_plus_plus`'s seeds and each row's nearest seed (``int64[N]``, positions in
    the seeds; the float32 ``D^2`` the seeding maintains): Lloyd's first assignment."""
    n = x.shape[0]
    if trials is None:
        trials = 2 + int(math.log(num_clusters))
    if pool_size is None:
        pool_size = seeding_pool_size(n, trials)
    if pool_size < trials:
        raise ValueError(f"pool_size={pool_size} must be at least trials={trials}")
    reduced = (
        fast_scoring
        and x.dtype == torch.float32
        and x.numel() >= REDUCED_SCORING_MIN_ELEMENTS
        and reduced_precision_switch(x.device) is not None
    )
    # a small problem on one thread: each multi-threaded operation waits for all its threads,
    # which on a loaded machine costs a time slice per operation
    with torch_threads(torch.get_num_threads() if x.numel() >= 2**20 else 1):
        return _greedy_seeds(x, num_clusters, generator, trials, pool_size, reduced)


#: the seeding scores in reduced precision from this many elements of ``x`` (N x d) up: where
#: it pays; smaller problems keep float32 scores, the same on every CPU and on a GPU
REDUCED_SCORING_MIN_ELEMENTS = 2**20

#: unit roundoff of bf16 (8 significant bits), the coarsest rounding a reduced product may apply
BF16_UNIT_ROUNDOFF = 2.0**-8


def _scoring_products(left: Tensor, right_t: Tensor, out: Tensor, reduced: bool) -> Tensor:
    """``left @ right_t`` into ``out``, inputs rounded to bf16 where ``reduced`` allows."""
    with reduced_precision_products(left.device) if reduced else contextlib.nullcontext():
        return torch.mm(left, right_t, out=out)


def excess_error_bound(norms: Tensor, seed_norm: float, dim: int, reduced: bool) -> Tensor:
    """Twice the worst-case ``|computed - exact|`` of the excess ``|s|^2 - 2 s.x`` computed as
    the product of ``[-2s, |s|^2]`` and ``[x, 1]``, for rows of norms ``norms`` and any ``s``
    of norm at most ``seed_norm``. Inputs rounded with unit roundoff ``u`` (bf16's where
    ``reduced``, else 0) and a float32 sum of ``dim + 1`` terms give ``|error| <= (2u + u^2 +
    (dim + 1) 2^-24) sum_i |a_i b_i| <= (...) (2 |s| |x| + |s|^2)`` (Cauchy-Schwarz)."""
    u = BF16_UNIT_ROUNDOFF if reduced else 0.0
    factor = 2 * (2 * u + u * u + (dim + 1) * 2.0**-24)
    return (2 * seed_norm * factor) * norms + factor * seed_norm**2


#: rows re-measured at once at a pool's end (their float32 distances to the pool's seeds)
RECOMPUTE_CHUNK = 2**16


def _greedy_seeds(
    x: Tensor,
    num_clusters: int,
    generator: torch.Generator,
    trials: int,
    pool_size: int,
    reduced: bool,
) -> tuple[Tensor, Tensor]:
    """:func:`kmeans_plus_plus_assigned`; ``reduced``: the pool's products may be rounded (bf16).

    One GEMM per pool gives every proposal ``p``'s excess ``|p|^2 - 2 p.x = |x - p|^2 - |x|^2``
    over every row ``x`` (``[-2p, |p|^2]`` times ``[x, 1]``). During a pool the candidates'
    gains use ``slack = D^2 - |x|^2`` as those excesses give it (rounded where ``reduced``); the
    acceptance test uses ``D^2`` at the proposals from their float32 Gram matrix. When the pool
    ends, ``D^2`` is measured in float32 for the rows that the pool's seeds may have come
    closer to: those whose scored distance to the nearest of them is within
    :func:`excess_error_bound` of ``D^2``; the others cannot have changed.
    """
    n, dim = x.shape
    device = x.device
    sq_norms = x.pow(2).sum(dim=1)
    norms = sq_norms.sqrt()
    # [x, 1] transposed once (a GEMM against a contiguous operand runs faster) and one buffer
    # for every pool's excesses (a fresh allocation of that size faults in new pages each time)
    x_t = torch.cat([x.T, x.new_ones(1, n)])
    buffer = x.new_empty(min(pool_size, 2 * trials * (num_clusters - 1)) * n)  # the first pool's
    # thousands of steps of a few passes over trials x N values: on one thread unless large
    # (two threads were 15% faster at N = 60,000 on an idle 2-core machine, but each two-thread
    # step waits for a time slice where the cores are oversubscribed)
    step_threads = torch.get_num_threads() if trials * n >= 2**22 else 1
    chosen = torch.empty(num_clusters, dtype=torch.long)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen[0] = first
    nearest_sq = (sq_norms + sq_norms[first] - 2 * (x @ x[first])).clamp_min_(0)
    nearest_sq[first] = 0
    nearest = torch.zeros(n, dtype=torch.long, device=device)  # each row's nearest seed
    count = 1
    while count < num_clusters:
        cumulative = torch.cumsum(nearest_sq, 0, dtype=torch.float64)
        total = float(cumulative[-1])
        if total <= 0:  # every row coincides with a seed: the rest uniformly among the others
            taken = torch.zeros(n, dtype=torch.bool)
            taken[chosen[:count]] = True
            free = (~taken).nonzero().flatten()
            order = torch.randperm(free.numel(), generator=generator)[: num_clusters - count]
            chosen[count:] = free[order]
            break
        size = min(pool_size, 2 * trials * (num_clusters - count))  # no waste near the end
        targets = torch.rand(size, generator=generator, dtype=torch.float64) * total
        uniforms = torch.rand(size, generator=generator, dtype=torch.float64)
        proposals = torch.searchsorted(cumulative, targets.to(device), right=True)
        proposals = proposals.clamp_max_(n - 1)
        # rounding may land on a zero-weight row: u * 0 < D^2 never holds, so it is rejected
        threshold = uniforms.to(device) * nearest_sq[proposals].double()
        proposal_sq = sq_norms[proposals].unsqueeze(1)
        doubled = 2 * x[proposals]
        left = torch.cat([-doubled, proposal_sq], dim=1)  # [-2p, |p|^2]
        excess = _scoring_products(left, x_t, buffer[: size * n].view(size, n), reduced)
        gram = torch.mm(doubled, x[proposals].T)  # float32: D^2 at the proposals
        at_proposals = nearest_sq[proposals]
        slack = nearest_sq - sq_norms  # D^2 - |x|^2, as the products give it
        lowest = torch.full_like(slack, float("inf"))  # the pool's seeds' |x - s|^2 - |x|^2
        pool_start = count
        rows = excess.new_empty(trials, n)
        start = 0
        with torch_threads(step_threads):
            while count < num_clusters:
                accepted = (threshold[start:] < at_proposals[start:].double()).nonzero().flatten()
                if accepted.numel() < trials:
                    break
                candidates = start + accepted[:trials]
                # gain of a candidate c: sum_x max(0, D^2(x) - |x - c|^2)
                first_candidate, last_candidate = int(candidates[0]), int(candidates[-1])
                if last_candidate - first_candidate == trials - 1:  # consecutive: no gather
                    torch.sub(slack, excess[first_candidate : last_candidate + 1], out=rows)
                else:
                    torch.index_select(excess, 0, candidates, out=rows)
                    torch.sub(slack, rows, out=rows)
                gain = rows.clamp_min_(0).sum(dim=1)
                best = int(candidates[int(torch.argmax(gain))])
                j = int(proposals[best])
                chosen[count] = j
                count += 1
                torch.minimum(slack, excess[best], out=slack)
                torch.minimum(lowest, excess[best], out=lowest)
                slack[j] = -sq_norms[j]
                to_best = (proposal_sq.flatten() - gram[best] + proposal_sq[best]).clamp_min_(0)
                torch.minimum(at_proposals, to_best, out=at_proposals)
                at_proposals[proposals == j] = 0
                start = last_candidate + 1
        if count == pool_start:
            continue
        # D^2 (and the nearest seed) in float32 where the pool's seeds may have come closer
        seeds = chosen[pool_start:count].to(device)
        bound = excess_error_bound(norms, float(norms[seeds].max()), dim, reduced)
        flagged = (lowest.add_(sq_norms).sub_(bound) < nearest_sq).nonzero().flatten()
        doubled_seeds_t = 2 * x[seeds].T
        for near in flagged.split(RECOMPUTE_CHUNK):  # bounded memory at millions of rows
            exact = torch.mm(x[near], doubled_seeds_t)
            exact.sub_(sq_norms[seeds]).neg_().add_(sq_norms[near].unsqueeze(1)).clamp_min_(0)
            values, which = exact.min(dim=1)
            closer = values < nearest_sq[near]
            nearest_sq[near[closer]] = values[closer]
            nearest[near[closer]] = which[closer] + pool_start
        nearest_sq[seeds] = 0
        nearest[seeds] = torch.arange(pool_start, count, device=device)
    return chosen.to(device), nearest


def _faiss_lloyd(x: Tensor, centres: Tensor, *, max_iter: int) -> Tensor:
    import faiss  # optional dependency
    import numpy as np

    data = np.ascontiguousarray(x.cpu().numpy())
    num_clusters = centres.shape[0]
    model = faiss.Kmeans(
        data.shape[1],
        num_clusters,
        niter=max_iter,
        nredo=1,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=-(-data.shape[0] // num_clusters) + 1,  # never subsample
    )
    model.train(data, init_centroids=np.ascontiguousarray(centres.cpu().numpy()))
    _, assignment = model.index.search(data, 1)
    return torch.from_numpy(assignment[:, 0].astype(np.int64)).to(x.device)


def two_nearest_centroids(
    x: Tensor, centroids: Tensor, budget: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest centroid index, its distance and the second-nearest distance of each row, in chunks.

    Squared distances come from ``|x|^2 + |c|^2 - 2 x.c`` (one matrix multiply per chunk); the
    two smallest per row from :func:`~mbdl.functional.knn.blockwise_topk_smallest`. The chunks'
    scores share one buffer: a fresh allocation of that size faults in new pages each time.
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
    buffer = x.new_empty(min(chunk, x.shape[0]) * padded)
    for start in range(0, x.shape[0], chunk):
        rows = x[start : start + chunk]
        out = buffer[: rows.shape[0] * padded].view(rows.shape[0], padded)
        scores = torch.addmm(bias, rows, centroids_t, alpha=-2.0, out=out)
        best, best_index = blockwise_topk_smallest(scores, min(2, num_centroids))
        distances = (best + rows.pow(2).sum(dim=1, keepdim=True)).clamp_min(0).sqrt()
        nearest[start : start + chunk] = best_index[:, 0]
        first[start : start + chunk] = distances[:, 0]
        if num_centroids > 1:
            second[start : start + chunk] = distances[:, 1]
    return nearest, first, second


def lloyd(
    x: Tensor,
    centres: Tensor,
    *,
    max_iter: int,
    budget: int = 2**30,
    assignment: Tensor | None = None,
) -> Tensor:
    """Lloyd's algorithm from ``centres``, with Hamerly's bounds (Hamerly, "Making k-means even faster", SDM 2010)
    and only the moved centroids measured.

    Each point keeps its distance to its centroid (``upper``) and a lower bound on the distance
    to every other centroid (``lower``). After an update step, a point skips the assignment when
    ``upper < lower - max shift`` (Hamerly). Otherwise only the centroids that moved are
    measured (one GEMM against them): the unmoved ones are still at least ``lower`` away, so a
    point closer to its own centroid than to ``min(lower, nearest other moved centroid)`` keeps
    it; the rest are measured against every centroid. Late iterations move few centroids, so
    they cost a fraction of a full assignment. The result is that of plain Lloyd: each iteration
    assigns every point to its nearest centroid, then moves each non-empty cluster's centroid to
    its mean; it stops early when no assignment changes. ``assignment``: each row's nearest
    centre when already known (the seeding's), which saves the first full assignment.
    """
    x = x.detach().float()
    centroids = centres.to(x).clone()
    num_clusters = centroids.shape[0]
    threads = torch.get_num_threads()

    def nearest_two(rows: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        large = rows.shape[0] * candidates.shape[0] >= 2**22  # worth all threads
        with torch_threads(threads if large else 1):
            return two_nearest_centroids(rows, candidates, budget)

    with torch_threads(1):  # the bookkeeping between the GEMMs: small operations
        if assignment is None:
            assignment, upper, lower = nearest_two(x, centroids)
        else:  # no second-nearest distance known: a lower bound of 0 checks every row once
            assignment = assignment.to(x.device).clone()
            upper = (x - centroids[assignment]).norm(dim=1)
            lower = torch.zeros_like(upper)
        for _ in range(max_iter):
            sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
            counts = torch.bincount(assignment, minlength=num_clusters).to(x.dtype)
            filled = counts > 0
            updated = centroids.clone()
            updated[filled] = sums[filled] / counts[filled].unsqueeze(1)
            moved = (updated != centroids).any(dim=1)
            if not bool(moved.any()):
                break
            shift = (updated - centroids).norm(dim=1)
            centroids = updated
            own_moved = moved[assignment].nonzero().flatten()
            upper[own_moved] = (x[own_moved] - centroids[assignment[own_moved]]).norm(dim=1)
            # A small slack keeps float32 rounding from skipping a point that should move.
            slack = 1e-4 * upper + 1e-6
            check = (upper + slack >= lower - shift.max()).nonzero().flatten()
            unmoved_bound = lower[check]  # unmoved centroids are still at least this far
            lower -= shift.max()
            moved_ids = moved.nonzero().flatten()
            if check.numel() and 2 * moved_ids.numel() <= num_clusters:
                nearest, first, second = nearest_two(x[check], centroids[moved_ids])
                other = torch.where(moved_ids[nearest] == assignment[check], second, first)
                bound = torch.minimum(unmoved_bound, other)
                keep = upper[check] + slack[check] < bound
                lower[check[keep]] = bound[keep]
                check = check[~keep]
            if check.numel() == 0:
                break
            new_assignment, new_upper, new_lower = nearest_two(x[check], centroids)
            changed = bool((new_assignment != assignment[check]).any())
            assignment[check], upper[check], lower[check] = new_assignment, new_upper, new_lower
            if not changed:
                break
    return assignment
