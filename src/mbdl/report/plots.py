"""Plots of a training run, rendered with matplotlib (Agg) into PNG ``data:`` URIs.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through pyplot, so
writing a report neither needs a display nor changes the user's backend or leaks figures.

Every function returns a ``data:image/png;base64,...`` string (or ``None`` when there is nothing
to draw), so the HTML report can inline it without any external file.
"""

from __future__ import annotations

import base64
import inspect
import io
import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from mbdl.metrics import (
    higher_is_better,
    metric_label,
    metric_of,
    registered_metrics,
    sorted_metric_keys,
)

_RECALL_KEY = re.compile(r"^recall@(\d+)$")
_VALIDATION_PREFIXES = ("val/", "validation/", "val_", "validation_")
_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#db2777")


def recall_at_k(metrics: Mapping[str, Any]) -> list[tuple[int, float]]:
    """The ``(K, Recall@K)`` pairs of a metric dict, sorted by K."""
    pairs = []
    for key, value in metrics.items():
        match = _RECALL_KEY.match(str(key))
        if match and _is_number(value):
            pairs.append((int(match.group(1)), float(value)))
    return sorted(pairs)


def validation_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The validation metrics of one ``log.jsonl`` record.

    Accepts a nested ``"validation"`` (or ``"val"``) dict and flat keys such as ``"val/map@r"``.
    """
    found: dict[str, float] = {}
    for nested in ("validation", "val"):
        value = record.get(nested)
        if isinstance(value, Mapping):
            found.update({str(k): float(v) for k, v in value.items() if _is_number(v)})
    for key, value in record.items():
        for prefix in _VALIDATION_PREFIXES:
            if str(key).startswith(prefix) and _is_number(value):
                found[str(key)[len(prefix) :]] = float(value)
    return found


def figure_to_data_uri(fig: Figure, dpi: int = 110) -> str:
    """Render ``fig`` to PNG and return it as a base64 ``data:`` URI."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs in exotic class names are not errors
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_training_curves(
    history: Sequence[Mapping[str, Any]], select_metric: str | None = None
) -> str | None:
    """Training loss (and learning rate) per epoch beside the validation metrics per epoch.

    With ``select_metric`` (the config's ``train.select_metric``), a dashed line marks the first
    epoch with its highest validation value: the checkpoint the trainer keeps.
    """
    losses = [
        (float(r["epoch"]), float(r["train_loss"]))
        for r in history
        if _is_number(r.get("epoch")) and _is_number(r.get("train_loss"))
    ]
    rates = [
        (float(r["epoch"]), float(r["lr"]))
        for r in history
        if _is_number(r.get("epoch")) and _is_number(r.get("lr"))
    ]
    validation: dict[str, list[tuple[float, float]]] = {}
    for record in history:
        if not _is_number(record.get("epoch")):
            continue
        for name, value in validation_metrics(record).items():
            validation.setdefault(name, []).append((float(record["epoch"]), value))
    if not losses and not validation:
        return None

    fig = Figure(figsize=(10.5, 3.6))
    loss_ax, val_ax = fig.subplots(1, 2)
    if losses:
        xs, ys = zip(*losses, strict=True)
        loss_ax.plot(xs, ys, marker="o", markersize=3, color=_PALETTE[0], label="training loss")
        loss_ax.set_ylabel("training loss")
        if rates:
            lr_ax = loss_ax.twinx()
            rx, ry = zip(*rates, strict=True)
            lr_ax.plot(rx, ry, color="#9ca3af", linestyle="--", linewidth=1, label="learning rate")
            lr_ax.set_ylabel("learning rate", color="#6b7280")
            lr_ax.tick_params(axis="y", colors="#6b7280")
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            for side in ("top", "left", "bottom"):
                lr_ax.spines[side].set_visible(False)
            lr_ax.spines["right"].set_color("#9ca3af")
    else:
        loss_ax.text(0.5, 0.5, "no training loss recorded", ha="center", va="center")
    _style_axes(loss_ax, "Training loss per epoch", "epoch", integer_x=True)

    shown = _one_per_family(sorted_metric_keys(validation)) or sorted_metric_keys(validation)
    for i, name in enumerate(shown[: len(_PALETTE)]):
        xs, ys = zip(*validation[name], strict=True)
        val_ax.plot(xs, ys, marker="o", markersize=3, color=_PALETTE[i], label=_label(name))
    if select_metric in validation:
        sign = 1.0 if _higher_is_better(select_metric) else -1.0
        best_epoch, best_value = max(validation[select_metric], key=lambda p: (sign * p[1], -p[0]))
        val_ax.axvline(best_epoch, color="#6b7280", linestyle=":", linewidth=1.2)
        val_ax.annotate(
            f"chosen: epoch {best_epoch:g}",
            xy=(best_epoch, best_value),
            xytext=(4, -14),
            textcoords="offset points",
            fontsize=8,
            color="#374151",
            annotation_clip=False,
        )
    if shown:
        # beside the axes, never on the curves
        val_ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        val_ax.text(0.5, 0.5, "no validation metrics recorded", ha="center", va="center")
    _style_axes(val_ax, "Validation metrics per epoch", "epoch", integer_x=True)
    fig.tight_layout()
    return figure_to_data_uri(fig)


def plot_recall_curve(metrics: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Recall@K against K (log2 axis), one line per split (validation, test)."""
    curves = {
        split: recall_at_k(values)
        for split, values in metrics.items()
        if isinstance(values, Mapping)
    }
    curves = {split: pairs for split, pairs in curves.items() if pairs}
    if not curves:
        return None
    fig = Figure(figsize=(5.2, 3.6))
    ax = fig.subplots()
    all_k: set[int] = set()
    for i, (split, pairs) in enumerate(curves.items()):
        ks, values = zip(*pairs, strict=True)
        all_k.update(ks)
        ax.plot(ks, values, marker="o", color=_PALETTE[i % len(_PALETTE)], label=_label(split))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_k))
    ax.set_xticklabels([str(k) for k in sorted(all_k)])
    ax.minorticks_off()
    ax.set_ylim(top=1.0)
    ax.legend(fontsize=9, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _style_axes(ax, "Recall@K", "K")
    ax.set_ylabel("recall")
    fig.tight_layout()
    return figure_to_data_uri(fig)


def project_2d(embeddings: Tensor, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D projection of ``embeddings`` ([N, d]) and the name of the method used.

    ``method``: ``"pca"`` (exact, via SVD), ``"tsne"`` (scikit-learn, an optional dependency) or
    ``"auto"`` (t-SNE when scikit-learn is installed and there are at least 30 points, else PCA).
    """
    if method not in ("auto", "pca", "tsne"):
        raise ValueError(f"projection must be 'auto', 'pca' or 'tsne', got {method!r}")
    x = embeddings.detach().to(device="cpu", dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(
            f"embeddings must be a non-empty [N, d] tensor, got shape {tuple(x.shape)}"
        )
    if method in ("auto", "tsne") and x.shape[0] >= 30:
        try:
            from sklearn.manifold import TSNE
            from threadpoolctl import threadpool_limits
        except ImportError:
            if method == "tsne":
                raise ValueError(
                    "projection='tsne' needs scikit-learn; install it or use 'pca'"
                ) from None
        else:
            perplexity = float(min(30.0, (x.shape[0] - 1) / 3))
            # scikit-learn < 1.5 calls the iteration budget n_iter
            budget = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"
            tsne = TSNE(
                n_components=2,
                init="pca",
                perplexity=perplexity,
                random_state=seed,
                **{budget: 500},
            )
            # One OpenMP thread: on a busy machine, more threads made t-SNE 10-30x slower.
            with threadpool_limits(limits=1):
                points = tsne.fit_transform(x.numpy())
            return np.asarray(points, dtype=np.float64), "t-SNE"
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:2]
    # SVD signs are arbitrary: make the largest loading of each component positive (reproducible).
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    points = (centred @ (components * signs).T).numpy()
    if points.shape[1] < 2:  # one-dimensional embeddings
        points = np.concatenate([points, np.zeros((points.shape[0], 1))], axis=1)
    return points, "PCA"


def plot_embedding_projection(
    embeddings: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    *,
    max_classes: int = 20,
    max_points: int = 600,
    method: str = "auto",
    seed: int = 0,
) -> str | None:
    """Scatter plot of a 2-D projection of the embeddings of up to ``max_classes`` classes
    (a seeded choice; at most ``max_points`` points, so t-SNE stays a few seconds), coloured by
    class, with the class names in the legend."""
    labels_np = labels.detach().cpu().numpy().astype(np.int64)
    if labels_np.size == 0:
        return None
    rng = np.random.default_rng(seed)
    classes = np.unique(labels_np)
    if len(classes) > max_classes:
        classes = np.sort(rng.choice(classes, size=max_classes, replace=False))
    chosen = np.flatnonzero(np.isin(labels_np, classes))
    if len(chosen) > max_points:
        chosen = np.sort(rng.choice(chosen, size=max_points, replace=False))
    points, method_name = project_2d(embeddings[torch.as_tensor(chosen)], method, seed)
    chosen_labels = labels_np[chosen]

    fig = Figure(figsize=(8.6, 5.6))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab20"]
    for i, label in enumerate(classes):
        mask = chosen_labels == label
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        ax.scatter(
            points[mask, 0],
            points[mask, 1],
            s=18,
            color=cmap(i % 20),
            alpha=0.85,
            edgecolors="white",
            linewidths=0.4,
            label=_shorten(str(name)),
        )
    total = len(np.unique(labels_np))
    title = f"{method_name} of the test embeddings ({len(classes)} of {total} classes)"
    _style_axes(ax, title, f"{method_name} 1")
    ax.set_ylabel(f"{method_name} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    legend = ax.legend(
        fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=1.4
    )
    for text in legend.get_texts():
        text.set_parse_math(False)  # a class name with "$" must not be read as TeX
    fig.tight_layout()
    return figure_to_data_uri(fig)


def _style_axes(ax: Any, title: str, xlabel: str, integer_x: bool = False) -> None:
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=11, loc="left", parse_math=False)
    ax.set_xlabel(xlabel)
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9ca3af")


def _label(name: str) -> str:
    """A metric's label from the registry; split names (validation, test) as they are."""
    return metric_label(name)


def _one_per_family(names: Sequence[str]) -> list[str]:
    """``names`` without the second and later keys of a family (``recall@2`` after
    ``recall@1``): the validation curves show one Recall@K."""
    kept: list[str] = []
    families: set[str] = set()
    metrics = registered_metrics()
    for name in names:
        metric = metric_of(name, metrics)
        if metric is not None and metric.is_family:
            if metric.name in families:
                continue
            families.add(metric.name)
        kept.append(name)
    return kept


def _higher_is_better(name: str) -> bool:
    try:
        return higher_is_better(name)
    except ValueError:  # not a registered metric: the trainer maximises
        return True


def _shorten(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
