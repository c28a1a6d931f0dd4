"""Brute-force reference implementations of the evaluation metrics, written from the definitions.

Plain Python loops over small sets; slow on purpose and independent of the package's code.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from typing import Any


def euclidean(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def cosine_distance(a: list[float], b: list[float]) -> float:
    norm_a = math.sqrt(sum(x * x for x in a))
    norm_b = math.sqrt(sum(y * y for y in b))
    return 1.0 - sum(x * y for x, y in zip(a, b, strict=True)) / (norm_a * norm_b)


def ranking(
    query: list[float],
    gallery: list[list[float]],
    *,
    exclude: int | None = None,
    distance: str = "euclidean",
) -> list[tuple[float, int]]:
    """``(distance, index)`` of every gallery item except ``exclude``, nearest first."""
    dist = euclidean if distance == "euclidean" else cosine_distance
    pairs = [(dist(query, g), j) for j, g in enumerate(gallery) if j != exclude]
    return sorted(pairs)


def retrieval_reference(
    gallery: list[list[float]],
    gallery_labels: list[int],
    ks: list[int],
    *,
    queries: list[list[float]] | None = None,
    query_labels: list[int] | None = None,
    distance: str = "euclidean",
) -> dict[str, float]:
    """Recall@K, P@1, R-Precision and MAP@R averaged over queries with R > 0.

    Leave-one-out (query ``i`` excluded by index) when ``queries`` is None.
    """
    leave_one_out = queries is None
    if queries is None or query_labels is None:
        queries, query_labels = gallery, gallery_labels
    sums: dict[str, float] = {f"recall@{k}": 0.0 for k in ks}
    sums.update({"precision@1": 0.0, "r_precision": 0.0, "map@r": 0.0})
    scored = 0
    for i, (query, label) in enumerate(zip(queries, query_labels, strict=True)):
        exclude = i if leave_one_out else None
        ranked = [
            gallery_labels[j]
            for _, j in ranking(query, gallery, exclude=exclude, distance=distance)
        ]
        r = sum(1 for j, y in enumerate(gallery_labels) if y == label and j != exclude)
        if r == 0:
            continue
        scored += 1
        for k in ks:
            sums[f"recall@{k}"] += 1.0 if label in ranked[:k] else 0.0
        sums["precision@1"] += 1.0 if ranked[0] == label else 0.0
        sums["r_precision"] += sum(1 for y in ranked[:r] if y == label) / r
        average_precision = 0.0
        hits = 0
        for position, y in enumerate(ranked[:r], start=1):
            if y == label:
                hits += 1
                average_precision += hits / position
        sums["map@r"] += average_precision / r
    return {name: total / scored for name, total in sums.items()}


def nmi_reference(labels: list[int], clusters: list[int]) -> float:
    """NMI with arithmetic normalisation, from the entropy and mutual-information formulas."""
    n = len(labels)
    count_y, count_c = Counter(labels), Counter(clusters)
    joint = Counter(zip(labels, clusters, strict=True))
    mutual_info = 0.0
    for (y, c), n_yc in joint.items():
        mutual_info += n_yc / n * math.log(n * n_yc / (count_y[y] * count_c[c]))
    h_y = -sum(v / n * math.log(v / n) for v in count_y.values())
    h_c = -sum(v / n * math.log(v / n) for v in count_c.values())
    return mutual_info / ((h_y + h_c) / 2)


def pair_f1_reference(labels: list[int], clusters: list[int]) -> float:
    """Pair-counting F1 by enumerating every pair of items."""
    tp = fp = fn = 0
    for i, j in combinations(range(len(labels)), 2):
        same_class = labels[i] == labels[j]
        same_cluster = clusters[i] == clusters[j]
        tp += same_class and same_cluster
        fp += (not same_class) and same_cluster
        fn += same_class and not same_cluster
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def lloyd_reference(
    points: list[list[float]], centroids: list[list[float]], max_iter: int
) -> list[int]:
    """Plain Lloyd's algorithm from given initial centroids; an empty cluster keeps its centroid."""
    centroids = [list(c) for c in centroids]

    def assign() -> list[int]:
        return [
            min(
                range(len(centroids)),
                key=lambda j: sum((a - b) ** 2 for a, b in zip(p, centroids[j], strict=True)),
            )
            for p in points
        ]

    assignment = assign()
    for _ in range(max_iter):
        for j in range(len(centroids)):
            members = [p for p, a in zip(points, assignment, strict=True) if a == j]
            if members:
                centroids[j] = [sum(col) / len(members) for col in zip(*members, strict=True)]
        new_assignment = assign()
        if new_assignment == assignment:
            break
        assignment = new_assignment
    return assignment


def greedy_kmeans_plus_plus_reference(
    points: list[list[float]], num_clusters: int, generator: Any, trials: int, pool_size: int
) -> list[int]:
    """Greedy k-means++ by plain loops, drawing from ``generator`` exactly as the package does:
    one ``randint(n)`` for the first seed; then pools of ``min(pool_size, 2 * trials * seeds
    left)`` proposals: as many uniforms in [0, 1) scaled by the potential at the pool's start,
    each mapped to the first row whose cumulative D^2 exceeds it, then as many uniforms ``u``.
    A proposal ``p`` is accepted at a step when ``u * D_0^2(p) < D^2(p)`` (``D_0`` at the
    pool's start, ``D`` now); a seed's candidates are the first ``trials`` accepted proposals
    after the previous seed's last candidate, and the candidate with the lowest resulting
    potential is kept (the first on ties); a new pool is drawn when fewer are left."""
    import torch

    def sq(a: list[float], b: list[float]) -> float:
        return sum((u - v) ** 2 for u, v in zip(a, b, strict=True))

    n = len(points)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    nearest = [sq(p, points[first]) for p in points]
    nearest[first] = 0.0
    while len(chosen) < num_clusters:
        cumulative, running = [], 0.0
        for value in nearest:
            running += value
            cumulative.append(running)
        size = min(pool_size, 2 * trials * (num_clusters - len(chosen)))
        targets = (torch.rand(size, generator=generator, dtype=torch.float64) * running).tolist()
        uniforms = torch.rand(size, generator=generator, dtype=torch.float64).tolist()
        proposals = [next((i for i, c in enumerate(cumulative) if c > t), n - 1) for t in targets]
        at_start = [nearest[p] for p in proposals]
        position = 0
        while len(chosen) < num_clusters:
            candidates = []
            for slot in range(position, size):
                if (
                    len(candidates) < trials
                    and uniforms[slot] * at_start[slot] < nearest[proposals[slot]]
                ):
                    candidates.append(slot)
            if len(candidates) < trials:
                break
            best = None
            for slot in candidates:
                j = proposals[slot]
                potential = sum(
                    min(d, sq(p, points[j])) for p, d in zip(points, nearest, strict=True)
                )
                if best is None or potential < best[0]:
                    best = (potential, j)
            assert best is not None
            j = best[1]
            chosen.append(j)
            nearest = [min(d, sq(p, points[j])) for p, d in zip(points, nearest, strict=True)]
            nearest[j] = 0.0
            position = candidates[-1] + 1
    return chosen
