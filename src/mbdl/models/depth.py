"""How deep each backbone parameter sits: the blocks of timm, torchvision and Hugging Face
networks, for layer-wise learning-rate decay (``train.layer_decay``) and freezing the first
blocks (``model.freeze_blocks``).

A parameter's block is read from its name: the first ``blocks.<i>.`` (timm ViT, EfficientNet,
MobileNet), ``stages.<i>.`` (timm ConvNeXt, ResNet-like ``stages``), ``layers.<i>.`` or
``layer.<i>.`` (Swin, Hugging Face ``encoder.layer``), ``features.<i>.`` (torchvision
MobileNet, EfficientNet, ConvNeXt) gives depth ``i + 1``; torchvision and timm ResNets'
``layer<i>.`` gives depth ``i``. What comes before the first block (stem, patch and position
embeddings, class token) has depth 0, what comes after the last (final norm) depth ``L + 1``,
``L`` the deepest block.
"""

from __future__ import annotations

import re

from torch import nn

from mbdl.errors import UserError

_INDEXED = re.compile(r"(?:^|\.)(?:blocks|stages|layers|layer|features)\.(\d+)\.")
_RESNET = re.compile(r"(?:^|\.)layer(\d+)\.")


def parameter_depths(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """``({parameter name: depth}, L)``: each parameter's depth (0 = stem, ``L + 1`` = after
    the last block) and the deepest block ``L`` (0 when no block is found)."""
    names = [name for name, _ in backbone.named_parameters()]
    block: dict[str, int | None] = {}
    for name in names:
        indexed = _INDEXED.search(name)
        resnet = _RESNET.search(name) if indexed is None else None
        if indexed is not None:
            block[name] = int(indexed.group(1)) + 1
        elif resnet is not None:
            block[name] = int(resnet.group(1))
        else:
            block[name] = None
    found = [d for d in block.values() if d is not None]
    deepest = max(found, default=0)
    depths: dict[str, int] = {}
    seen_block = False
    for name in names:
        depth = block[name]
        if depth is not None:
            seen_block = True
            depths[name] = depth
        else:
            depths[name] = deepest + 1 if seen_block else 0
    return depths, deepest


def layer_scales(backbone: nn.Module, decay: float) -> dict[str, float]:
    """``{parameter name: decay ** (L + 1 - depth)}``: the learning-rate factor of each
    parameter under layer-wise decay (BEiT's rule; the last blocks learn fastest)."""
    depths, deepest = parameter_depths(backbone)
    return {name: decay ** (deepest + 1 - depth) for name, depth in depths.items()}


def _keep_eval(module: nn.Module, _: object) -> None:
    module.eval()  # a frozen block's BatchNorm: running statistics fixed in training too


def freeze_blocks(backbone: nn.Module, count: int) -> list[str]:
    """Freeze the stem and the first ``count`` blocks of ``backbone`` (depth <= ``count``): no
    gradients, and their normalisation layers keep their running statistics; returns the
    frozen parameter names. ``count`` beyond the deepest block is refused (UserError)."""
    if count <= 0:
        return []
    depths, deepest = parameter_depths(backbone)
    if deepest == 0:
        raise UserError(
            f"model.freeze_blocks={count}: no blocks found in {type(backbone).__name__} "
            "(looked for blocks.N, stages.N, layers.N, layer.N, features.N, layerN)"
        )
    if count > deepest:
        raise UserError(f"model.freeze_blocks={count} exceeds the backbone's {deepest} blocks")
    frozen = [name for name, depth in depths.items() if depth <= count]
    frozen_set = set(frozen)
    for name, parameter in backbone.named_parameters():
        if name in frozen_set:
            parameter.requires_grad_(False)
    for module_name, module in backbone.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{module_name}."
            if any(name.startswith(prefix) for name in frozen_set):
                module.register_forward_pre_hook(_keep_eval)
    return frozen
