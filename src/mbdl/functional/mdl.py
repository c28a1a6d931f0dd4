"""The Margin-based Discriminate Loss (MDL) of Sun, Tang and Bai, "Learning Deep Embeddings via
Margin-Based Discriminate Loss", S+SSPR 2018 (LNCS, doi:10.1007/978-3-319-97785-0_11).

Reconstructed from the paper's abstract; the paper's exact formula may differ.
The project's definition (``docs/mdl-loss.md``), with ``D`` the ``B x M`` distance matrix:

    P_i = {j != i : y_j = y_i},  N_i = {k : y_k != y_i},  A = {i : P_i and N_i non-empty}
    p_i = max_{j in P_i} D_ij  (farthest positive),   n_i = min_{k in N_i} D_ik  (nearest negative)
    V+_i = {j in P_i : D_ij > n_i - m},   V-_i = {k in N_i : D_ik < p_i + m}
    l_i = mean_{j in V+_i} (D_ij - n_i + m) + mean_{k in V-_i} (p_i + m - D_ik)   (empty mean = 0)
    L = (1 / |A|) sum_{i in A} l_i

Anchor ``i`` is strictly discriminated when ``p_i + m <= n_i``; then ``l_i = 0``. With
``soft_boundary=t`` the boundaries become ``p_i = t logsumexp_{P_i}(D_ij / t)`` and
``n_i = -t logsumexp_{N_i}(-D_ik / t)`` (``t -> 0`` gives the hard form). Gradients flow through
``D`` and through the boundaries. Everything is computed on the ``B x M`` matrix with masks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mbdl.functional.checks import check_loss_inputs, check_number
from mbdl.functional.distances import check_distance, loss_distances
from mbdl.functional.pairs import pair_masks
from mbdl.functional.reductions import connected_zero


def check_mdl_options(margin: float, soft_boundary: float | None) -> None:
    """Raise ``ValueError`` unless ``margin >= 0`` and ``soft_boundary`` is ``None`` or ``> 0``."""
    check_number("margin", margin, minimum=0)
    if soft_boundary is not None and not (math.isfinite(soft_boundary) and soft_boundary > 0):
        raise ValueError(f"soft_boundary must be None or a finite number > 0; got {soft_boundary}")


def discrimination_boundaries(
    dist: Tensor, positive: Tensor, negative: Tensor, soft_boundary: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor ``(farthest_positive p_i, nearest_negative n_i, valid)`` of a ``B x M`` matrix.

    ``valid[i]``: anchor ``i`` has at least one positive and one negative. Boundaries of anchors
    without positives (negatives) are 0 and must be ignored. ``soft_boundary=t`` uses
    ``t logsumexp(D / t)`` over the positives and ``-t logsumexp(-D / t)`` over the negatives.
    """
    has_positive = positive.any(dim=1)
    has_negative = negative.any(dim=1)
    if soft_boundary is None:
        farthest_positive = dist.masked_fill(~positive, -math.inf).amax(dim=1)
        nearest_negative = dist.masked_fill(~negative, math.inf).amin(dim=1)
    else:
        t = soft_boundary
        # rows without any member are filled with 0 so logsumexp and its gradient stay finite
        pos_logits = (dist / t).masked_fill(~positive, -math.inf)
        pos_logits = pos_logits.masked_fill(~has_positive[:, None], 0.0)
        neg_logits = (dist / -t).masked_fill(~negative, -math.inf)
        neg_logits = neg_logits.masked_fill(~has_negative[:, None], 0.0)
        farthest_positive = t * torch.logsumexp(pos_logits, dim=1)
        nearest_negative = -t * torch.logsumexp(neg_logits, dim=1)
    zero = torch.zeros((), dtype=dist.dtype, device=dist.device)
    farthest_positive = torch.where(has_positive, farthest_positive, zero)
    nearest_negative = torch.where(has_negative, nearest_negative, zero)
    return farthest_positive, nearest_negative, has_positive & has_negative


def violation_masks(
    dist: Tensor,
    positive: Tensor,
    negative: Tensor,
    farthest_positive: Tensor,
    nearest_negative: Tensor,
    margin: float,
) -> tuple[Tensor, Tensor]:
    """``(V+, V-)``: positives with ``D_ij > n_i - m`` and negatives with ``D_ik < p_i + m``."""
    violating_positive = positive & (dist > (nearest_negative - margin)[:, None])
    violating_negative = negative & (dist < (farthest_positive + margin)[:, None])
    return violating_positive, violating_negative


def mdl_per_anchor(
    dist: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    margin: float = 0.2,
    soft_boundary: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``(l, valid)``: the per-anchor MDL terms ``l_i`` (0 for invalid anchors) and the valid mask.

    Uses ``mean_{V+}(D - n + m) = mean_{V+}(D) - n + m`` (and likewise for ``V-``), so only the
    masked row sums of ``D`` are needed.
    """
    farthest_positive, nearest_negative, valid = discrimination_boundaries(
        dist, positive, negative, soft_boundary
    )
    violating_positive, violating_negative = violation_masks(
        dist, positive, negative, farthest_positive, nearest_negative, margin
    )
    zero = torch.zeros((), dtype=dist.dtype, device=dist.device)
    num_pos = violating_positive.sum(dim=1)
    num_neg = violating_negative.sum(dim=1)
    pos_mean = torch.where(violating_positive, dist, zero).sum(dim=1) / num_pos.clamp_min(1)
    neg_mean = torch.where(violating_negative, dist, zero).sum(dim=1) / num_neg.clamp_min(1)
    pos_term = torch.where(num_pos > 0, pos_mean - nearest_negative + margin, zero)
    neg_term = torch.where(num_neg > 0, farthest_positive + margin - neg_mean, zero)
    per_anchor = torch.where(valid, pos_term + neg_term, zero)
    return per_anchor, valid


class _HardMarginDiscriminate(torch.autograd.Function):
    """The hard-boundary MDL with a hand-written backward, both sides of every anchor at once.

    Side 0 holds ``S_0 = D`` on the positives, side 1 ``S_1 = -D`` on the negatives (``-big``
    elsewhere), a ``2 x B x M`` stack. Its row maxima are ``p_i`` and ``-n_i``; with the
    thresholds ``t_0 = n_i - m`` and ``t_1 = -(p_i + m)`` both violation sets are ``S_s > t_s``
    and both terms have one form, ``mean_{V_s}(S_s) - t_s`` (empty: 0), since
    ``mean_{V+}(D) - n + m`` and ``p + m - mean_{V-}(D)`` are exactly that. One pass per
    operation over the stack instead of one per side keeps a small batch cheap.
    Backward: ``dL/dD_ij = s (1/|V+_i| [j in V+_i] - 1/|V-_i| [j in V-_i])`` plus ``+s [V-_i
    non-empty]`` at the farthest positive and ``-s [V+_i non-empty]`` at the nearest negative,
    with ``s = 1/|A|``. Equal to autograd through :func:`mdl_per_anchor` (ties in the
    boundaries aside: the first farthest positive and nearest negative take their gradient).
    """

    @staticmethod
    def forward(
        ctx: Any, dist: Tensor, positive: Tensor, negative: Tensor, margin: float
    ) -> Tensor:
        big = torch.finfo(dist.dtype).max
        members = torch.stack([positive, negative])
        sides = torch.stack([dist, dist.neg()]).masked_fill_(~members, -big)
        boundary, boundary_index = sides.max(dim=2, keepdim=True)  # [p, -n] and where
        valid = (boundary > -big).all(dim=0)  # a positive and a negative
        threshold = boundary.flip(0).neg_().sub_(margin).masked_fill_(~valid, math.inf)
        violating = sides > threshold
        del members
        as_float = violating.to(dist.dtype)
        counts = as_float.sum(dim=2, keepdim=True)
        inverse = counts.clamp_min(1).reciprocal_()
        non_empty = counts.clamp_max(1)  # counts are whole numbers: 1 where V_s is not empty
        # outside V_s the product is 0 (-big times 0 is -0): the sums over V_s
        means = sides.mul_(as_float).sum(dim=2, keepdim=True).mul_(inverse)
        del sides, as_float
        num_valid = valid.sum().clamp_min_(1)
        ctx.save_for_backward(violating, inverse, non_empty, boundary_index, num_valid)
        return (means - threshold.masked_fill_(~valid, 0)).mul_(non_empty).sum() / num_valid

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        violating, inverse, non_empty, boundary_index, num_valid = ctx.saved_tensors
        scale = grad_output / num_valid
        sides = violating.to(grad_output.dtype).mul_(inverse * scale)
        grad = sides[0] - sides[1]  # side 1 holds -D
        # the thresholds: t_0 = n - m enters side 0 with -1, t_1 = -(p + m) side 1 with -1
        index = boundary_index.squeeze(2).T  # [B, 2]: farthest positive, nearest negative
        values = torch.cat([non_empty[1], non_empty[0].neg()], dim=1).mul_(scale)
        grad.scatter_add_(1, index, values.to(grad.dtype))
        return grad, None, None, None


def mdl_from_distances(
    dist: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    margin: float = 0.2,
    soft_boundary: float | None = None,
) -> Tensor:
    """MDL on a precomputed ``B x M`` distance matrix and its positive/negative masks.

    ``L = (1/|A|) sum_{i in A} l_i``; a zero still connected to ``dist`` when ``A`` is empty.
    The hard form runs a fused kernel with a hand-written backward; the soft form autograd.
    """
    check_mdl_options(margin, soft_boundary)
    if dist.numel() == 0:
        return connected_zero(dist)
    if soft_boundary is None:
        return _HardMarginDiscriminate.apply(dist, positive, negative, float(margin))
    per_anchor, valid = mdl_per_anchor(
        dist, positive, negative, margin=margin, soft_boundary=soft_boundary
    )
    # with no valid anchor every l_i is a masked 0, so the sum is a zero connected to ``dist``
    return per_anchor.sum() / valid.sum().clamp_min(1)


def margin_discriminate_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 0.2,
    soft_boundary: float | None = None,
    distance: str = "euclidean",
    normalize: bool = True,
    anchor_offset: int | None = None,
) -> Tensor:
    """The Margin-based Discriminate Loss (Sun, Tang, Bai, S+SSPR 2018), as reconstructed from the
    paper's abstract (the paper's exact formula may differ); see the module docstring.

    ``L = (1/|A|) sum_i [mean_{j in V+_i}(D_ij - n_i + m) + mean_{k in V-_i}(p_i + m - D_ik)]``.
    Anchors are the rows of ``embeddings``; positives and negatives come from ``ref_emb`` when
    given (``anchor_offset=k``: ``ref_emb[k + i]`` is anchor ``i`` itself and is skipped).
    fp16/bf16 inputs are computed in fp32 and the loss is returned in fp32.
    """
    check_loss_inputs(embeddings, labels, ref_emb, ref_labels)
    check_mdl_options(margin, soft_boundary)
    check_distance(distance)
    dist = loss_distances(embeddings, ref_emb, distance=distance, normalize=normalize)
    positive, negative = pair_masks(labels, ref_labels, anchor_offset)
    return mdl_from_distances(dist, positive, negative, margin=margin, soft_boundary=soft_boundary)
