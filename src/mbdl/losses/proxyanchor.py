"""``ProxyAnchorLoss``: the module over :func:`mbdl.functional.proxyanchor.proxy_anchor_loss`."""

from __future__ import annotations

from torch import Tensor

from mbdl.functional.proxyanchor import check_proxyanchor_options, proxy_anchor_loss
from mbdl.losses.base import ProxyLoss


class ProxyAnchorLoss(ProxyLoss):
    """Proxy-anchor loss (Kim et al., CVPR 2020) with one learnable proxy per class
    (:class:`~mbdl.losses.base.ProxyLoss`: ``proxies``, ``num_classes x embedding_dim``,
    Kaiming-normal initialised with ``fan_out`` as in the authors' code). The proxies are the
    anchors, so a reference set is refused with a ``ValueError``; labels must be in
    ``[0, num_classes)``.
    """

    name = "proxyanchor"
    search_grid = ("margin", (0.1, 0.05, 0.2))

    def __init__(
        self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0
    ) -> None:
        super().__init__(num_classes, embedding_dim)
        check_proxyanchor_options(margin, alpha)
        self.margin = margin
        self.alpha = alpha

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return proxy_anchor_loss(
            embeddings, labels, self.proxies, margin=self.margin, alpha=self.alpha
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, alpha={self.alpha}"
