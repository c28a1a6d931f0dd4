"""The embedding model: backbone -> linear head (optional BatchNorm) -> L2 normalisation."""

from __future__ import annotations

import os
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mbdl.models.backbones import build_backbone


class EmbeddingModel(nn.Module):
    """``images -> normalize(head(backbone(images)))``.

    ``backbone`` and ``head`` are separate attributes so a trainer can give them their own
    learning rates. With ``freeze_bn`` every BatchNorm layer of the backbone stays in eval mode
    (running statistics fixed) and its affine parameters are frozen, whatever ``train()`` says.
    ``build_args`` holds the arguments that rebuild the architecture (without ``pretrained``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        embedding_dim: int,
        *,
        head_bn: bool = False,
        normalize: bool = True,
        freeze_bn: bool = False,
        in_channels: int = 3,
        build_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim < 2:
            raise ValueError(f"embedding_dim must be >= 2, got {embedding_dim}")
        self.backbone = backbone
        layers: list[nn.Module] = [nn.Linear(feature_dim, embedding_dim)]
        if head_bn:
            layers.append(nn.BatchNorm1d(embedding_dim))
        self.head = nn.Sequential(*layers)
        self.feature_dim = feature_dim
        self.embedding_dim = embedding_dim
        self.in_channels = in_channels
        self.normalize = normalize
        self.freeze_bn = freeze_bn
        self.build_args = dict(build_args or {})
        if freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    for parameter in module.parameters():
                        parameter.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        embeddings = self.head(self.backbone(images))
        if not self.normalize:
            return embeddings
        # in fp32 also under bf16/fp16 autocast: unit norm to float32 precision
        return F.normalize(embeddings.float(), p=2, dim=1)


def build_model(
    backbone: str,
    embedding_dim: int,
    *,
    pretrained: str | os.PathLike[str] | None = None,
    in_channels: int = 3,
    freeze_bn: bool = False,
    head_bn: bool = False,
    normalize: bool = True,
) -> EmbeddingModel:
    """An :class:`EmbeddingModel` on ``backbone`` (one of :data:`mbdl.models.BACKBONES`).

    ``pretrained``: ``None``, a torchvision weight name (``"DEFAULT"``, ``"IMAGENET1K_V1"``) or a
    local state_dict file of the torchvision model (classifier keys ignored).
    """
    module, feature_dim = build_backbone(backbone, pretrained=pretrained, in_channels=in_channels)
    args = {
        "backbone": backbone,
        "embedding_dim": embedding_dim,
        "in_channels": in_channels,
        "freeze_bn": freeze_bn,
        "head_bn": head_bn,
        "normalize": normalize,
    }
    return EmbeddingModel(
        module,
        feature_dim,
        embedding_dim,
        head_bn=head_bn,
        normalize=normalize,
        freeze_bn=freeze_bn,
        in_channels=in_channels,
        build_args=args,
    )
