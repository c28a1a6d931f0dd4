"""Masks of positive and negative pairs on the B x M matrix (batch against itself or a reference)."""

from __future__ import annotations

from torch import Tensor


def check_anchor_offset(num_anchors: int, num_ref: int, anchor_offset: int) -> None:
    """Raise ``ValueError`` unless anchors ``anchor_offset ... anchor_offset + B - 1`` are rows of
    the reference set."""
    if anchor_offset < 0 or anchor_offset + num_anchors > num_ref:
        raise ValueError(
            f"anchor_offset={anchor_offset} puts the {num_anchors} anchors outside the "
            f"reference set of {num_ref} items"
        )


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
    negative = ~same
    if anchor_offset is not None:
        check_anchor_offset(labels.shape[0], ref_labels.shape[0], anchor_offset)
        same.diagonal(anchor_offset).fill_(False)  # (i, anchor_offset + i): the anchor itself
    return same, negative
