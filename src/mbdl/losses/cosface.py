"""``CosFaceLoss``: the module over :func:`mbdl.functional.cosface.cosface_loss`."""

from __future__ import annotations

from torch import Tensor

from mbdl.functional.cosface import check_cosface_options, cosface_loss
from mbdl.losses.normsoftmax import ProxySoftmaxLoss


class CosFaceLoss(ProxySoftmaxLoss):
    """CosFace (Wang et al., CVPR 2018): cross-entropy over ``s (cos(x, w_c) - m [c = y])`` with
    one learnable proxy ``w_c`` per class (defaults from the paper and pytorch-metric-learning:
    ``margin=0.35``, ``scale=64``)."""

    name = "cosface"
    search_grid = ("margin", (0.35, 0.2, 0.5))

    def __init__(
        self, num_classes: int, embedding_dim: int, margin: float = 0.35, scale: float = 64.0
    ) -> None:
        super().__init__(num_classes, embedding_dim)
        check_cosface_options(margin, scale)
        self.margin = margin
        self.scale = scale

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return cosface_loss(embeddings, labels, self.proxies, margin=self.margin, scale=self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, scale={self.scale}"
