"""The library under the inference commands: embed, verify and evaluate a trained model.

Each function takes a model (a :class:`mbdl.model.LoadedModel`, or a path that
:func:`mbdl.model.load_model` reads: a model directory, ``hf://owner/name``, a run directory or a
checkpoint) and returns a dataclass; ``mbdl embed``, ``verify``, ``eval`` and ``search`` over a
split (:func:`search_split`) parse their arguments, call one of these and format the result. Images are read through the one checked
reader (:func:`mbdl.data.files.read_image`) and go through the model's recorded preprocessing;
a split is always embedded with the evaluation transform, the training split included.

This module imports no training code. The run-config glue it and the trainer share lives in
:mod:`mbdl.runconfig` (its names are re-exported here for code written before it moved).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mbdl.errors import UserError
from mbdl.model.loading import LoadedModel, load_model
from mbdl.runconfig import (
    choose_verification_threshold,
    embed_with_config,
    evaluate_dataset,
    evaluate_test,
    evaluation_options,
    format_metrics,
    load_data,
    model_config,
    resolve_device,
    source_options,
    split_for_inference,
    verification_at_threshold,
)

ModelLike = LoadedModel | str | os.PathLike[str]
ImageLike = Any  # a path (str / PathLike) or a PIL image


def as_loaded_model(model: ModelLike, device: str | torch.device = "auto") -> LoadedModel:
    """``model`` itself when loaded, else :func:`mbdl.model.load_model` of the path on
    ``device`` (``auto``: cuda when available)."""
    if isinstance(model, LoadedModel):
        return model
    target = resolve_device(device) if isinstance(device, str) else device
    return load_model(model, target)


def read_images(model: LoadedModel, images: Sequence[ImageLike]) -> list[Any]:
    """PIL images in the model's colour mode: paths read by the one checked reader
    (:func:`mbdl.data.files.read_image`: 16-bit scaled, alpha composited, size bounded), PIL
    images converted the same way."""
    from PIL import Image

    from mbdl.data.files import read_image, to_mode

    mode = model.record.color_mode
    return [
        to_mode(image, mode) if isinstance(image, Image.Image) else read_image(image, mode)
        for image in images
    ]


#: images :func:`embed_images` reads, transforms and embeds at a time
EMBED_BATCH = 64


def embed_images(
    model: ModelLike,
    images: Sequence[ImageLike],
    *,
    device: str | torch.device = "auto",
    batch_size: int = EMBED_BATCH,
) -> Tensor:
    """The ``[N, d]`` float32 CPU embeddings of image files or PIL images, ``batch_size`` of
    them read and embedded at a time (memory bounded by the batch, not by N)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loaded = as_loaded_model(model, device)
    parts = []
    for start in range(0, len(images), batch_size):
        chunk = read_images(loaded, images[start : start + batch_size])
        batch = torch.stack([loaded.transform(image) for image in chunk])
        with torch.inference_mode():
            parts.append(loaded.module(batch.to(loaded.device)).float().cpu())
    return torch.cat(parts) if parts else torch.empty(0, loaded.record.embedding_dim)


@dataclass(frozen=True)
class SplitEmbeddings:
    """The embeddings of one split of a model's data, in order."""

    split: str
    embeddings: Tensor  # [N, d] float32
    labels: Tensor  # [N] int64
    class_names: list[str]
    items: list[str]  # each item's path or readable name


def embed(
    model: ModelLike,
    *,
    split: str = "test",
    overrides: Sequence[str] = (),
    device: str | torch.device = "auto",
) -> SplitEmbeddings:
    """Embed the ``split`` of the model's training data (``overrides``: ``data.*`` / ``eval.*``
    / ``seed`` changes to its stored config) with the evaluation transform."""
    loaded = as_loaded_model(model, device)
    config = model_config(loaded.record, overrides)
    dataset = split_for_inference(load_data(config), split)
    embeddings, labels = embed_with_config(loaded.module, dataset, config, loaded.device)
    return SplitEmbeddings(
        split=split,
        embeddings=embeddings,
        labels=labels,
        class_names=list(dataset.class_names),
        items=[dataset.describe(i) for i in range(len(dataset))],
    )


@dataclass(frozen=True)
class Verification:
    """The answer to "are these two images the same item?"."""

    same: bool
    distance: float
    threshold: float
    distance_kind: str  # the distance measured (the model's eval.distance)
    threshold_source: str  # "given" or "validation classes"
    far: float | None  # the false accept rate the threshold was chosen at, when stored

    def to_json(self) -> dict[str, Any]:
        return {
            "same": self.same,
            "distance": self.distance,
            "threshold": self.threshold,
            "distance_kind": self.distance_kind,
            "threshold_source": self.threshold_source,
            "far": self.far,
        }


def stored_threshold(model: LoadedModel, distance: str) -> float:
    """The model's validated verification threshold in ``distance``; a :class:`UserError`
    when it stores none."""
    verification = model.record.verification
    if verification is None:
        raise UserError(
            "this model has no verification threshold (it had no validation classes, or was "
            "trained before mbdl stored one): give one with --threshold DISTANCE"
        )
    return verification.threshold_for(distance)


def verify(
    model: ModelLike,
    image_a: ImageLike,
    image_b: ImageLike,
    *,
    threshold: float | None = None,
    device: str | torch.device = "auto",
) -> Verification:
    """Whether ``image_a`` and ``image_b`` show the same item: their distance (the model's, in
    float64) against ``threshold``, or the one chosen on the validation classes when None."""
    import math

    from mbdl.functional.verification import paired_distances

    loaded = as_loaded_model(model, device)
    distance_kind = loaded.record.distance
    if threshold is None:
        chosen = stored_threshold(loaded, distance_kind)
        source = "validation classes"
        far = loaded.record.verification.far if loaded.record.verification else None
    else:
        if not (math.isfinite(threshold) and threshold >= 0):
            raise UserError(f"the threshold must be a finite distance >= 0; got {threshold}")
        chosen, source, far = float(threshold), "given", None
    embeddings = embed_images(loaded, [image_a, image_b])
    # the pair's own distance, as the stored threshold was chosen (float64; not a GEMM
    # expansion, whose rounding leaves two identical images about 3e-4 apart)
    distance = float(paired_distances(embeddings[:1], embeddings[1:], distance_kind)[0])
    return Verification(distance <= chosen, distance, chosen, distance_kind, source, far)


@dataclass(frozen=True)
class SplitNeighbour:
    """One item of a split found for a query."""

    rank: int  # 1-based
    index: int  # the item's position in the split
    item: str  # its path or readable name
    label: str  # its class name
    distance: float  # the model's distance (eval.distance), in float64
    match: bool | None  # distance <= threshold when a threshold applies, else None


@dataclass(frozen=True)
class SplitSearch:
    """The nearest items of a split of the model's data, per query (in the queries' order)."""

    split: str
    distance_kind: str
    threshold: float | None
    queries: list[str]
    neighbours: list[list[SplitNeighbour]]


def search_split(
    model: ModelLike,
    queries: Sequence[ImageLike],
    *,
    split: str = "test",
    k: int = 5,
    overrides: Sequence[str] = (),
    threshold: float | str | None = None,
    device: str | torch.device = "auto",
) -> SplitSearch:
    """The ``k`` nearest items of the ``split`` of the model's data (``overrides``: ``data.*`` /
    ``eval.*`` / ``seed`` changes to its stored config) for each query image (paths or PIL
    images, read in the model's colour mode by :func:`read_images`; both sides through the
    split's evaluation transform), by the model's distance computed in float64 (near 0 the
    float32 expansion ``|q|^2 + |g|^2 - 2 q.g`` cancels). ``threshold``: None (no match flags),
    a distance, or ``"model"`` (the threshold chosen on the validation classes)."""
    import math

    from mbdl.functional.distances import pairwise_distance

    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    if not queries:
        raise UserError("give at least one query image")
    loaded = as_loaded_model(model, device)
    config = model_config(loaded.record, overrides)
    distance_kind = config.eval.distance
    if threshold == "model":
        chosen: float | None = stored_threshold(loaded, distance_kind)
    elif threshold is None:
        chosen = None
    else:
        chosen = float(threshold)
        if not (math.isfinite(chosen) and chosen >= 0):
            raise UserError(f"the threshold must be a finite distance >= 0; got {threshold}")
    images = read_images(loaded, queries)  # a bad query is refused before the data loads
    dataset = split_for_inference(load_data(config), split)
    gallery, labels = embed_with_config(loaded.module, dataset, config, loaded.device)
    batch = torch.stack([dataset.transform(image) for image in images])
    with torch.inference_mode():
        embedded = loaded.module(batch.to(loaded.device)).float().cpu()
    distances = pairwise_distance(embedded.double(), gallery.double(), distance_kind)
    values, indices = torch.topk(distances, min(k, len(dataset)), dim=1, largest=False)
    neighbours = [
        [
            SplitNeighbour(
                rank,
                index,
                dataset.describe(index),
                dataset.class_names[int(labels[index])],
                distance,
                None if chosen is None else distance <= chosen,
            )
            for rank, (distance, index) in enumerate(
                zip(row_values.tolist(), row_indices.tolist(), strict=True), start=1
            )
        ]
        for row_values, row_indices in zip(values, indices, strict=True)
    ]
    names = [
        q if isinstance(q, (str, os.PathLike)) else f"image[{i}]" for i, q in enumerate(queries)
    ]
    return SplitSearch(split, distance_kind, chosen, [str(n) for n in names], neighbours)


@dataclass(frozen=True)
class Evaluation:
    """The metrics of a model on a split of its data (``metrics``: the table of
    :func:`mbdl.evaluate.evaluate`, plus ``tar@threshold`` / ``far@threshold`` at the stored
    threshold; ``meta``: how they were computed)."""

    split: str
    metrics: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)
    embeddings: Tensor | None = None
    labels: Tensor | None = None

    def to_json(self) -> dict[str, Any]:
        """What ``mbdl eval --json`` prints: ``{"metrics": ..., "meta": ...}``."""
        return {"metrics": dict(self.metrics), "meta": dict(self.meta)}


def evaluate_model(
    model: ModelLike,
    *,
    split: str = "test",
    overrides: Sequence[str] = (),
    device: str | torch.device = "auto",
) -> Evaluation:
    """Evaluate the model on the test (query vs gallery where the source has them) or the
    validation classes of its data, and the TAR / FAR at its stored threshold."""
    from mbdl.evaluate import split_metrics

    if split not in ("test", "val"):
        raise UserError(f"split must be test or val, got {split!r}")
    loaded = as_loaded_model(model, device)
    config = model_config(loaded.record, overrides)
    splits = load_data(config)
    if split == "test":
        metrics, embeddings, labels = evaluate_test(loaded.module, splits, config, loaded.device)
    else:
        dataset = split_for_inference(splits, "val")
        metrics, embeddings, labels = evaluate_dataset(
            loaded.module, dataset, config, loaded.device
        )
    verification = loaded.record.verification
    if (
        verification is not None
        and verification.distance == config.eval.distance
        and torch.unique(labels).numel() >= 2
    ):
        metrics.update(
            verification_at_threshold(embeddings, labels, config, verification.threshold)
        )
    table, meta = split_metrics(metrics)
    return Evaluation(split, table, meta, embeddings, labels)


__all__ = [
    "Evaluation",
    "SplitEmbeddings",
    "SplitNeighbour",
    "SplitSearch",
    "Verification",
    "as_loaded_model",
    "choose_verification_threshold",
    "embed",
    "embed_images",
    "embed_with_config",
    "evaluate_dataset",
    "evaluate_model",
    "evaluate_test",
    "evaluation_options",
    "format_metrics",
    "load_data",
    "read_images",
    "resolve_device",
    "search_split",
    "source_options",
    "stored_threshold",
    "verify",
]
