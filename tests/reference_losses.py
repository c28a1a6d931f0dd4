"""Plain-Python reference loops for MDL, the contrastive loss and the triplet loss.

Written from the formulas (docs/mdl-loss.md; Hadsell et al. 2006; Schroff et al. 2015; Hermans et
al. 2017), one anchor and one pair at a time, in Python floats (double precision). They are slow
and obvious on purpose: the package's vectorised kernels are tested against them.
Also: the label layouts the loss tests sweep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Vector = list[float]

LAYOUTS = ("one_class", "singletons", "p_by_k", "random")


def make_labels(layout: str, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Labels for a batch of ``batch_size`` in one of :data:`LAYOUTS`."""
    if layout == "one_class":
        return torch.zeros(batch_size, dtype=torch.long)
    if layout == "singletons":
        return torch.randperm(batch_size, generator=generator)
    if layout == "p_by_k":
        per_class = 2 if batch_size < 8 else 4
        return torch.arange(batch_size) // per_class
    if layout == "random":
        num_classes = max(1, batch_size // 3)
        return torch.randint(0, num_classes, (batch_size,), generator=generator)
    raise ValueError(layout)


# ---------------------------------------------------------------- distances


def _norm(v: Vector) -> float:
    return math.sqrt(sum(a * a for a in v))


def _normalized(v: Vector) -> Vector:
    n = _norm(v)
    return [a / max(n, 1e-12) for a in v]


def ref_distance(a: Vector, b: Vector, distance: str) -> float:
    """One distance between two vectors, from its definition."""
    if distance == "euclidean":
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
    if distance == "squared_euclidean":
        return sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
    if distance == "cosine":
        na, nb = _norm(a), _norm(b)
        if na == 0 or nb == 0:
            return 1.0
        return 1 - sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)
    raise ValueError(distance)


def _prepare(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    anchor_offset: int | None,
    distance: str,
    normalize: bool,
) -> tuple[list[list[float]], list[list[int]], list[list[int]]]:
    """Distance matrix as lists, and per anchor the lists of positive and negative indices."""
    anchors = [list(map(float, row)) for row in embeddings.double().tolist()]
    anchor_labels = [int(y) for y in labels.tolist()]
    if ref_emb is None or ref_labels is None:
        refs, reference_labels, offset = anchors, anchor_labels, 0
    else:
        refs = [list(map(float, row)) for row in ref_emb.double().tolist()]
        reference_labels, offset = [int(y) for y in ref_labels.tolist()], anchor_offset
    if normalize:
        anchors = [_normalized(v) for v in anchors]
        refs = [_normalized(v) for v in refs]
    dist = [[ref_distance(a, r, distance) for r in refs] for a in anchors]
    positives, negatives = [], []
    for i, y in enumerate(anchor_labels):
        itself = None if offset is None else offset + i
        positives.append([j for j, z in enumerate(reference_labels) if z == y and j != itself])
        negatives.append([k for k, z in enumerate(reference_labels) if z != y])
    return dist, positives, negatives


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------- MDL (docs/mdl-loss.md)


def ref_mdl(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    margin: float = 0.2,
    soft_boundary: float | None = None,
    distance: str = "euclidean",
    normalize: bool = True,
    anchor_offset: int | None = None,
) -> float:
    """MDL as docs/mdl-loss.md writes it, anchor by anchor, pair by pair."""
    dist, positives, negatives = _prepare(
        embeddings, labels, ref_emb, ref_labels, anchor_offset, distance, normalize
    )
    m = margin
    per_anchor = []
    for i, row in enumerate(dist):
        pos, neg = positives[i], negatives[i]
        if not pos or not neg:
            continue  # not in A
        if soft_boundary is None:
            p_i = max(row[j] for j in pos)
            n_i = min(row[k] for k in neg)
        else:
            t = soft_boundary
            p_i = t * math.log(sum(math.exp(row[j] / t) for j in pos))
            n_i = -t * math.log(sum(math.exp(-row[k] / t) for k in neg))
        violating_pos = [j for j in pos if row[j] > n_i - m]
        violating_neg = [k for k in neg if row[k] < p_i + m]
        l_i = _mean([row[j] - n_i + m for j in violating_pos]) + _mean(
            [p_i + m - row[k] for k in violating_neg]
        )
        per_anchor.append(l_i)
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def ref_strictly_discriminated(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float,
    distance: str = "euclidean",
    normalize: bool = True,
) -> bool:
    """Whether ``p_i + m <= n_i`` holds at every anchor with a positive and a negative."""
    dist, positives, negatives = _prepare(embeddings, labels, None, None, 0, distance, normalize)
    for i, row in enumerate(dist):
        pos, neg = positives[i], negatives[i]
        if pos and neg and max(row[j] for j in pos) + margin > min(row[k] for k in neg):
            return False
    return True


# ---------------------------------------------------------------- contrastive (Hadsell et al. 2006)


def ref_contrastive(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    distance: str = "euclidean",
    normalize: bool = True,
    anchor_offset: int | None = None,
) -> float:
    """Mean of the non-zero ``[D - pos_margin]_+`` over ordered positive pairs, plus the mean of
    the non-zero ``[neg_margin - D]_+`` over ordered negative pairs."""
    dist, positives, negatives = _prepare(
        embeddings, labels, ref_emb, ref_labels, anchor_offset, distance, normalize
    )
    pos_terms, neg_terms = [], []
    for i, row in enumerate(dist):
        for j in positives[i]:
            term = max(row[j] - pos_margin, 0.0)
            if term > 0:
                pos_terms.append(term)
        for k in negatives[i]:
            term = max(neg_margin - row[k], 0.0)
            if term > 0:
                neg_terms.append(term)
    return _mean(pos_terms) + _mean(neg_terms)


# ---------------------------------------------------------------- triplet (Schroff 2015, Hermans 2017)


def ref_triplet(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    margin: float = 0.2,
    mining: str = "all",
    distance: str = "euclidean",
    normalize: bool = True,
    anchor_offset: int | None = None,
) -> float:
    """Mean of the non-zero ``[D_ap - D_an + m]_+`` over the triplets ``mining`` selects:
    all (a, p, n); per anchor the farthest p and nearest n ("batch_hard"); or the (a, p, n)
    with ``D_ap < D_an < D_ap + m`` ("semi_hard")."""
    dist, positives, negatives = _prepare(
        embeddings, labels, ref_emb, ref_labels, anchor_offset, distance, normalize
    )
    terms = []
    for i, row in enumerate(dist):
        pos, neg = positives[i], negatives[i]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            triplets = [(max(row[j] for j in pos), min(row[k] for k in neg))]
        elif mining == "all":
            triplets = [(row[j], row[k]) for j in pos for k in neg]
        elif mining == "semi_hard":
            triplets = [
                (row[j], row[k]) for j in pos for k in neg if row[j] < row[k] < row[j] + margin
            ]
        else:
            raise ValueError(mining)
        for d_ap, d_an in triplets:
            term = max(d_ap - d_an + margin, 0.0)
            if term > 0:
                terms.append(term)
    return _mean(terms)
