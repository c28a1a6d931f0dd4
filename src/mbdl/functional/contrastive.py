"""The contrastive loss of Hadsell, Chopra and LeCun, "Dimensionality Reduction by Learning an
Invariant Mapping", CVPR 2006, on all pairs of a batch.

    pos_loss = mean over non-zero terms of [D_ij - pos_margin]_+,   (i, j) positive pairs
    neg_loss = mean over non-zero terms of [neg_margin - D_ik]_+,   (i, k) negative pairs
    L = pos_loss + neg_loss

Pairs are ordered: ``(i, j)`` and ``(j, i)`` both count, and an anchor is never paired with
itself. This is the reduction of pytorch-metric-learning's ``ContrastiveLoss`` (with its default
``AvgNonZeroReducer``), so numbers are comparable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mbdl.functional.checks import check_loss_inputs, check_number
from mbdl.functional.distances import check_distance, loss_distances
from mbdl.functional.pairs import pair_masks


def check_contrastive_options(pos_margin: float, neg_margin: float) -> None:
    """Raise ``ValueError`` unless both margins are finite numbers."""
    check_number("pos_margin", pos_margin)
    check_number("neg_margin", neg_margin)


def mean_of_nonzero(terms: Tensor) -> Tensor:
    """Mean of the entries of ``terms`` (>= 0) that are > 0; a connected 0 when none is."""
    return terms.sum() / (terms > 0).sum().clamp_min(1)


class _Contrastive(torch.autograd.Function):
    """The contrastive loss with a hand-written backward (a few passes over the ``B x M`` matrix).

    With ``P+`` the positive pairs with ``D > pos_margin`` and ``N+`` the negative pairs with
    ``D < neg_margin``: ``L = mean_{P+}(D) - pos_margin + neg_margin - mean_{N+}(D)`` (each side 0
    when its set is empty) and ``dL/dD = 1/|P+|`` on ``P+``, ``-1/|N+|`` on ``N+``, 0 elsewhere.
    """

    @staticmethod
    def forward(
        ctx: Any,
        dist: Tensor,
        positive: Tensor,
        negative: Tensor,
        pos_margin: float,
        neg_margin: float,
    ) -> Tensor:
        active_positive = positive & (dist > pos_margin)
        active_negative = negative & (dist < neg_margin)
        num_pos = active_positive.sum().to(dist.dtype)
        num_neg = active_negative.sum().to(dist.dtype)
        pos_sum = (dist * active_positive).sum()
        neg_sum = (dist * active_negative).sum()
        pos_loss = (pos_sum - pos_margin * num_pos) / num_pos.clamp_min(1)
        neg_loss = (neg_margin * num_neg - neg_sum) / num_neg.clamp_min(1)
        ctx.save_for_backward(active_positive, active_negative, num_pos, num_neg)
        return pos_loss + neg_loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        active_positive, active_negative, num_pos, num_neg = ctx.saved_tensors
        pull = (grad_output / num_pos.clamp_min(1)).to(grad_output.dtype)
        push = (-grad_output / num_neg.clamp_min(1)).to(grad_output.dtype)
        # arithmetic masks: ``torch.where`` on B x M is several times slower on CPU
        grad = active_positive.to(grad_output.dtype).mul_(pull)
        grad.addcmul_(active_negative.to(grad_output.dtype), push)
        return grad, None, None, None, None


def contrastive_from_distances(
    dist: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
) -> Tensor:
    """The contrastive loss on a precomputed ``B x M`` distance matrix and its pair masks
    (a zero connected to ``dist`` when no term is non-zero)."""
    return _Contrastive.apply(dist, positive, negative, float(pos_margin), float(neg_margin))


def contrastive_terms(
    dist: Tensor, positive: Tensor, negative: Tensor, *, pos_margin: float, neg_margin: float
) -> tuple[Tensor, Tensor]:
    """The readable form: ``B x M`` matrices of ``[D - pos_margin]_+`` on positive pairs and
    ``[neg_margin - D]_+`` on negative pairs (0 elsewhere), differentiable by autograd."""
    zero = torch.zeros((), dtype=dist.dtype, device=dist.device)
    pos_terms = torch.where(positive, (dist - pos_margin).clamp_min(0), zero)
    neg_terms = torch.where(negative, (neg_margin - dist).clamp_min(0), zero)
    return pos_terms, neg_terms


def contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    distance: str = "euclidean",
    normalize: bool = True,
    anchor_offset: int | None = None,
) -> Tensor:
    """Contrastive loss (Hadsell, Chopra, LeCun, CVPR 2006), each side averaged over its non-zero
    terms: ``mean_nz [D_ij - pos_margin]_+ + mean_nz [neg_margin - D_ik]_+``.

    Anchors are the rows of ``embeddings``; pairs are formed with ``ref_emb`` when given
    (``anchor_offset=k``: ``ref_emb[k + i]`` is anchor ``i`` itself and is skipped).
    fp16/bf16 inputs are computed in fp32 and the loss is returned in fp32.
    """
    check_loss_inputs(embeddings, labels, ref_emb, ref_labels)
    check_contrastive_options(pos_margin, neg_margin)
    check_distance(distance)
    dist = loss_distances(embeddings, ref_emb, distance=distance, normalize=normalize)
    positive, negative = pair_masks(labels, ref_labels, anchor_offset)
    return contrastive_from_distances(
        dist, positive, negative, pos_margin=pos_margin, neg_margin=neg_margin
    )
