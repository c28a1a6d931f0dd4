"""Example loss plugins, written as a user would write them in their own package.

``loss.name=example_loss_plugin:SquaredContrastiveLoss`` trains with the first (this folder on
``PYTHONPATH``); docs/losses/index.md ("Writing your own loss") shows the same code. The tests
run the loss contract (tests/test_loss_contract.py), the config checks, training, resuming,
``mbdl compare`` and ``mbdl eval`` with them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mbdl.functional.checks import check_loss_inputs
from mbdl.functional.distances import loss_distances
from mbdl.functional.pairs import pair_masks
from mbdl.functional.reductions import upcast
from mbdl.losses import MetricLoss


class SquaredContrastiveLoss(MetricLoss):
    """The original contrastive loss (Hadsell, Chopra, LeCun, CVPR 2006, eq. 4) on L2-normalised
    embeddings: ``L = sum_P D_ij^2 / 2 + sum_N [m - D_ik]_+^2 / 2``, divided by the number of
    pairs (0 when the batch has none)."""

    search_grid = (
        "margin",
        (1.0, 0.5, 1.5),
    )  # for `mbdl compare --losses ...:SquaredContrastiveLoss`

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if not margin > 0:
            raise ValueError(f"margin must be > 0; got {margin!r}")
        self.margin = margin

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        anchor_offset: int | None,
    ) -> Tensor:
        dist = loss_distances(embeddings, ref_emb)
        positive, negative = pair_masks(labels, ref_labels, anchor_offset)
        zero = torch.zeros((), dtype=dist.dtype, device=dist.device)
        terms = torch.where(positive, dist.square(), zero) + torch.where(
            negative, (self.margin - dist).clamp_min(0).square(), zero
        )
        pairs = (positive | negative).sum().clamp_min(1)
        return terms.sum() / (2 * pairs)  # no pair: an exact 0, still connected to the graph

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class CenterLoss(nn.Module):
    """Center loss (Wen, Zhang, Li, Qiao, ECCV 2016) as a plain ``nn.Module`` plugin:
    ``L = mean_i ||x_i - c_{y_i}||^2 / 2`` with one learnable centre per class. It needs
    ``num_classes`` and ``embedding_dim`` from the trainer and takes no reference set."""

    needs = ("num_classes", "embedding_dim")
    accepts_ref = False

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.centers = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.1)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_loss_inputs(embeddings, labels, ref_emb, ref_labels)
        if ref_emb is not None:
            raise ValueError("CenterLoss takes no reference set: its anchors are the class centres")
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.centers):
            raise ValueError(f"labels must be in [0, {len(self.centers)})")
        x = upcast(embeddings)
        return self.scale * (x - self.centers.to(x.dtype)[labels]).square().sum(dim=1).mean() / 2


class NotALoss:
    """Not an ``nn.Module``: ``loss.name`` must refuse it with one line."""


class WrongForward(nn.Module):
    """A module whose ``forward`` does not take ``(embeddings, labels, ...)``."""

    def forward(self, embeddings: Tensor) -> Tensor:
        return embeddings.sum()


class UndeclaredNeeds(nn.Module):
    """Requires ``num_classes`` without declaring ``needs``: refused with the fix."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb=None, ref_labels=None) -> Tensor:
        return embeddings.sum()
