"""Open-set verification: "are these two items the same class?" from a distance threshold.

A pair is *genuine* when both items share a label, an *impostor* pair otherwise. A threshold
``t`` accepts a pair when its distance is ``<= t``:

- ``FAR(t)`` (false accept rate, = FMR) = accepted impostor pairs / impostor pairs;
- ``TAR(t)`` (true accept rate) = accepted genuine pairs / genuine pairs; ``FRR = FNMR = 1 - TAR``.

``TAR@FAR=f`` is the largest ``TAR(t)`` over thresholds with ``FAR(t) <= f`` (the ROC point
scikit-learn's ``roc_curve`` gives with scores ``-distance``); its threshold is the largest such
``t``: just below the distance of the ``(m+1)``-th closest impostor pair, with ``m`` the largest
count such that ``m / M <= f`` over ``M`` impostor pairs. With fewer than ``1/f`` impostor pairs
that is ``FAR = 0``. The equal error rate (EER) is ``(FAR(t) + FRR(t)) / 2`` at the threshold
``t`` (one of the pair distances) that minimises ``|FAR(t) - FRR(t)|``.

Pairs: every pair of a set (or every query-gallery pair) when there are at most ``max_pairs``,
else a seeded sample of ``max_pairs`` genuine pairs (all of them if there are fewer) and
``max_pairs`` impostor pairs, each drawn uniformly (with replacement) from its kind.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mbdl.functional.knn import safe_scale

VERIFY_DISTANCES: tuple[str, ...] = ("euclidean", "squared_euclidean", "cosine")
DEFAULT_FARS: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
DEFAULT_MAX_PAIRS = 1_000_000


def far_name(far: float) -> str:
    """The FAR as written in metric keys: ``1e-3 -> "1e-3"``, ``0.25 -> "0.25"``."""
    text = f"{far:.0e}"
    if float(text) != far:
        return f"{far:g}"
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def paired_distances(
    a: Tensor, b: Tensor, distance: str = "euclidean", chunk: int = 65536
) -> Tensor:
    """``distance(a[i], b[i])`` for each row ``i`` (float64, computed in chunks of rows).

    ``distance``: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"`` (``1 - cos``).
    """
    if distance not in VERIFY_DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(VERIFY_DISTANCES)}; got {distance!r}")
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"a and b must be 2-D of one shape; got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    if a.numel() == 0:
        return out
    scale = safe_scale(torch.stack([a.detach().abs().max(), b.detach().abs().max()]))
    for start in range(0, a.shape[0], chunk):
        x = a[start : start + chunk].double() * scale
        y = b[start : start + chunk].double() * scale
        if distance == "cosine":
            cos = torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-300)
            out[start : start + chunk] = 1.0 - cos
        else:
            squared = (x - y).pow(2).sum(dim=1)
            if distance == "squared_euclidean":
                out[start : start + chunk] = squared / scale / scale
            else:
                out[start : start + chunk] = squared.sqrt() / scale
    return out


def _class_groups(labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(classes, order, starts, sizes)``: ``order`` sorts the items by class; class ``c``'s
    items are ``order[starts[c] : starts[c] + sizes[c]]``."""
    classes, inverse, sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    return classes, order, starts, sizes


def verification_pairs(
    labels: Tensor,
    query_labels: Tensor | None = None,
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
    """Genuine and impostor pairs of one set (``query_labels=None``: unordered pairs ``i < j``)
    or of queries against a gallery (``labels`` the gallery's; pairs ``(query, gallery)``).

    Returns ``(genuine_a, genuine_b, impostor_a, impostor_b, exhaustive)``: index tensors
    (``a`` into the queries, ``b`` into the gallery; both into the one set) and whether every
    pair was enumerated (else a seeded sample, see the module docstring).
    """
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1; got {max_pairs}")
    labels = labels.cpu().long()
    same_set = query_labels is None
    queries = labels if query_labels is None else query_labels.cpu().long()
    n_a, n_b = queries.numel(), labels.numel()
    total = n_a * (n_a - 1) // 2 if same_set else n_a * n_b
    if total == 0:
        raise ValueError("verification needs at least two items")
    if total <= max_pairs:
        if same_set:
            a, b = torch.triu_indices(n_a, n_a, offset=1)
        else:
            a = torch.arange(n_a).repeat_interleave(n_b)
            b = torch.arange(n_b).repeat(n_a)
        genuine = queries[a] == labels[b]
        pairs = (a[genuine], b[genuine], a[~genuine], b[~genuine])
    else:
        generator = torch.Generator().manual_seed(seed)
        pairs = (
            *_sample_genuine(queries, labels, same_set, max_pairs, generator),
            *_sample_impostors(queries, labels, same_set, max_pairs, generator),
        )
    if pairs[0].numel() == 0:
        raise ValueError("verification needs genuine pairs: no two items share a label")
    if pairs[2].numel() == 0:
        raise ValueError("verification needs impostor pairs: every item has the same label")
    return (*pairs, total <= max_pairs)


def _sample_genuine(
    queries: Tensor, labels: Tensor, same_set: bool, max_pairs: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    classes, order_b, starts_b, sizes_b = _class_groups(labels)
    if same_set:
        order_a, starts_a, sizes_a = order_b, starts_b, sizes_b
        counts = sizes_b * (sizes_b - 1) // 2
    else:
        # query items grouped by the gallery's classes (queries of absent classes have no pair)
        position = torch.searchsorted(classes, queries).clamp_max(classes.numel() - 1)
        present = classes[position] == queries
        class_of = torch.where(present, position, classes.numel())
        sizes_a = torch.bincount(class_of, minlength=classes.numel() + 1)[:-1]
        order_a = torch.argsort(class_of, stable=True)
        starts_a = torch.cumsum(sizes_a, 0) - sizes_a
        counts = sizes_a * sizes_b
    total = int(counts.sum())
    if total == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    if total <= max_pairs:  # every genuine pair, one batch per distinct (size_a, size_b)
        a_parts, b_parts = [], []
        present = counts.nonzero().flatten()
        shape_key = sizes_a[present] * (int(sizes_b.max()) + 1) + sizes_b[present]
        for key in torch.unique(shape_key).tolist():
            group = present[shape_key == key]
            size_a, size_b = int(sizes_a[group[0]]), int(sizes_b[group[0]])
            if same_set:
                i, j = torch.triu_indices(size_a, size_a, offset=1)
            else:
                i = torch.arange(size_a).repeat_interleave(size_b)
                j = torch.arange(size_b).repeat(size_a)
            # rows: the group's classes; columns: the pairs (i, j) within a class
            a_parts.append(order_a[(starts_a[group].unsqueeze(1) + i).flatten()])
            b_parts.append(order_b[(starts_b[group].unsqueeze(1) + j).flatten()])
        return torch.cat(a_parts), torch.cat(b_parts)
    cls = torch.multinomial(counts.double(), max_pairs, replacement=True, generator=generator)
    u = (torch.rand(max_pairs, generator=generator, dtype=torch.float64) * sizes_a[cls]).long()
    if same_set:  # two distinct members: v uniform over the other sizes - 1
        v = torch.rand(max_pairs, generator=generator, dtype=torch.float64) * (sizes_b[cls] - 1)
        v = v.long()
        v = v + (v >= u).long()
    else:
        v = (torch.rand(max_pairs, generator=generator, dtype=torch.float64) * sizes_b[cls]).long()
    u = torch.minimum(u, sizes_a[cls] - 1)
    v = torch.minimum(v, sizes_b[cls] - 1)
    return order_a[starts_a[cls] + u], order_b[starts_b[cls] + v]


def _sample_impostors(
    queries: Tensor, labels: Tensor, same_set: bool, max_pairs: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Uniform impostor pairs by rejection (a pair with one label is redrawn)."""
    n_a, n_b = queries.numel(), labels.numel()
    a_parts: list[Tensor] = []
    b_parts: list[Tensor] = []
    found = 0
    for _ in range(1000):
        draw = 2 * (max_pairs - found) + 16
        a = torch.randint(n_a, (draw,), generator=generator)
        b = torch.randint(n_b, (draw,), generator=generator)
        keep = queries[a] != labels[b]
        a, b = a[keep], b[keep]
        a_parts.append(a)
        b_parts.append(b)
        found += a.numel()
        if found >= max_pairs:
            break
    if not a_parts or found == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    a, b = torch.cat(a_parts)[:max_pairs], torch.cat(b_parts)[:max_pairs]
    if same_set:  # an unordered pair: smaller index first
        a, b = torch.minimum(a, b), torch.maximum(a, b)
    return a, b


def _tar_at_far(genuine: Tensor, impostor: Tensor, far: float) -> tuple[float, float, float]:
    """``(tar, far_reached, threshold)`` for sorted genuine and impostor distances."""
    m_total = impostor.numel()
    m = min(math.floor(far * m_total), m_total)
    while m + 1 <= m_total and (m + 1) / m_total <= far:
        m += 1
    while m > 0 and m / m_total > far:
        m -= 1
    if m >= m_total:
        threshold = max(float(genuine[-1]), float(impostor[-1]))
    else:
        threshold = math.nextafter(float(impostor[m]), -math.inf)
    accepted = int(torch.searchsorted(genuine, genuine.new_tensor([threshold]), right=True))
    reached = int(torch.searchsorted(impostor, impostor.new_tensor([threshold]), right=True))
    return accepted / genuine.numel(), reached / m_total, threshold


def equal_error_rate(genuine: Tensor, impostor: Tensor) -> tuple[float, float]:
    """``(eer, threshold)`` from genuine and impostor distances (any order)."""
    genuine, impostor = torch.sort(genuine.double())[0], torch.sort(impostor.double())[0]
    thresholds = torch.unique(torch.cat([genuine, impostor]))
    far = torch.searchsorted(impostor, thresholds, right=True).double() / impostor.numel()
    frr = 1.0 - torch.searchsorted(genuine, thresholds, right=True).double() / genuine.numel()
    best = int(torch.argmin((far - frr).abs()))
    return float((far[best] + frr[best]) / 2), float(thresholds[best])


def verification_metrics(
    genuine: Tensor, impostor: Tensor, fars: tuple[float, ...] = DEFAULT_FARS
) -> dict[str, float]:
    """TAR, the FAR reached and the threshold at each target FAR, and the EER and its threshold.

    Keys: ``tar@far=<f>``, ``far@far=<f>``, ``threshold@far=<f>`` for each ``f`` in ``fars``,
    ``eer``, ``eer_threshold``, ``genuine_pairs``, ``impostor_pairs``.
    """
    if genuine.numel() == 0 or impostor.numel() == 0:
        raise ValueError("verification needs at least one genuine and one impostor pair")
    for far in fars:
        if not 0 < far < 1:
            raise ValueError(f"FAR must be in (0, 1); got {far!r}")
    genuine, impostor = torch.sort(genuine.double())[0], torch.sort(impostor.double())[0]
    results: dict[str, float] = {}
    for far in fars:
        tar, reached, threshold = _tar_at_far(genuine, impostor, far)
        name = far_name(far)
        results[f"tar@far={name}"] = tar
        results[f"far@far={name}"] = reached
        results[f"threshold@far={name}"] = threshold
    results["eer"], results["eer_threshold"] = equal_error_rate(genuine, impostor)
    results["genuine_pairs"] = float(genuine.numel())
    results["impostor_pairs"] = float(impostor.numel())
    return results


def threshold_at_far(genuine: Tensor, impostor: Tensor, far: float) -> float:
    """The largest distance threshold whose FAR on these pairs is at most ``far``."""
    if not 0 < far < 1:
        raise ValueError(f"FAR must be in (0, 1); got {far!r}")
    genuine, impostor = torch.sort(genuine.double())[0], torch.sort(impostor.double())[0]
    return _tar_at_far(genuine, impostor, far)[2]


def rates_at_threshold(genuine: Tensor, impostor: Tensor, threshold: float) -> tuple[float, float]:
    """``(TAR, FAR)``: the fractions of genuine and impostor pairs with distance ``<= threshold``."""
    tar = float((genuine.double() <= threshold).double().mean())
    far = float((impostor.double() <= threshold).double().mean())
    return tar, far


def pair_distances(
    embeddings: Tensor,
    labels: Tensor,
    *,
    query_embeddings: Tensor | None = None,
    query_labels: Tensor | None = None,
    distance: str = "euclidean",
    max_pairs: int = DEFAULT_MAX_PAIRS,
    seed: int = 0,
) -> tuple[Tensor, Tensor, bool]:
    """Distances of the genuine and impostor pairs of a set (or of queries against a gallery):
    ``(genuine[G], impostor[M], exhaustive)``, see :func:`verification_pairs`."""
    ga, gb, ia, ib, exhaustive = verification_pairs(
        labels, query_labels, max_pairs=max_pairs, seed=seed
    )
    queries = embeddings if query_embeddings is None else query_embeddings
    gallery = embeddings.to(queries.device)
    genuine = paired_distances(
        queries[ga.to(queries.device)], gallery[gb.to(queries.device)], distance
    )
    impostor = paired_distances(
        queries[ia.to(queries.device)], gallery[ib.to(queries.device)], distance
    )
    return genuine.cpu(), impostor.cpu(), exhaustive
