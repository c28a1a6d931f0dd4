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

from mbdl.functional.checks import check_loss_inputs
from mbdl.functional.distances import check_distance, loss_distances
from mbdl.functional.pairs import pair_masks
from mbdl.functional.reductions import connected_zero


def check_mdl_options(margin: float, soft_boundary: float | None) -> None:
    """Raise ``ValueError`` unless ``margin >= 0`` and ``soft_boundary`` is ``None`` or ``> 0``."""
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0; got {margin}")
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
    """The hard-boundary MDL with a hand-written backward: a few passes over the ``B x M`` matrix.

    Forward: boundaries by arg-max/arg-min, the masks ``V+``/``V-``, their counts and row sums.
    Backward: ``dL/dD_ij = s (1/|V+_i| [j in V+_i] - 1/|V-_i| [j in V-_i])`` plus ``+s [V-_i
    non-empty]`` at the farthest positive and ``-s [V+_i non-empty]`` at the nearest negative,
    with ``s = 1/|A|`` (the boundaries enter ``l_i`` with coefficients +1 and -1).
    Equal to autograd through :func:`mdl_per_anchor` (ties in the boundaries aside).
    """

    @staticmethod
    def forward(
        ctx: Any, dist: Tensor, positive: Tensor, negative: Tensor, margin: float
    ) -> Tensor:
        # masks are applied by arithmetic (``torch.where`` on B x M is several times slower on CPU):
        # masked_pos is D on the positives and -big elsewhere, masked_neg D / +big
        big = torch.finfo(dist.dtype).max
        pos_float = positive.to(dist.dtype)
        masked_pos = pos_float.sub(1).mul_(big).addcmul_(dist, pos_float)
        del pos_float
        farthest_index = masked_pos.argmax(dim=1, keepdim=True)
        farthest_positive = masked_pos.gather(1, farthest_index).squeeze(1)
        neg_float = negative.to(dist.dtype)
        masked_neg = neg_float.sub(1).mul_(-big).addcmul_(dist, neg_float)
        del neg_float
        nearest_index = masked_neg.argmin(dim=1, keepdim=True)
        nearest_negative = masked_neg.gather(1, nearest_index).squeeze(1)
        # an anchor without positives has p = -big, without negatives n = +big
        valid = (farthest_positive > -big) & (nearest_negative < big)
        # thresholds that select nothing on invalid anchors; the +-big fill of the masked
        # matrices keeps non-positives out of V+ and non-negatives out of V-
        pos_threshold = torch.where(valid, nearest_negative - margin, math.inf)
        neg_threshold = torch.where(valid, farthest_positive + margin, -math.inf)
        violating_positive = masked_pos > pos_threshold[:, None]
        del masked_pos
        violating_negative = masked_neg < neg_threshold[:, None]
        del masked_neg
        num_pos = violating_positive.sum(dim=1)
        num_neg = violating_negative.sum(dim=1)
        pos_sum = (dist * violating_positive).sum(dim=1)
        neg_sum = (dist * violating_negative).sum(dim=1)
        zero = dist.new_zeros(())
        pos_term = torch.where(
            num_pos > 0, pos_sum / num_pos.clamp_min(1) - nearest_negative + margin, zero
        )
        neg_term = torch.where(
            num_neg > 0, farthest_positive + margin - neg_sum / num_neg.clamp_min(1), zero
        )
        num_valid = valid.sum().clamp_min(1)
        ctx.save_for_backward(
            violating_positive,
            violating_negative,
            num_pos,
            num_neg,
            farthest_index,
            nearest_index,
            num_valid,
        )
        return (pos_term + neg_term).sum() / num_valid

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (
            violating_positive,
            violating_negative,
            num_pos,
            num_neg,
            farthest_index,
            nearest_index,
            num_valid,
        ) = ctx.saved_tensors
        scale = grad_output / num_valid
        pull = (scale / num_pos.clamp_min(1)).to(grad_output.dtype)[:, None]
        push = (-scale / num_neg.clamp_min(1)).to(grad_output.dtype)[:, None]
        grad = violating_positive.to(grad_output.dtype).mul_(pull)
        grad.addcmul_(violating_negative.to(grad_output.dtype), push)
        grad.scatter_add_(1, farthest_index, (scale * (num_neg > 0))[:, None].to(grad.dtype))
        grad.scatter_add_(1, nearest_index, (-scale * (num_pos > 0))[:, None].to(grad.dtype))
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
