"""``ContrastiveLoss``: the module over :func:`mbdl.functional.contrastive.contrastive_loss`."""

from __future__ import annotations

from mbdl.functional.contrastive import check_contrastive_options, contrastive_loss
from mbdl.functional.distances import check_distance
from mbdl.losses.base import FunctionalLoss


class ContrastiveLoss(FunctionalLoss):
    """Contrastive loss (Hadsell, Chopra, LeCun, CVPR 2006) over all ordered pairs of the batch:
    ``mean_nz [D_ij - pos_margin]_+`` over positive pairs plus ``mean_nz [neg_margin - D_ik]_+``
    over negative pairs, each mean over the non-zero terms (pytorch-metric-learning's convention).
    """

    name = "contrastive"
    search_grid = ("neg_margin", (1.0, 0.7, 1.3))

    loss_function = staticmethod(contrastive_loss)
    hyper_parameters = ("pos_margin", "neg_margin", "distance", "normalize")

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        distance: str = "euclidean",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_contrastive_options(pos_margin, neg_margin)
        check_distance(distance)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.distance = distance
        self.normalize = normalize
