"""``ArcFaceLoss``: the module over :func:`mbdl.functional.arcface.arcface_loss`."""

from __future__ import annotations

from torch import Tensor

from mbdl.functional.arcface import arcface_loss, check_arcface_options
from mbdl.losses.normsoftmax import ProxySoftmaxLoss


class ArcFaceLoss(ProxySoftmaxLoss):
    """ArcFace (Deng et al., CVPR 2019): cross-entropy over ``s cos(theta_c + m [c = y])``, with
    ``theta_c`` the angle between ``x`` and its learnable class proxy ``w_c`` and the margin ``m``
    in radians (defaults from the paper: ``margin=0.5``, ``scale=64``; pytorch-metric-learning
    takes the margin in degrees, 28.6)."""

    name = "arcface"
    search_grid = ("margin", (0.5, 0.3, 0.7))

    def __init__(
        self, num_classes: int, embedding_dim: int, margin: float = 0.5, scale: float = 64.0
    ) -> None:
        super().__init__(num_classes, embedding_dim)
        check_arcface_options(margin, scale)
        self.margin = margin
        self.scale = scale

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return arcface_loss(embeddings, labels, self.proxies, margin=self.margin, scale=self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, scale={self.scale}"
