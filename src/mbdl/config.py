"""Run configuration: a schema of every key, YAML files, dotted command-line overrides, validation.

A configuration is a YAML mapping with the sections ``data``, ``model``, ``loss``, ``train``,
``eval`` and the top-level keys ``seed``, ``out`` and ``resume``. Overrides use dotted keys with
values parsed as YAML scalars: ``loss.name=triplet loss.margin=0.1 train.epochs=5``.

The loss's own hyper-parameters are flat keys of the ``loss`` section (``loss.margin``,
``loss.alpha``, ...): they are the keyword arguments of the loss class's constructor (see
``mbdl.losses``), validated against its signature; ``num_classes`` and ``embedding_dim`` are
supplied by the trainer. Every other key is declared once, as a field of the dataclasses below
(:func:`key`: default, help, allowed values or the registry of its values, bounds, whether a
resumed run may change it; the type is the field's annotation). :data:`CONFIG_SCHEMA`, the bounds,
:data:`RESUME_FREE_KEYS` and the documentation's configuration reference derive from them.
"""

from __future__ import annotations

import difflib
import inspect
import math
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

import yaml

from mbdl.errors import UserError
from mbdl.metrics import select_metric_help, selectable_keys

SECTIONS: tuple[str, ...] = ("data", "model", "loss", "train", "eval")

#: bounds on a YAML config (file or override value): bytes, nesting depth, alias uses, and the
#: number of values once aliases are expanded (a "billion laughs" file is a few hundred bytes)
YAML_MAX_BYTES = 1 << 20
YAML_MAX_DEPTH = 32
YAML_MAX_ALIASES = 100
YAML_MAX_VALUES = 100_000


def _shown(value: object) -> str:
    """``repr(value)`` for a message, bounded: long strings, lists, mappings and deep nesting
    are abbreviated (``...``), so a message never formats an unbounded value."""
    shown = _REPR.repr(value)
    return shown if len(shown) <= 300 else shown[:300] + "..."


bounded_repr = _shown


def _make_repr() -> reprlib.Repr:
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxstring, bounded.maxother = 3, 200, 80
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = 8
    return bounded


_REPR = _make_repr()


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses duplicate keys (a repeated section silently replaced
    the first), nesting deeper than :data:`YAML_MAX_DEPTH` and more than
    :data:`YAML_MAX_ALIASES` alias uses."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > YAML_MAX_ALIASES:
                raise ConfigError(f"it uses more than {YAML_MAX_ALIASES} aliases (*name)")
        self._depth += 1
        try:
            if self._depth > YAML_MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(
                    f"it nests deeper than {YAML_MAX_DEPTH} levels (line {mark.line + 1})"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue
                if duplicate:
                    raise ConfigError(
                        f"key {_shown(key)} appears twice (line {key_node.start_mark.line + 1}); "
                        "keep one"
                    )
        return super().construct_mapping(node, deep=deep)


def _count_values(value: Any, limit: int) -> int:
    """The number of values in ``value`` with aliases expanded, counting stops past ``limit``."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def load_yaml_bounded(text: str) -> Any:
    """``yaml.safe_load(text)`` within the bounds above (a :class:`ConfigError` saying which,
    without the file's name: callers add it)."""
    if len(text) > YAML_MAX_BYTES:
        raise ConfigError(f"it is larger than {YAML_MAX_BYTES} bytes")
    loader = _BoundedLoader(text)
    try:
        data = loader.get_single_data()
    except RecursionError:
        raise ConfigError(f"it nests deeper than {YAML_MAX_DEPTH} levels") from None
    finally:
        loader.dispose()
    if _count_values(data, YAML_MAX_VALUES) > YAML_MAX_VALUES:
        raise ConfigError(f"it holds more than {YAML_MAX_VALUES} values once aliases are expanded")
    return data


class _LossNames(Sequence[str]):
    """The names of the registered losses (``mbdl.losses.LOSSES``: the built-ins found in the
    package, then installed plugins), read on first use; ``in`` also accepts import paths
    ``package.module:Name``."""

    def _names(self) -> tuple[str, ...]:
        from mbdl.losses import LOSSES

        return LOSSES.names()

    def __getitem__(self, index: Any) -> Any:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name: object) -> bool:
        from mbdl.losses import LOSSES

        return name in LOSSES

    def __repr__(self) -> str:
        return repr(self._names())


LOSS_NAMES: Sequence[str] = _LossNames()


class Key(NamedTuple):
    """One configuration key, declared once as a field of the config dataclasses (:func:`key`).

    The type is the field's annotation (``"int | None"``); ``choices`` are the allowed values;
    ``registry`` is the import path of a :class:`mbdl.plugins.Registry` whose names (and plugin
    import paths) the value must be; ``minimum`` / ``above`` are inclusive / strict lower bounds,
    ``maximum`` an inclusive upper bound; ``resume_free`` keys may differ between a run and its
    resumption (they do not change the results).
    """

    type: str
    default: Any
    choices: tuple[Any, ...] | None
    help: str
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    resume_free: bool = False
    registry: str | None = None


_KEY = "mbdl.config.key"  # the dataclass field metadata entry that holds a field's Key


def key(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    registry: str | None = None,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    resume_free: bool = False,
) -> Any:
    """A config dataclass field that declares one key (its type is the field's annotation)."""
    declared = Key("", default, choices, help, minimum, above, maximum, resume_free, registry)
    metadata = {_KEY: declared}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# Loss constructor arguments that the trainer supplies (MetricLoss.needs).
_TRAINER_SUPPLIED = ("num_classes", "embedding_dim")


class ConfigError(UserError):
    """A configuration key or value that is not valid; the message names it and the fix."""


@dataclass
class DataConfig:
    source: str = key(
        "glyphs",
        "Data source: a built-in name, the name of an installed plugin (entry point group "
        "mbdl.sources) or the import path package.module:load_splits of your own loader (see "
        "Data sources and backbones); every built-in source but glyphs needs data.root.",
        registry="mbdl.data.sources:SOURCES",
    )
    root: str | None = key(None, "Directory (or file) of the data set.", resume_free=True)
    image_size: int | None = key(
        None,
        "Side of the square network input in pixels; null: glyphs and idx 32; with "
        "model.backbone=auto the recipe picks it (32 from scratch; 64 for a pretrained network "
        "on a CPU, smaller images upscaled); with a backbone named, file sources (folder, csv, cub, ...) pick it "
        "from the training images: their median shorter side rounded down to a multiple of 16 "
        "(at least 32), at most the backbone's native size (smallcnn 32, torchvision backbones "
        "224).",
        minimum=8,
        maximum=4096,
    )
    val_fraction: float = key(
        0.15,
        "Fraction of the training classes held out as validation classes (model selection); 0: "
        "none.",
        minimum=0.0,
    )
    max_classes: int | None = key(
        None, "glyphs only: use a subset of this many characters (quick runs and tests).", minimum=4
    )
    num_workers: int | str = key(
        "auto",
        "DataLoader worker processes (0: load in the main process); auto: sized to the machine "
        "and the data path by measurement (mbdl.data.workers: for batches from memory one where "
        "a CPU is left over by the training threads, else none, two with a GPU; the CPUs but one "
        "for images decoded one by one; none for evaluating from memory); printed on the data "
        "line with the reason.",
        minimum=0,
        resume_free=True,
    )
    cache: str = key(
        "auto",
        "Decode a file source's training images once, resized, as uint8 (mbdl.data.cache), and "
        "its evaluation splits once at the network's input size: auto: in memory when they fit "
        "in a quarter of the available memory, else a memory-mapped file in the cache directory "
        "($MBDL_CACHE) when its disk has room, else decode per image; disk: refused before "
        "writing when the disk lacks the room (the message gives the size); off: decode every "
        "image every epoch and evaluation. The choice and its reason are on the data line; a "
        "cache whose source files changed (size or time) or written by another version is "
        "rebuilt, never read.",
        choices=("auto", "memory", "disk", "off"),
    )
    skip_corrupt: bool = key(
        False, "Skip unreadable images with a warning (counted) instead of stopping with an error."
    )
    bbox: bool = key(False, "cub and cars only: crop every image to its bounding box.")
    augment: str = key(
        "auto",
        "Training augmentation: crop (random resized crop + flip, photographs), affine (small "
        "jitter, glyphs and digits), auto (crop from 64 px up, else affine), none; true = auto, "
        "false = none.",
        choices=("auto", "crop", "affine", "none"),
    )
    image_column: str = key(
        "image", "hf source: the column holding the images (a datasets Image or image bytes)."
    )
    label_column: str = key(
        "label",
        "hf source: the column holding the class labels (ClassLabel, ints or strings); "
        "webdataset: the field of a sample's .json holding its label (an index or a name).",
    )
    mean: list[float] | None = key(
        None,
        "Per-channel mean subtracted from images in [0, 1] (3 values, or 1 for grey data); "
        "null: what the backbone's weights expect (torchvision weights' transforms, timm's "
        "pretrained_cfg, the Hugging Face image processor, open_clip's preprocess_cfg), none "
        "for random weights. Training, evaluation and every saved model use it.",
    )
    std: list[float] | None = key(
        None,
        "Per-channel standard deviation images are divided by (each > 0); null: what the "
        "backbone's weights expect (see data.mean).",
    )
    interpolation: str = key(
        "auto",
        "Resize filter for training and evaluation; auto: what the backbone's weights expect "
        "(bilinear by default).",
        choices=("auto", "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"),
    )
    crop_fraction: float | None = key(
        None,
        "Evaluation centre crop side / resized shorter side (timm's crop_pct); null: what the "
        "backbone's weights expect, else 224/256 from 64 px up and 1 below; in (0, 1].",
        above=0.0,
    )
    allow_outside_root: bool = key(
        False,
        "Folder source: accept images and class folders whose resolved path (through symbolic "
        "links) lies outside data.root; off, such a file is refused.",
    )


@dataclass
class ModelConfig:
    backbone: str = key(
        "auto",
        "Backbone network: auto (picked with the input size, augmentation, BatchNorm handling, "
        "learning rates, batch composition and budget from the training images and the "
        "pretrained weights on this machine, see mbdl.recipe; glyphs: smallvgg, the default "
        "recipe), a built-in name, timm/<name> (any timm model; pip install 'mbdl[timm]'), the "
        "name of an installed plugin (entry point group mbdl.backbones) or the import path "
        "package.module:build of your own builder (see Data sources and backbones).",
        registry="mbdl.models.backbones:BACKBONES",
    )
    embedding_dim: int = key(64, "Size of the embedding.", minimum=2, maximum=16384)
    pretrained: str | None = key(
        None,
        "torchvision weight name (IMAGENET1K_V1, DEFAULT) or a local weights file; null: random "
        "init.",
    )
    init: str | None = key(
        None,
        "Start from a trained mbdl embedder (backbone and head): a run directory, a model "
        "directory or hf://owner/name; its architecture must match the model.* keys, and its "
        "preprocessing is used unless data.mean/std/interpolation/crop_fraction say otherwise.",
    )
    freeze_bn: bool = key(False, "Freeze the backbone's BatchNorm statistics and affine.")
    freeze_blocks: int = key(
        0,
        "Freeze the stem and the first N blocks of the backbone (no gradients, BatchNorm "
        "statistics fixed); blocks are timm/HF blocks.N, stages.N, layer.N, torchvision "
        "features.N and ResNet layerN.",
        minimum=0,
    )
    head_bn: bool = key(False, "BatchNorm in the embedding head.")


@dataclass
class LossConfig:
    name: str = key(
        "mdl",
        "Loss. Its hyper-parameters are further loss.* keys, the keyword arguments of the loss "
        "class (e.g. loss.margin=0.2); num_classes and embedding_dim are set by the trainer. A "
        "built-in name, the name of an installed plugin (entry point group mbdl.losses) or the "
        "import path package.module:MyLoss of your own loss (see Losses).",
        registry="mbdl.losses:LOSSES",
    )
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = key(30, "Training epochs.", minimum=1)
    batch_classes: int = key(32, "P: classes per batch.", minimum=2)
    batch_per_class: int = key(4, "K: images per class in a batch (batch size P x K).", minimum=2)
    optimizer: str = key("adamw", "Optimiser.", choices=("adamw", "sgd"))
    lr: float = key(
        0.001,
        "Learning rate of the backbone (peak, after warm-up), for the global batch: under torchrun"
        " with W processes a step sees P x K x W images and the same gradients as one process on "
        "them, so lr is not scaled with W.",
        above=0.0,
    )
    layer_decay: float | None = key(
        None,
        "Layer-wise learning-rate decay: a backbone parameter at depth d of L blocks learns at "
        "lr x layer_decay^(L + 1 - d) (stem 0, blocks 1..L, final norm L + 1); null: off. "
        "Typical for ViTs: 0.65-0.75; in (0, 1].",
        above=0.0,
    )
    head_lr_mult: float = key(1.0, "Learning rate of the embedding head = lr x this.", minimum=0.0)
    loss_lr: float | None = key(
        None,
        "Learning rate of the loss's own parameters (proxies, margin beta); null: train.lr.",
        minimum=0.0,
    )
    momentum: float = key(0.9, "SGD momentum.", minimum=0.0)
    weight_decay: float = key(
        0.0001,
        "Weight decay of the network's weight matrices and kernels (not biases, norms or loss "
        "parameters).",
        minimum=0.0,
    )
    warmup_epochs: float = key(
        1.0,
        "Linear learning-rate warm-up (epochs, fractions allowed), then cosine decay to 0 per "
        "step.",
        minimum=0.0,
    )
    grad_clip: float | None = key(
        None, "Clip the gradients' global L2 norm to this value; null: no clipping.", above=0.0
    )
    amp: str = key(
        "auto",
        "Mixed precision: bf16 autocast (CPU or CUDA), fp16 autocast with a GradScaler (CUDA "
        "only); auto: bf16 on a GPU that supports it (else fp16) and on a CPU with bf16 matrix "
        "instructions (AVX512-BF16 or AMX), else off.",
        choices=("auto", "off", "bf16", "fp16"),
    )
    channels_last: bool = key(
        True,
        "Run convolutional backbones in the channels-last memory format (faster convolutions on "
        "CPUs with oneDNN and on GPU tensor cores; the same results up to rounding).",
    )
    device: str = key(
        "auto",
        "Device; auto: cuda when available.",
        choices=("auto", "cpu", "cuda"),
        resume_free=True,
    )
    num_threads: int | None = key(
        None, "torch CPU threads; null: torch's default.", minimum=1, resume_free=True
    )
    val_every: int = key(
        1, "Validate every this many epochs (and always after the last epoch).", minimum=1
    )
    select_metric: str = key(
        "map@r",
        f"Validation metric that chooses the best checkpoint: {select_metric_help()}.",
    )
    patience: int | None = key(
        None,
        "Early stopping: stop after this many validations without improvement; null: never.",
        minimum=1,
    )
    max_steps_per_epoch: int | None = key(
        None,
        "Cap on the batches per epoch (smoke runs); null: a full pass of the sampler.",
        minimum=1,
    )
    checkpoint_every_steps: int | None = key(
        None,
        "Also write checkpoints/last.pt every this many steps within an epoch; null: per epoch "
        "only.",
        minimum=1,
    )
    progress: bool = key(
        True, "Progress bar per epoch (only shown when stderr is a terminal).", resume_free=True
    )
    xbm_size: int = key(
        0,
        "Cross-batch memory (Wang et al., CVPR 2020): keep the last this many training embeddings "
        "(all ranks' under torchrun) as extra positives and negatives; 0: off. Not for "
        "proxyanchor.",
        minimum=0,
    )
    xbm_warmup_steps: int = key(
        0,
        "Optimiser steps before the cross-batch memory is used (it is filled from the start); the "
        "paper waits about 1000 iterations while the embedding still drifts fast.",
        minimum=0,
    )
    ema: float | None = key(
        None,
        "Exponential moving average of the weights with this decay, in (0, 1) (e.g. 0.999): "
        "after every optimiser step ema = decay x ema + (1 - decay) x weights; the average is "
        "what is validated, selected into best.pt, tested and exported. null: off.",
        above=0.0,
    )
    accumulate: int = key(
        1,
        "Gradient accumulation: micro-batches (each P x K) per optimiser step, each loss divided "
        "by this number; train.max_steps_per_epoch and the schedule count optimiser steps. A "
        "pair-based loss compares pairs within a micro-batch only (unless train.xbm_size adds "
        "earlier embeddings); a loss that is a mean over samples (proxy and softmax losses) gets "
        "the gradients of the large batch.",
        minimum=1,
    )
    compile: bool = key(
        False,
        "torch.compile the model for training (the first steps compile; needs a C compiler on "
        "CPU).",
    )
    loggers: list[str] = key(
        [],
        "Experiment trackers that also receive log.jsonl's records, the config, the test metrics "
        "and the report's figures: tensorboard (OUT/tensorboard), mlflow ($MLFLOW_TRACKING_URI, "
        "else OUT/mlruns), wandb ($WANDB_PROJECT, default mbdl; files in OUT/wandb; "
        "WANDB_MODE=offline keeps them local); each needs its extra (pip install "
        "'mbdl[tensorboard]').",
        choices=("tensorboard", "mlflow", "wandb"),
        resume_free=True,
    )


@dataclass
class EvalConfig:
    ks: list[int] = key([1, 2, 4, 8], "K values of Recall@K.")
    batch_size: int = key(256, "Batch size when embedding a data set.", minimum=1, resume_free=True)
    distance: str = key(
        "euclidean",
        "Distance for retrieval and search.",
        choices=("euclidean", "squared_euclidean", "cosine"),
    )
    report: bool = key(
        True,
        "Write OUT/report.html (plots, embedding projection, retrieval examples) after the test.",
        resume_free=True,
    )
    kmeans_restarts: int | str = key(
        "auto",
        "k-means runs (greedy k-means++ seeding each) behind NMI, AMI and F1; the run with the "
        "lowest inertia is kept; auto: 3 while N x k (points x classes) <= 1e8, else 1 "
        "(mbdl.functional.kmeans.resolve_restarts; metrics.json records kmeans/restarts).",
        minimum=1,
        resume_free=True,
    )
    verify_far: float = key(
        0.001,
        "False accept rate at which mbdl train chooses the verification threshold on the "
        "validation classes (stored in checkpoints/best.pt, used by mbdl verify and mbdl search "
        "--threshold); the test TAR and FAR at that threshold go to metrics.json.",
        above=0.0,
        resume_free=True,
    )
    verify_max_pairs: int = key(
        1000000,
        "Verification pairs: every pair of a split when there are at most this many, else a seeded"
        " sample of this many genuine and this many impostor pairs.",
        minimum=1,
        resume_free=True,
    )


@dataclass
class Config:
    """A validated run configuration (see :data:`CONFIG_SCHEMA`)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = key(0, "Seed of the split, model initialisation, sampler and augmentation.")
    out: str | None = key(
        None,
        "Run directory; null: runs/<source>-<loss>-<date>-<time>. A fresh run refuses a non-empty "
        "directory.",
        resume_free=True,
    )
    resume: bool = key(
        False,
        "Continue the run in out from checkpoints/last.pt (starts fresh when there is none yet).",
        resume_free=True,
    )
    #: the dotted keys the user set (file or overrides): an automatic choice never changes them
    user_set: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)
    #: the :class:`mbdl.recipe.Recipe` that resolved ``model.backbone=auto``, if any
    recipe: Any = field(default=None, repr=False, compare=False)


def _declared_keys() -> dict[str, Key]:
    """Every key declared by the fields of :class:`Config` and its sections, in their order."""
    schema: dict[str, Key] = {}
    sections = get_type_hints(Config)
    for outer in fields(Config):
        if outer.name in SECTIONS:
            inner = [(f"{outer.name}.{f.name}", f) for f in fields(sections[outer.name])]
        else:
            inner = [(outer.name, outer)]
        for name, declared in inner:
            if _KEY in declared.metadata:
                schema[name] = declared.metadata[_KEY]._replace(type=str(declared.type))
    return schema


#: every key (but the loss's own hyper-parameters) -> its :class:`Key`; derived from the fields
CONFIG_SCHEMA: dict[str, Key] = _declared_keys()

#: inclusive upper bounds of the sizes that drive allocations (an image side of 10^5 pixels
#: would ask for tens of GB per image); checkpoints are held to the same bounds
UPPER_BOUNDS: dict[str, float] = {
    name: k.maximum for name, k in CONFIG_SCHEMA.items() if k.maximum is not None
}

#: keys that may differ between a run and its resumption (they do not change the results)
RESUME_FREE_KEYS: frozenset[str] = frozenset(
    name for name, k in CONFIG_SCHEMA.items() if k.resume_free
)


def _default(key: str) -> Any:
    value = CONFIG_SCHEMA[key].default
    return list(value) if isinstance(value, list) else value


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
    elif base == "int | str":
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, str) and _looks_like_number(value):
            value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{key} must be a finite number; got {_shown(value)}")
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
    elif base == "list[float]":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            if not all(math.isfinite(float(v)) for v in value):
                raise ConfigError(f"{key} must hold finite numbers; got {value!r}")
            return [float(v) for v in value]
    elif base == "list[str]":
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    else:  # pragma: no cover - the schema only uses the types above
        raise AssertionError(f"unknown schema type {type_name}")
    expected = f"a {base}" + (" or null" if optional else "")
    raise ConfigError(f"{key} must be {expected}; got {_shown(value)} ({_type_name(value)})")


def _check_value(key: str, value: Any) -> Any:
    declared = CONFIG_SCHEMA[key]
    allowed = declared.choices
    if key == "data.augment" and isinstance(value, bool):
        value = "auto" if value else "none"
    if key in ("train.amp", "data.cache") and value is False:
        value = "off"  # YAML 1.1 reads a bare `off` as false
    if declared.type == "int | str" and isinstance(value, str):  # a count, or auto
        if value != "auto":
            raise ConfigError(
                f"{key} must be auto or a count >= {declared.minimum:g}; got {_shown(value)}"
            )
        return value
    value = _coerce(key, value, declared.type)
    if allowed is not None and isinstance(value, list):
        for item in value:
            if item not in allowed:
                raise ConfigError(
                    f"{key}: {_shown(item)} is not allowed; choose from {', '.join(allowed)}"
                )
    elif allowed is not None and value not in allowed:
        raise ConfigError(
            f"{key}={_shown(value)} is not allowed; choose one of {', '.join(allowed)}"
        )
    if declared.registry is not None and not (key == "model.backbone" and value == "auto"):
        _check_registered(key, value, declared.registry)
    lower = declared.above if declared.above is not None else declared.minimum
    if lower is not None and value is not None:
        strict = declared.above is not None
        if value < lower or (strict and value == lower):
            relation = ">" if strict else ">="
            raise ConfigError(f"{key} must be {relation} {lower:g}; got {_shown(value)}")
    if declared.maximum is not None and value is not None and value > declared.maximum:
        raise ConfigError(f"{key} must be <= {declared.maximum:g}; got {_shown(value)}")
    return value


def registry_choices(registry: Any) -> str:
    """The values a registry accepts, for messages and docs: its names, then plugins."""
    describe = getattr(registry, "describe_choices", None)
    if describe is not None:
        return str(describe())
    return f"{', '.join(registry.names())} or an import path package.module:Name"


def _check_registered(key: str, value: str, registry_path: str) -> None:
    """``value`` must name an entry of the registry at ``registry_path`` (a built-in name, an
    installed plugin or an import path); a plugin is imported and checked here, before training."""
    from mbdl.plugins import PluginError, import_object

    registry = import_object(registry_path, kind="registry")
    if value not in registry:
        raise ConfigError(
            f"{key}={_shown(value)} is not allowed; choose one of {registry_choices(registry)}"
        )
    try:
        registry.get(value)
    except PluginError as error:
        raise ConfigError(f"{key}: {error}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; the value is parsed as a YAML scalar."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {_shown(text)} must look like key=value (e.g. train.epochs=5)")
    try:
        value = load_yaml_bounded(raw) if raw.strip() else None
    except ConfigError as error:
        raise ConfigError(f"override {_shown(text)}: {error}") from None
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise ConfigError(f"override {_shown(text)}: cannot parse the value ({problem})") from None
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
                f"unknown key {key}: not a parameter of loss {_shown(name)}{hint} "
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
            f"loss {_shown(name)} needs {', '.join('loss.' + p for p in missing)} to be set"
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
        raise ConfigError(f"loss {_shown(name)}: {error}") from None
    defaults = {p: d for p, d in valid.items() if d is not inspect.Parameter.empty}
    return {**defaults, **checked}  # the resolved config records every hyper-parameter


# ---------------------------------------------------------------------------------------------
# loading


def _flatten(mapping: dict[str, Any], source: str) -> dict[str, Any]:
    """Nested YAML mapping -> dotted keys. Section values must be mappings."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: keys must be strings; got {_shown(key)}")
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


def stored_config_values(stored: object, where: str) -> dict[str, Any]:
    """The dotted keys of a config read from a received file (a checkpoint, a model directory,
    an index), in the one canonical form :func:`config_from_flat` reads, checked against the
    trust rule before anything imports what it names.

    Every spelling the loader accepts (nested sections, flat dotted keys, both at once) is
    flattened first; then every key backed by a registry (``data.source``, ``model.backbone``,
    ``loss.name``) whose value is an import path is refused unless ``MBDL_TRUST_PLUGINS=1``
    (:func:`mbdl.plugins.check_stored_name`). Callers build their :class:`Config` from the
    returned values, never from the file's own mapping.
    """
    from mbdl.plugins import check_stored_name

    if stored is None:
        return {}
    if not isinstance(stored, dict):
        raise ConfigError(f"{where}: its stored config must be a mapping of keys")
    flat = _flatten(stored, where)
    for key, value in flat.items():
        declared = CONFIG_SCHEMA.get(key)
        if declared is not None and declared.registry is not None:
            check_stored_name(value, key=key, where=where)
    return flat


def nested_config_values(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys -> the nested form of ``config.yaml`` (the inverse of the flattening)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, dot, sub = key.partition(".")
        if dot and section in SECTIONS:
            nested.setdefault(section, {})[sub] = value
        else:
            nested[key] = value
    return nested


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
        raise ConfigError(f"config file {_shown(str(file))} does not exist")
    try:
        with open(file, "rb") as handle:
            raw = handle.read(YAML_MAX_BYTES + 1)
        data = load_yaml_bounded(raw.decode("utf-8"))
    except ConfigError as error:
        raise ConfigError(f"config file {_shown(str(file))}: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {_shown(str(file))}: {error}") from None
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())
        raise ConfigError(f"config file {_shown(str(file))} is not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {_shown(str(file))} must hold a mapping of keys")
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
        user_set=frozenset(values),
    )


def _check_cross_keys(resolved: dict[str, Any]) -> None:
    ks = resolved["eval.ks"]
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"eval.ks must be a non-empty list of integers >= 1; got {_shown(ks)}")
    metric = resolved["train.select_metric"]
    allowed = selectable_keys(ks)
    if metric not in allowed:
        raise ConfigError(
            f"train.select_metric={_shown(metric)} is not allowed; choose one of {', '.join(allowed)}"
        )
    if resolved["train.ema"] is not None and resolved["train.ema"] >= 1:
        raise ConfigError(f"train.ema must be in (0, 1); got {_shown(resolved['train.ema'])}")
    if resolved["eval.verify_far"] >= 1:
        raise ConfigError(
            f"eval.verify_far must be in (0, 1); got {_shown(resolved['eval.verify_far'])}"
        )
    if resolved["data.val_fraction"] >= 1:
        raise ConfigError(
            f"data.val_fraction must be in [0, 1); got {_shown(resolved['data.val_fraction'])}"
        )
    if resolved["data.root"] is None and _source_needs_root(resolved["data.source"]):
        raise ConfigError(
            f"data.source={resolved['data.source']} needs data.root=PATH (where the data set is)"
        )
    if resolved["data.max_classes"] is not None and resolved["data.source"] != "glyphs":
        raise ConfigError("data.max_classes applies to data.source=glyphs only")
    _check_statistics(resolved)
    if resolved["train.warmup_epochs"] > resolved["train.epochs"]:
        raise ConfigError(
            f"train.warmup_epochs={resolved['train.warmup_epochs']:g} exceeds "
            f"train.epochs={resolved['train.epochs']}"
        )


def _check_statistics(resolved: dict[str, Any]) -> None:
    """data.mean and data.std: one value per channel (1 or 3, the same count), std > 0."""
    mean, std = resolved["data.mean"], resolved["data.std"]
    for name, values in (("data.mean", mean), ("data.std", std)):
        if values is not None and len(values) not in (1, 3):
            raise ConfigError(
                f"{name} needs one value per channel (3, or 1 for grey data); got {values!r}"
            )
    if mean is not None and std is not None and len(mean) != len(std):
        raise ConfigError(
            f"data.mean has {len(mean)} values but data.std {len(std)}; give one per channel"
        )
    if std is not None and any(v <= 0 for v in std):
        raise ConfigError(f"data.std must be > 0 for every channel; got {std!r}")
    # images are scaled to [0, 1] before normalising: 0-255 values (mmcv's, detectron2's) would
    # wash every image out to a constant
    for name, values, fits in (
        ("data.mean", mean, lambda v: 0 <= v <= 1),
        ("data.std", std, lambda v: v <= 1),
    ):
        if values is not None and not all(fits(v) for v in values):
            scaled = ", ".join(f"{v / 255:.4g}" for v in values)
            hint = f"; on the 0-255 scale, divide by 255: {name}=[{scaled}]"
            raise ConfigError(
                f"{name}={list(values)!r} does not fit images scaled to [0, 1]"
                + (hint if max(values) > 1 and min(values) >= 0 else "")
            )
    for key in ("data.crop_fraction", "train.layer_decay"):  # fractions: (0, 1]
        if resolved[key] is not None and resolved[key] > 1:
            raise ConfigError(f"{key} must be <= 1; got {resolved[key]!r}")


def _source_needs_root(name: str) -> bool:
    from mbdl.data.sources import SOURCES

    return SOURCES.get(name).needs_root


def _check_xbm(resolved: dict[str, Any]) -> None:
    """Cross-batch memory needs a loss that takes a reference set (not a proxy loss)."""
    from mbdl.losses import loss_class

    name = resolved["loss.name"]
    if resolved["train.xbm_size"] > 0 and not getattr(loss_class(name), "accepts_ref", True):
        raise ConfigError(
            f"train.xbm_size={resolved['train.xbm_size']} needs a loss that takes a reference set; "
            f"loss {_shown(name)} has none (its anchors are proxies): set train.xbm_size=0"
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
    """Dotted keys whose values differ between two flat configs, ignoring :data:`RESUME_FREE_KEYS`
    (the keys declared ``resume_free``)."""
    keys = sorted(set(old) | set(new))
    return [
        k
        for k in keys
        if k not in RESUME_FREE_KEYS and old.get(k, "<unset>") != new.get(k, "<unset>")
    ]
