"""Backbones, declared once: the :data:`BACKBONES` registry behind ``model.backbone``.

Every backbone maps ``images[B, C, H, W]`` to pooled features ``[B, feature_dim]``. The built-in
architectures are one table (:data:`BUILTIN_BACKBONES`): per architecture how to build it,
which layer is its classifier (replaced by ``nn.Identity``; what comes before it stays, e.g.
ConvNeXt's LayerNorm), where its first convolution is (rebuilt for ``in_channels != 3``; when
weights were loaded, a grey input's filters are the sum of the RGB filters, the usual way to keep
a pretrained network's response to grey images) and its native input size. Besides the table,
``model.backbone`` takes ``timm/<name>`` (any timm model, ``pip install 'mbdl[timm]'``),
``hf/<model id or local directory>`` (a Hugging Face ``transformers`` vision encoder,
``pip install 'mbdl[hf]'``), ``open_clip/<architecture>`` (an open_clip image tower,
``pip install 'mbdl[open_clip]'``), the name an installed package declares in the entry-point
group ``mbdl.backbones`` and an import path ``package.module:build`` of a function
``build(pretrained, in_channels) -> (nn.Module, feature_dim)``, whose output is checked on a
small input.

Every declaration also says what its weights expect of an image (:meth:`statistics`: mean, std,
interpolation, crop fraction, as :class:`mbdl.model.preprocessing.ImageStatistics`), read from
where the weights come from; random weights expect nothing (None).

Pretrained weights of a built-in torchvision backbone are a torchvision weight name
(``"DEFAULT"``, ``"IMAGENET1K_V1"``; fetched through ``torch.hub`` into its cache) or a local
``state_dict`` file with the torchvision model's keys (loaded with
``torch.load(weights_only=True)``; strict, except that the classifier's keys, and GoogLeNet's
auxiliary classifiers, are ignored).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import urllib.error
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torchvision
from torch import Tensor, nn

from mbdl.errors import UserError
from mbdl.model.preprocessing import IMAGENET, ImageStatistics
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

    def statistics(self, backbone: str, pretrained: str | None) -> ImageStatistics | None:
        """A torchvision weight name: its ``transforms()`` (mean, std, interpolation,
        ``crop_size / resize_size``); a local weights file: ImageNet's; none: None."""
        if pretrained is None:
            return None
        if self.hub_weights and is_weight_name(str(pretrained)):
            weights = resolve_weights(backbone, str(pretrained))
            preset = weights.transforms()
            crop, resize = preset.crop_size[0], preset.resize_size[0]
            return ImageStatistics(
                tuple(preset.mean),
                tuple(preset.std),
                interpolation=preset.interpolation.value,
                crop_fraction=crop / resize,
                input_size=int(crop),
                origin=f"torchvision {weights}",
            )
        return IMAGENET


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


def state_dict_problems(own: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    """What keeps ``given`` from loading strictly into a module whose state is ``own``: missing
    and unexpected keys and the first shape mismatch, each with an example (empty: it loads)."""
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    wrong = [k for k in given if k in own and own[k].shape != given[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        key = wrong[0]
        problems.append(
            f"shape mismatch for {key}: {tuple(given[key].shape)} vs {tuple(own[key].shape)}"
        )
    return problems


def load_backbone_weights(
    model: nn.Module, backbone: str, state: Mapping[str, Tensor], source: str
) -> None:
    """Load ``state`` into ``model`` strictly, ignoring the classifier's keys."""
    prefixes = BUILTIN_BACKBONES[backbone].classifier_prefixes()
    kept = {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}
    problems = state_dict_problems(model.state_dict(), kept)
    if problems:
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

    def statistics(self, backbone: str, pretrained: str | None) -> ImageStatistics | None:
        """The builder's ``statistics`` attribute (an :class:`ImageStatistics`) when it has one,
        else ImageNet's when weights are given."""
        if pretrained is None:
            return None
        declared = getattr(self.function, "statistics", None)
        return declared if isinstance(declared, ImageStatistics) else IMAGENET


def missing_package(package: str, extra: str, what: str) -> PluginError:
    """The one-line error for a backbone family whose package is not installed."""
    return PluginError(f"{what} need the {package} package: pip install 'mbdl[{extra}]'")


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise missing_package("timm", "timm", "timm backbones") from None
    return timm


#: ``model.pretrained`` values that mean "the library's own published weights" (a download)
HUB_WEIGHTS = ("DEFAULT",)

#: the weight files of timm's (and Hugging Face's) hub layout, in the order they are looked for
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _statistics_from_timm(config: Mapping[str, Any], origin: str) -> ImageStatistics:
    """timm's resolved data config (``timm.data.resolve_data_config``) of a ``pretrained_cfg``."""
    resolved = _timm().data.resolve_data_config(pretrained_cfg=dict(config))
    size = resolved.get("input_size")
    return ImageStatistics(
        tuple(float(v) for v in resolved["mean"]),
        tuple(float(v) for v in resolved["std"]),
        interpolation=str(resolved.get("interpolation", "bilinear")),
        crop_fraction=float(resolved.get("crop_pct", 224 / 256)),
        input_size=int(size[-1]) if size else None,
        origin=origin,
    )


def _read_json(file: Path, what: str) -> dict[str, Any]:
    import json

    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PretrainedWeightsError(f"cannot read {what} {file}: {_first_line(error)}") from None
    if not isinstance(data, dict):
        raise PretrainedWeightsError(f"{what} {file} does not hold a JSON object")
    return data


@dataclass(frozen=True)
class TimmBackbone:
    """``timm/<name>``: ``timm.create_model(name, num_classes=0, in_chans=...)`` (timm removes
    the classifier, keeps what comes before it and adapts the first convolution itself).

    ``pretrained``: ``DEFAULT`` (timm's own download of the model's default weights from the
    Hugging Face Hub, cached), a directory in timm's hub layout (``config.json`` with
    ``architecture`` and ``pretrained_cfg``, and ``model.safetensors`` or ``pytorch_model.bin``),
    or a weights file of that model (a ``state_dict``, ``.safetensors`` or ``.pth``). The
    statistics are timm's resolved data config of the directory's ``pretrained_cfg``, else of the
    model's registered one."""

    model: str

    @property
    def native_size(self) -> int:
        config = _timm().models.get_pretrained_cfg(self.model)
        size = getattr(config, "input_size", None) if config is not None else None
        return int(size[-1]) if size else 224

    def _local(self, name: str, pretrained: str) -> Path:
        path = Path(os.path.expanduser(pretrained))
        if not path.exists():
            raise PretrainedWeightsError(
                f"{name}: model.pretrained={pretrained!r} is neither DEFAULT (timm's download, "
                "which needs a network) nor a local file or directory; download the weights of "
                f"{self.model} (e.g. from huggingface.co/timm) and pass model.pretrained=PATH"
            )
        if path.is_dir():
            config = path / "config.json"
            if not config.is_file() or not any((path / f).is_file() for f in HUB_WEIGHT_FILES):
                raise PretrainedWeightsError(
                    f"{name}: {path} is not a timm model directory (config.json and "
                    f"{' or '.join(HUB_WEIGHT_FILES)})"
                )
            architecture = _read_json(config, "timm config").get("architecture")
            base = self.model.split(".")[0]
            if architecture != base:
                raise PretrainedWeightsError(
                    f"{name}: {path} holds weights of {architecture!r}, not {base!r}; set "
                    f"model.backbone=timm/{architecture}"
                )
        return path

    def statistics(self, backbone: str, pretrained: str | None) -> ImageStatistics | None:
        if pretrained is None:
            return None
        if pretrained not in HUB_WEIGHTS:
            path = self._local(backbone, pretrained)
            config = path / "config.json" if path.is_dir() else path.parent / "config.json"
            if config.is_file():
                stored = _read_json(config, "timm config").get("pretrained_cfg")
                if isinstance(stored, dict) and "mean" in stored:
                    return _statistics_from_timm(stored, f"timm pretrained_cfg of {config}")
        registered = _timm().models.get_pretrained_cfg(self.model)
        if registered is None:
            return IMAGENET
        return _statistics_from_timm(registered.to_dict(), f"timm pretrained_cfg of {self.model}")

    def build(
        self, name: str, pretrained: str | os.PathLike[str] | None, in_channels: int
    ) -> tuple[nn.Module, int]:
        timm = _timm()
        options: dict[str, Any] = {"num_classes": 0, "in_chans": in_channels}
        hub = pretrained is not None and str(pretrained) in HUB_WEIGHTS
        try:
            # DEFAULT: timm's own download (Hugging Face Hub), cached
            module = timm.create_model(self.model, pretrained=hub, **options)
        except Exception as error:  # a download raises many types
            if not hub:
                raise
            raise PretrainedWeightsError(
                f"cannot load timm's weights of {name} (a download, which needs a network): "
                f"{_first_line(error)}; download them elsewhere (huggingface.co/timm) and pass "
                "model.pretrained=PATH"
            ) from None
        if pretrained is not None and not hub:
            path = self._local(name, str(pretrained))
            if path.is_dir():
                path = next(path / f for f in HUB_WEIGHT_FILES if (path / f).is_file())
            load_timm_weights(module, _weights_file(path), in_channels, f"{path} into {name}")
        return check_features(
            module,
            int(module.num_features),
            in_channels=in_channels,
            size=self.native_size,
            name=name,
        )


def _weights_file(path: Path) -> Mapping[str, Tensor]:
    """A state_dict from a ``.safetensors`` file or a torch file (:func:`file_state_dict`)."""
    if path.suffix != ".safetensors":
        return file_state_dict(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise PretrainedWeightsError(
            f"cannot load pretrained weights {path}: {_first_line(error)}"
        ) from None


def load_timm_weights(
    module: nn.Module, state: Mapping[str, Tensor], in_channels: int, where: str
) -> None:
    """Load ``state`` into a timm model built with ``num_classes=0``: strictly, the classifier's
    keys ignored, the first convolution adapted to ``in_channels`` as timm does."""
    config = getattr(module, "pretrained_cfg", {}) or {}
    classifiers = config.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    own = module.state_dict()
    kept = {
        k: v
        for k, v in state.items()
        if not (k.startswith(tuple(c + "." for c in classifiers)) and k not in own)
    }
    first_conv = config.get("first_conv")
    if in_channels != 3 and isinstance(first_conv, str) and f"{first_conv}.weight" in kept:
        from timm.models import adapt_input_conv

        key = f"{first_conv}.weight"
        kept[key] = adapt_input_conv(in_channels, kept[key])
    problems = state_dict_problems(own, kept)
    if problems:
        raise PretrainedWeightsError(
            f"cannot load pretrained weights {where}: {'; '.join(problems)}"
        )
    module.load_state_dict(kept, strict=True)


class GreyToRGB(nn.Module):
    """Repeats a one-channel image to the three channels a network was built for."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return cast(Tensor, self.network(images))


#: the prefix of ``model.backbone`` values built by Hugging Face ``transformers``
HF_PREFIX = "hf/"

#: PIL's resampling filter numbers (what an image processor's ``resample`` holds)
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _side(size: object) -> Any:
    """The side an image processor's ``size`` / ``crop_size`` names (``shortest_edge``,
    ``height`` or a bare number)."""
    if isinstance(size, dict):
        return size.get("shortest_edge") or size.get("height")
    return size


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise missing_package("transformers", "hf", "hf/ backbones") from None
    return transformers


class HfFeatures(nn.Module):
    """A ``transformers`` vision encoder as ``images -> features``: its ``pooler_output`` when
    the model has one (ViT's pooler, DINOv2's and CLIP's normalised CLS token, ConvNeXt's pooled
    map), else the first (CLS) token of ``last_hidden_state``, or its spatial mean for a
    ``[B, C, H, W]`` feature map."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        output = self.encoder(pixel_values=images)
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return cast(Tensor, pooled.flatten(1))
        hidden = cast(Tensor, output.last_hidden_state)
        return hidden[:, 0] if hidden.dim() == 3 else hidden.mean(dim=(2, 3))


@contextlib.contextmanager
def _quiet_transformers(transformers: Any) -> Iterator[None]:
    """transformers' weight-loading progress bar off (stderr holds mbdl's lines only)."""
    logging = transformers.utils.logging
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


@dataclass(frozen=True)
class HfBackbone:
    """``hf/<model id or local directory>``: ``transformers.AutoModel`` (the vision tower of a
    CLIP-style model) as :class:`HfFeatures`. ``pretrained``: ``DEFAULT`` loads the weights the
    id or directory holds (``from_pretrained``; a hub id is downloaded once, then cached); None
    builds the architecture from its ``config.json`` with random weights. The statistics are
    the image processor's (``preprocessor_config.json``: ``image_mean``, ``image_std``,
    ``resample``, ``crop_size`` / ``size``)."""

    model: str

    def _config(self) -> Any:
        transformers = _transformers()
        try:
            return transformers.AutoConfig.from_pretrained(self.model)
        except (OSError, ValueError, KeyError) as error:
            raise PretrainedWeightsError(
                f"hf/{self.model}: not a transformers model id or directory ({_first_line(error)})"
            ) from None

    @property
    def native_size(self) -> int:
        config = self._config()
        config = getattr(config, "vision_config", config)
        size = getattr(config, "image_size", 224)
        return int(size[-1] if isinstance(size, (list, tuple)) else size)

    def processor_config(self) -> dict[str, Any] | None:
        """The image processor's settings (``preprocessor_config.json``), None if it has none."""
        local = Path(os.path.expanduser(self.model))
        if local.is_dir():
            file = local / "preprocessor_config.json"
            return _read_json(file, "image processor config") if file.is_file() else None
        try:
            processor = _transformers().AutoImageProcessor.from_pretrained(self.model)
        except (OSError, ValueError, KeyError):
            return None
        return dict(processor.to_dict())

    def statistics(self, backbone: str, pretrained: str | None) -> ImageStatistics | None:
        if pretrained is None:
            return None
        config = self.processor_config()
        if config is None:
            return IMAGENET
        origin = f"image processor of {self.model}"
        if config.get("do_normalize", True) is False:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            mean = tuple(config.get("image_mean") or IMAGENET.mean)
            std = tuple(config.get("image_std") or IMAGENET.std)
        resample = config.get("resample", 2)
        interpolation = PIL_RESAMPLE.get(int(resample), "bilinear")
        size, crop = config.get("size"), config.get("crop_size")
        crop_fraction = 1.0
        if config.get("do_center_crop") and _side(crop) and _side(size):
            crop_fraction = min(1.0, float(_side(crop)) / float(_side(size)))
        input_size = _side(crop) if config.get("do_center_crop") else _side(size)
        return ImageStatistics(
            tuple(float(v) for v in mean),
            tuple(float(v) for v in std),
            interpolation=interpolation,
            crop_fraction=crop_fraction,
            input_size=int(input_size) if isinstance(input_size, int) else None,
            origin=origin,
        )

    def build(
        self, name: str, pretrained: str | os.PathLike[str] | None, in_channels: int
    ) -> tuple[nn.Module, int]:
        transformers = _transformers()
        if pretrained is not None and str(pretrained) not in HUB_WEIGHTS:
            raise PretrainedWeightsError(
                f"{name}: the weights are those of {self.model}; set model.pretrained=DEFAULT "
                "(or null for random weights), not a file"
            )
        try:
            if pretrained is None:
                encoder = transformers.AutoModel.from_config(self._config())
            else:
                with _quiet_transformers(transformers):
                    encoder = transformers.AutoModel.from_pretrained(self.model)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise PretrainedWeightsError(f"cannot load {name}: {_first_line(error)}") from None
        encoder = getattr(encoder, "vision_model", encoder)  # CLIP-style: the image tower
        module = HfFeatures(encoder)
        size = self.native_size
        module.eval()
        with torch.no_grad():
            dim = int(module(torch.zeros(1, 3, size, size)).shape[-1])
        return check_features(module, dim, in_channels=in_channels, size=size, name=name)


#: the prefix of ``model.backbone`` values built by open_clip
OPEN_CLIP_PREFIX = "open_clip/"


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise missing_package("open-clip-torch", "open_clip", "open_clip/ backbones") from None
    return open_clip


@dataclass(frozen=True)
class OpenClipBackbone:
    """``open_clip/<architecture>``: the image tower (``.visual``) of
    ``open_clip.create_model(architecture, pretrained=...)``; its features are the projected
    image embedding. ``pretrained``: a local weights file or an open_clip pretrained tag
    (downloaded, cached). The statistics are the architecture's ``preprocess_cfg`` (OpenAI's
    mean and std, bicubic, by default); open_clip resizes the shorter side to the input size,
    so the crop fraction is 1."""

    model: str

    def _config(self) -> dict[str, Any]:
        config = _open_clip().get_model_config(self.model)
        if config is None:
            raise PluginError(f"unknown open_clip architecture {self.model!r}")
        return dict(config)

    @property
    def native_size(self) -> int:
        size = self._config().get("vision_cfg", {}).get("image_size", 224)
        return int(size[-1] if isinstance(size, (list, tuple)) else size)

    def statistics(self, backbone: str, pretrained: str | None) -> ImageStatistics | None:
        if pretrained is None:
            return None
        open_clip = _open_clip()
        config = self._config().get("preprocess_cfg", {})
        mean = config.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = config.get("std", open_clip.OPENAI_DATASET_STD)
        return ImageStatistics(
            tuple(float(v) for v in mean),
            tuple(float(v) for v in std),
            interpolation=str(config.get("interpolation", "bicubic")),
            crop_fraction=1.0,
            input_size=self.native_size,
            origin=f"open_clip preprocess_cfg of {self.model}",
        )

    def build(
        self, name: str, pretrained: str | os.PathLike[str] | None, in_channels: int
    ) -> tuple[nn.Module, int]:
        open_clip = _open_clip()
        weights = None if pretrained is None else os.path.expanduser(str(pretrained))
        try:
            model = open_clip.create_model(self.model, pretrained=weights)
        except Exception as error:  # open_clip raises many types for a bad file or tag
            if pretrained is None:
                raise
            raise PretrainedWeightsError(
                f"cannot load pretrained weights {pretrained} into {name}: {_first_line(error)}"
            ) from None
        visual = model.visual
        module = GreyToRGB(visual)
        dim = int(getattr(visual, "output_dim", 0) or self._config()["embed_dim"])
        return check_features(
            module, dim, in_channels=in_channels, size=self.native_size, name=name
        )


#: a backbone declaration of any family
AnyBackbone = Backbone | PluginBackbone | TimmBackbone | HfBackbone | OpenClipBackbone

#: ``model.backbone`` prefixes of the library families and their declarations
FAMILIES: dict[str, type[TimmBackbone] | type[HfBackbone] | type[OpenClipBackbone]] = {
    TIMM_PREFIX: TimmBackbone,
    HF_PREFIX: HfBackbone,
    OPEN_CLIP_PREFIX: OpenClipBackbone,
}


def check_backbone(found: object, name: str) -> AnyBackbone:
    """A registry entry as a buildable declaration: a :class:`Backbone` table entry as it is, a
    builder function wrapped in a :class:`PluginBackbone` (its signature checked)."""
    if isinstance(found, (Backbone, PluginBackbone, TimmBackbone, HfBackbone, OpenClipBackbone)):
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


class BackboneRegistry(Registry[AnyBackbone]):
    """The :class:`mbdl.plugins.Registry` of backbones, which also builds ``timm/<name>``,
    ``hf/<id or directory>`` and ``open_clip/<architecture>``."""

    def __contains__(self, name: object) -> bool:
        return (isinstance(name, str) and name.startswith(tuple(FAMILIES))) or super().__contains__(
            name
        )

    def get(self, name: str) -> AnyBackbone:
        if name.startswith(TIMM_PREFIX):
            model = name.removeprefix(TIMM_PREFIX)
            if not _timm().is_model(model):
                raise PluginError(
                    f"unknown timm model {model!r}; timm.list_models() lists its names"
                )
            return TimmBackbone(model)
        if name.startswith(HF_PREFIX):
            hf = HfBackbone(name.removeprefix(HF_PREFIX))
            hf._config()  # not a model id or directory: refused here
            return hf
        if name.startswith(OPEN_CLIP_PREFIX):
            backbone = OpenClipBackbone(name.removeprefix(OPEN_CLIP_PREFIX))
            backbone._config()  # an unknown architecture: refused here
            return backbone
        return super().get(name)

    def describe_choices(self) -> str:
        return (
            f"{', '.join(self.names())}, timm/<name> (pip install 'mbdl[timm]'), hf/<model id or "
            "directory> (pip install 'mbdl[hf]'), open_clip/<architecture> (pip install "
            "'mbdl[open_clip]') or an import path package.module:build"
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


def weights_statistics(backbone: str, pretrained: str | None) -> ImageStatistics | None:
    """What ``backbone``'s weights ``pretrained`` expect of an image (mean, std,
    interpolation, crop fraction), as the library they come from states it; None for random
    weights."""
    return BACKBONES.get(backbone).statistics(
        backbone, None if pretrained is None else str(pretrained)
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


class InputSizeError(UserError):
    """An input side the model cannot take (fixed position embeddings of another size)."""


def check_input_side(model: nn.Module, side: int, channels: int, backbone: str) -> None:
    """Refuse an input side ``model`` cannot take (a ViT whose position embeddings are fixed
    at another size and not interpolated): one forward pass of a blank
    ``[1, channels, side, side]`` image in eval mode, without gradients, before training."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, side, side, device=device))
    except Exception as error:  # each library raises its own type for a size it cannot take
        try:
            size = native_input_size(backbone)
            native = f"; its input size is {size} px: set data.image_size={size}"
        except Exception:  # a plugin or import path without a declared size
            native = "; set data.image_size to the size it was built for"
        raise InputSizeError(
            f"model.backbone={backbone} cannot take {side} x {side} px images "
            f"({type(error).__name__}: {_first_line(error)}){native}"
        ) from None
    finally:
        model.train(was_training)
