"""``SupConLoss``: the module over :func:`mbdl.functional.supcon.supcon_loss`."""

from __future__ import annotations

from mbdl.functional.supcon import check_supcon_options, supcon_loss
from mbdl.losses.base import FunctionalLoss


class SupConLoss(FunctionalLoss):
    """Supervised contrastive loss ``L_out`` (Khosla et al., NeurIPS 2020) on cosine similarities
    divided by ``temperature``: for each anchor, minus the mean log-softmax of its positives over
    every other item; averaged over the anchors that have a positive (default ``temperature=0.1``,
    the paper's and pytorch-metric-learning's). Takes a reference set (cross-batch memory).
    """

    name = "supcon"
    search_grid = ("temperature", (0.1, 0.05, 0.2))
    loss_function = staticmethod(supcon_loss)
    hyper_parameters = ("temperature",)

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        check_supcon_options(temperature)
        self.temperature = temperature
