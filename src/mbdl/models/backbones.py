"""Backbones: torchvision image networks with their classifier removed, and the small CNN.

Every backbone maps ``images[B, C, H, W]`` to pooled features ``[B, feature_dim]``.
Pretrained weights are a torchvision weight name (``"DEFAULT"``, ``"IMAGENET1K_V1"``; fetched
through ``torch.hub`` into its cache) or a local ``state_dict`` file with the torchvision model's
keys (loaded with ``torch.load(weights_only=True)``; strict, except that the classifier's keys,
and GoogLeNet's auxiliary classifiers, are ignored). With ``in_channels != 3`` the first
convolution is replaced; when weights were loaded, a grey input's filters are the sum of the RGB
filters (the usual way to keep a pretrained network's response to grey images).
"""

from __future__ import annotations

import os
import re
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torchvision
from torch import Tensor, nn

from mbdl.errors import UserError
from mbdl.models.smallcnn import SMALL_CNNS, SmallCNN

TORCHVISION_BACKBONES = ("resnet18", "resnet50", "googlenet", "mobilenet_v2", "efficientnet_b0")
BACKBONES = (*SMALL_CNNS, *TORCHVISION_BACKBONES)

#: state_dict key prefixes that belong to the removed classifier (not loaded)
CLASSIFIER_PREFIXES = {
    "resnet18": ("fc.",),
    "resnet50": ("fc.",),
    "googlenet": ("fc.", "aux1.", "aux2."),
    "mobilenet_v2": ("classifier.",),
    "efficientnet_b0": ("classifier.",),
    **{name: () for name in SMALL_CNNS},
}

#: the input side each backbone was designed for: the largest size an automatic choice picks
NATIVE_INPUT_SIZES = {name: 32 for name in SMALL_CNNS} | {
    name: 224 for name in TORCHVISION_BACKBONES
}

_WEIGHT_NAME = re.compile(r"^(?:[A-Za-z0-9_]+_Weights\.)?(?P<name>[A-Z][A-Z0-9_]*)$")


class PretrainedWeightsError(UserError):
    """Pretrained weights that cannot be found, fetched or loaded."""


def is_weight_name(pretrained: str) -> bool:
    """Whether ``pretrained`` is a torchvision weight name (not an existing file)."""
    return _WEIGHT_NAME.match(pretrained) is not None and not Path(pretrained).exists()


def resolve_weights(backbone: str, name: str) -> Any:
    """The torchvision ``WeightsEnum`` member ``name`` (e.g. ``"DEFAULT"``) of ``backbone``."""
    match = _WEIGHT_NAME.match(name)
    enum = torchvision.models.get_model_weights(backbone)
    available = list(enum.__members__)
    if match is None or match["name"] not in available:
        raise PretrainedWeightsError(
            f"unknown pretrained weights {name!r} for {backbone}; available: {', '.join(available)} "
            "or a local .pth file"
        )
    return enum[match["name"]]


def download_state_dict(url: str) -> Mapping[str, Tensor]:
    """Fetch a torchvision checkpoint through ``torch.hub`` (cached under ``TORCH_HOME``)."""
    return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)


def hub_state_dict(backbone: str, name: str) -> Mapping[str, Tensor]:
    """The state_dict of torchvision's weights ``name`` for ``backbone``, or one clear error."""
    weights = resolve_weights(backbone, name)
    try:
        return download_state_dict(weights.url)
    except (urllib.error.URLError, OSError, RuntimeError, ValueError) as error:
        reason = getattr(error, "reason", None) or (str(error).splitlines() or [repr(error)])[0]
        raise PretrainedWeightsError(
            f"cannot download pretrained weights {backbone} {weights} from {weights.url} ({reason}); "
            f"download that file elsewhere and pass its local path as pretrained=PATH "
            f"(model.pretrained=PATH), or place it in {torch.hub.get_dir()}/checkpoints"
        ) from None


def file_state_dict(path: str | os.PathLike[str]) -> Mapping[str, Tensor]:
    """A ``state_dict`` from a local file (also accepted: ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrappers and a DataParallel ``module.`` prefix)."""
    file = Path(os.path.expanduser(str(path)))
    if not file.is_file():
        raise PretrainedWeightsError(f"pretrained weights file not found: {file}")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise PretrainedWeightsError(f"cannot load pretrained weights {file}: {error}") from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise PretrainedWeightsError(f"{file} does not hold a state_dict of tensors")
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    return loaded


def load_backbone_weights(
    model: nn.Module, backbone: str, state: Mapping[str, Tensor], source: str
) -> None:
    """Load ``state`` into ``model`` strictly, ignoring the classifier's keys."""
    prefixes = CLASSIFIER_PREFIXES[backbone]
    kept = {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}
    own = model.state_dict()
    missing = [k for k in own if k not in kept]
    unexpected = [k for k in kept if k not in own]
    wrong_shape = [k for k in kept if k in own and own[k].shape != kept[k].shape]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong_shape:
            key = wrong_shape[0]
            problems.append(
                f"shape mismatch for {key}: {tuple(kept[key].shape)} vs {tuple(own[key].shape)}"
            )
        fits = [name for name in backbones_fitting(state) if name != backbone]
        hint = f"; they fit {', '.join(fits)}: set model.backbone={fits[0]}" if fits else ""
        raise PretrainedWeightsError(
            f"weights {source} do not fit {backbone}: {'; '.join(problems)}{hint}"
        )
    model.load_state_dict(kept, strict=True)


def backbones_fitting(state: Mapping[str, Tensor]) -> list[str]:
    """The backbones of :data:`BACKBONES` whose parameters ``state`` holds exactly (same keys and
    shapes, classifier keys ignored); the networks are built on the meta device (no memory)."""
    fitting = []
    for name in BACKBONES:
        prefixes = CLASSIFIER_PREFIXES[name]
        kept = {
            k: tuple(v.shape) for k, v in state.items() if not (prefixes and k.startswith(prefixes))
        }
        candidates: list[nn.Module]
        with torch.device("meta"):
            if name in SMALL_CNNS:
                widths, pool_after = SMALL_CNNS[name]
                candidates = [SmallCNN(c, widths=widths, pool_after=pool_after) for c in (1, 3)]
            else:
                options = (
                    {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
                )
                candidates = [torchvision.models.get_model(name, weights=None, **options)]
        for model in candidates:
            own = {
                k: tuple(v.shape)
                for k, v in model.state_dict().items()
                if not (prefixes and k.startswith(prefixes))
            }
            if own == kept:
                fitting.append(name)
                break
    return fitting


def _first_conv_slot(model: nn.Module, backbone: str) -> tuple[nn.Module, str]:
    """The module holding the first convolution and its attribute name there."""
    if backbone.startswith("resnet"):
        return model, "conv1"
    if backbone == "googlenet":
        return cast(nn.Module, model.conv1), "conv"
    return cast(nn.Module, cast(nn.Sequential, model.features)[0]), "0"


def adapt_input_channels(
    model: nn.Module, backbone: str, in_channels: int, pretrained: bool
) -> None:
    """Replace the first convolution for ``in_channels`` inputs (grey from summed RGB filters)."""
    owner, attribute = _first_conv_slot(model, backbone)
    old = cast(nn.Conv2d, getattr(owner, attribute))
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=cast(tuple[int, int], old.kernel_size),
        stride=cast(tuple[int, int], old.stride),
        padding=cast(tuple[int, int], old.padding),
        bias=old.bias is not None,
    )
    if pretrained and in_channels == 1:
        with torch.no_grad():
            new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
            if old.bias is not None and new.bias is not None:
                new.bias.copy_(old.bias)
    setattr(owner, attribute, new)


def build_backbone(
    backbone: str, *, pretrained: str | os.PathLike[str] | None = None, in_channels: int = 3
) -> tuple[nn.Module, int]:
    """``(module, feature_dim)`` for ``backbone`` with its classifier removed."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    state: Mapping[str, Tensor] | None = None
    source = ""
    if pretrained is not None:
        text = str(pretrained)
        if isinstance(pretrained, str) and is_weight_name(text):
            if backbone in SMALL_CNNS:
                raise PretrainedWeightsError(
                    f"{backbone} has no torchvision weights ({text!r}); give a local .pth file"
                )
            state, source = hub_state_dict(backbone, text), f"{backbone} {text}"
        else:
            state, source = file_state_dict(text), text
    if backbone in SMALL_CNNS:
        widths, pool_after = SMALL_CNNS[backbone]
        small = SmallCNN(in_channels=in_channels, widths=widths, pool_after=pool_after)
        if state is not None:
            load_backbone_weights(small, backbone, state, source)
        return small, small.feature_dim
    options: dict[str, Any] = {}
    if backbone == "googlenet":
        # torchvision's ImageNet GoogLeNet weights expect its input re-normalisation
        options = {"aux_logits": False, "init_weights": True, "transform_input": state is not None}
    model = torchvision.models.get_model(backbone, weights=None, **options)
    if backbone in ("resnet18", "resnet50", "googlenet"):
        feature_dim = model.fc.in_features
        model.fc = nn.Identity()
    else:
        feature_dim = model.classifier[-1].in_features
        model.classifier = nn.Identity()
    if state is not None:
        load_backbone_weights(model, backbone, state, source)
    if in_channels != 3:
        if backbone == "googlenet":
            model.transform_input = False
        adapt_input_channels(model, backbone, in_channels, pretrained=state is not None)
    return model, int(feature_dim)
