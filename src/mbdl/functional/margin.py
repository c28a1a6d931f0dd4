"""The margin loss with distance-weighted sampling of Wu, Manmatha, Smola, Krähenbühl, "Sampling
Matters in Deep Embedding Learning", ICCV 2017.

On euclidean distances ``D`` of L2-normalised embeddings, with ``beta_i`` the boundary of anchor
``i`` (one learnable value, or one per class indexed by the anchor's label):

    l+(i, j) = [alpha + D_ij - beta_i]_+            (positive pair)
    l-(i, k) = [alpha - D_ik + beta_i]_+            (negative pair)
    L = sum_{(i,j,k) in T} (l+(i,j) + l-(i,k)) / (#{T: l+ > 0} + #{T: l- > 0})  + nu * R(beta)

over a set ``T`` of triplets (each non-zero pair term is counted once per triplet, as in the
authors' code and PML ``MarginLoss``). ``R(beta) = beta`` for one boundary and
``sum_T beta_{y_i} / divisor`` for per-class boundaries (PML's convention).

``T`` is built without triplet index tensors, as per-pair multiplicities on the ``B x M`` matrix:

- ``sampling="distance_weighted"`` (the paper): every positive ``(i, j)`` is paired with one
  negative of ``i`` drawn with probability ``∝ 1/q(D_ik)``, where on the unit sphere of dimension
  ``n`` the distance density is ``q(d) ∝ d^{n-2} (1 - d^2/4)^{(n-3)/2}``; distances are clipped
  below at ``cutoff`` and negatives with ``D >= nonzero_loss_cutoff`` get weight 0. Anchors
  whose negatives all have weight 0 draw uniformly among their negatives. Draws are with
  replacement, from ``torch.multinomial`` under the given ``generator``.
- ``sampling="all"``: every (positive, negative) combination of every anchor (PML
  ``MarginLoss(triplets_per_anchor="all")`` without a miner).

Anchors without a positive or without a negative form no triplet; without any triplet the
loss (regulariser included) is a zero connected to the inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mbdl.functional.checks import check_loss_inputs, check_number
from mbdl.functional.distances import loss_distances
from mbdl.functional.pairs import pair_masks
from mbdl.functional.reductions import connected_zero

SAMPLINGS: tuple[str, ...] = ("distance_weighted", "all")


def check_margin_options(
    alpha: float, nu: float, sampling: str, cutoff: float, nonzero_loss_cutoff: float
) -> None:
    """Raise ``ValueError`` on a negative ``alpha``/``nu``, an unknown ``sampling`` or bad cutoffs."""
    check_number("alpha", alpha, minimum=0)
    check_number("nu", nu, minimum=0)
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
    if not (math.isfinite(cutoff) and 0 < cutoff < nonzero_loss_cutoff):
        raise ValueError(
            f"need 0 < cutoff < nonzero_loss_cutoff; got cutoff={cutoff}, "
            f"nonzero_loss_cutoff={nonzero_loss_cutoff}"
        )


def distance_weights(
    dist: Tensor,
    negative: Tensor,
    dim: int,
    *,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> Tensor:
    """Unnormalised sampling weights ``1/q(D)`` of the negatives (``B x M``, no gradient).

    ``log w = (2 - n) log d - (n - 3)/2 log(1 - d^2/4)`` with ``d = max(D, cutoff)``, set to 0
    outside the negatives and for ``D >= nonzero_loss_cutoff``; each row is scaled by its maximum.
    """
    with torch.no_grad():
        d = dist.detach().clamp_min(cutoff)
        log_w = (2.0 - dim) * d.log() - ((dim - 3) / 2.0) * (1 - d.pow(2) / 4).clamp_min(
            1e-12
        ).log()
        eligible = negative & (d < nonzero_loss_cutoff)
        log_w = log_w.masked_fill(~eligible, -math.inf)
        row_max = log_w.amax(dim=1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        return torch.exp(log_w - row_max)


def sample_negatives(
    dist: Tensor,
    negative: Tensor,
    num_samples: int,
    dim: int,
    *,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``B x num_samples`` column indices of negatives drawn with replacement ``∝ 1/q(D)``.

    Rows whose weights are all 0 draw uniformly among their negatives; rows without any negative
    get index 0 and must be ignored by the caller.
    """
    weights = distance_weights(
        dist, negative, dim, cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff
    )
    no_weight = weights.sum(dim=1, keepdim=True) == 0
    weights = torch.where(no_weight, negative.to(weights.dtype), weights)
    # rows without negatives: any valid distribution; their draws are discarded
    weights[~negative.any(dim=1)] = 1.0
    return torch.multinomial(weights, num_samples, replacement=True, generator=generator)


def triplet_multiplicities(
    dist: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    sampling: str = "distance_weighted",
    dim: int | None = None,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(pos_count, neg_count)``: how many triplets of ``T`` contain each pair (``B x M``)."""
    num_pos = positive.sum(dim=1, keepdim=True)
    num_neg = negative.sum(dim=1, keepdim=True)
    valid = (num_pos > 0) & (num_neg > 0)
    if sampling == "all":
        pos_count = torch.where(positive & valid, num_neg, 0)
        neg_count = torch.where(negative & valid, num_pos, 0)
        return pos_count.to(dist.dtype), neg_count.to(dist.dtype)
    pos_count = (positive & valid).to(dist.dtype)
    neg_count = torch.zeros_like(dist)
    most = int(num_pos.max()) if num_pos.numel() else 0
    if most > 0 and bool(valid.any()):
        drawn = sample_negatives(
            dist,
            negative,
            most,
            dist.shape[1] if dim is None else dim,
            cutoff=cutoff,
            nonzero_loss_cutoff=nonzero_loss_cutoff,
            generator=generator,
        )
        # one negative per positive: keep the first |P_i| draws of each valid anchor
        keep = (torch.arange(most, device=dist.device)[None, :] < num_pos) & valid
        neg_count.scatter_add_(1, drawn, keep.to(dist.dtype))
    return pos_count, neg_count


def margin_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    beta: Tensor | float = 1.2,
    alpha: float = 0.2,
    nu: float = 0.0,
    sampling: str = "distance_weighted",
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
    generator: torch.Generator | None = None,
    anchor_offset: int | None = None,
) -> Tensor:
    """Margin loss (Wu et al., ICCV 2017) over distance-weighted or all triplets.

    ``beta``: a number, a 1-element tensor, or a ``num_classes`` tensor indexed by the anchor
    labels. ``L = sum_T (l+ + l-) / #nonzero terms + nu R(beta)``; see the module docstring.
    fp16/bf16 are computed in fp32 and the loss is returned in fp32.
    """
    check_loss_inputs(embeddings, labels, ref_emb, ref_labels)
    check_margin_options(alpha, nu, sampling, cutoff, nonzero_loss_cutoff)
    dist = loss_distances(embeddings, ref_emb, distance="euclidean", normalize=True)
    if isinstance(beta, Tensor):
        beta_t = beta.to(device=dist.device, dtype=dist.dtype).reshape(-1)
    else:
        beta_t = torch.tensor([float(beta)], device=dist.device, dtype=dist.dtype)
    if beta_t.numel() == 1:
        beta_i = beta_t.reshape(1, 1)
    else:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= beta_t.numel()):
            raise ValueError(
                f"labels must be in [0, {beta_t.numel()}) to index the per-class beta; "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        beta_i = beta_t[labels.long()][:, None]
    positive, negative = pair_masks(labels, ref_labels, anchor_offset)
    pos_count, neg_count = triplet_multiplicities(
        dist,
        positive,
        negative,
        sampling=sampling,
        dim=embeddings.shape[1],
        cutoff=cutoff,
        nonzero_loss_cutoff=nonzero_loss_cutoff,
        generator=generator,
    )
    pos_loss = (dist - beta_i + alpha).clamp_min(0)
    neg_loss = (beta_i - dist + alpha).clamp_min(0)
    with torch.no_grad():
        divisor = (pos_count * (pos_loss > 0)).sum() + (neg_count * (neg_loss > 0)).sum()
    total = (pos_count * pos_loss).sum() + (neg_count * neg_loss).sum()
    if not bool(pos_count.any()):
        # no triplet at all: a zero connected to the inputs and to beta (PML returns 0 here too)
        return connected_zero(dist, beta_i)
    loss = total / divisor if bool(divisor > 0) else connected_zero(dist, beta_i)
    if nu > 0:
        if beta_t.numel() == 1:
            loss = loss + nu * beta_t[0]
        elif bool(divisor > 0):
            loss = loss + nu * (pos_count.sum(dim=1) * beta_i[:, 0]).sum() / divisor
    return loss
