"""Checks of a config against the data it applies to, run once before the first training step.

Everything that evaluation or the sampler would otherwise refuse after hours of training is
checked here, as one :class:`~mbdl.config.ConfigError` that names the key and the fix:

- P x K: ``train.batch_classes`` against the training classes, and at least one training class
  with two images (a batch needs positive pairs);
- ``eval.ks`` against every split that will be evaluated (validation and test each item against
  the others, so K <= size - 1; In-Shop's queries against the gallery, so K <= gallery size);
- each evaluated split has at least two classes and a class with two items (R-Precision and
  MAP@R need a relevant item);
- ``eval.distance`` against what the evaluator accepts (``squared_euclidean`` ranks exactly as
  ``euclidean``; its verification thresholds are squared distances).

:func:`describe_data` is the one-line scan report (images and classes per split, the smallest
and largest class, what was skipped).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mbdl.config import Config, ConfigError
from mbdl.functional.knn import check_knn_options


def _class_sizes(dataset: Any) -> np.ndarray:
    labels = np.asarray(dataset.labels)
    return np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)


def _check_evaluable(name: str, dataset: Any, ks: list[int], *, leave_one_out: bool) -> None:
    sizes = _class_sizes(dataset)
    sizes = sizes[sizes > 0]
    if len(sizes) < 2:
        raise ConfigError(
            f"the {name} split has {len(sizes)} class(es); retrieval needs at least 2"
            + ("; raise data.val_fraction or set it to 0" if name == "validation" else "")
        )
    if leave_one_out and sizes.max() < 2:
        raise ConfigError(
            f"every class of the {name} split has one image, so no image has a match to find; "
            "the data set needs at least 2 images in some class"
        )
    available = len(dataset) - int(leave_one_out)
    if max(ks) > available:
        raise ConfigError(
            f"eval.ks has K={max(ks)} but the {name} split offers only {available} "
            f"neighbours per query; use eval.ks with every K <= {available}"
        )


def validate_before_training(config: Config, splits: Any) -> None:
    """Raise :class:`ConfigError` for any setting the data cannot satisfy (module docstring)."""
    try:
        check_knn_options(config.eval.distance, "auto")
    except ValueError as error:
        raise ConfigError(f"eval.distance={config.eval.distance}: {error}") from None
    train_sizes = _class_sizes(splits.train)
    num_classes = int((train_sizes > 0).sum())
    if num_classes < config.train.batch_classes:
        raise ConfigError(
            f"train.batch_classes={config.train.batch_classes} but the training split has only "
            f"{num_classes} classes; lower train.batch_classes"
        )
    if num_classes and train_sizes.max() < 2:
        raise ConfigError(
            "every training class has one image, so a batch has no positive pair; the data "
            "set needs at least 2 images in some class"
        )
    ks = list(config.eval.ks)
    if len(splits.val):
        _check_evaluable("validation", splits.val, ks, leave_one_out=True)
    if splits.query is not None and splits.gallery is not None:
        _check_evaluable("gallery", splits.gallery, ks, leave_one_out=False)
    else:
        _check_evaluable("test", splits.test, ks, leave_one_out=True)


def describe_data(splits: Any) -> str:
    """One line: images and classes of each split, the class sizes, what was skipped, the
    network's input size (and how it was picked), and where the decoded images are held and how
    many loader workers read them (and why)."""
    parts = []
    for name in ("train", "val", "test", "query", "gallery"):
        dataset = getattr(splits, name, None)
        if dataset is None or (name == "val" and len(dataset) == 0):
            continue
        sizes = _class_sizes(dataset)
        sizes = sizes[sizes > 0]
        spread = f", {sizes.min()}-{sizes.max()} per class" if len(sizes) else ""
        parts.append(f"{name} {len(dataset)} images / {len(sizes)} classes{spread}")
    info = splits.info or {}
    skipped = int(info.get("skipped", 0))
    duplicates = len(info.get("duplicates", []))
    extra = f"; skipped {skipped} unreadable" if skipped else ""
    extra += f"; {duplicates} duplicate paths counted once" if duplicates else ""
    size = info.get("image_size") or f"{splits.image_size} px"
    extra += f"; input {size}, {splits.channels} channel(s)"
    if info.get("data_path"):  # mbdl.data.cache.decode_splits: cache and loader workers, and why
        extra += f"; {info['data_path']}"
    if info.get("preprocessing"):  # mbdl.runconfig.load_data: the weights' and the data keys'
        extra += f"; {info['preprocessing']}"
    recipe = f"; {info['recipe']}" if info.get("recipe") else ""  # model.backbone=auto's choice
    return f"data {splits.source}: " + ", ".join(parts) + extra + recipe
