"""Plain-Python reference loops for the lifted structured, N-pair, margin, multi-similarity and
proxy-anchor losses, written from the papers' formulas (Song et al. 2016 eq. 4; Sohn 2016; Wu et
al. 2017; Wang et al. 2019 eq. 7-8 and 10; Kim et al. 2020 eq. 4), one anchor / pair / triplet at
a time in Python floats (double precision). Slow and obvious on purpose.
Also: shared input builders and the bad-input cases every loss must reject.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from reference_losses import LAYOUTS, make_labels

__all__ = [
    "LAYOUTS",
    "assert_rejects_bad_inputs",
    "batch",
    "make_labels",
    "ref_distance_weight",
    "ref_lifted",
    "ref_margin",
    "ref_multisimilarity",
    "ref_npair",
    "ref_proxy_anchor",
]

Vector = list[float]


def batch(seed: int, batch_size: int, layout: str, dim: int = 6, dtype=torch.float64):
    """``(embeddings, labels)``: standard-normal embeddings and labels of ``layout``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, dim, generator=g, dtype=dtype)
    return x, make_labels(layout, batch_size, g)


def _rows(x: torch.Tensor) -> list[Vector]:
    return [list(map(float, row)) for row in x.double().tolist()]


def _dot(a: Vector, b: Vector) -> float:
    return sum(p * q for p, q in zip(a, b, strict=True))


def _unit(v: Vector) -> Vector:
    n = math.sqrt(_dot(v, v))
    return [a / max(n, 1e-12) for a in v]


def _euclid(a: Vector, b: Vector) -> float:
    return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b, strict=True)))


def _cos(a: Vector, b: Vector) -> float:
    return _dot(_unit(a), _unit(b))


def _sets(labels, ref_labels, anchor_offset):
    """Anchor labels, reference labels and the reference index of each anchor itself (or None)."""
    ys = [int(v) for v in labels.tolist()]
    if ref_labels is None:
        return ys, ys, list(range(len(ys)))
    zs = [int(v) for v in ref_labels.tolist()]
    return ys, zs, [None if anchor_offset is None else anchor_offset + i for i in range(len(ys))]


# ---------------------------------------------------------------- lifted (Song et al. 2016, eq. 4)


def ref_lifted(
    embeddings,
    labels,
    ref_emb=None,
    ref_labels=None,
    *,
    margin=1.0,
    normalize=True,
    anchor_offset=None,
) -> float:
    """``1/(2|P|) sum_{(i,j) in P} [log(sum_{N_i} e^{m-D_ik} + sum_{N_j} e^{m-D_jl}) + D_ij]_+^2``
    over the ordered positive pairs (i in the batch, j in the reference set); the negatives of
    ``j`` are the reference items with another label than ``j``."""
    xs = _rows(embeddings)
    rs = xs if ref_emb is None else _rows(ref_emb)
    if normalize:
        xs, rs = [_unit(v) for v in xs], [_unit(v) for v in rs]
    ys, zs, itself = _sets(labels, ref_labels, anchor_offset)
    terms = []
    for i, x in enumerate(xs):
        for j, r in enumerate(rs):
            if zs[j] != ys[i] or j == itself[i]:
                continue
            total = sum(
                math.exp(margin - _euclid(x, rs[k])) for k in range(len(rs)) if zs[k] != ys[i]
            )
            total += sum(
                math.exp(margin - _euclid(r, rs[n])) for n in range(len(rs)) if zs[n] != zs[j]
            )
            joint = math.log(total) + _euclid(x, r) if total > 0 else -math.inf
            terms.append(max(joint, 0.0) ** 2)
    if not terms:
        return 0.0
    # each unordered pair appears twice among the ordered ones: 1/(2|P|) sum = mean(terms) / 2
    return sum(terms) / (2 * len(terms))


# ---------------------------------------------------------------- N-pair (Sohn 2016)


def ref_npair(
    embeddings, labels, ref_emb=None, ref_labels=None, *, l2_reg=0.02, anchor_offset=None
) -> float:
    """One pair per class: anchor = first batch item of the class, positive = first other item
    of the class in the reference set; ``L = 1/N sum_c log(1 + sum_{c' != c}
    exp(x_c.x_{c'}^+ - x_c.x_c^+)) + l2_reg * mean_i ||x_i||^2``."""
    xs = _rows(embeddings)
    rs = xs if ref_emb is None else _rows(ref_emb)
    ys, zs, itself = _sets(labels, ref_labels, anchor_offset)
    pairs = []
    for c in sorted(set(ys)):
        a = ys.index(c)
        candidates = [j for j in range(len(rs)) if zs[j] == c and j != itself[a]]
        if candidates:
            pairs.append((xs[a], rs[candidates[0]]))
    if not pairs:
        return 0.0
    ce = 0.0
    for c, (anchor, positive) in enumerate(pairs):
        own = _dot(anchor, positive)
        ce += math.log(
            1 + sum(math.exp(_dot(anchor, p) - own) for k, (_, p) in enumerate(pairs) if k != c)
        )
    reg = sum(_dot(x, x) for x in xs) / len(xs)
    return ce / len(pairs) + l2_reg * reg


# ---------------------------------------------------------------- margin (Wu et al. 2017)


def ref_distance_weight(d: float, dim: int, cutoff: float, nonzero_loss_cutoff: float) -> float:
    """``1 / q(max(d, cutoff))`` with ``q(d) = d^{n-2} (1 - d^2/4)^{(n-3)/2}``; 0 if ``d >= nzc``."""
    if d >= nonzero_loss_cutoff:
        return 0.0
    d = max(d, cutoff)
    return 1.0 / (d ** (dim - 2) * (1 - d * d / 4) ** ((dim - 3) / 2))


def ref_margin(
    embeddings,
    labels,
    triplets: Sequence[tuple[int, int, int]] | None = None,
    ref_emb=None,
    ref_labels=None,
    *,
    beta: float | Sequence[float] = 1.2,
    alpha: float = 0.2,
    nu: float = 0.0,
    anchor_offset=None,
) -> float:
    """``sum_T ([a + D_ap - b]_+ + [a - D_an + b]_+) / #non-zero terms + nu R(beta)`` over the
    triplets ``T`` (all (a, p, n) when None); ``R = beta`` for one boundary, ``sum_T
    beta_{y_a} / #non-zero terms`` per class. Unit-normalised euclidean distances."""
    xs = [_unit(v) for v in _rows(embeddings)]
    rs = xs if ref_emb is None else [_unit(v) for v in _rows(ref_emb)]
    ys, zs, itself = _sets(labels, ref_labels, anchor_offset)
    if triplets is None:
        triplets = [
            (a, p, n)
            for a in range(len(xs))
            for p in range(len(rs))
            if zs[p] == ys[a] and p != itself[a]
            for n in range(len(rs))
            if zs[n] != ys[a]
        ]
    if not triplets:
        return 0.0
    per_class = not isinstance(beta, (int, float))
    total, nonzero, beta_sum = 0.0, 0, 0.0
    for a, p, n in triplets:
        b = beta[ys[a]] if per_class else beta  # type: ignore[index]
        pos = max(alpha + _euclid(xs[a], rs[p]) - b, 0.0)
        neg = max(alpha - _euclid(xs[a], rs[n]) + b, 0.0)
        total += pos + neg
        nonzero += (pos > 0) + (neg > 0)
        beta_sum += b
    loss = total / nonzero if nonzero else 0.0
    if per_class:
        return loss + (nu * beta_sum / nonzero if nonzero else 0.0)
    return loss + nu * beta  # type: ignore[operator]


# ---------------------------------------------------------------- multi-similarity (Wang et al. 2019)


def ref_multisimilarity(
    embeddings,
    labels,
    ref_emb=None,
    ref_labels=None,
    *,
    alpha=2.0,
    beta=50.0,
    base=0.5,
    epsilon=0.1,
    anchor_offset=None,
) -> float:
    """Mining: positives with ``S_ij - eps < max_{N_i} S``, negatives with ``S_ik + eps >
    min_{P_i} S``; ``l_i = 1/alpha log(1 + sum e^{-alpha(S_ij - base)}) + 1/beta log(1 + sum
    e^{beta(S_ik - base)})``; ``L = mean_i l_i`` over all anchors."""
    xs = _rows(embeddings)
    rs = xs if ref_emb is None else _rows(ref_emb)
    ys, zs, itself = _sets(labels, ref_labels, anchor_offset)
    total = 0.0
    for i, x in enumerate(xs):
        sims = [_cos(x, r) for r in rs]
        pos = [j for j in range(len(rs)) if zs[j] == ys[i] and j != itself[i]]
        neg = [k for k in range(len(rs)) if zs[k] != ys[i]]
        if not pos or not neg:
            continue
        hardest_neg = max(sims[k] for k in neg)
        hardest_pos = min(sims[j] for j in pos)
        kept_pos = [j for j in pos if sims[j] - epsilon < hardest_neg]
        kept_neg = [k for k in neg if sims[k] + epsilon > hardest_pos]
        total += math.log(1 + sum(math.exp(-alpha * (sims[j] - base)) for j in kept_pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (sims[k] - base)) for k in kept_neg)) / beta
    return total / len(xs)


# ---------------------------------------------------------------- proxy anchor (Kim et al. 2020)


def ref_proxy_anchor(embeddings, labels, proxies, *, margin=0.1, alpha=32.0) -> float:
    """``1/|P+| sum_{c in P+} log(1 + sum_{X_c+} e^{-alpha(s - delta)}) + 1/C sum_c log(1 +
    sum_{X_c-} e^{alpha(s + delta)})`` with ``s`` the cosine similarity to the proxy."""
    xs, ps = _rows(embeddings), _rows(proxies)
    ys = [int(v) for v in labels.tolist()]
    present = sorted(set(ys))
    pos = sum(
        math.log(
            1
            + sum(
                math.exp(-alpha * (_cos(x, ps[c]) - margin))
                for x, y in zip(xs, ys, strict=True)
                if y == c
            )
        )
        for c in present
    )
    neg = sum(
        math.log(
            1
            + sum(
                math.exp(alpha * (_cos(x, ps[c]) + margin))
                for x, y in zip(xs, ys, strict=True)
                if y != c
            )
        )
        for c in range(len(ps))
    )
    return pos / len(present) + neg / len(ps)


# ---------------------------------------------------------------- bad inputs every loss rejects


def assert_rejects_bad_inputs(loss: Callable[..., torch.Tensor]) -> None:
    """``loss(embeddings, labels)`` raises a ``ValueError`` naming each problem."""
    import pytest

    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    cases = [
        (x.clone().index_fill_(0, torch.tensor([1]), math.nan), y, "NaN or Inf"),
        (x.clone().index_fill_(0, torch.tensor([2]), math.inf), y, "NaN or Inf"),
        (x[:, 0], y, "2-D"),
        (x[:, :1], y, "at least 2 dimensions"),
        (x, y[:5], "entries but the embeddings have"),
        (x, y.double(), "must be integers"),
        (x, y[:, None], "1-D"),
        (x.long(), y, "floating point"),
    ]
    for emb, lab, message in cases:
        with pytest.raises(ValueError, match=message):
            loss(emb, lab)
