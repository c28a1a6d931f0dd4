"""Models: a backbone (torchvision, timm, a small CNN or a plugin) -> embedding head -> L2 normalisation."""

from __future__ import annotations

from mbdl.models.backbones import (
    BACKBONES,
    BUILTIN_BACKBONES,
    NATIVE_INPUT_SIZES,
    Backbone,
    PretrainedWeightsError,
    build_backbone,
    native_input_size,
)
from mbdl.models.embedding import EmbeddingModel, build_model
from mbdl.models.smallcnn import SmallCNN

__all__ = [
    "BACKBONES",
    "BUILTIN_BACKBONES",
    "NATIVE_INPUT_SIZES",
    "Backbone",
    "EmbeddingModel",
    "PretrainedWeightsError",
    "SmallCNN",
    "build_backbone",
    "build_model",
    "native_input_size",
]
