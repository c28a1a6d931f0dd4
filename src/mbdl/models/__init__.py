"""Models: a backbone (torchvision or a small CNN) -> embedding head -> L2 normalisation."""

from __future__ import annotations

from mbdl.models.backbones import (
    BACKBONES,
    NATIVE_INPUT_SIZES,
    PretrainedWeightsError,
    build_backbone,
)
from mbdl.models.embedding import EmbeddingModel, build_model
from mbdl.models.smallcnn import SmallCNN

__all__ = [
    "BACKBONES",
    "NATIVE_INPUT_SIZES",
    "EmbeddingModel",
    "PretrainedWeightsError",
    "SmallCNN",
    "build_backbone",
    "build_model",
]
