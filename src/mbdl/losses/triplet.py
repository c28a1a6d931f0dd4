"""``TripletMarginLoss``: the module over :func:`mbdl.functional.triplet.triplet_margin_loss`."""

from __future__ import annotations

from torch import Tensor

from mbdl.functional.distances import check_distance
from mbdl.functional.triplet import check_triplet_options, triplet_margin_loss
from mbdl.losses.base import MetricLoss


class TripletMarginLoss(MetricLoss):
    """Triplet margin loss (Schroff et al., CVPR 2015; batch-hard: Hermans et al. 2017):
    ``[D_ap - D_an + m]_+`` averaged over the non-zero triplets, with ``mining`` one of ``"all"``
    (every triplet), ``"batch_hard"`` (farthest positive, nearest negative per anchor) or
    ``"semi_hard"`` (every triplet with ``D_ap < D_an < D_ap + m``).
    """

    needs: tuple[str, ...] = ()

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

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        anchor_offset: int | None,
    ) -> Tensor:
        return triplet_margin_loss(
            embeddings,
            labels,
            ref_emb,
            ref_labels,
            margin=self.margin,
            mining=self.mining,
            distance=self.distance,
            normalize=self.normalize,
            anchor_offset=anchor_offset,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, mining={self.mining!r}, "
            f"distance={self.distance!r}, normalize={self.normalize}"
        )
