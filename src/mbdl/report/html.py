"""The run report: one self-contained HTML page (inline CSS, plots and thumbnails as ``data:`` URIs).

Everything that comes from the user (class names, paths, config values) goes through
:func:`html.escape`, so a class called ``<script>`` is shown, never run.
"""

from __future__ import annotations

import base64
import io
import json
import math
import numbers
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

import mbdl
from mbdl.fileio import atomic_write_text
from mbdl.metrics import metric_label, metric_of, registered_metrics, sorted_metric_keys
from mbdl.report.plots import (
    plot_embedding_projection,
    plot_recall_curve,
    plot_training_curves,
)

REPORT_NAME = "report.html"
#: The key figures' cards show the first this many summary metrics of the registry (a
#: family by its smallest K).
SUMMARY_CARDS = 4


@dataclass(frozen=True)
class Retrieval:
    """One query of the retrieval grid and its nearest neighbours (dataset indices, best first)."""

    query: int
    neighbours: list[int]
    distances: list[float]
    correct: list[bool]


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Mapping[str, Any]],
    test_embeddings: Tensor,
    test_labels: Tensor,
    test_dataset: Any,
    num_queries: int = 8,
    top_k: int = 5,
    max_classes: int = 20,
    projection: str = "auto",
    distance: str | None = None,
    seed: int | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (atomically: temp file, then rename) and return its path.

    The page holds the run's config, the validation and test metrics, the training curves,
    Recall@K against K, a 2-D projection of the test embeddings (``projection``: ``auto`` is
    t-SNE when scikit-learn is installed, else PCA) of up to ``max_classes`` classes, and
    ``num_queries`` seeded test queries with their ``top_k`` exact nearest neighbours (the query
    itself excluded by index). ``test_dataset`` follows the ``ImageDataset`` contract.
    ``distance`` defaults to the config's evaluation distance, else euclidean; ``seed`` to the
    config's ``seed``, else 0.
    """
    embeddings = test_embeddings.detach().to("cpu", torch.float32)
    labels = test_labels.detach().to("cpu", torch.int64).reshape(-1)
    if embeddings.ndim != 2 or embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"test_embeddings [N, d] and test_labels [N] disagree: shapes "
            f"{tuple(test_embeddings.shape)} and {tuple(test_labels.shape)}"
        )
    if len(test_dataset) != labels.shape[0]:
        raise ValueError(
            f"test_dataset has {len(test_dataset)} items but there are {labels.shape[0]} test labels"
        )
    flat_config = flatten_config(config)
    if seed is None:
        seed = _int_or(flat_config.get("seed"), 0)
    if distance is None:
        distance = _config_distance(flat_config)

    retrievals = retrieval_examples(
        embeddings, labels, num_queries=num_queries, k=top_k, seed=seed, distance=distance
    )
    page = render_report(
        config=flat_config,
        history=history,
        metrics=metrics,
        training_plot=plot_training_curves(
            history, _str_or_none(flat_config.get("train.select_metric"))
        ),
        recall_plot=plot_recall_curve(metrics),
        projection_plot=plot_embedding_projection(
            embeddings,
            labels,
            list(test_dataset.class_names),
            max_classes=max_classes,
            method=projection,
            seed=seed,
        ),
        retrievals=retrievals,
        dataset=test_dataset,
        distance=distance,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_NAME
    atomic_write_text(path, page)
    return path


def retrieval_examples(
    embeddings: Tensor,
    labels: Tensor,
    *,
    num_queries: int = 8,
    k: int = 5,
    seed: int = 0,
    distance: str = "euclidean",
) -> list[Retrieval]:
    """``num_queries`` seeded queries (from classes with at least two items, distinct classes
    while possible) and their ``k`` exact nearest neighbours among all other items.

    The query is excluded by its index, never by dropping the first neighbour (which breaks on
    duplicates at distance 0).
    """
    from mbdl.functional.knn import knn

    n = labels.shape[0]
    k = min(k, n - 1)
    if num_queries <= 0 or k <= 0:
        return []
    labels_np = labels.numpy()
    _, inverse, counts = np.unique(labels_np, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse] >= 2)
    if len(candidates) == 0:
        candidates = np.arange(n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(candidates)
    # one query per class first, then fill up with the remaining candidates
    _, first = np.unique(labels_np[order], return_index=True)
    distinct = order[np.sort(first)]
    rest = order[~np.isin(order, distinct)]
    queries = np.concatenate([distinct, rest])[:num_queries]

    query_tensor = torch.as_tensor(queries, dtype=torch.int64)
    dists, idx = knn(
        embeddings[query_tensor], embeddings, k + 1, distance=distance, exclude_self=False
    )
    examples = []
    for row, query in enumerate(queries.tolist()):
        keep = [(int(j), float(d)) for j, d in zip(idx[row], dists[row], strict=True) if j != query]
        keep = keep[:k]
        examples.append(
            Retrieval(
                query=query,
                neighbours=[j for j, _ in keep],
                distances=[d for _, d in keep],
                correct=[bool(labels_np[j] == labels_np[query]) for j, _ in keep],
            )
        )
    return examples


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (dataclass-like objects are read via ``vars``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "__dataclass_fields__"):
            value = {f: getattr(value, f) for f in value.__dataclass_fields__}
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def thumbnail_data_uri(image: Image.Image, size: int = 112) -> str:
    """``image`` scaled to fit ``size`` x ``size`` (small images are enlarged) as a PNG data URI."""
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    scale = size / max(image.size)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(new_size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_report(
    *,
    config: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Mapping[str, Any]],
    training_plot: str | None,
    recall_plot: str | None,
    projection_plot: str | None,
    retrievals: Sequence[Retrieval],
    dataset: Any,
    distance: str,
) -> str:
    """The report page as a string; ``config`` is flat (dotted keys)."""
    title_bits = [
        str(config[key])
        for key in ("loss.name", "model.backbone", "data.source")
        if config.get(key) not in (None, "")
    ]
    title = " · ".join(title_bits) or "training run"
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    body = [
        '<header class="page-header"><div class="wrap">',
        '<p class="eyebrow">mbdl training report</p>',
        f"<h1>{escape(title)}</h1>",
        f'<p class="subtitle">{escape(_subtitle(config, history))}</p>',
        "</div></header>",
        '<main class="wrap">',
        _summary_cards(metrics, history),
        _section(
            "Metrics",
            '<div class="split">'
            + _metrics_table(metrics)
            + (_figure(recall_plot, "Recall@K against K", css="recall") if recall_plot else "")
            + "</div>"
            + _meta_block(metrics),
            _metrics_note(metrics),
        ),
        _section(
            "Training curves",
            _figure(training_plot, "Training loss and validation metrics per epoch")
            if training_plot
            else '<p class="empty">No training history was recorded.</p>',
        ),
        _section(
            "Test embeddings",
            _figure(projection_plot, "2-D projection of the test embeddings, coloured by class"),
            "A seeded choice of test classes (classes never seen in training).",
        ),
        _section(
            "Retrieval examples",
            _retrieval_grid(retrievals, dataset, distance),
            f"Seeded test queries and their nearest test images ({escape(distance)} distance; "
            "the query itself excluded). A green border and ✓ mark a result of the query's class, "
            "a red border and ✗ one of another class.",
        ),
        _section("Configuration", _config_table(config)),
        "</main>",
        f'<footer class="wrap">Generated by mbdl {escape(mbdl.__version__)} on {escape(generated)}.'
        "</footer>",
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>mbdl report: {escape(title)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _subtitle(config: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    if config.get("model.embedding_dim") is not None:
        parts.append(f"{config['model.embedding_dim']}-d embedding")
    if config.get("train.batch_classes") and config.get("train.batch_per_class"):
        parts.append(
            f"batches of {config['train.batch_classes']} x {config['train.batch_per_class']}"
        )
    epochs = [r.get("epoch") for r in history if isinstance(r.get("epoch"), numbers.Real)]
    if epochs:
        parts.append(f"{len(epochs)} epochs logged")
    if config.get("seed") is not None:
        parts.append(f"seed {config['seed']}")
    if config.get("out"):
        parts.append(f"run {Path(str(config['out'])).name}")
    return " · ".join(parts)


def _summary_cards(
    metrics: Mapping[str, Mapping[str, Any]], history: Sequence[Mapping[str, Any]]
) -> str:
    test = metrics.get("test", {})
    ks = _family_ks(test)
    firsts = [
        next((key for key in metric.keys(ks) if key in test), None)
        for metric in registered_metrics()
        if metric.summary
    ]
    shown = [key for key in firsts if key is not None][:SUMMARY_CARDS]
    cards = [(metric_label(name), _format_value(test[name]), "test") for name in shown]
    speeds = [
        float(r["images_per_s"])
        for r in history
        if isinstance(r.get("images_per_s"), numbers.Real) and math.isfinite(r["images_per_s"])
    ]
    if speeds:
        cards.append(("Throughput", f"{statistics.median(speeds):,.0f}", "images/s (median epoch)"))
    elapsed = [r["elapsed_s"] for r in history if isinstance(r.get("elapsed_s"), numbers.Real)]
    if elapsed:
        cards.append(("Training time", _format_duration(float(max(elapsed))), "wall clock"))
    if not cards:
        return ""
    items = "".join(
        f'<div class="card"><div class="card-value">{escape(value)}</div>'
        f'<div class="card-label">{escape(label)}</div><div class="card-note">{escape(note)}</div>'
        "</div>"
        for label, value, note in cards
    )
    return f'<section class="cards" aria-label="Key figures">{items}</section>'


#: the groups of the metrics table, by what a metric needs (:data:`mbdl.metrics.NEEDS`)
_GROUPS = (("knn", "Retrieval"), ("kmeans", "Clustering"), ("pairs", "Verification"))
#: the splits the metrics table has a column for (metrics.json's other blocks are not splits)
_NOT_SPLITS = frozenset({"meta", "verification"})


def _metric_tables(
    metrics: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per split, the metric table and the run metadata: ``metrics.json``'s ``meta`` block where
    it has one, else separated from the split's flat metrics (:func:`mbdl.evaluate.split_metrics`)."""
    from mbdl.evaluate import split_metrics

    stored_meta = metrics.get("meta") if isinstance(metrics.get("meta"), Mapping) else {}
    tables: dict[str, dict[str, Any]] = {}
    metas: dict[str, dict[str, Any]] = {}
    for split, values in metrics.items():
        if split in _NOT_SPLITS or not _has_scalars(values):
            continue
        table, meta = split_metrics({k: v for k, v in values.items() if _is_scalar(v)})
        tables[str(split)] = table
        extra = stored_meta.get(split) if isinstance(stored_meta, Mapping) else None
        metas[str(split)] = {**meta, **(dict(extra) if isinstance(extra, Mapping) else {})}
    return tables, metas


def _group_of(name: str, registry: Sequence[Any]) -> str:
    metric = metric_of(name, registry)
    if metric is not None:
        return metric.needs
    if name.startswith(("tar@", "far@", "threshold@", "eer")):
        return "pairs"
    return "other"


def _metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    tables, _ = _metric_tables(metrics)
    splits = [s for s in tables if tables[s]]
    names = sorted_metric_keys({name for s in splits for name in tables[s]})
    if not names:
        return '<p class="empty">No metrics were recorded.</p>'
    head = "".join(
        f'<th scope="col" class="num">{escape(str(s).capitalize())}</th>' for s in splits
    )
    registry = registered_metrics()
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(_group_of(name, registry), []).append(name)
    bodies = []
    for need, title in (*_GROUPS, ("other", "Other")):
        if need not in grouped:
            continue
        rows = [
            f'<tr class="group"><th scope="rowgroup" colspan="{len(splits) + 1}">'
            f"{escape(title)}</th></tr>"
        ]
        for name in grouped[need]:
            metric = metric_of(name, registry)
            tip = f' title="{escape(metric.description)}"' if metric and metric.description else ""
            cells = "".join(
                f'<td class="num">{escape(_format_value(tables[s][name]))}</td>'
                if name in tables[s]
                else '<td class="num missing">—</td>'
                for s in splits
            )
            label = escape(metric_label(name, registry))
            rows.append(f'<tr><th scope="row"{tip}>{label}</th>{cells}</tr>')
        bodies.append(f"<tbody>{''.join(rows)}</tbody>")
    return (
        '<table class="metrics"><thead><tr><th scope="col">Metric</th>'
        f"{head}</tr></thead>{''.join(bodies)}</table>"
    )


def _meta_block(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """How the metrics were computed (k-means backend, restarts, seed; pair counts, as
    integers) and the verification threshold, apart from the metrics."""
    _, metas = _metric_tables(metrics)
    items = []
    for split, meta in metas.items():
        if meta:
            text = ", ".join(f"{key} {_format_value(value)}" for key, value in meta.items())
            items.append(f"<li><strong>{escape(split.capitalize())}</strong>: {escape(text)}</li>")
    chosen = metrics.get("verification")
    if isinstance(chosen, Mapping) and _is_scalar(chosen.get("threshold")):
        far = chosen.get("far")
        text = f"{chosen.get('distance', '')} distance {_format_value(chosen['threshold'])}"
        if _is_scalar(far):
            text += (
                f", chosen on the {chosen.get('chosen_on', 'validation')} classes at FAR {far:g}"
            )
        items.append(f"<li><strong>Verification threshold</strong>: {escape(text)}</li>")
    if not items:
        return ""
    return f'<ul class="meta" aria-label="Run metadata">{"".join(items)}</ul>'


def _metrics_note(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    splits = [str(s) for s in metrics if s not in _NOT_SPLITS and _has_scalars(metrics[s])]
    registry = registered_metrics()
    groups = [
        (source, [m.label for m in registry if m.needs == need])
        for need, source in _NEEDS_NOTE.items()
    ]
    note = "; ".join(f"{_and_list(labels)} {source}" for source, labels in groups if labels) + "."
    if "validation" in splits and "test" in splits:
        note += " The checkpoint was chosen on the validation classes; the test classes are unseen."
    return note


def _retrieval_grid(retrievals: Sequence[Retrieval], dataset: Any, distance: str) -> str:
    if not retrievals:
        return '<p class="empty">Too few test images for retrieval examples.</p>'
    names = list(dataset.class_names)
    labels = np.asarray(dataset.labels)
    total = sum(len(r.correct) for r in retrievals)
    hits = sum(sum(r.correct) for r in retrievals)
    rows = [
        f'<p class="grid-summary">{hits} of {total} retrieved images share their query\'s class.</p>',
        '<div class="retrievals">',
    ]
    for number, example in enumerate(retrievals, start=1):
        query_class = _class_name(names, int(labels[example.query]))
        tiles = [
            _tile(
                dataset,
                example.query,
                css="query",
                badge="Query",
                caption=query_class,
                note=dataset.describe(example.query),
                alt=f"Query {number}: class {query_class}",
            )
        ]
        for rank, (index, dist, correct) in enumerate(
            zip(example.neighbours, example.distances, example.correct, strict=True), start=1
        ):
            name = _class_name(names, int(labels[index]))
            verdict = "correct" if correct else "wrong"
            tiles.append(
                _tile(
                    dataset,
                    index,
                    css=verdict,
                    badge=f"{'✓' if correct else '✗'} #{rank}",
                    caption=name,
                    note=f"d = {dist:.3f}",
                    alt=f"Result {rank} of query {number}: class {name}, {verdict}",
                    title=dataset.describe(index),
                )
            )
        rows.append(f'<div class="retrieval-row">{"".join(tiles)}</div>')
    rows.append("</div>")
    return "".join(rows)


def _tile(
    dataset: Any,
    index: int,
    *,
    css: str,
    badge: str,
    caption: str,
    note: str,
    alt: str,
    title: str | None = None,
) -> str:
    uri = thumbnail_data_uri(dataset.load_image(index))
    tooltip = escape(title if title is not None else note)
    return (
        f'<figure class="tile {css}" title="{tooltip}">'
        f'<div class="thumb"><img src="{uri}" alt="{escape(alt)}"></div>'
        f'<figcaption><span class="badge">{escape(badge)}</span>'
        f'<span class="caption">{escape(caption)}</span>'
        f'<span class="note">{escape(note)}</span></figcaption></figure>'
    )


def _config_table(config: Mapping[str, Any]) -> str:
    if not config:
        return '<p class="empty">No configuration was recorded.</p>'
    rows = "".join(
        f'<tr><th scope="row"><code>{escape(str(key))}</code></th>'
        f"<td><code>{escape(_format_config_value(value))}</code></td></tr>"
        for key, value in config.items()
    )
    return f'<table class="config"><tbody>{rows}</tbody></table>'


def _section(title: str, content: str, note: str | None = None) -> str:
    """A report panel; ``content`` and ``note`` are HTML (escape what comes from the user)."""
    anchor = title.lower().replace(" ", "-")
    lead = f'<p class="lead">{note}</p>' if note else ""
    return f'<section id="{anchor}" class="panel"><h2>{escape(title)}</h2>{lead}{content}</section>'


def _figure(uri: str | None, alt: str, css: str = "") -> str:
    if not uri:
        return f'<p class="empty">{escape(alt)}: nothing to plot.</p>'
    return f'<figure class="plot {css}"><img src="{uri}" alt="{escape(alt)}"></figure>'


def _class_name(names: Sequence[str], label: int) -> str:
    return str(names[label]) if 0 <= label < len(names) else str(label)


_NEEDS_NOTE = {
    "knn": "from exact nearest neighbours (each item queries all others)",
    "kmeans": "from k-means with as many clusters as classes",
    "pairs": "from the genuine and impostor pairs",
}


def _and_list(words: Sequence[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def _family_ks(values: Mapping[str, Any]) -> list[int]:
    """The Ks of the family keys (``recall@4``) in ``values``: the run's ``eval.ks``."""
    return sorted(
        {
            int(key.rsplit("@", 1)[1])
            for metric in registered_metrics()
            if metric.is_family
            for key in values
            if metric.owns(key)
        }
    )


def _has_scalars(values: Any) -> bool:
    return isinstance(values, Mapping) and any(_is_scalar(v) for v in values.values())


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{float(value):.4f}"


def _format_config_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps([v if isinstance(v, (int, float, bool)) else str(v) for v in value])
    if isinstance(value, Mapping):
        return "{}" if not value else json.dumps({str(k): str(v) for k, v in value.items()})
    return str(value)


def _format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _int_or(value: Any, default: int) -> int:
    return (
        int(value)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool)
        else default
    )


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _config_distance(config: Mapping[str, Any]) -> str:
    for key in ("eval.distance", "evaluate.distance", "evaluation.distance", "distance"):
        value = config.get(key)
        if value in ("euclidean", "cosine"):
            return str(value)
        if value == "squared_euclidean":  # the same ranking as euclidean
            return "euclidean"
    return "euclidean"


_CSS = """
:root { --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#f3f4f6; --panel:#ffffff;
  --accent:#2563eb; --good:#16a34a; --bad:#dc2626; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
.wrap { max-width: 1120px; margin: 0 auto; padding: 0 24px; }
.page-header { background:#111827; color:#f9fafb; padding: 28px 0 24px; margin-bottom: 24px; }
.page-header h1 { margin: 2px 0 6px; font-size: 28px; font-weight: 650; letter-spacing: -0.01em; }
.eyebrow { margin:0; text-transform:uppercase; letter-spacing:.12em; font-size:12px; color:#93c5fd; }
.subtitle { margin:0; color:#d1d5db; }
.cards { display:grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap:14px;
  margin-bottom: 20px; }
.card { background:var(--panel); border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
.card-value { font-size:25px; font-weight:650; font-variant-numeric: tabular-nums;
  white-space: nowrap; }
.card-label { font-weight:600; }
.card-note { color:var(--muted); font-size:13px; }
.panel { background:var(--panel); border:1px solid var(--line); border-radius:10px;
  padding: 18px 22px 22px; margin-bottom: 20px; }
.panel h2 { margin: 0 0 4px; font-size: 19px; }
.lead { margin: 0 0 14px; color: var(--muted); font-size: 14px; }
.empty { color: var(--muted); font-style: italic; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 6px 12px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
thead th { font-size: 13px; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
tbody tr:nth-child(even) { background: #f9fafb; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.missing { color: var(--muted); }
table.metrics { max-width: 460px; flex: 1 1 340px; }
table.metrics tr.group th { text-align: left; font-size: 0.8rem; text-transform: uppercase;
  letter-spacing: 0.04em; color: #6b7280; padding-top: 0.8rem; }
ul.meta { font-size: 0.85rem; color: #4b5563; margin: 0.8rem 0 0; padding-left: 1.1rem; }
.split { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.split .plot { flex: 1 1 380px; margin: 0; }
.split .plot img { max-width: 500px; width: 100%; }
table.config th { width: 34%; font-weight: 500; }
table.config code { font: 13px/1.4 ui-monospace, "DejaVu Sans Mono", monospace;
  overflow-wrap: anywhere; }
.plot { margin: 8px 0 0; }
.plot img { max-width: 100%; height: auto; display: block; }
.grid-summary { margin: 0 0 12px; font-weight: 600; }
.retrievals { display: flex; flex-direction: column; gap: 12px; }
.retrieval-row { display: grid; grid-template-columns: repeat(6, minmax(0, 1fr)); gap: 10px;
  padding-bottom: 12px; border-bottom: 1px solid var(--line); }
.retrieval-row:last-child { border-bottom: none; }
.tile { margin: 0; border: 3px solid var(--line); border-radius: 8px; overflow: hidden;
  background: #fff; display: flex; flex-direction: column; }
.tile.query { border-color: var(--accent); }
.tile.correct { border-color: var(--good); }
.tile.wrong { border-color: var(--bad); }
.thumb { height: 118px; display: flex; align-items: center; justify-content: center;
  background: #f9fafb; }
.thumb img { max-width: 100%; max-height: 112px; image-rendering: auto; }
figcaption { padding: 6px 8px 8px; font-size: 12.5px; line-height: 1.35; display: flex;
  flex-direction: column; gap: 1px; min-width: 0; }
.badge { font-weight: 700; }
.query .badge { color: var(--accent); }
.correct .badge { color: var(--good); }
.wrong .badge { color: var(--bad); }
.caption { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.note { color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
  font-variant-numeric: tabular-nums; }
footer { color: var(--muted); font-size: 13px; padding-bottom: 32px; }
@media (max-width: 720px) { .retrieval-row { grid-template-columns: repeat(3, minmax(0, 1fr)); } }
"""
