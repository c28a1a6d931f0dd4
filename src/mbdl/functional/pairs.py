"""Masks of positive and negative pairs on the B x M matrix (batch against itself or a reference)."""

from __future__ import annotations

import torch
from torch import Tensor


def self_pair_mask(
    num_anchors: int, num_ref: int, anchor_offset: int | None, device: torch.device
) -> Tensor:
    """``B x M`` boolean mask that is True at ``(i, anchor_offset + i)``: an anchor against itself.

    ``anchor_offset=None`` means the reference set does not contain the anchors (all False).
    """
    mask = torch.zeros(num_anchors, num_ref, dtype=torch.bool, device=device)
    if anchor_offset is not None:
        if anchor_offset < 0 or anchor_offset + num_anchors > num_ref:
            raise ValueError(
                f"anchor_offset={anchor_offset} puts the {num_anchors} anchors outside the "
                f"reference set of {num_ref} items"
            )
        rows = torch.arange(num_anchors, device=device)
        mask[rows, rows + anchor_offset] = True
    return mask


def pair_masks(
    labels: Tensor, ref_labels: Tensor | None = None, anchor_offset: int | None = None
) -> tuple[Tensor, Tensor]:
    """Boolean ``B x M`` masks ``(positive, negative)``.

    ``positive[i, j]``: same label and not the anchor itself; ``negative[i, j]``: different label.
    With ``ref_labels=None`` the reference set is the batch and ``anchor_offset`` is 0.
    """
    if ref_labels is None:
        ref_labels, anchor_offset = labels, 0
    same = labels[:, None] == ref_labels[None, :]
    itself = self_pair_mask(labels.shape[0], ref_labels.shape[0], anchor_offset, labels.device)
    return same & ~itself, ~same
