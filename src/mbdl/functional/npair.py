"""The multi-class N-pair loss of Sohn, "Improved Deep Metric Learning with Multi-class N-pair
Loss Objective", NeurIPS 2016, on inner products of unnormalised embeddings.

From ``N`` pairs ``(x_c, x_c^+)`` of ``N`` different classes:

    L = (1/N) sum_c log(1 + sum_{c' != c} exp(x_c . x_{c'}^+ - x_c . x_c^+)) + l2_reg * R
    R = (1/B) sum_{i=1}^{B} ||x_i||^2

i.e. a cross-entropy over the logits ``x_c . x_{c'}^+`` with target ``c``, plus the paper's L2
regulariser of the embedding norms, averaged over the batch (PML ``NPairsLoss`` with
``embedding_regularizer=LpRegularizer(power=2)`` and ``embedding_reg_weight=l2_reg``).

Pair selection (deterministic): for every class present in the batch, the anchor ``x_c`` is its
first item (lowest batch index) and the positive ``x_c^+`` the first other item of that class in
the reference set (the batch itself when ``ref_emb`` is None, so the class's second item, as PML
picks it); classes without such a positive are skipped. Negatives of an anchor are the positives
of the other selected classes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mbdl.functional.checks import check_loss_inputs, check_number
from mbdl.functional.pairs import pair_masks
from mbdl.functional.reductions import connected_zero, upcast


def check_npair_options(l2_reg: float) -> None:
    """Raise ``ValueError`` unless ``l2_reg`` is a finite number >= 0."""
    check_number("l2_reg", l2_reg, minimum=0)


def npair_indices(
    labels: Tensor, ref_labels: Tensor | None = None, anchor_offset: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(anchor_idx, positive_idx)``: one pair per class, ordered by label (see module docstring).

    ``anchor_idx`` indexes the batch, ``positive_idx`` the reference set (the batch if None).
    """
    classes, inverse = torch.unique(labels, return_inverse=True)
    order = torch.arange(labels.shape[0], device=labels.device)
    first = torch.full(classes.shape, labels.shape[0], dtype=torch.long, device=labels.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    if ref_labels is None:
        # the second item of each class: O(B), no class x batch mask
        later = torch.where(order == first[inverse], labels.shape[0], order)
        second = torch.full_like(first, labels.shape[0])
        second = second.scatter_reduce(0, inverse, later, reduce="amin")
        has_pair = second < labels.shape[0]
        return first[has_pair], second[has_pair]
    positive, _ = pair_masks(labels[first], ref_labels, None)
    if anchor_offset is not None:
        positive &= ~_is_itself(first, positive.shape[1], anchor_offset)
    has_positive = positive.any(dim=1)
    # argmax returns the first maximal entry: the lowest-index positive
    positive_idx = positive.to(torch.uint8).argmax(dim=1)
    return first[has_positive], positive_idx[has_positive]


def _is_itself(anchor_idx: Tensor, num_ref: int, anchor_offset: int) -> Tensor:
    """``len(anchor_idx) x num_ref`` mask of ``ref[anchor_offset + anchor_idx]``, the anchor itself."""
    if anchor_offset < 0:
        raise ValueError(f"anchor_offset must be >= 0; got {anchor_offset}")
    cols = torch.arange(num_ref, device=anchor_idx.device)
    return cols[None, :] == (anchor_idx + anchor_offset)[:, None]


def npair_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    l2_reg: float = 0.02,
    anchor_offset: int | None = None,
) -> Tensor:
    """Multi-class N-pair loss (Sohn, NeurIPS 2016) with the embedding L2 regulariser.

    ``L = (1/N) sum_c CE(softmax_{c'}(x_c . x_{c'}^+), c) + l2_reg * mean_i ||x_i||^2``; a zero
    connected to the inputs when no class has a pair. fp16/bf16 are computed in fp32.
    """
    check_loss_inputs(embeddings, labels, ref_emb, ref_labels)
    check_npair_options(l2_reg)
    if ref_emb is not None and anchor_offset is not None:
        if anchor_offset < 0 or anchor_offset + embeddings.shape[0] > ref_emb.shape[0]:
            raise ValueError(
                f"anchor_offset={anchor_offset} puts the {embeddings.shape[0]} anchors outside "
                f"the reference set of {ref_emb.shape[0]} items"
            )
    x = upcast(embeddings)
    ref = x if ref_emb is None else upcast(ref_emb).to(x.dtype)
    anchor_idx, positive_idx = npair_indices(labels, ref_labels, anchor_offset)
    if anchor_idx.numel() == 0:
        return connected_zero(*(upcast(t) for t in (embeddings, ref_emb) if t is not None))
    num_pairs = anchor_idx.shape[0]
    if ref_emb is None:
        # one gather (and one scatter in backward) for both ends of the pairs
        picked = x.index_select(0, torch.cat([anchor_idx, positive_idx]))
        anchors, positives = picked[:num_pairs], picked[num_pairs:]
    else:
        anchors, positives = x.index_select(0, anchor_idx), ref.index_select(0, positive_idx)
    logits = anchors @ positives.T
    targets = torch.arange(num_pairs, device=x.device)
    loss = torch.nn.functional.cross_entropy(logits, targets)
    if l2_reg > 0:
        flat = x.reshape(-1)
        loss = loss + (l2_reg / x.shape[0]) * torch.dot(flat, flat)
    return loss
