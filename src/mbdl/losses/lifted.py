"""``LiftedStructureLoss``: the module over :func:`mbdl.functional.lifted.lifted_structure_loss`."""

from __future__ import annotations

from mbdl.functional.lifted import check_lifted_options, lifted_structure_loss
from mbdl.losses.base import FunctionalLoss


class LiftedStructureLoss(FunctionalLoss):
    """Lifted structured loss (Song et al., CVPR 2016, eq. 4): for each positive pair ``(i, j)``,
    ``J_ij = log(sum_{N_i} exp(m - D_ik) + sum_{N_j} exp(m - D_jl)) + D_ij`` and
    ``L = 1/(2|P|) sum_P [J_ij]_+^2``, on euclidean distances (L2-normalised when ``normalize``).
    With ``ref_emb`` the negatives of the ``j`` end come from the reference set.
    """

    name = "lifted"
    search_grid = ("margin", (1.0, 0.5, 1.5))

    loss_function = staticmethod(lifted_structure_loss)
    hyper_parameters = ("margin", "normalize")

    def __init__(self, margin: float = 1.0, normalize: bool = True) -> None:
        super().__init__()
        check_lifted_options(margin)
        self.margin = margin
        self.normalize = normalize
