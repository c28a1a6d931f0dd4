"""Layer-wise learning-rate decay (``train.layer_decay``) and freezing the first blocks
(``model.freeze_blocks``) on timm, torchvision and Hugging Face style backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mbdl.config import ConfigError, load_config
from mbdl.models import build_model
from mbdl.models.depth import freeze_blocks, parameter_depths
from mbdl.train.optim import build_optimizer


def _group_lr(optimizer: torch.optim.Optimizer, parameter: torch.nn.Parameter) -> float:
    for group in optimizer.param_groups:
        if any(p is parameter for p in group["params"]):
            return float(group["lr"])
    raise AssertionError("parameter in no group")


def test_resnet_depths_and_learning_rates() -> None:
    model = build_model("resnet18", 8)
    depths, deepest = parameter_depths(model.backbone)
    assert deepest == 4
    assert depths["conv1.weight"] == 0 and depths["layer1.0.conv1.weight"] == 1
    assert depths["layer4.1.bn2.bias"] == 4
    config = load_config(None, ["train.lr=0.1", "train.layer_decay=0.5", "train.head_lr_mult=2"])
    optimizer = build_optimizer(config, model, torch.nn.Identity())
    named = dict(model.backbone.named_parameters())
    # lr x 0.5 ** (L + 1 - depth), L = 4
    assert _group_lr(optimizer, named["conv1.weight"]) == pytest.approx(0.1 * 0.5**5)
    assert _group_lr(optimizer, named["layer1.0.conv1.weight"]) == pytest.approx(0.1 * 0.5**4)
    assert _group_lr(optimizer, named["layer4.0.conv1.weight"]) == pytest.approx(0.1 * 0.5)
    assert _group_lr(optimizer, model.head[0].weight) == pytest.approx(0.2)  # head untouched
    groups = {p for g in optimizer.param_groups for p in g["params"]}
    assert len(groups) == len(list(model.parameters()))  # every parameter exactly once
    off = build_optimizer(load_config(None, ["train.lr=0.1"]), model, torch.nn.Identity())
    assert _group_lr(off, named["conv1.weight"]) == pytest.approx(0.1)


def test_timm_vit_blocks_and_final_norm() -> None:
    pytest.importorskip("timm")
    model = build_model("timm/test_vit", 8)
    depths, deepest = parameter_depths(model.backbone)
    assert depths["cls_token"] == 0 and depths["patch_embed.proj.weight"] == 0
    assert depths["blocks.0.attn.qkv.weight"] == 1
    assert depths["norm.weight"] == deepest + 1
    config = load_config(None, ["train.lr=1.0", "train.layer_decay=0.75"])
    optimizer = build_optimizer(config, model, torch.nn.Identity())
    named = dict(model.backbone.named_parameters())
    assert _group_lr(optimizer, named["norm.weight"]) == pytest.approx(1.0)
    assert _group_lr(optimizer, named["blocks.0.attn.qkv.weight"]) == pytest.approx(0.75**deepest)


def test_freeze_blocks_keeps_them_unchanged_after_a_step() -> None:
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 8)
    frozen = set(freeze_blocks(model.backbone, 3))
    assert "features.0.0.weight" in frozen and "features.2.conv.0.0.weight" in frozen
    assert "features.3.conv.0.0.weight" not in frozen
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = build_optimizer(load_config(None, ["train.lr=0.1"]), model, torch.nn.Identity())
    model.train()
    images = torch.rand(4, 3, 32, 32)
    loss = model(images).pow(2).sum() + model.backbone(images).mean()
    loss.backward()
    optimizer.step()
    after = model.backbone.state_dict()
    for name, parameter in model.backbone.named_parameters():
        if name in frozen:
            assert parameter.grad is None, name
    for key in before:
        block = key.split(".")[1] if key.startswith("features.") else ""
        if block.isdigit() and int(block) < 3 and "num_batches" not in key:
            torch.testing.assert_close(after[key], before[key], msg=key)  # weights and BN stats
    assert not torch.equal(
        after["features.3.conv.0.0.weight"], before["features.3.conv.0.0.weight"]
    )


def test_freeze_blocks_refusals(tmp_path: Path) -> None:
    from mbdl.errors import UserError

    with pytest.raises(UserError, match="exceeds the backbone's 4 blocks"):
        freeze_blocks(build_model("resnet18", 8).backbone, 5)
    with pytest.raises(UserError, match="no blocks found"):
        freeze_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1)
    with pytest.raises(ConfigError, match=r"train\.layer_decay must be <= 1"):
        load_config(None, ["train.layer_decay=1.5"])
