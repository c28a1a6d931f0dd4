"""The supervised contrastive loss of Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu,
Krishnan, "Supervised Contrastive Learning", NeurIPS 2020 (eq. 2, ``L_out``).

On the cosine similarities ``S_ij = cos(x_i, x_j)`` with temperature ``T``, ``P(i)`` the positives
of anchor ``i`` and ``A(i)`` every item but the anchor itself:

    l_i = -1/|P(i)| sum_{p in P(i)} log( exp(S_ip / T) / sum_{a in A(i)} exp(S_ia / T) )
    L   = 1/|V| sum_{i in V} l_i,   V = { i : P(i) non-empty }

With a reference set (cross-batch memory, other GPUs) ``P(i)`` and ``A(i)`` are taken from it
(``anchor_offset`` marks the anchor itself). Anchors without a positive are left out of the mean
(the paper's batches always give every anchor one); with none, ``L`` is a connected 0.
pytorch-metric-learning's ``SupConLoss`` agrees whenever the batch has two classes or more and
every anchor a positive; it returns 0 for a batch of one class, where ``L_out`` (and this kernel)
is still ``>= log |P(i)|`` and pulls the least similar positives in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mbdl.functional.checks import check_loss_inputs, check_number
from mbdl.functional.multisimilarity import cosine_similarity
from mbdl.functional.pairs import pair_masks


def check_supcon_options(temperature: float) -> None:
    """Raise ``ValueError`` unless ``temperature`` is a finite number > 0."""
    check_number("temperature", temperature, above=0)


def supcon_from_similarities(
    sim: Tensor, positive: Tensor, negative: Tensor, *, temperature: float = 0.1
) -> Tensor:
    """``L_out`` on a precomputed ``B x M`` similarity matrix and its pair masks (``A(i)`` is
    ``positive | negative``: every item but the anchor itself)."""
    others = positive | negative
    # an anchor alone in the reference set has no A(i) (and no positive): keep its row finite
    logits = (sim / temperature).masked_fill(~others, -math.inf)
    logits = logits.masked_fill(~others.any(dim=1, keepdim=True), 0.0)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    num_positives = positive.sum(dim=1)
    pos_log_prob = torch.where(positive, log_prob, log_prob.new_zeros(())).sum(dim=1)
    per_anchor = -pos_log_prob / num_positives.clamp_min(1)
    return per_anchor.sum() / (num_positives > 0).sum().clamp_min(1)


def supcon_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    temperature: float = 0.1,
    anchor_offset: int | None = None,
) -> Tensor:
    """Supervised contrastive loss ``L_out`` (Khosla et al., NeurIPS 2020), mean over the anchors
    that have a positive.

    Anchors are the rows of ``embeddings``; positives and the softmax denominator come from
    ``ref_emb`` when given (``anchor_offset=k``: ``ref_emb[k + i]`` is anchor ``i`` itself and is
    skipped). fp16/bf16 inputs are computed in fp32 and the loss is returned in fp32.
    """
    check_loss_inputs(embeddings, labels, ref_emb, ref_labels)
    check_supcon_options(temperature)
    sim = cosine_similarity(embeddings, ref_emb)
    positive, negative = pair_masks(labels, ref_labels, anchor_offset)
    return supcon_from_similarities(sim, positive, negative, temperature=temperature)
