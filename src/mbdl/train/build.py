"""What the trainer builds from the config when the caller does not pass it in: the model (and
the arguments that rebuild it from a checkpoint), the loss given what it ``needs``, and the
cross-batch memory around it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from mbdl.config import Config
from mbdl.losses.xbm import CrossBatchMemory


def model_args(config: Config, channels: int) -> dict[str, Any]:
    """The :func:`mbdl.models.build_model` arguments of ``config`` (``model_args`` of a checkpoint)."""
    return {
        "backbone": config.model.backbone,
        "embedding_dim": config.model.embedding_dim,
        "in_channels": channels,
        "freeze_bn": config.model.freeze_bn,
        "head_bn": config.model.head_bn,
        "normalize": True,
    }


def build_model_from_config(config: Config, args: dict[str, Any]) -> nn.Module:
    """The embedding model of ``args`` (:func:`model_args`) with ``model.pretrained`` weights,
    or ``model.init``'s trained embedder, its first ``model.freeze_blocks`` blocks frozen."""
    from mbdl.models import build_model
    from mbdl.models.depth import freeze_blocks
    from mbdl.models.warmstart import warm_start

    args = dict(args)
    model = build_model(
        args.pop("backbone"), args.pop("embedding_dim"), pretrained=config.model.pretrained, **args
    )
    if config.model.init is not None:  # a trained embedder's backbone and head
        warm_start(model, config.model.init)
    freeze_blocks(model.backbone, config.model.freeze_blocks)
    return model


def build_loss_from_config(config: Config, train_labels: np.ndarray) -> nn.Module:
    """``loss.name`` with ``loss.params`` and what it ``needs`` (number of training classes,
    embedding size)."""
    from mbdl.losses import build_loss, loss_class

    extra: dict[str, Any] = {}
    needs = getattr(loss_class(config.loss.name), "needs", ())
    if "num_classes" in needs:
        extra["num_classes"] = len(np.unique(train_labels))
    if "embedding_dim" in needs:
        extra["embedding_dim"] = config.model.embedding_dim
    return build_loss(config.loss.name, **config.loss.params, **extra)


def cross_batch_memory(config: Config, loss: nn.Module) -> CrossBatchMemory | None:
    """The cross-batch memory around ``loss`` when ``train.xbm_size > 0``."""
    if config.train.xbm_size == 0:
        return None
    return CrossBatchMemory(
        loss, config.train.xbm_size, config.model.embedding_dim, config.train.xbm_warmup_steps
    )


def memory_format_of(config: Config, model: nn.Module) -> torch.memory_format:
    """Channels-last for a convolutional model when ``train.channels_last`` (faster
    convolutions), else the default format."""
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if config.train.channels_last and convolutional:
        return torch.channels_last
    return torch.contiguous_format


__all__ = [
    "build_loss_from_config",
    "build_model_from_config",
    "cross_batch_memory",
    "memory_format_of",
    "model_args",
]
