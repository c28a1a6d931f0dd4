"""Run configuration: a schema of every key, YAML files, dotted command-line overrides, validation.

A configuration is a YAML mapping with the sections ``data``, ``model``, ``loss``, ``train``,
``eval`` and the top-level keys ``seed``, ``out`` and ``resume``. Overrides use dotted keys with
values parsed as YAML scalars: ``loss.name=triplet loss.margin=0.1 train.epochs=5``.

The loss's own hyper-parameters are flat keys of the ``loss`` section (``loss.margin``,
``loss.alpha``, ...): they are the keyword arguments of the loss class's constructor (see
``mbdl.losses``), validated against its signature; ``num_classes`` and ``embedding_dim`` are
supplied by the trainer. :data:`CONFIG_SCHEMA` lists every other key with its type, default,
allowed values and help text; the documentation's configuration reference is generated from it.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mbdl.errors import UserError
from mbdl.metrics import select_metric_help, selectable_keys

SECTIONS: tuple[str, ...] = ("data", "model", "loss", "train", "eval")

SOURCES = ("glyphs", "folder", "csv", "idx", "cub", "cars", "sop", "inshop")
BACKBONES = (
    "smallcnn",
    "smallvgg",
    "resnet18",
    "resnet50",
    "googlenet",
    "mobilenet_v2",
    "efficientnet_b0",
)
LOSS_NAMES = (
    "mdl",
    "contrastive",
    "triplet",
    "lifted",
    "npair",
    "margin",
    "multisimilarity",
    "proxyanchor",
)

# key -> (type, default, allowed values or None, help). Types are the strings
# "str", "int", "float", "bool", "list[int]", "list[str]", optionally with " | None".
CONFIG_SCHEMA: dict[str, tuple[str, Any, tuple[Any, ...] | None, str]] = {
    "data.source": (
        "str",
        "glyphs",
        SOURCES,
        "Data source; every source but glyphs needs data.root.",
    ),
    "data.root": ("str | None", None, None, "Directory (or file) of the data set."),
    "data.image_size": (
        "int | None",
        None,
        None,
        "Side of the square network input in pixels; null: glyphs and idx 32; file sources "
        "(folder, csv, cub, ...) pick it from the training images: their median shorter side "
        "rounded down to a multiple of 16 (at least 32), at most the backbone's native size "
        "(smallcnn 32, torchvision backbones 224).",
    ),
    "data.val_fraction": (
        "float",
        0.15,
        None,
        "Fraction of the training classes held out as validation classes (model selection); 0: none.",
    ),
    "data.max_classes": (
        "int | None",
        None,
        None,
        "glyphs only: use a subset of this many characters (quick runs and tests).",
    ),
    "data.num_workers": (
        "int",
        0,
        None,
        "DataLoader worker processes (0: load in the main process).",
    ),
    "data.cache": (
        "str",
        "auto",
        ("auto", "memory", "disk", "off"),
        "Decode a file source's training images once, resized, as uint8 (mbdl.data.cache): auto: "
        "in memory when they fit in a quarter of the available memory, else a memory-mapped "
        "file in the cache directory; off: decode every image every epoch.",
    ),
    "data.skip_corrupt": (
        "bool",
        False,
        None,
        "Skip unreadable images with a warning (counted) instead of stopping with an error.",
    ),
    "data.allow_outside_root": (
        "bool",
        False,
        None,
        "Folder source: accept images and class folders whose resolved path (through symbolic "
        "links) lies outside data.root; off, such a file is refused.",
    ),
    "data.bbox": (
        "bool",
        False,
        None,
        "cub and cars only: crop every image to its bounding box.",
    ),
    "data.augment": (
        "str",
        "auto",
        ("auto", "crop", "affine", "none"),
        "Training augmentation: crop (random resized crop + flip, photographs), affine (small "
        "jitter, glyphs and digits), auto (crop from 64 px up, else affine), none; true = auto, "
        "false = none.",
    ),
    "model.backbone": ("str", "smallvgg", BACKBONES, "Backbone network."),
    "model.embedding_dim": ("int", 64, None, "Size of the embedding."),
    "model.pretrained": (
        "str | None",
        None,
        None,
        "torchvision weight name (IMAGENET1K_V1, DEFAULT) or a local weights file; null: random init.",
    ),
    "model.freeze_bn": (
        "bool",
        False,
        None,
        "Freeze the backbone's BatchNorm statistics and affine.",
    ),
    "model.head_bn": ("bool", False, None, "BatchNorm in the embedding head."),
    "loss.name": (
        "str",
        "mdl",
        LOSS_NAMES,
        "Loss. Its hyper-parameters are further loss.* keys, the keyword arguments of the loss "
        "class (e.g. loss.margin=0.2); num_classes and embedding_dim are set by the trainer.",
    ),
    "train.epochs": ("int", 30, None, "Training epochs."),
    "train.batch_classes": ("int", 32, None, "P: classes per batch."),
    "train.batch_per_class": ("int", 4, None, "K: images per class in a batch (batch size P x K)."),
    "train.optimizer": ("str", "adamw", ("adamw", "sgd"), "Optimiser."),
    "train.lr": (
        "float",
        1e-3,
        None,
        "Learning rate of the backbone (peak, after warm-up), for the global batch: under torchrun "
        "with W processes a step sees P x K x W images and the same gradients as one process on "
        "them, so lr is not scaled with W.",
    ),
    "train.head_lr_mult": ("float", 1.0, None, "Learning rate of the embedding head = lr x this."),
    "train.loss_lr": (
        "float | None",
        None,
        None,
        "Learning rate of the loss's own parameters (proxies, margin beta); null: train.lr.",
    ),
    "train.momentum": ("float", 0.9, None, "SGD momentum."),
    "train.weight_decay": (
        "float",
        1e-4,
        None,
        "Weight decay of the network's weight matrices and kernels (not biases, norms or loss "
        "parameters).",
    ),
    "train.warmup_epochs": (
        "float",
        1.0,
        None,
        "Linear learning-rate warm-up (epochs, fractions allowed), then cosine decay to 0 per step.",
    ),
    "train.grad_clip": (
        "float | None",
        None,
        None,
        "Clip the gradients' global L2 norm to this value; null: no clipping.",
    ),
    "train.amp": (
        "str",
        "auto",
        ("auto", "off", "bf16", "fp16"),
        "Mixed precision: bf16 autocast (CPU or CUDA), fp16 autocast with a GradScaler (CUDA only); "
        "auto: bf16 on a GPU that supports it (else fp16) and on a CPU with bf16 matrix "
        "instructions (AVX512-BF16 or AMX), else off.",
    ),
    "train.channels_last": (
        "bool",
        True,
        None,
        "Run convolutional backbones in the channels-last memory format (faster convolutions "
        "on CPUs with oneDNN and on GPU tensor cores; the same results up to rounding).",
    ),
    "train.device": ("str", "auto", ("auto", "cpu", "cuda"), "Device; auto: cuda when available."),
    "train.num_threads": (
        "int | None",
        None,
        None,
        "torch CPU threads; null: torch's default.",
    ),
    "train.val_every": (
        "int",
        1,
        None,
        "Validate every this many epochs (and always after the last epoch).",
    ),
    "train.select_metric": (
        "str",
        "map@r",
        None,
        f"Validation metric that chooses the best checkpoint: {select_metric_help()}.",
    ),
    "train.patience": (
        "int | None",
        None,
        None,
        "Early stopping: stop after this many validations without improvement; null: never.",
    ),
    "train.max_steps_per_epoch": (
        "int | None",
        None,
        None,
        "Cap on the batches per epoch (smoke runs); null: a full pass of the sampler.",
    ),
    "train.checkpoint_every_steps": (
        "int | None",
        None,
        None,
        "Also write checkpoints/last.pt every this many steps within an epoch; null: per epoch only.",
    ),
    "train.progress": (
        "bool",
        True,
        None,
        "Progress bar per epoch (only shown when stderr is a terminal).",
    ),
    "train.xbm_size": (
        "int",
        0,
        None,
        "Cross-batch memory (Wang et al., CVPR 2020): keep the last this many training embeddings "
        "(all ranks' under torchrun) as extra positives and negatives; 0: off. Not for proxyanchor.",
    ),
    "train.xbm_warmup_steps": (
        "int",
        0,
        None,
        "Optimiser steps before the cross-batch memory is used (it is filled from the start); "
        "the paper waits about 1000 iterations while the embedding still drifts fast.",
    ),
    "train.loggers": (
        "list[str]",
        [],
        ("tensorboard", "mlflow"),
        "Experiment trackers that also receive log.jsonl's records, the config, the test metrics "
        "and the report's figures: tensorboard (OUT/tensorboard), mlflow ($MLFLOW_TRACKING_URI, "
        "else OUT/mlruns); each needs its extra (pip install 'mbdl[tensorboard]').",
    ),
    "eval.ks": ("list[int]", [1, 2, 4, 8], None, "K values of Recall@K."),
    "eval.batch_size": ("int", 256, None, "Batch size when embedding a data set."),
    "eval.distance": (
        "str",
        "euclidean",
        ("euclidean", "squared_euclidean", "cosine"),
        "Distance for retrieval and search.",
    ),
    "eval.report": (
        "bool",
        True,
        None,
        "Write OUT/report.html (plots, embedding projection, retrieval examples) after the test.",
    ),
    "eval.kmeans_restarts": (
        "int",
        3,
        None,
        "k-means runs (greedy k-means++ seeding each) behind NMI, AMI and F1; the run with the "
        "lowest inertia is kept.",
    ),
    "eval.verify_far": (
        "float",
        1e-3,
        None,
        "False accept rate at which mbdl train chooses the verification threshold on the "
        "validation classes (stored in checkpoints/best.pt, used by mbdl verify and mbdl search "
        "--threshold); the test TAR and FAR at that threshold go to metrics.json.",
    ),
    "eval.verify_max_pairs": (
        "int",
        1_000_000,
        None,
        "Verification pairs: every pair of a split when there are at most this many, else a "
        "seeded sample of this many genuine and this many impostor pairs.",
    ),
    "seed": ("int", 0, None, "Seed of the split, model initialisation, sampler and augmentation."),
    "out": (
        "str | None",
        None,
        None,
        "Run directory; null: runs/<source>-<loss>-<date>-<time>. A fresh run refuses a "
        "non-empty directory.",
    ),
    "resume": (
        "bool",
        False,
        None,
        "Continue the run in out from checkpoints/last.pt (starts fresh when there is none yet).",
    ),
}

# Inclusive lower bounds, (value, strict) where strict means the bound itself is not allowed.
_LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "data.image_size": (8, False),
    "data.val_fraction": (0.0, False),
    "data.max_classes": (4, False),
    "data.num_workers": (0, False),
    "model.embedding_dim": (2, False),
    "train.epochs": (1, False),
    "train.batch_classes": (2, False),
    "train.batch_per_class": (2, False),
    "train.lr": (0.0, True),
    "train.head_lr_mult": (0.0, False),
    "train.loss_lr": (0.0, False),
    "train.momentum": (0.0, False),
    "train.weight_decay": (0.0, False),
    "train.warmup_epochs": (0.0, False),
    "train.grad_clip": (0.0, True),
    "train.num_threads": (1, False),
    "train.val_every": (1, False),
    "train.patience": (1, False),
    "train.max_steps_per_epoch": (1, False),
    "train.checkpoint_every_steps": (1, False),
    "train.xbm_size": (0, False),
    "train.xbm_warmup_steps": (0, False),
    "eval.batch_size": (1, False),
    "eval.kmeans_restarts": (1, False),
    "eval.verify_far": (0.0, True),
    "eval.verify_max_pairs": (1, False),
}

# Inclusive upper bounds of the sizes that drive allocations (an image side of 10^5 pixels
# would ask for tens of GB per image); checkpoints are held to the same bounds.
UPPER_BOUNDS: dict[str, int] = {
    "data.image_size": 4096,
    "model.embedding_dim": 16_384,
}

# Keys that may differ between a run and its resumption (they do not change the results).
RESUME_FREE_KEYS: frozenset[str] = frozenset(
    {
        "resume",
        "out",
        "data.root",
        "data.num_workers",
        "train.device",
        "train.num_threads",
        "train.progress",
        "train.loggers",
        "eval.batch_size",
        "eval.report",
        "eval.kmeans_restarts",
        "eval.verify_far",
        "eval.verify_max_pairs",
    }
)

# Loss constructor arguments that the trainer supplies (MetricLoss.needs).
_TRAINER_SUPPLIED = ("num_classes", "embedding_dim")


class ConfigError(UserError):
    """A configuration key or value that is not valid; the message names it and the fix."""


def _default(key: str) -> Any:
    value = CONFIG_SCHEMA[key][1]
    return list(value) if isinstance(value, list) else value


@dataclass
class DataConfig:
    source: str = _default("data.source")
    root: str | None = _default("data.root")
    image_size: int | None = _default("data.image_size")
    val_fraction: float = _default("data.val_fraction")
    max_classes: int | None = _default("data.max_classes")
    num_workers: int = _default("data.num_workers")
    cache: str = _default("data.cache")
    skip_corrupt: bool = _default("data.skip_corrupt")
    bbox: bool = _default("data.bbox")
    augment: str = _default("data.augment")
    allow_outside_root: bool = _default("data.allow_outside_root")


@dataclass
class ModelConfig:
    backbone: str = _default("model.backbone")
    embedding_dim: int = _default("model.embedding_dim")
    pretrained: str | None = _default("model.pretrained")
    freeze_bn: bool = _default("model.freeze_bn")
    head_bn: bool = _default("model.head_bn")


@dataclass
class LossConfig:
    name: str = _default("loss.name")
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = _default("train.epochs")
    batch_classes: int = _default("train.batch_classes")
    batch_per_class: int = _default("train.batch_per_class")
    optimizer: str = _default("train.optimizer")
    lr: float = _default("train.lr")
    head_lr_mult: float = _default("train.head_lr_mult")
    loss_lr: float | None = _default("train.loss_lr")
    momentum: float = _default("train.momentum")
    weight_decay: float = _default("train.weight_decay")
    warmup_epochs: float = _default("train.warmup_epochs")
    grad_clip: float | None = _default("train.grad_clip")
    amp: str = _default("train.amp")
    channels_last: bool = _default("train.channels_last")
    device: str = _default("train.device")
    num_threads: int | None = _default("train.num_threads")
    val_every: int = _default("train.val_every")
    select_metric: str = _default("train.select_metric")
    patience: int | None = _default("train.patience")
    max_steps_per_epoch: int | None = _default("train.max_steps_per_epoch")
    checkpoint_every_steps: int | None = _default("train.checkpoint_every_steps")
    progress: bool = _default("train.progress")
    xbm_size: int = _default("train.xbm_size")
    xbm_warmup_steps: int = _default("train.xbm_warmup_steps")
    loggers: list[str] = field(default_factory=lambda: _default("train.loggers"))


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: _default("eval.ks"))
    batch_size: int = _default("eval.batch_size")
    distance: str = _default("eval.distance")
    report: bool = _default("eval.report")
    kmeans_restarts: int = _default("eval.kmeans_restarts")
    verify_far: float = _default("eval.verify_far")
    verify_max_pairs: int = _default("eval.verify_max_pairs")


@dataclass
class Config:
    """A validated run configuration (see :data:`CONFIG_SCHEMA`)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = _default("seed")
    out: str | None = _default("out")
    resume: bool = _default("resume")


# ---------------------------------------------------------------------------------------------
# values


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _coerce(key: str, value: Any, type_name: str) -> Any:
    """``value`` checked against the schema type ``type_name`` (int -> float widening only)."""
    optional = type_name.endswith(" | None")
    base = type_name.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must be a {base}, not null")
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, str) and _looks_like_number(value):
            value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{key} must be a finite number; got {value!r}")
            return float(value)
    elif base == "str":
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # out=2024 means the directory "2024"
        if isinstance(value, str):
            return value
    elif base == "list[int]":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return list(value)
    elif base == "list[str]":
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    else:  # pragma: no cover - the schema only uses the types above
        raise AssertionError(f"unknown schema type {type_name}")
    expected = f"a {base}" + (" or null" if optional else "")
    raise ConfigError(f"{key} must be {expected}; got {value!r} ({_type_name(value)})")


def _check_value(key: str, value: Any) -> Any:
    type_name, _, allowed, _ = CONFIG_SCHEMA[key]
    if key == "data.augment" and isinstance(value, bool):
        value = "auto" if value else "none"
    if key == "train.amp" and value is False:
        value = "off"  # YAML 1.1 reads a bare `off` as false
    value = _coerce(key, value, type_name)
    if allowed is not None and isinstance(value, list):
        for item in value:
            if item not in allowed:
                raise ConfigError(
                    f"{key}: {item!r} is not allowed; choose from {', '.join(allowed)}"
                )
    elif allowed is not None and value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    if key in _LOWER_BOUNDS and value is not None:
        bound, strict = _LOWER_BOUNDS[key]
        if value < bound or (strict and value == bound):
            relation = ">" if strict else ">="
            raise ConfigError(f"{key} must be {relation} {bound:g}; got {value!r}")
    if key in UPPER_BOUNDS and value is not None and value > UPPER_BOUNDS[key]:
        raise ConfigError(f"{key} must be <= {UPPER_BOUNDS[key]}; got {value!r}")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; the value is parsed as a YAML scalar."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.epochs=5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise ConfigError(f"override {text!r}: cannot parse the value ({problem})") from None
    return key, value


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}


# ---------------------------------------------------------------------------------------------
# loss parameters


def loss_parameters(name: str) -> dict[str, Any]:
    """The configurable hyper-parameters of loss ``name`` and their defaults (``inspect.Parameter.empty``
    for required ones); ``num_classes`` and ``embedding_dim`` are left out (the trainer sets them)."""
    from mbdl.losses import loss_class

    signature = inspect.signature(loss_class(name).__init__)
    params: dict[str, Any] = {}
    for param in list(signature.parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name in _TRAINER_SUPPLIED:
            continue
        params[param.name] = param.default
    return params


def _check_loss_params(name: str, given: dict[str, Any], embedding_dim: int) -> dict[str, Any]:
    """Check ``given`` loss hyper-parameters against loss ``name``'s constructor, then construct it
    once so the loss's own value checks run; returns every parameter (defaults filled in)."""
    from mbdl.losses import loss_class

    valid = loss_parameters(name)
    checked: dict[str, Any] = {}
    for param, value in given.items():
        if param not in valid:
            key = f"loss.{param}"
            choices = [f"loss.{p}" for p in valid]
            suggestions = difflib.get_close_matches(key, [*choices, *CONFIG_SCHEMA], n=3)
            hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
            params_text = ", ".join(choices) if choices else "none"
            raise ConfigError(
                f"unknown key {key}: not a parameter of loss {name!r}{hint} "
                f"(its parameters: {params_text})"
            )
        default = valid[param]
        if default is not inspect.Parameter.empty and default is not None and value is not None:
            if isinstance(default, bool):
                value = _coerce(f"loss.{param}", value, "bool")
            elif isinstance(default, float):
                value = _coerce(f"loss.{param}", value, "float")
            elif isinstance(default, int):
                value = _coerce(f"loss.{param}", value, "int")
            elif isinstance(default, str):
                value = _coerce(f"loss.{param}", value, "str")
        checked[param] = value
    missing = [p for p, d in valid.items() if d is inspect.Parameter.empty and p not in checked]
    if missing:
        raise ConfigError(
            f"loss {name!r} needs {', '.join('loss.' + p for p in missing)} to be set"
        )
    cls = loss_class(name)
    extra: dict[str, Any] = {}
    needs = getattr(cls, "needs", ())
    if "num_classes" in needs:
        extra["num_classes"] = 2
    if "embedding_dim" in needs:
        extra["embedding_dim"] = embedding_dim
    try:
        cls(**checked, **extra)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"loss {name!r}: {error}") from None
    defaults = {p: d for p, d in valid.items() if d is not inspect.Parameter.empty}
    return {**defaults, **checked}  # the resolved config records every hyper-parameter


# ---------------------------------------------------------------------------------------------
# loading


def _flatten(mapping: dict[str, Any], source: str) -> dict[str, Any]:
    """Nested YAML mapping -> dotted keys. Section values must be mappings."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: keys must be strings; got {key!r}")
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be a mapping of {key}.* keys")
            for sub, sub_value in value.items():
                flat[f"{key}.{sub}"] = sub_value
        else:
            flat[key] = value
    return flat


def _suggest_unknown(key: str, loss_name: str | None) -> ConfigError:
    candidates = list(CONFIG_SCHEMA)
    if loss_name is not None:
        try:
            candidates += [f"loss.{p}" for p in loss_parameters(loss_name)]
        except Exception:  # the loss registry is not importable: suggest schema keys only
            pass
    suggestions = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not suggestions:
        section = key.split(".")[0]
        suggestions = [k for k in candidates if k.startswith(section + ".")][:3]
    hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
    return ConfigError(f"unknown key {key}{hint}")


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """The dotted keys of a YAML config file (not yet validated)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {str(file)!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {str(file)!r}: {error}") from None
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(file)!r} must hold a mapping of keys")
    return _flatten(data, str(file))


def config_from_flat(values: dict[str, Any]) -> Config:
    """Validate dotted ``key -> value`` pairs on top of the defaults and build a :class:`Config`."""
    resolved: dict[str, Any] = {key: _default(key) for key in CONFIG_SCHEMA}
    loss_params: dict[str, Any] = {}
    loss_name = values.get("loss.name", resolved["loss.name"])
    if "loss.name" in values:
        loss_name = _check_value("loss.name", values["loss.name"])
    for key, value in values.items():
        if key in CONFIG_SCHEMA:
            resolved[key] = _check_value(key, value)
        elif key.startswith("loss.") and key.count(".") == 1:
            loss_params[key.removeprefix("loss.")] = value
        else:
            raise _suggest_unknown(key, loss_name)
    _check_cross_keys(resolved)
    resolved_loss = _check_loss_params(
        resolved["loss.name"], loss_params, resolved["model.embedding_dim"]
    )
    _check_xbm(resolved)

    def section(name: str) -> dict[str, Any]:
        prefix = name + "."
        return {k.removeprefix(prefix): v for k, v in resolved.items() if k.startswith(prefix)}

    loss_section = section("loss")
    return Config(
        data=DataConfig(**section("data")),
        model=ModelConfig(**section("model")),
        loss=LossConfig(name=loss_section["name"], params=resolved_loss),
        train=TrainConfig(**section("train")),
        eval=EvalConfig(**section("eval")),
        seed=resolved["seed"],
        out=resolved["out"],
        resume=resolved["resume"],
    )


def _check_cross_keys(resolved: dict[str, Any]) -> None:
    ks = resolved["eval.ks"]
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"eval.ks must be a non-empty list of integers >= 1; got {ks!r}")
    metric = resolved["train.select_metric"]
    allowed = selectable_keys(ks)
    if metric not in allowed:
        raise ConfigError(
            f"train.select_metric={metric!r} is not allowed; choose one of {', '.join(allowed)}"
        )
    if resolved["eval.verify_far"] >= 1:
        raise ConfigError(f"eval.verify_far must be in (0, 1); got {resolved['eval.verify_far']!r}")
    if resolved["data.val_fraction"] >= 1:
        raise ConfigError(
            f"data.val_fraction must be in [0, 1); got {resolved['data.val_fraction']!r}"
        )
    if resolved["data.source"] != "glyphs" and resolved["data.root"] is None:
        raise ConfigError(
            f"data.source={resolved['data.source']} needs data.root=PATH (where the data set is)"
        )
    if resolved["data.max_classes"] is not None and resolved["data.source"] != "glyphs":
        raise ConfigError("data.max_classes applies to data.source=glyphs only")
    if resolved["train.warmup_epochs"] > resolved["train.epochs"]:
        raise ConfigError(
            f"train.warmup_epochs={resolved['train.warmup_epochs']:g} exceeds "
            f"train.epochs={resolved['train.epochs']}"
        )


def _check_xbm(resolved: dict[str, Any]) -> None:
    """Cross-batch memory needs a loss that takes a reference set (not a proxy loss)."""
    from mbdl.losses import loss_class

    name = resolved["loss.name"]
    if resolved["train.xbm_size"] > 0 and not getattr(loss_class(name), "accepts_ref", True):
        raise ConfigError(
            f"train.xbm_size={resolved['train.xbm_size']} needs a loss that takes a reference set; "
            f"loss {name!r} has none (its anchors are proxies): set train.xbm_size=0"
        )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (``key=value``),
    validated. Raises :class:`ConfigError` (a ``ValueError``) naming the bad key or value."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml_config(path))
    for text in overrides or []:
        key, value = parse_override(text)
        values[key] = value
    return config_from_flat(values)


def config_to_flat(config: Config) -> dict[str, Any]:
    """Dotted ``key -> value`` of every key (loss parameters as ``loss.<param>``)."""
    nested = config_to_dict(config)
    flat = _flatten(nested, "config")
    return flat


def config_to_dict(config: Config) -> dict[str, Any]:
    """The nested plain-Python form written to ``OUT/config.yaml`` (loads back with
    :func:`load_config`)."""
    return {
        "data": dict(vars(config.data)),
        "model": dict(vars(config.model)),
        "loss": {"name": config.loss.name, **config.loss.params},
        "train": dict(vars(config.train)),
        "eval": {**vars(config.eval), "ks": list(config.eval.ks)},
        "seed": config.seed,
        "out": config.out,
        "resume": config.resume,
    }


def config_to_yaml(config: Config) -> str:
    """YAML text of the resolved configuration."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two flat configs, ignoring :data:`RESUME_FREE_KEYS`."""
    keys = sorted(set(old) | set(new))
    return [
        k
        for k in keys
        if k not in RESUME_FREE_KEYS and old.get(k, "<unset>") != new.get(k, "<unset>")
    ]
