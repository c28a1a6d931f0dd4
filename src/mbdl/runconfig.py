"""What a run's config says, for the trainer and the inference library alike: its data
(:func:`load_data`), its device, and the embedding and evaluation of a model with its ``eval.*``
keys; and the config of a trained model (:func:`model_config`, the stored one with ``data.*`` /
``eval.*`` / ``seed`` overrides).

The inference library (:mod:`mbdl.inference`) imports this module, never the training code
(:mod:`mbdl.train.trainer`, its optimiser, sampler or data loaders).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mbdl.config import Config, ConfigError
from mbdl.data.workers import loader_workers
from mbdl.errors import UserError
from mbdl.model.record import ModelRecord, imagenet_normalised

# ---------------------------------------------------------------------------------------------
# data and device


def source_options(config: Config) -> dict[str, Any]:
    """Keyword options for the source's ``load_splits``, checked against what it accepts (the
    transforms' settings, ``data.augment`` and the statistics, go to :func:`mbdl.data.load_splits`
    itself: :func:`transform_options`)."""
    from mbdl.data.sources import SOURCES

    accepted = inspect.signature(SOURCES.get(config.data.source).function()).parameters
    wanted: dict[str, tuple[Any, bool]] = {  # option -> (value, whether the user asked for it)
        "skip_corrupt": (config.data.skip_corrupt, config.data.skip_corrupt),
        "bbox": (config.data.bbox, config.data.bbox),
        "max_classes": (config.data.max_classes, config.data.max_classes is not None),
        "allow_outside_root": (config.data.allow_outside_root, config.data.allow_outside_root),
        "image_column": (config.data.image_column, config.data.image_column != "image"),
        "label_column": (config.data.label_column, config.data.label_column != "label"),
    }
    options = {}
    for name, (value, asked) in wanted.items():
        if name in accepted:
            options[name] = value
        elif asked:
            raise ConfigError(f"data.{name} does not apply to data.source={config.data.source}")
    return options


def transform_options(config: Config) -> dict[str, Any]:
    """What :func:`mbdl.data.attach_default_transforms` takes from a config: ``augment``
    (``data.augment``), ``imagenet_norm`` and ``statistics`` (the backbone's weights', with the
    ``data.mean`` / ``std`` / ``interpolation`` / ``crop_fraction`` overrides)."""
    from mbdl.model.preprocessing import config_statistics

    return {
        "augment": config.data.augment,
        "imagenet_norm": imagenet_normalised(config.model.pretrained),
        "statistics": config_statistics(config),
    }


def load_data(config: Config) -> Any:
    """The :class:`mbdl.data.Splits` of ``config.data``, transforms attached; with
    ``model.backbone=auto`` the recipe is resolved first, in place, from the data
    (:func:`mbdl.recipe.resolve_auto`, which returns the splits it loaded)."""
    from mbdl.data import load_splits
    from mbdl.model.preprocessing import config_statistics
    from mbdl.recipe import resolve_auto

    resolved = resolve_auto(config)
    if resolved is not None:
        return _checked_preprocessing(config, resolved, config_statistics(config))
    transforms = transform_options(config)
    splits = load_splits(
        config.data.source,
        config.data.root,
        image_size=config.data.image_size,
        val_fraction=config.data.val_fraction,
        seed=config.seed,
        backbone=config.model.backbone,
        **transforms,
        **source_options(config),
    )
    return _checked_preprocessing(config, splits, transforms["statistics"])


def _checked_preprocessing(config: Config, splits: Any, statistics: Any) -> Any:
    """``splits`` once ``data.mean`` / ``data.std`` fit their channels, with the data line's
    note of where the preprocessing comes from and what the data keys override."""
    from mbdl.model.preprocessing import check_data_channels, describe_statistics

    check_data_channels(config, int(splits.channels))
    note = describe_statistics(statistics, int(splits.image_size))
    if note is not None:
        splits.info = {**(splits.info or {}), "preprocessing": note}
    return splits


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def model_config(record: ModelRecord, overrides: Sequence[str] = ()) -> Config:
    """The config a model was trained with (its data, its ``eval.*`` keys), with ``data.*``,
    ``eval.*`` and ``seed`` overrides (``key=value`` strings) applied."""
    from mbdl.config import config_from_flat, parse_override, stored_config_values

    stored = record.provenance.training_config
    if not stored:
        where = record.provenance.source or "this model"
        raise UserError(f"{where} records no training config (its data): cannot run this")
    flat = stored_config_values(dict(stored), "checkpoint config")
    for text in overrides:
        key, value = parse_override(text)
        if not key.startswith(("data.", "eval.")) and key != "seed":
            raise UserError(f"only data.*, eval.* and seed overrides apply here; got {key}")
        flat[key] = value
    flat["resume"] = False
    return config_from_flat(flat)


def split_for_inference(splits: Any, name: str) -> Any:
    """The split ``name`` of ``splits`` with the evaluation transform, whichever split it is (the
    training split's own transform augments: a copy gets the test split's instead)."""
    import copy

    dataset = getattr(splits, name, None)
    if dataset is None:
        raise UserError(f"data source {splits.source} has no {name} split")
    if len(dataset) == 0:
        raise UserError(f"the {name} split is empty")
    if name == "train":
        dataset = copy.copy(dataset)
        dataset.transform = splits.test.transform
    return dataset


# ---------------------------------------------------------------------------------------------
# evaluation


def embed_with_config(
    model: nn.Module, dataset: Any, config: Config, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mbdl.evaluate.embed_dataset` with the config's batch size and loader workers."""
    from mbdl.evaluate import embed_dataset

    return embed_dataset(
        model,
        dataset,
        batch_size=config.eval.batch_size,
        device=str(device),
        num_workers=loader_workers(config.data.num_workers, dataset, training=False),
    )


def evaluate_dataset(
    model: nn.Module, dataset: Any, config: Config, device: torch.device
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Embed ``dataset`` and compute :func:`mbdl.evaluate.evaluate` (each item queries the rest)."""
    from mbdl.evaluate import evaluate

    embeddings, labels = embed_with_config(model, dataset, config, device)
    metrics = evaluate(
        embeddings,
        labels,
        ks=tuple(config.eval.ks),
        distance=config.eval.distance,
        seed=config.seed,
        **evaluation_options(config),
    )
    return metrics, embeddings, labels


def evaluation_options(config: Config) -> dict[str, Any]:
    """The :func:`mbdl.evaluate.evaluate` options the ``eval.*`` keys set beyond ks and distance."""
    from mbdl.functional.verification import DEFAULT_FARS

    return {
        "kmeans_restarts": config.eval.kmeans_restarts,
        "verify_fars": tuple(sorted({*DEFAULT_FARS, config.eval.verify_far}, reverse=True)),
        "verify_max_pairs": config.eval.verify_max_pairs,
    }


def evaluate_test(
    model: nn.Module, splits: Any, config: Config, device: torch.device
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Test metrics: query vs gallery where the source defines them (In-Shop), else every test
    image against the others. Returns the metrics and the test split's embeddings and labels."""
    from mbdl.evaluate import evaluate

    if splits.query is not None and splits.gallery is not None:
        query, query_labels = embed_with_config(model, splits.query, config, device)
        gallery, gallery_labels = embed_with_config(model, splits.gallery, config, device)
        metrics = evaluate(
            gallery,
            gallery_labels,
            query_embeddings=query,
            query_labels=query_labels,
            ks=tuple(config.eval.ks),
            distance=config.eval.distance,
            seed=config.seed,
            **evaluation_options(config),
        )
        test, test_labels = embed_with_config(model, splits.test, config, device)
        return metrics, test, test_labels
    return evaluate_dataset(model, splits.test, config, device)


def choose_verification_threshold(
    model: nn.Module, splits: Any, config: Config, device: torch.device
) -> dict[str, Any] | None:
    """The distance threshold at FAR ``eval.verify_far`` on the validation classes' pairs (never
    the test classes'), with the validation TAR and FAR it reaches; None without validation
    classes."""
    from mbdl.functional.verification import rates_at_threshold, threshold_at_far

    if len(splits.val) == 0:
        return None
    embeddings, labels = embed_with_config(model, splits.val, config, device)
    if torch.unique(labels).numel() < 2:
        return None
    genuine, impostor = _verification_pairs(embeddings, labels, config)
    threshold = threshold_at_far(genuine, impostor, config.eval.verify_far)
    tar, far = rates_at_threshold(genuine, impostor, threshold)
    return {
        "threshold": threshold,
        "far": config.eval.verify_far,
        "distance": config.eval.distance,
        "chosen_on": "validation",
        "validation_tar": tar,
        "validation_far": far,
        "validation_pairs": [int(genuine.numel()), int(impostor.numel())],
    }


def verification_at_threshold(
    embeddings: torch.Tensor, labels: torch.Tensor, config: Config, threshold: float
) -> dict[str, float]:
    """TAR and FAR of the pairs of ``embeddings`` at a threshold chosen elsewhere."""
    from mbdl.functional.verification import rates_at_threshold

    tar, far = rates_at_threshold(*_verification_pairs(embeddings, labels, config), threshold)
    return {"tar@threshold": tar, "far@threshold": far}


def _verification_pairs(
    embeddings: torch.Tensor, labels: torch.Tensor, config: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """Genuine and impostor pair distances of a split, as ``eval.*`` and the seed say."""
    from mbdl.functional.verification import pair_distances

    genuine, impostor, _ = pair_distances(
        embeddings,
        labels,
        distance=config.eval.distance,
        max_pairs=config.eval.verify_max_pairs,
        seed=config.seed,
    )
    return genuine, impostor


def format_metrics(metrics: dict[str, Any]) -> str:
    """``name value`` lines of the metrics, in the order of :func:`mbdl.evaluate.evaluate`,
    then the run metadata (k-means backend, restarts, seed, pair counts; integers as integers)
    on one line of its own (:func:`mbdl.evaluate.split_metrics`)."""
    from mbdl.evaluate import split_metrics

    table, meta = split_metrics(metrics)
    width = max((len(k) for k in table), default=0)
    lines = [f"{k:<{width}}  {v:.4f}" for k, v in table.items()]
    if meta:
        lines.append("(" + ", ".join(f"{k} {v}" for k, v in meta.items()) + ")")
    return "\n".join(lines)


__all__ = [
    "choose_verification_threshold",
    "embed_with_config",
    "evaluate_dataset",
    "evaluate_test",
    "evaluation_options",
    "format_metrics",
    "load_data",
    "model_config",
    "resolve_device",
    "source_options",
    "split_for_inference",
    "transform_options",
    "verification_at_threshold",
]
