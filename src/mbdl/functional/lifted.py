"""The lifted structured loss of Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via Lifted
Structured Feature Embedding", CVPR 2016 (eq. 4, the smooth log-sum-exp form).

With ``D`` the euclidean distance matrix, ``P`` the positive pairs and ``N_i`` the negatives of
item ``i``:

    J_ij = log( sum_{k in N_i} exp(m - D_ik) + sum_{l in N_j} exp(m - D_jl) ) + D_ij
    L = 1 / (2 |P|) sum_{(i, j) in P} [J_ij]_+^2

Every unordered positive pair appears twice (``(i, j)`` and ``(j, i)``) among the ordered positive
entries of the ``B x B`` matrix, so ``L`` is the mean of ``[J_ij]_+^2 / 2`` over those entries.

With a reference set (``ref_emb``) the anchors ``i`` are the batch rows and ``j`` runs over the
reference set; "both ends" then means: the negatives of ``i`` are the reference items with another
label (row ``i`` of the ``B x M`` matrix) and the negatives of ``j`` are the reference items with
another label than ``ref_j`` (computed on the rows of the ``M x M`` reference matrix that are
needed). ``L`` is the mean of ``[J_ij]_+^2 / 2`` over the positive entries of the ``B x M``
matrix. A positive pair whose two ends have no negative at all has ``J = -inf`` (``log 0``) and
contributes 0 but is still counted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mbdl.functional.checks import check_loss_inputs, check_number
from mbdl.functional.distances import loss_distances
from mbdl.functional.pairs import pair_masks
from mbdl.functional.reductions import connected_zero, upcast

# stands for log(0) = -inf where a row has no negative; finite so gradients stay finite
_LOG_ZERO = -1e30


def check_lifted_options(margin: float) -> None:
    """Raise ``ValueError`` unless ``margin`` is a finite number."""
    check_number("margin", margin)


def negative_logsumexp(dist: Tensor, negative: Tensor, margin: float) -> Tensor:
    """Per row ``log sum_{k in N_i} exp(m - D_ik)``; rows without negatives give ``-1e30``."""
    has_negative = negative.any(dim=1)
    logits = (margin - dist).masked_fill(~negative, -math.inf)
    logits = logits.masked_fill(~has_negative[:, None], 0.0)
    out = torch.logsumexp(logits, dim=1)
    return torch.where(has_negative, out, torch.full_like(out, _LOG_ZERO))


def lifted_structure_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 1.0,
    normalize: bool = True,
    anchor_offset: int | None = None,
) -> Tensor:
    """Lifted structured loss (Song et al., CVPR 2016, eq. 4); see the module docstring.

    ``L = 1/(2|P|) sum_{(i,j) in P} [log(sum_{N_i} e^{m - D_ik} + sum_{N_j} e^{m - D_jl}) + D_ij]_+^2``
    on euclidean distances (of L2-normalised embeddings when ``normalize``, as PML does).
    fp16/bf16 are computed in fp32 and the loss is returned in fp32 (fp64 stays fp64).
    """
    check_loss_inputs(embeddings, labels, ref_emb, ref_labels)
    check_lifted_options(margin)
    dist = loss_distances(embeddings, ref_emb, distance="euclidean", normalize=normalize)
    positive, negative = pair_masks(labels, ref_labels, anchor_offset)
    inputs = [t for t in (embeddings, ref_emb) if t is not None]
    if not bool(positive.any()) or not bool(negative.any()):
        return connected_zero(*(upcast(t) for t in inputs))
    anchor_lse = negative_logsumexp(dist, negative, margin)
    rows, cols = positive.nonzero(as_tuple=True)
    if ref_emb is None or ref_labels is None:
        other_lse = anchor_lse[cols]
    else:
        # the j end: negatives of ref_j within the reference set, only for the columns needed
        needed, where_needed = torch.unique(cols, return_inverse=True)
        ref_dist = loss_distances(
            ref_emb[needed], ref_emb, distance="euclidean", normalize=normalize
        )
        ref_negative = ref_labels[needed][:, None] != ref_labels[None, :]
        other_lse = negative_logsumexp(ref_dist.to(dist.dtype), ref_negative, margin)[where_needed]
    joint = torch.logaddexp(anchor_lse[rows], other_lse) + dist[rows, cols]
    return joint.clamp_min(0).pow(2).sum() / (2 * rows.numel())
