"""``ProxyAnchorLoss``: the module over :func:`mbdl.functional.proxyanchor.proxy_anchor_loss`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mbdl.functional.proxyanchor import check_proxyanchor_options, proxy_anchor_loss
from mbdl.losses.base import MetricLoss


class ProxyAnchorLoss(MetricLoss):
    """Proxy-anchor loss (Kim et al., CVPR 2020) with one learnable proxy per class
    (``proxies``: ``num_classes x embedding_dim``, Kaiming-normal initialised with ``fan_out`` as
    in the authors' code). The proxies are the anchors, so a reference set is refused with a
    ``ValueError``; labels must be in ``[0, num_classes)``.
    """

    name = "proxyanchor"
    needs = ("num_classes", "embedding_dim")
    accepts_ref = False
    search_grid = ("margin", (0.1, 0.05, 0.2))

    def __init__(
        self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0
    ) -> None:
        super().__init__()
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1; got {num_classes!r}")
        if not (isinstance(embedding_dim, int) and embedding_dim >= 2):
            raise ValueError(f"embedding_dim must be an integer >= 2; got {embedding_dim!r}")
        check_proxyanchor_options(margin, alpha)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.margin = margin
        self.alpha = alpha
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        anchor_offset: int | None,
    ) -> Tensor:
        if ref_emb is not None or anchor_offset is not None:
            raise ValueError(
                "ProxyAnchorLoss takes no reference set (ref_emb/anchor_offset): "
                "its anchors are the class proxies"
            )
        return proxy_anchor_loss(
            embeddings, labels, self.proxies, margin=self.margin, alpha=self.alpha
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"margin={self.margin}, alpha={self.alpha}"
        )
