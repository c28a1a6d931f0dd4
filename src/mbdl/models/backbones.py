"""Backbones, declared once: the :data:`BACKBONES` registry behind ``model.backbone``.

Every backbone maps ``images[B, C, H, W]`` to pooled features ``[B, feature_dim]``. The built-in
architectures are one table (:data:`BUILTIN_BACKBONES`): per architecture how to build it,
which layer is its classifier (replaced by ``nn.Identity``; what comes before it stays, e.g.
ConvNeXt's LayerNorm), where its first convolution is (rebuilt for ``in_channels != 3``; when
weights were loaded, a grey input's filters are the sum of the RGB filters, the usual way to keep
a pretrained network's response to grey images) and its native input size. Besides the table,
``model.backbone`` takes ``timm/<name>`` (any timm model, ``pip install 'mbdl[timm]'``), the name
an installed package declares in the entry-point group ``mbdl.backbones`` and an import path
``package.module:build`` of a function ``build(pretrained, in_channels) -> (nn.Module,
feature_dim)``, whose output is checked on a small input.

Pretrained weights of a built-in torchvision backbone are a torchvision weight name
(``"DEFAULT"``, ``"IMAGENET1K_V1"``; fetched through ``torch.hub`` into its cache) or a local
``state_dict`` file with the torchvision model's keys (loaded with
``torch.load(weights_only=True)``; strict, except that the classifier's keys, and GoogLeNet's
auxiliary classifiers, are ignored).
"""

from __future__ import annotations

import inspect
import os
import re
import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torchvision
from torch import Tensor, nn

from mbdl.errors import UserError
from mbdl.models.smallcnn import SMALL_CNNS, SmallCNN
from mbdl.plugins import PluginError, Registry


@dataclass(frozen=True)
class Backbone:
    """One architecture as a feature extractor ``images[B, C, H, W] -> features[B, feature_dim]``.

    Attributes:
        network: ``(in_channels, pretrained) -> nn.Module``, the whole network with random
            weights (``pretrained`` says whether weights will be loaded into it).
        native_size: the input side it was designed for (the largest an automatic choice picks).
        head: dotted path of the classifier layer that is replaced by ``nn.Identity`` (the
            feature size is its ``in_features``); what comes before it stays, e.g. torchvision
            ConvNeXt's LayerNorm (``classifier.0``). None: the network ends in features.
        first_conv: dotted path of the first convolution, rebuilt for ``in_channels != 3``
            (None: ``network`` builds its input layer for ``in_channels`` itself).
        ignore: further state_dict key prefixes a weights file may hold that are not loaded
            (GoogLeNet's auxiliary classifiers).
        hub_weights: ``pretrained`` may be a torchvision weight name of this architecture.
    """

    network: Callable[[int, bool], nn.Module]
    native_size: int = 224
    head: str | None = None
    first_conv: str | None = None
    ignore: tuple[str, ...] = ()
    hub_weights: bool = False

    def classifier_prefixes(self) -> tuple[str, ...]:
        """The state_dict key prefixes of what is removed (never loaded from a weights file)."""
        return ((self.head + ".",) if self.head else ()) + self.ignore

    def input_channels(self) -> tuple[int, ...]:
        """The input channel counts its network is built with (others: first conv rebuilt)."""
        return (3,) if self.first_conv is not None else (1, 3)


def _small_cnn(name: str) -> Callable[[int, bool], nn.Module]:
    widths, pool_after = SMALL_CNNS[name]
    return lambda in_channels, pretrained: SmallCNN(
        in_channels=in_channels, widths=widths, pool_after=pool_after
    )


def _torchvision(name: str, **options: Any) -> Callable[[int, bool], nn.Module]:
    return lambda in_channels, pretrained: torchvision.models.get_model(
        name, weights=None, **options
    )


def _googlenet(in_channels: int, pretrained: bool) -> nn.Module:
    # torchvision's ImageNet GoogLeNet weights expect its input re-normalisation
    return torchvision.models.get_model(
        "googlenet", weights=None, aux_logits=False, init_weights=True, transform_input=pretrained
    )


#: every built-in architecture: how to build it, strip its classifier, adapt its input
BUILTIN_BACKBONES: dict[str, Backbone] = {
    **{name: Backbone(_small_cnn(name), native_size=32) for name in SMALL_CNNS},
    "resnet18": Backbone(_torchvision("resnet18"), head="fc", first_conv="conv1", hub_weights=True),
    "resnet50": Backbone(_torchvision("resnet50"), head="fc", first_conv="conv1", hub_weights=True),
    "googlenet": Backbone(
        _googlenet, head="fc", first_conv="conv1.conv", ignore=("aux1.", "aux2."), hub_weights=True
    ),
    "mobilenet_v2": Backbone(
        _torchvision("mobilenet_v2"),
        head="classifier",
        first_conv="features.0.0",
        hub_weights=True,
    ),
    "efficientnet_b0": Backbone(
        _torchvision("efficientnet_b0"),
        head="classifier",
        first_conv="features.0.0",
        hub_weights=True,
    ),
    "convnext_tiny": Backbone(
        _torchvision("convnext_tiny"),
        head="classifier.2",  # keeps classifier.0, the LayerNorm of the pooled features
        first_conv="features.0.0",
        hub_weights=True,
    ),
}

#: the input side each built-in backbone was designed for
NATIVE_INPUT_SIZES = {name: entry.native_size for name, entry in BUILTIN_BACKBONES.items()}

#: the prefix of ``model.backbone`` values built by timm (``timm/resnet18``)
TIMM_PREFIX = "timm/"

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
    prefixes = BUILTIN_BACKBONES[backbone].classifier_prefixes()
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
    """The built-in backbones whose parameters ``state`` holds exactly (same keys and shapes,
    classifier keys ignored); the networks are built on the meta device (no memory)."""
    fitting = []
    for name, entry in BUILTIN_BACKBONES.items():
        prefixes = entry.classifier_prefixes()
        kept = {
            k: tuple(v.shape) for k, v in state.items() if not (prefixes and k.startswith(prefixes))
        }
        for channels in entry.input_channels():
            with torch.device("meta"):
                model = entry.network(channels, False)
            own = {
                k: tuple(v.shape)
                for k, v in model.state_dict().items()
                if not (prefixes and k.startswith(prefixes))
            }
            if own == kept:
                fitting.append(name)
                break
    return fitting


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted ``path`` of ``model``; returns the module it replaced."""
    owner_path, _, attribute = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    old = model.get_submodule(path)
    setattr(owner, attribute, new)
    return old


def _in_features(module: nn.Module, where: str) -> int:
    """The input size of a classifier: its (last) ``nn.Linear``'s ``in_features``."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{where} holds no nn.Linear to take the feature size from")
    return int(linears[-1].in_features)


def adapt_input_channels(
    model: nn.Module, first_conv: str, in_channels: int, pretrained: bool
) -> None:
    """Replace the convolution at the dotted path ``first_conv`` for ``in_channels`` inputs (grey
    from summed RGB filters when weights were loaded)."""
    old = cast(nn.Conv2d, model.get_submodule(first_conv))
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
    _replace_module(model, first_conv, new)
    if getattr(model, "transform_input", False):  # GoogLeNet's RGB re-normalisation: 3 channels
        model.transform_input = False  # type: ignore[assignment]


def _weights(
    backbone: str, entry: Backbone, pretrained: str | os.PathLike[str] | None
) -> tuple[Mapping[str, Tensor] | None, str]:
    """The state_dict ``pretrained`` names (a torchvision weight name or a file) and its name."""
    if pretrained is None:
        return None, ""
    text = str(pretrained)
    if isinstance(pretrained, str) and is_weight_name(text):
        if not entry.hub_weights:
            raise PretrainedWeightsError(
                f"{backbone} has no torchvision weights ({text!r}); give a local .pth file"
            )
        return hub_state_dict(backbone, text), f"{backbone} {text}"
    return file_state_dict(text), text


def build_declared(
    backbone: str,
    entry: Backbone,
    *,
    pretrained: str | os.PathLike[str] | None = None,
    in_channels: int = 3,
) -> tuple[nn.Module, int]:
    """Build a table entry: network, classifier replaced, weights loaded, input adapted."""
    state, source = _weights(backbone, entry, pretrained)
    adapt = entry.first_conv is not None and in_channels != 3
    model = entry.network(3 if adapt else in_channels, state is not None)
    if entry.head is not None:
        head = _replace_module(model, entry.head, nn.Identity())
        feature_dim = _in_features(head, f"{backbone}.{entry.head}")
    else:
        feature_dim = int(cast(int, model.feature_dim))
    if state is not None:
        load_backbone_weights(model, backbone, state, source)
    if adapt and entry.first_conv is not None:
        adapt_input_channels(model, entry.first_conv, in_channels, pretrained=state is not None)
    return model, feature_dim


def check_features(
    module: object, feature_dim: object, *, in_channels: int, size: int, name: str
) -> tuple[nn.Module, int]:
    """Refuse a plugin's ``(module, feature_dim)`` unless the module maps two ``size`` x ``size``
    images with ``in_channels`` channels to features ``[2, feature_dim]`` (one clear line)."""
    if not isinstance(module, nn.Module):
        raise PluginError(
            f"backbone {name!r} built a {type(module).__name__}, not a torch nn.Module"
        )
    if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim < 1:
        raise PluginError(
            f"backbone {name!r}: feature_dim must be a positive int; got {feature_dim!r}"
        )
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            features = module(torch.zeros(2, in_channels, size, size))
    except Exception as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise PluginError(
            f"backbone {name!r} fails on a [2, {in_channels}, {size}, {size}] input: {first}"
        ) from None
    finally:
        module.train(was_training)
    shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
    if shape != (2, feature_dim):
        raise PluginError(
            f"backbone {name!r} maps a [2, {in_channels}, {size}, {size}] input to {shape}, not "
            f"features [2, {feature_dim}]"
        )
    return module, feature_dim


@dataclass(frozen=True)
class PluginBackbone:
    """A user's builder ``build(pretrained, in_channels) -> (nn.Module, feature_dim)``;
    ``pretrained`` is ``model.pretrained`` as given (None or a string) and is the builder's to
    interpret. An attribute ``build.native_size`` (default 224) gives its native input side."""

    function: Callable[..., tuple[nn.Module, int]]
    native_size: int = 224

    def build(
        self, name: str, pretrained: str | os.PathLike[str] | None, in_channels: int
    ) -> tuple[nn.Module, int]:
        value = None if pretrained is None else str(pretrained)
        try:
            result = self.function(pretrained=value, in_channels=in_channels)
        except (ValueError, TypeError, OSError) as error:
            first = (str(error).splitlines() or [type(error).__name__])[0]
            raise PluginError(f"backbone {name!r} failed to build: {first}") from None
        if not isinstance(result, tuple) or len(result) != 2:
            raise PluginError(
                f"backbone {name!r} returned a {type(result).__name__}, not (nn.Module, feature_dim)"
            )
        return check_features(*result, in_channels=in_channels, size=self.native_size, name=name)


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise PluginError(
            "timm backbones need the timm package: pip install 'mbdl[timm]'"
        ) from None
    return timm


@dataclass(frozen=True)
class TimmBackbone:
    """``timm/<name>``: ``timm.create_model(name, num_classes=0, in_chans=...)`` (timm removes
    the classifier, keeps what comes before it and adapts the first convolution itself).
    ``pretrained`` is a local weights file of that timm model (timm's hub downloads need a
    network)."""

    model: str

    @property
    def native_size(self) -> int:
        config = _timm().models.get_pretrained_cfg(self.model)
        size = getattr(config, "input_size", None) if config is not None else None
        return int(size[-1]) if size else 224

    def build(
        self, name: str, pretrained: str | os.PathLike[str] | None, in_channels: int
    ) -> tuple[nn.Module, int]:
        timm = _timm()
        options: dict[str, Any] = {"num_classes": 0, "in_chans": in_channels}
        if pretrained is not None:
            file = Path(os.path.expanduser(str(pretrained)))
            if not file.is_file():
                raise PretrainedWeightsError(
                    f"{name}: model.pretrained={str(pretrained)!r} is not a local file; timm's "
                    f"hub downloads need a network, so download the weights of {self.model} "
                    "elsewhere (e.g. huggingface.co/timm) and pass model.pretrained=PATH"
                )
            options |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(file)}}
        try:
            module = timm.create_model(self.model, **options)
        except Exception as error:  # torch.load and load_state_dict raise many types
            if pretrained is None:
                raise
            first = (str(error).splitlines() or [type(error).__name__])[0]
            raise PretrainedWeightsError(
                f"cannot load pretrained weights {pretrained} into {name}: {first}"
            ) from None
        return check_features(
            module,
            int(module.num_features),
            in_channels=in_channels,
            size=self.native_size,
            name=name,
        )


def check_backbone(found: object, name: str) -> Backbone | PluginBackbone | TimmBackbone:
    """A registry entry as a buildable declaration: a :class:`Backbone` table entry as it is, a
    builder function wrapped in a :class:`PluginBackbone` (its signature checked)."""
    if isinstance(found, (Backbone, PluginBackbone, TimmBackbone)):
        return found
    if not callable(found):
        raise PluginError(
            f"backbone {name!r} is a {type(found).__name__}, not a function "
            "(pretrained, in_channels) -> (nn.Module, feature_dim) or an mbdl Backbone"
        )
    try:
        inspect.signature(found).bind(pretrained=None, in_channels=3)
    except TypeError as error:
        raise PluginError(
            f"backbone {name!r}: its function {inspect.signature(found)} cannot be called as "
            f"build(pretrained=..., in_channels=...) ({error})"
        ) from None
    except ValueError:
        pass  # no signature to read: checked when it is called
    native = getattr(found, "native_size", 224)
    if not isinstance(native, int) or isinstance(native, bool) or native < 1:
        raise PluginError(f"backbone {name!r}: native_size must be a positive int; got {native!r}")
    return PluginBackbone(found, native)


class BackboneRegistry(Registry[Backbone | PluginBackbone | TimmBackbone]):
    """The :class:`mbdl.plugins.Registry` of backbones, which also builds ``timm/<name>``."""

    def __contains__(self, name: object) -> bool:
        return (isinstance(name, str) and name.startswith(TIMM_PREFIX)) or super().__contains__(
            name
        )

    def get(self, name: str) -> Backbone | PluginBackbone | TimmBackbone:
        if name.startswith(TIMM_PREFIX):
            model = name.removeprefix(TIMM_PREFIX)
            if not _timm().is_model(model):
                raise PluginError(
                    f"unknown timm model {model!r}; timm.list_models() lists its names"
                )
            return TimmBackbone(model)
        return super().get(name)

    def describe_choices(self) -> str:
        return (
            f"{', '.join(self.names())}, timm/<name> (pip install 'mbdl[timm]') or an import "
            "path package.module:build"
        )


def _declared(entry: Backbone) -> Callable[[], Backbone]:
    return lambda: entry


#: every ``model.backbone``: built-in names, ``timm/<name>``, installed plugins (entry-point
#: group ``mbdl.backbones``) and import paths ``package.module:build``
BACKBONES = BackboneRegistry(
    "backbone",
    "mbdl.backbones",
    {name: _declared(entry) for name, entry in BUILTIN_BACKBONES.items()},
    check_backbone,
)


def native_input_size(backbone: str) -> int:
    """The input side ``backbone`` (any :data:`BACKBONES` value) was designed for."""
    if backbone in BUILTIN_BACKBONES:
        return BUILTIN_BACKBONES[backbone].native_size
    return BACKBONES.get(backbone).native_size


def build_backbone(
    backbone: str, *, pretrained: str | os.PathLike[str] | None = None, in_channels: int = 3
) -> tuple[nn.Module, int]:
    """``(module, feature_dim)`` for ``backbone`` (a :data:`BACKBONES` value) with its
    classifier removed."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {BACKBONES.describe_choices()}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    entry = BACKBONES.get(backbone)
    if isinstance(entry, Backbone):
        return build_declared(backbone, entry, pretrained=pretrained, in_channels=in_channels)
    return entry.build(backbone, pretrained, in_channels)
