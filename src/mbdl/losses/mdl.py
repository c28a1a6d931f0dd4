"""``MarginDiscriminateLoss``: the module over :func:`mbdl.functional.mdl.margin_discriminate_loss`.

Reconstructed from the paper's abstract (Sun, Tang, Bai, S+SSPR 2018); the paper's exact formula
may differ. See ``docs/mdl-loss.md`` and :mod:`mbdl.functional.mdl` for the formula.
"""

from __future__ import annotations

from mbdl.functional.distances import check_distance
from mbdl.functional.mdl import check_mdl_options, margin_discriminate_loss
from mbdl.losses.base import FunctionalLoss


class MarginDiscriminateLoss(FunctionalLoss):
    """Margin-based Discriminate Loss (Sun, Tang, Bai, S+SSPR 2018), reconstructed from the
    abstract; the paper's exact formula may differ.

    For each anchor ``i`` with farthest positive ``p_i`` and nearest negative ``n_i``:
    ``l_i = mean_{D_ij > n_i - m, j in P_i} (D_ij - n_i + m) + mean_{D_ik < p_i + m, k in N_i}
    (p_i + m - D_ik)``, averaged over the anchors that have a positive and a negative.
    ``soft_boundary=t`` replaces max/min by ``t``-temperature log-sum-exp.
    """

    name = "mdl"
    search_grid = ("margin", (0.2, 0.1, 0.4))

    loss_function = staticmethod(margin_discriminate_loss)
    hyper_parameters = ("margin", "soft_boundary", "distance", "normalize")

    def __init__(
        self,
        margin: float = 0.2,
        soft_boundary: float | None = None,
        distance: str = "euclidean",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_mdl_options(margin, soft_boundary)
        check_distance(distance)
        self.margin = margin
        self.soft_boundary = soft_boundary
        self.distance = distance
        self.normalize = normalize
