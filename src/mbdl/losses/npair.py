"""``NPairLoss``: the module over :func:`mbdl.functional.npair.npair_loss`."""

from __future__ import annotations

from torch import Tensor

from mbdl.functional.npair import check_npair_options, npair_loss
from mbdl.losses.base import MetricLoss


class NPairLoss(MetricLoss):
    """Multi-class N-pair loss (Sohn, NeurIPS 2016) on inner products of unnormalised embeddings:
    one (anchor, positive) pair per class (first item, first other item of the class),
    ``L = CE over x_c . x_{c'}^+ with target c`` ``+ l2_reg * mean_i ||x_i||^2``.
    """

    name = "npair"
    # one point: l2_reg adds a constant on the L2-normalised embeddings the models output, so
    # other values would train identically
    search_grid = ("l2_reg", (0.02,))

    def __init__(self, l2_reg: float = 0.02) -> None:
        super().__init__()
        check_npair_options(l2_reg)
        self.l2_reg = l2_reg

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        anchor_offset: int | None,
    ) -> Tensor:
        return npair_loss(
            embeddings, labels, ref_emb, ref_labels, l2_reg=self.l2_reg, anchor_offset=anchor_offset
        )

    def extra_repr(self) -> str:
        return f"l2_reg={self.l2_reg}"
