"""``NormSoftmaxLoss``: the module over :func:`mbdl.functional.normsoftmax.normsoftmax_loss`,
and ``ProxySoftmaxLoss``, the unregistered base of the softmax-over-proxies losses (NormSoftmax,
CosFace, ArcFace)."""

from __future__ import annotations

from torch import Tensor

from mbdl.functional.normsoftmax import check_normsoftmax_options, normsoftmax_loss
from mbdl.losses.base import ProxyLoss


class ProxySoftmaxLoss(ProxyLoss):
    """A softmax over one learnable proxy (class weight) per class (:class:`ProxyLoss`): the
    proxies are the anchors' targets. Subclasses implement :meth:`proxy_loss`."""

    reference_refusal = "it classifies against its class proxies"


class NormSoftmaxLoss(ProxySoftmaxLoss):
    """NormSoftmax (Zhai & Wu, BMVC 2019): cross-entropy over ``cos(x, w_c) / temperature`` with
    one learnable proxy ``w_c`` per class (defaults from the paper: ``temperature=0.05``)."""

    name = "normsoftmax"
    search_grid = ("temperature", (0.05, 0.1, 0.025))

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05) -> None:
        super().__init__(num_classes, embedding_dim)
        check_normsoftmax_options(temperature)
        self.temperature = temperature

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return normsoftmax_loss(embeddings, labels, self.proxies, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"
