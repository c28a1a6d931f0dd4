"""The multi-similarity loss of Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General
Pair Weighting for Deep Metric Learning", CVPR 2019, with its pair-mining step.

On the cosine similarity matrix ``S`` (``B x M``), with ``P_i`` / ``N_i`` the positives /
negatives of anchor ``i``:

    mining (eq. 7-8): keep positive j if  S_ij - eps < max_{k in N_i} S_ik,
                      keep negative k if  S_ik + eps > min_{j in P_i} S_ij
    l_i = 1/alpha log(1 + sum_{j kept} exp(-alpha (S_ij - base)))
        + 1/beta  log(1 + sum_{k kept} exp( beta  (S_ik - base)))
    L = (1/B) sum_i l_i

which is PML ``MultiSimilarityLoss`` given the pairs of ``MultiSimilarityMiner(epsilon)``.
Mining selects pairs only (no gradient flows through the selection).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mbdl.functional.checks import check_loss_inputs, check_number
from mbdl.functional.pairs import pair_masks
from mbdl.functional.reductions import upcast


def check_multisimilarity_options(alpha: float, beta: float, base: float, epsilon: float) -> None:
    """Raise ``ValueError`` unless ``alpha, beta > 0`` and ``base, epsilon`` are finite."""
    check_number("alpha", alpha, above=0)
    check_number("beta", beta, above=0)
    check_number("base", base)
    check_number("epsilon", epsilon)


def cosine_similarity(embeddings: Tensor, ref_emb: Tensor | None = None) -> Tensor:
    """``S_ij = cos(x_i, y_j)`` (``B x M``); fp16/bf16 upcast to fp32, mixed dtypes promoted."""
    x = upcast(embeddings)
    y = x if ref_emb is None else upcast(ref_emb)
    if y.dtype != x.dtype:
        common = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(common), y.to(common)
    x_unit = torch.nn.functional.normalize(x, dim=1)
    y_unit = x_unit if ref_emb is None else torch.nn.functional.normalize(y, dim=1)
    return x_unit @ y_unit.T


def log_one_plus_sum_exp(logits: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """``log(1 + sum_{mask} exp(logits))`` along ``dim``, stable, 0 where the mask is empty.

    Finite value and gradient everywhere; masked entries get zero gradient.
    """
    masked = logits.masked_fill(~mask, -math.inf)
    shift = masked.amax(dim=dim, keepdim=True).clamp_min(0).detach()
    total = torch.exp(masked - shift).sum(dim=dim, keepdim=True) + torch.exp(-shift)
    return (shift + total.log()).squeeze(dim)


def multisimilarity_mining(
    sim: Tensor, positive: Tensor, negative: Tensor, epsilon: float
) -> tuple[Tensor, Tensor]:
    """``(kept_positive, kept_negative)`` masks of the MS pair mining (MultiSimilarityMiner rule).

    Positives with ``S - eps <`` the hardest negative, negatives with ``S + eps >`` the hardest
    positive; an anchor without negatives keeps no positive and vice versa.
    """
    with torch.no_grad():
        hardest_negative = sim.masked_fill(~negative, -math.inf).amax(dim=1, keepdim=True)
        hardest_positive = sim.masked_fill(~positive, math.inf).amin(dim=1, keepdim=True)
        kept_positive = positive & (sim - epsilon < hardest_negative)
        kept_negative = negative & (sim + epsilon > hardest_positive)
    return kept_positive, kept_negative


def multisimilarity_from_similarities(
    sim: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
) -> Tensor:
    """MS loss with mining on a precomputed ``B x M`` similarity matrix and its pair masks."""
    kept_positive, kept_negative = multisimilarity_mining(sim, positive, negative, epsilon)
    pos_term = log_one_plus_sum_exp(-alpha * (sim - base), kept_positive) / alpha
    neg_term = log_one_plus_sum_exp(beta * (sim - base), kept_negative) / beta
    return (pos_term + neg_term).mean()


def multisimilarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    anchor_offset: int | None = None,
) -> Tensor:
    """Multi-similarity loss with MS pair mining (Wang et al., CVPR 2019); see the module docstring.

    ``L = (1/B) sum_i [1/a log(1 + sum_{P~i} e^{-a(S_ij - l)}) + 1/b log(1 + sum_{N~i} e^{b(S_ik - l)})]``
    on cosine similarities. With no kept pair the loss is an exact 0 connected to the inputs.
    fp16/bf16 are computed in fp32 and the loss is returned in fp32.
    """
    check_loss_inputs(embeddings, labels, ref_emb, ref_labels)
    check_multisimilarity_options(alpha, beta, base, epsilon)
    sim = cosine_similarity(embeddings, ref_emb)
    positive, negative = pair_masks(labels, ref_labels, anchor_offset)
    return multisimilarity_from_similarities(
        sim, positive, negative, alpha=alpha, beta=beta, base=base, epsilon=epsilon
    )
