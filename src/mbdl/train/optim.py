"""The optimiser (parameter groups for the backbone, the head and the loss) and its per-step
learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mbdl.config import Config
from mbdl.models.depth import layer_scales
from mbdl.train.schedule import warmup_cosine_schedule


def build_optimizer(config: Config, model: nn.Module, loss: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD with parameter groups: backbone (``lr``; with ``train.layer_decay`` one
    group per depth, ``lr * layer_decay ** (L + 1 - depth)``, :mod:`mbdl.models.depth`), head
    (``lr * head_lr_mult``), each with and without weight decay (biases and 1-D parameters get
    none), loss parameters (``loss_lr``, no weight decay)."""
    train = config.train
    groups: list[dict[str, Any]] = []

    def add(name: str, params: list[nn.Parameter], lr: float, decay: float) -> None:
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "weight_decay": decay, "name": name})

    head = getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    body = [p for p in model.parameters() if id(p) not in head_ids]
    head_params = [p for p in model.parameters() if id(p) in head_ids]
    head_lr = train.lr * train.head_lr_mult
    backbone = getattr(model, "backbone", None)
    if train.layer_decay is not None and isinstance(backbone, nn.Module):
        # one pair of groups per depth, lr x layer_decay ** (L + 1 - depth)
        scales = layer_scales(backbone, train.layer_decay)
        named = dict(backbone.named_parameters())
        by_scale: dict[float, list[nn.Parameter]] = {}
        for name, scale in scales.items():
            by_scale.setdefault(scale, []).append(named[name])
        body_ids = {id(p) for p in body}
        for scale, params in sorted(by_scale.items()):
            params = [p for p in params if id(p) in body_ids]
            lr = train.lr * scale
            add(f"backbone_x{scale:.4g}", [p for p in params if p.ndim > 1], lr, train.weight_decay)
            add(f"backbone_no_decay_x{scale:.4g}", [p for p in params if p.ndim <= 1], lr, 0.0)
        grouped = {id(p) for p in named.values()}
        body = [p for p in body if id(p) not in grouped]  # outside the backbone: no decay
    add("backbone", [p for p in body if p.ndim > 1], train.lr, train.weight_decay)
    add("backbone_no_decay", [p for p in body if p.ndim <= 1], train.lr, 0.0)
    add("head", [p for p in head_params if p.ndim > 1], head_lr, train.weight_decay)
    add("head_no_decay", [p for p in head_params if p.ndim <= 1], head_lr, 0.0)
    add(
        "loss",
        list(loss.parameters()),
        train.loss_lr if train.loss_lr is not None else train.lr,
        0.0,
    )
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    return torch.optim.AdamW(groups, lr=train.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Config, steps_per_epoch: int
) -> LambdaLR:
    """Linear warm-up over ``train.warmup_epochs``, then cosine decay to zero at the end of
    ``train.epochs``, stepped after every optimiser step (:mod:`mbdl.train.schedule`)."""
    total_steps = steps_per_epoch * config.train.epochs
    warmup_steps = min(total_steps, round(config.train.warmup_epochs * steps_per_epoch))
    return warmup_cosine_schedule(optimizer, warmup_steps, total_steps)


__all__ = ["build_optimizer", "build_scheduler"]
