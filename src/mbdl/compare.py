"""``mbdl compare``: every loss trained under the same budget, tuned on validation classes only.

The protocol (docs/protocol.md; Musgrave, Belongie and Lim, "A Metric Learning Reality Check",
ECCV 2020):

1. Every loss gets the same configuration (data, backbone, embedding size, batch composition,
   optimiser, schedule, epoch budget): the config file and overrides, with the ``loss.*`` keys
   replaced by the loss's name and its searched hyper-parameter (other loss parameters keep the
   loss's defaults).
2. Search: each loss's main hyper-parameter takes the first ``search_budget`` values of its grid in
   :data:`SEARCH_GRIDS` (the loss's default first), each trained with the first seed for
   ``search_epochs`` epochs (default: the config's). The value whose run has the best validation
   ``train.select_metric`` (its validation-selected checkpoint) is chosen; ties keep the earlier
   value. The test classes are never looked at.
3. The chosen value is trained with every seed; a seed's test metrics are those of its run's
   validation-selected checkpoint. When ``search_epochs`` equals the config's epochs, the first
   seed's run *is* the search run of the chosen value (same directory) and is not trained twice.

Runs live in ``OUT/<loss>/<param>=<value>_seed<S>_e<E>/`` (ordinary ``mbdl train`` run
directories) and are resumed with ``resume=true``; a finished run (``metrics.json`` present and
the same config) is read back, never trained again. After every run ``OUT/summary.json``,
``OUT/summary.md``, ``OUT/curves.png`` and ``OUT/report.html`` (self-contained) are rewritten.

Summaries: test metrics as mean and sample standard deviation (``ddof=1``; ``null`` with one
seed) over seeds; validation Recall@1 and MAP@R per epoch (mean over seeds) against the epoch and
against the training wall-clock time (``elapsed_s`` of ``log.jsonl``: training steps only, not
evaluation); and per seed the first epoch whose validation value reaches 95% of that run's best
(mean and std over seeds).
"""

from __future__ import annotations

import argparse
import copy
import html
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbdl.config import (
    LOSS_NAMES,
    Config,
    ConfigError,
    config_differences,
    config_from_flat,
    config_to_flat,
    load_config,
    parse_override,
    read_yaml_config,
)
from mbdl.fileio import atomic_write_bytes, atomic_write_text
from mbdl.metrics import improves, metric_label, summary_keys_in
from mbdl.recipe import resolve_auto


class _SearchGrids(Mapping[str, tuple[str, tuple[float, ...]]]):
    """loss -> (searched hyper-parameter, its grid; the loss's default first), read from each
    registered loss class's ``search_grid`` (``mbdl.losses``); plugin losses by name too."""

    def __getitem__(self, loss: str) -> tuple[str, tuple[float, ...]]:
        from mbdl.losses import search_grid

        return search_grid(loss)

    def __iter__(self) -> Iterator[str]:
        return iter(LOSS_NAMES)

    def __len__(self) -> int:
        return len(LOSS_NAMES)

    def __contains__(self, loss: object) -> bool:
        return loss in LOSS_NAMES


#: loss -> (searched hyper-parameter, its grid; the loss's default first). Budget N uses the
#: first N values of each grid.
SEARCH_GRIDS: Mapping[str, tuple[str, tuple[float, ...]]] = _SearchGrids()


def max_search_budget(losses: Sequence[str] = ()) -> int:
    """The longest grid among the built-in losses and ``losses`` (which may be plugins)."""
    from mbdl.losses import builtin_losses

    return max(len(SEARCH_GRIDS[name][1]) for name in (*builtin_losses(), *losses))


#: The validation curves (and epochs-to-95% columns) of the summary. The test table's columns
#: are the registry's summary metrics (:func:`mbdl.metrics.summary_keys_in`).
CURVE_METRICS = ("recall@1", "map@r")
REACH_FRACTION = 0.95

TrainFn = Callable[[Config], dict[str, Any]]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison."""

    loss: str
    param: str
    value: float
    seed: int
    epochs: int

    @property
    def tag(self) -> str:
        return f"{self.param}={self.value:g}_seed{self.seed}_e{self.epochs}"


# ---------------------------------------------------------------------------------------------
# statistics of finished runs (pure functions)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``ddof=1``; None for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


def validation_curve(
    history: Sequence[dict[str, Any]], metric: str
) -> list[tuple[int, float, float]]:
    """``(epoch, elapsed_s, validation[metric])`` of the log records that validated."""
    return [
        (int(r["epoch"]), float(r["elapsed_s"]), float(r["validation"][metric]))
        for r in history
        if isinstance(r.get("validation"), dict) and metric in r["validation"]
    ]


def epochs_to_reach(
    curve: Sequence[tuple[int, float, float]], fraction: float = REACH_FRACTION
) -> tuple[int, float] | None:
    """First ``(epoch, elapsed_s)`` whose value is at least ``fraction`` times the curve's best."""
    if not curve:
        return None
    best = max(value for _, _, value in curve)
    for epoch, elapsed, value in curve:
        if value >= fraction * best:
            return epoch, elapsed
    return None  # pragma: no cover - the best point itself always qualifies


def mean_curve(curves: Sequence[Sequence[tuple[int, float, float]]]) -> dict[str, list[float]]:
    """Per epoch present in every curve: mean elapsed time and mean value over the curves."""
    if not curves:
        return {"epoch": [], "elapsed_s": [], "value": []}
    epochs = sorted(set.intersection(*({e for e, _, _ in c} for c in curves)))
    by_epoch = [{e: (t, v) for e, t, v in c} for c in curves]
    return {
        "epoch": [float(e) for e in epochs],
        "elapsed_s": [statistics.fmean(c[e][0] for c in by_epoch) for e in epochs],
        "value": [statistics.fmean(c[e][1] for c in by_epoch) for e in epochs],
    }


# ---------------------------------------------------------------------------------------------
# running


def base_values(config_path: str | Path | None, overrides: Sequence[str]) -> dict[str, Any]:
    """Flat config values shared by every loss: the file and overrides without ``loss.*``."""
    values = dict(read_yaml_config(config_path)) if config_path is not None else {}
    values = {k: v for k, v in values.items() if not k.startswith("loss.")}
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("loss.") or key in ("seed", "out", "resume"):
            raise ConfigError(
                f"mbdl compare sets {key} itself (use --losses, --seeds, --out); remove {text!r}"
            )
        values[key] = value
    return values


def run_config(base: dict[str, Any], spec: RunSpec, out: Path) -> Config:
    """The validated config of one run."""
    values = {
        **base,
        "loss.name": spec.loss,
        f"loss.{spec.param}": spec.value,
        "seed": spec.seed,
        "train.epochs": spec.epochs,
        "out": str(out / spec.loss / spec.tag),
        "resume": True,
    }
    return config_from_flat(values)


def finished_metrics(config: Config) -> dict[str, Any] | None:
    """The saved ``metrics.json`` of a finished run with this same config, else None."""
    run = Path(str(config.out))
    metrics_file, config_file = run / "metrics.json", run / "config.yaml"
    if not (metrics_file.is_file() and config_file.is_file()):
        return None
    saved = load_config(config_file)
    resolved = copy.deepcopy(config)
    resolve_auto(resolved)  # the run's config.yaml records what model.backbone=auto chose
    if config_differences(config_to_flat(saved), config_to_flat(resolved)):
        return None  # let the trainer refuse it with its own message
    metrics: dict[str, Any] = json.loads(metrics_file.read_text(encoding="utf-8"))
    return metrics


def read_history(run: Path) -> list[dict[str, Any]]:
    """The records of ``run/log.jsonl`` (empty when absent)."""
    log = run / "log.jsonl"
    if not log.is_file():
        return []
    lines = log.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def check_request(losses: Sequence[str], seeds: int, search_budget: int) -> None:
    """Raise ``ValueError`` for an unknown loss, a duplicate, seeds < 1 or a bad budget."""
    if not losses:
        raise ValueError("--losses needs at least one loss")
    unknown = [name for name in losses if name not in LOSS_NAMES]
    if unknown:
        raise ValueError(f"unknown loss {unknown[0]!r}; choose from {', '.join(LOSS_NAMES)}")
    if len(set(losses)) != len(losses):
        raise ValueError(f"--losses lists a loss twice: {','.join(losses)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1; got {seeds}")
    budget = max_search_budget(losses)  # also resolves every loss and its grid: errors up front
    if not 1 <= search_budget <= budget:
        raise ValueError(f"--search-budget must be between 1 and {budget}; got {search_budget}")


def compare(
    config_path: str | Path | None,
    overrides: Sequence[str],
    *,
    losses: Sequence[str],
    seeds: int = 3,
    search_budget: int = 3,
    search_epochs: int | None = None,
    out: str | Path = "runs/compare",
    train_fn: TrainFn | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the comparison (see the module docstring) and return the summary written to
    ``out/summary.json``. ``train_fn`` defaults to :func:`mbdl.train.train`."""
    check_request(losses, seeds, search_budget)
    if search_epochs is not None and search_epochs < 1:
        raise ValueError(f"--search-epochs must be at least 1; got {search_epochs}")
    if train_fn is None:
        from mbdl.train import train as default_train

        train_fn = default_train
    trainer: TrainFn = train_fn
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    base = base_values(config_path, overrides)
    reference = config_from_flat({**base, "out": None})  # validates the shared part once
    first_seed = reference.seed
    seed_list = [first_seed + i for i in range(seeds)]
    epochs = reference.train.epochs
    tune_epochs = search_epochs or epochs
    select = reference.train.select_metric
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "config": None if config_path is None else str(config_path),
        "overrides": list(overrides),
        "losses": list(losses),
        "seeds": seed_list,
        "search_budget": search_budget,
        "search_epochs": tune_epochs,
        "epochs": epochs,
        "select_metric": select,
        "grids": {
            name: {"param": SEARCH_GRIDS[name][0], "values": list(SEARCH_GRIDS[name][1])}
            for name in losses
        },
    }
    state: dict[str, Any] = {"settings": settings, "losses": {}}

    def run(spec: RunSpec) -> dict[str, Any]:
        config = run_config(base, spec, out_dir)
        saved = finished_metrics(config)
        name = f"{spec.loss} {spec.param}={spec.value:g} seed {spec.seed} ({spec.epochs} epochs)"
        if saved is not None:
            say(f"compare: {name}: finished earlier, read back")
            return saved
        say(f"compare: {name}: training into {config.out}")
        start = time.perf_counter()
        metrics = trainer(config)
        say(f"compare: {name}: done in {time.perf_counter() - start:.0f} s")
        return metrics

    for loss in losses:
        param, grid = SEARCH_GRIDS[loss]
        search = []
        for value in grid[:search_budget]:
            spec = RunSpec(loss, param, value, first_seed, tune_epochs)
            metrics = run(spec)
            score = metrics.get("validation", {}).get(select)
            search.append({"value": value, "run": f"{loss}/{spec.tag}", select: score})
        scored = [s for s in search if s[select] is not None]
        if not scored:
            raise ValueError(f"{loss}: no search run has a validation {select} (val_fraction=0?)")
        chosen = scored[0]
        for entry in scored[1:]:
            if improves(select, float(entry[select]), float(chosen[select])):
                chosen = entry
        runs = []
        for seed in seed_list:
            spec = RunSpec(loss, param, float(chosen["value"]), seed, epochs)
            metrics = run(spec)
            runs.append({"seed": seed, "run": f"{loss}/{spec.tag}", "metrics": metrics})
        state["losses"][loss] = summarize_loss(out_dir, param, search, chosen["value"], runs)
        write_outputs(out_dir, state)
    state["complete"] = True
    write_outputs(out_dir, state)
    return state


def summarize_loss(
    out_dir: Path,
    param: str,
    search: list[dict[str, Any]],
    chosen: float,
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """Means, spreads, curves and epochs-to-95% of one loss's seed runs."""
    test: dict[str, dict[str, float | None]] = {}
    for metric in summary_keys_in(key for r in runs for key in r["metrics"]["test"]):
        values = [
            float(r["metrics"]["test"][metric]) for r in runs if metric in r["metrics"]["test"]
        ]
        if values:
            mean, std = mean_std(values)
            test[metric] = {"mean": mean, "std": std}
    curves: dict[str, Any] = {}
    reach: dict[str, Any] = {}
    for metric in CURVE_METRICS:
        per_seed = [validation_curve(read_history(out_dir / r["run"]), metric) for r in runs]
        curves[metric] = mean_curve([c for c in per_seed if c])
        reached = [epochs_to_reach(c) for c in per_seed]
        epochs = [float(r[0]) for r in reached if r is not None]
        seconds = [float(r[1]) for r in reached if r is not None]
        entry: dict[str, Any] = {"per_seed": [None if r is None else r[0] for r in reached]}
        if epochs:
            entry["epochs_mean"], entry["epochs_std"] = mean_std(epochs)
            entry["seconds_mean"], entry["seconds_std"] = mean_std(seconds)
        reach[metric] = entry
    return {
        "param": param,
        "search": search,
        "chosen": {param: chosen},
        "runs": [
            {
                "seed": r["seed"],
                "run": r["run"],
                "test": r["metrics"]["test"],
                "validation": r["metrics"].get("validation", {}),
            }
            for r in runs
        ],
        "test": test,
        "curves": curves,
        "reach_95": reach,
    }


# ---------------------------------------------------------------------------------------------
# outputs


def _fmt(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    text = f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def _reach_text(entry: dict[str, Any], key: str = "epochs", digits: int = 1) -> str:
    if f"{key}_mean" not in entry:
        return "—"
    return _fmt(entry[f"{key}_mean"], entry[f"{key}_std"], digits)


def summary_tables(state: dict[str, Any]) -> dict[str, list[list[str]]]:
    """The summary's tables as rows of text cells (first row: header)."""
    settings = state["settings"]
    select = settings["select_metric"]
    columns = summary_keys_in(key for r in state["losses"].values() for key in r["test"])
    test_rows = [["loss", "chosen", *columns]]
    search_rows = [
        [
            "loss",
            "parameter",
            f"value: validation {select} (seed {settings['seeds'][0]}, "
            f"{settings['search_epochs']} epochs)",
        ]
    ]
    labels = [metric_label(m) for m in CURVE_METRICS]
    reach_rows = [
        [
            "loss",
            *(f"{what} to 95% {label}" for label in labels for what in ("epochs", "seconds")),
            *(f"best mean val {label}" for label in labels),
        ]
    ]
    for loss, result in state["losses"].items():
        chosen = ", ".join(f"{k}={v:g}" for k, v in result["chosen"].items())
        cells = [
            _fmt(result["test"][m]["mean"], result["test"][m]["std"])
            if m in result["test"]
            else "—"
            for m in columns
        ]
        test_rows.append([loss, chosen, *cells])
        tried = "; ".join(
            f"{s['value']:g}: {_fmt(s[select], None, 4)}"
            + (" (chosen)" if s["value"] == result["chosen"][result["param"]] else "")
            for s in result["search"]
        )
        search_rows.append([loss, result["param"], tried])
        reach = [result["reach_95"][m] for m in CURVE_METRICS]
        best = [max(result["curves"][m]["value"], default=float("nan")) for m in CURVE_METRICS]
        reach_rows.append([
            loss, *(text for r in reach for text in (_reach_text(r), _reach_text(r, "seconds", 0))),
            *(_fmt(b) for b in best),
        ])  # fmt: skip
    return {"test": test_rows, "search": search_rows, "reach": reach_rows}


def _markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def summary_markdown(state: dict[str, Any]) -> str:
    """``summary.md``: settings, test table, search table, epochs-to-95% table."""
    settings = state["settings"]
    tables = summary_tables(state)
    n = len(settings["seeds"])
    status = "complete" if state.get("complete") else "partial (still running or cut)"
    parts = [
        "# mbdl compare",
        "",
        f"Status: {status}. Config: `{settings['config'] or 'defaults'}`, overrides: "
        f"`{' '.join(settings['overrides']) or 'none'}`; {settings['epochs']} epochs, seeds "
        f"{settings['seeds']}, search budget {settings['search_budget']} per loss "
        f"({settings['search_epochs']} epochs, first seed), selection by validation "
        f"{settings['select_metric']}.",
        "",
        f"## Test metrics (mean ± std over {n} seed{'s' if n > 1 else ''}, "
        "validation-selected checkpoints)",
        "",
        _markdown_table(tables["test"]),
        "",
        "## Hyper-parameter search (validation classes only)",
        "",
        _markdown_table(tables["search"]),
        "",
        "## Convergence (validation; 95% of each run's own best, mean ± std over seeds)",
        "",
        _markdown_table(tables["reach"]),
        "",
        "Seconds are training time (log.jsonl elapsed_s, evaluation excluded).",
        "",
    ]
    return "\n".join(parts)


def plot_curves(state: dict[str, Any]) -> bytes | None:
    """PNG of mean validation Recall@1 and MAP@R against epoch and training time, every loss."""
    from matplotlib.figure import Figure

    losses = state["losses"]
    if not losses:
        return None
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2)
    palette = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563",
               "#db2777")  # fmt: skip
    for row, metric in enumerate(CURVE_METRICS):
        for col, xkey in enumerate(("epoch", "elapsed_s")):
            ax = axes[row][col]
            for i, (loss, result) in enumerate(losses.items()):
                curve = result["curves"][metric]
                style = {"lw": 2.6} if loss == "mdl" else {"lw": 1.4}
                ax.plot(curve[xkey], curve["value"], marker="o", ms=3,
                        color=palette[i % len(palette)], label=loss, **style)  # fmt: skip
            label = metric_label(metric)
            ax.set_xlabel("epoch" if xkey == "epoch" else "training time (s)")
            ax.set_ylabel(f"validation {label}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    n = len(state["settings"]["seeds"])
    fig.suptitle(f"Validation curves, mean over {n} seed{'s' if n > 1 else ''}")
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, facecolor="white")
    return buffer.getvalue()


def summary_html(state: dict[str, Any], png: bytes | None) -> str:
    """``report.html``: one self-contained page (tables, the inline curves)."""
    import base64

    tables = summary_tables(state)
    settings = state["settings"]

    def table(rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in rows[1:]
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    image = ""
    if png is not None:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        image = f'<img alt="validation curves" src="{uri}">'
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "font-size:13px;text-align:left}th{background:#f3f4f6}img{max-width:100%}"
    )
    settings_text = html.escape(json.dumps({k: v for k, v in settings.items() if k != "grids"}))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>mbdl compare</title>"
        f"<style>{style}</style></head><body><h1>mbdl compare</h1>"
        f"<p>{'complete' if state.get('complete') else 'partial'}; settings: "
        f"<code>{settings_text}</code></p>"
        "<h2>Test metrics (mean ± std over seeds)</h2>"
        + table(tables["test"])
        + "<h2>Validation curves</h2>"
        + image
        + "<h2>Convergence: first epoch reaching 95% of the run's best validation value</h2>"
        + table(tables["reach"])
        + "<h2>Hyper-parameter search (validation classes)</h2>"
        + table(tables["search"])
        + "</body></html>\n"
    )


def write_outputs(out_dir: Path, state: dict[str, Any]) -> None:
    """Write summary.json, summary.md, curves.png and report.html (atomically)."""
    atomic_write_text(out_dir / "summary.json", json.dumps(state, indent=2) + "\n")
    atomic_write_text(out_dir / "summary.md", summary_markdown(state))
    png = plot_curves(state)
    if png is not None:
        atomic_write_bytes(out_dir / "curves.png", png)
    atomic_write_text(out_dir / "report.html", summary_html(state, png))


# ---------------------------------------------------------------------------------------------
# command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mbdl compare``."""
    parser.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [KEY=VALUE ...]",
        help="the shared config file (default: glyphs) and dotted overrides (not loss.*)",
    )
    parser.add_argument(
        "--losses",
        default=",".join(LOSS_NAMES),
        help=f"comma-separated losses (default: all: {','.join(LOSS_NAMES)})",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per loss (default 3)")
    parser.add_argument(
        "--search-budget",
        type=int,
        default=3,
        help=f"values of each loss's hyper-parameter tried on validation (1-{max_search_budget()})",
    )
    parser.add_argument(
        "--search-epochs", type=int, default=None, help="epochs of a search run (default: config's)"
    )
    parser.add_argument(
        "--out", default=None, help="output directory (default runs/compare-SOURCE)"
    )


def run_cli(args: argparse.Namespace, split: Callable[[Sequence[str]], Any]) -> int:
    """Run ``mbdl compare`` from parsed arguments; ``split`` separates overrides from paths."""
    overrides, others = split(args.items or [])
    if len(others) > 1:
        raise ValueError(f"expected at most one config file, got {', '.join(others)}")
    losses = [name.strip() for name in str(args.losses).split(",") if name.strip()]
    check_request(losses, args.seeds, args.search_budget)
    config_path = others[0] if others else None
    out = args.out
    if out is None:
        source = config_from_flat({**base_values(config_path, overrides), "out": None}).data.source
        out = f"runs/compare-{source}"
    state = compare(
        config_path,
        overrides,
        losses=losses,
        seeds=args.seeds,
        search_budget=args.search_budget,
        search_epochs=args.search_epochs,
        out=out,
    )
    print(summary_markdown(state))
    print(f"report: {Path(out) / 'report.html'}")
    return 0


__all__ = [
    "SEARCH_GRIDS",
    "compare",
    "epochs_to_reach",
    "mean_std",
    "summary_markdown",
]
