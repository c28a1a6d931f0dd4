"""``MultiSimilarityLoss``: the module over :func:`mbdl.functional.multisimilarity.multisimilarity_loss`."""

from __future__ import annotations

from mbdl.functional.multisimilarity import check_multisimilarity_options, multisimilarity_loss
from mbdl.losses.base import FunctionalLoss


class MultiSimilarityLoss(FunctionalLoss):
    """Multi-similarity loss (Wang et al., CVPR 2019) with its pair mining, on cosine similarity:
    ``L = mean_i [1/alpha log(1 + sum_{mined P_i} e^{-alpha(S_ij - base)})
    + 1/beta log(1 + sum_{mined N_i} e^{beta(S_ik - base)})]``; mining keeps positives with
    ``S_ij - epsilon < max_{N_i} S`` and negatives with ``S_ik + epsilon > min_{P_i} S``.
    """

    name = "multisimilarity"
    search_grid = ("base", (0.5, 0.3, 0.7))

    loss_function = staticmethod(multisimilarity_loss)
    hyper_parameters = ("alpha", "beta", "base", "epsilon")

    def __init__(
        self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1
    ) -> None:
        super().__init__()
        check_multisimilarity_options(alpha, beta, base, epsilon)
        self.alpha = alpha
        self.beta = beta
        self.base = base
        self.epsilon = epsilon
