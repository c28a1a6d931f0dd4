"""``TripletMarginLoss``: the module over :func:`mbdl.functional.triplet.triplet_margin_loss`."""

from __future__ import annotations

from mbdl.functional.distances import check_distance
from mbdl.functional.triplet import check_triplet_options, triplet_margin_loss
from mbdl.losses.base import FunctionalLoss


class TripletMarginLoss(FunctionalLoss):
    """Triplet margin loss (Schroff et al., CVPR 2015; batch-hard: Hermans et al. 2017):
    ``[D_ap - D_an + m]_+`` averaged over the non-zero triplets, with ``mining`` one of ``"all"``
    (every triplet), ``"batch_hard"`` (farthest positive, nearest negative per anchor) or
    ``"semi_hard"`` (every triplet with ``D_ap < D_an < D_ap + m``).
    """

    name = "triplet"
    search_grid = ("margin", (0.2, 0.1, 0.4))

    loss_function = staticmethod(triplet_margin_loss)
    hyper_parameters = ("margin", "mining", "distance", "normalize")

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "all",
        distance: str = "euclidean",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_triplet_options(margin, mining)
        check_distance(distance)
        self.margin = margin
        self.mining = mining
        self.distance = distance
        self.normalize = normalize
