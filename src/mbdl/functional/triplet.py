"""The triplet margin loss of Schroff, Kalenichenko and Philbin, "FaceNet", CVPR 2015, with the
batch-hard mining of Hermans, Beyer and Leibe, "In Defense of the Triplet Loss", 2017.

    loss(a, p, n) = [D_ap - D_an + m]_+,   L = mean over the triplets with a non-zero loss

Triplets (anchor ``a``, positive ``p`` of the same class, ``p != a``, negative ``n`` of another
class) are chosen by ``mining``:

- ``"all"``: every triplet of the batch.
- ``"batch_hard"``: per anchor, the farthest positive and the nearest negative (Hermans 2017).
- ``"semi_hard"``: every triplet with ``D_ap < D_an < D_ap + m``: negatives farther than the
  positive but inside the margin (Schroff 2015, eq. 4 and the margin). This is the set that
  pytorch-metric-learning's ``TripletMarginMiner(type_of_triplets="semihard")`` selects.

No triplet index tensor is built. "all" and "semi_hard" sort each anchor's negative distances once;
for a positive pair ``(a, p)`` the negatives with ``D_an < D_ap + m`` are a prefix of that order, so
``sum_n [D_ap - D_an + m]_+ = c (D_ap + m) - (sum of the c smallest D_an)`` with ``c`` found by
binary search and the sum read from a cumulative sum: ``O(B M log M)`` time and a few ``B x M``
buffers, never ``B x M x M``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mbdl.functional.checks import check_loss_inputs, check_number
from mbdl.functional.distances import check_distance, loss_distances
from mbdl.functional.pairs import pair_masks
from mbdl.functional.reductions import connected_zero

MINING: tuple[str, ...] = ("all", "batch_hard", "semi_hard")


def check_triplet_options(margin: float, mining: str) -> None:
    """Raise ``ValueError`` unless ``margin >= 0`` and ``mining`` is one of :data:`MINING`."""
    check_number("margin", margin, minimum=0)
    if mining not in MINING:
        raise ValueError(f"mining must be one of {', '.join(MINING)}; got {mining!r}")


def _batch_hard(dist: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """Per valid anchor ``[max_P D - min_N D + m]_+``, averaged over the non-zero ones."""
    hardest_positive = dist.masked_fill(~positive, -math.inf).amax(dim=1)
    hardest_negative = dist.masked_fill(~negative, math.inf).amin(dim=1)
    valid = positive.any(dim=1) & negative.any(dim=1)
    zero = torch.zeros((), dtype=dist.dtype, device=dist.device)
    # invalid anchors have an infinite boundary: replace it before the subtraction
    hardest_positive = torch.where(valid, hardest_positive, zero)
    hardest_negative = torch.where(valid, hardest_negative, zero)
    terms = torch.where(valid, (hardest_positive - hardest_negative + margin).clamp_min(0), zero)
    return terms.sum() / (terms > 0).sum().clamp_min(1)


def _sorted_negative_sums(
    dist: Tensor, positive: Tensor, negative: Tensor, margin: float, semi_hard: bool
) -> Tensor:
    """Sum and count, over positive pairs ``(a, p)`` and the negatives ``n`` selected for them,
    of ``D_ap - D_an + m`` where it is > 0; returns the mean (a connected 0 when there is none)."""
    negatives_sorted = dist.masked_fill(~negative, math.inf).sort(dim=1).values
    # prefix[i, c] = sum of the c smallest negative distances of anchor i (prefix[i, 0] = 0)
    prefix = torch.nn.functional.pad(
        negatives_sorted.masked_fill(~torch.isfinite(negatives_sorted), 0).cumsum(dim=1), (1, 0)
    )
    upper = dist + margin
    below_upper = torch.searchsorted(negatives_sorted.detach(), upper.detach().contiguous())
    if semi_hard:
        below_lower = torch.searchsorted(
            negatives_sorted.detach(), dist.detach().contiguous(), right=True
        )
    else:
        below_lower = torch.zeros_like(below_upper)
    # no triplet off a positive pair, and none when the window is empty (semi-hard with m = 0)
    below_upper = torch.where(positive, torch.maximum(below_upper, below_lower), below_lower)
    count = below_upper - below_lower
    negative_sum = prefix.gather(1, below_upper) - prefix.gather(1, below_lower)
    total = (upper * count.to(dist.dtype) - negative_sum).sum()
    return total / count.sum().clamp_min(1)


def triplet_from_distances(
    dist: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    margin: float = 0.2,
    mining: str = "all",
) -> Tensor:
    """The triplet margin loss on a precomputed ``B x M`` distance matrix and its pair masks."""
    check_triplet_options(margin, mining)
    if dist.numel() == 0:
        return connected_zero(dist)
    if mining == "batch_hard":
        return _batch_hard(dist, positive, negative, margin)
    return _sorted_negative_sums(dist, positive, negative, margin, semi_hard=mining == "semi_hard")


def triplet_margin_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 0.2,
    mining: str = "all",
    distance: str = "euclidean",
    normalize: bool = True,
    anchor_offset: int | None = None,
) -> Tensor:
    """Triplet margin loss (Schroff et al. 2015; batch-hard: Hermans et al. 2017):
    ``mean over non-zero triplets of [D_ap - D_an + m]_+``, triplets chosen by ``mining``
    (``"all"``, ``"batch_hard"``, ``"semi_hard"``; see the module docstring).

    Anchors are the rows of ``embeddings``; positives and negatives come from ``ref_emb`` when
    given (``anchor_offset=k``: ``ref_emb[k + i]`` is anchor ``i`` itself and is skipped).
    fp16/bf16 inputs are computed in fp32 and the loss is returned in fp32.
    """
    check_loss_inputs(embeddings, labels, ref_emb, ref_labels)
    check_triplet_options(margin, mining)
    check_distance(distance)
    dist = loss_distances(embeddings, ref_emb, distance=distance, normalize=normalize)
    positive, negative = pair_masks(labels, ref_labels, anchor_offset)
    return triplet_from_distances(dist, positive, negative, margin=margin, mining=mining)
