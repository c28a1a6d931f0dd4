"""``NormSoftmaxLoss``: the module over :func:`mbdl.functional.normsoftmax.normsoftmax_loss`,
and ``ProxySoftmaxLoss``, the unregistered base of the softmax-over-proxies losses (NormSoftmax,
CosFace, ArcFace)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mbdl.functional.normsoftmax import check_normsoftmax_options, normsoftmax_loss
from mbdl.losses.base import MetricLoss


class ProxySoftmaxLoss(MetricLoss):
    """A softmax over one learnable proxy (class weight) per class: holds ``proxies``
    (``num_classes x embedding_dim``, Kaiming-normal initialised with ``fan_out`` like
    :class:`~mbdl.losses.proxyanchor.ProxyAnchorLoss`). The proxies are the anchors' targets, so
    a reference set is refused with a ``ValueError``; labels must be in ``[0, num_classes)``.
    Subclasses implement :meth:`proxy_loss`.
    """

    needs = ("num_classes", "embedding_dim")
    accepts_ref = False

    def __init__(self, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1; got {num_classes!r}")
        if not (isinstance(embedding_dim, int) and embedding_dim >= 2):
            raise ValueError(f"embedding_dim must be an integer >= 2; got {embedding_dim!r}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
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
                f"{type(self).__name__} takes no reference set (ref_emb/anchor_offset): "
                "it classifies against its class proxies"
            )
        return self.proxy_loss(embeddings, labels)

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``embeddings`` against :attr:`proxies`."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"


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
