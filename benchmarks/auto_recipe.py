"""``model.backbone=auto`` against a small grid of recipes, on icons, Fashion-MNIST and glyphs.

For each data set the auto default (only the data set's keys: what a user types) and every
recipe of one grid, the SAME grid for every data set (backbone x input size x budget in passes
over the training images), are trained with ``mbdl train`` one after another in fresh
processes, with every seed of ``--seeds``. The grid's best is chosen on the validation classes
(the mean over the seeds of the validation MAP@R of each run's chosen checkpoint), never on
test; the table reports the auto default's mean test MAP@R over the best's, and its mean wall
time (the whole ``mbdl train``: data, training, validation, test) over the best's.

``--scale S`` multiplies every run's budget (the auto default's resolved steps and the grid's)
by S, cut into 5 epochs (more where an epoch would exceed one pass): on a loaded machine the
whole comparison then fits, and it compares the recipes at budgets in the same proportion. The
auto default is then one ``mbdl train`` with the data set's keys and its scaled
``train.epochs`` / ``train.max_steps_per_epoch`` (which change only the budget of the choice);
the benchmark resolves the choice in its own process first, untimed, to know the steps to scale
(a user pays only the ``mbdl train``).

The data sets are built by the script, deterministically: icons: every 4th class name (sorted)
of an ``mbdl data icons`` folder (``--icons``), with its ``split.txt``; Fashion-MNIST: 100
images per class drawn with seed 0 (``benchmarks/make_fashion_subset.py``) from Debian's
``dataset-fashion-mnist`` (``--fashion-full``); glyphs: the default data set.

The ETA: each run's data line of the auto default says ``ETA ~...`` (its training images over
the speed table of :func:`mbdl.recipe.images_per_second`); it is recorded beside the run's
measured training seconds (log.jsonl) and whole wall time. The glyphs keep the default recipe,
whose data line prints no ETA: the script computes the same estimate for them.

    python benchmarks/auto_recipe.py --threads 2 --seeds 0,1   # -> benchmarks/results/auto_recipe.json
    python benchmarks/auto_recipe.py --publish results.json   # render a stored run into the docs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write_results

#: images per grid batch (P x K with P = min(16, training classes))
GRID_BATCH = 64
#: the grid's budgets: passes over the training images (images seen = passes x training images)
GRID_PASSES = (5, 30)
#: the grid's recipes: name -> (description, overrides); the budget is added per data set
GRID_RECIPES: dict[str, tuple[str, list[str]]] = {
    "smallvgg32": (
        "smallvgg from scratch, 32 px",
        [
            "model.backbone=smallvgg",
            "data.image_size=32",
            "data.augment=affine",
            "train.lr=1e-3",
        ],
    ),
    "mobilenet64": (
        "mobilenet_v2 ImageNet weights, 64 px, freeze_bn, head lr x10",
        [
            "model.backbone=mobilenet_v2",
            "model.pretrained={weights}",
            "model.freeze_bn=true",
            "model.embedding_dim=128",
            "data.image_size=64",
            "data.augment=affine",
            "train.lr=1e-4",
            "train.head_lr_mult=10",
            "train.loss_lr=1e-2",
        ],
    ),
}
#: cell name -> (description, overrides, passes): every recipe at every budget
GRID: dict[str, tuple[str, list[str], int]] = {
    f"{name}_{passes}passes": (f"{description}, {passes} passes", overrides, passes)
    for passes in GRID_PASSES
    for name, (description, overrides) in GRID_RECIPES.items()
}

#: the icons subset: every ICONS_EVERY-th class name, sorted
ICONS_EVERY = 4
#: the Fashion-MNIST subset: images per class, drawn with seed 0
FASHION_PER_CLASS = 100

#: data set -> its keys: what a user types
DATASETS: dict[str, list[str]] = {
    "icons": ["data.source=folder", "data.root={icons}"],
    "fashion": ["data.source=idx", "data.root={fashion}", "data.val_fraction=0.4"],
    "glyphs": [],
}


def icons_subset(full: Path, out: Path, every: int = ICONS_EVERY) -> dict[str, Any]:
    """Copy every ``every``-th class folder (sorted by name) of an ``mbdl data icons`` folder
    into ``out``, with the lines of its ``split.txt`` for those classes; return a description
    (classes, images, a SHA-256 of the sorted relative file names) for the results."""
    import hashlib
    import shutil

    from mbdl.data.folder import read_split_file

    split_file = full / "split.txt"
    if not split_file.is_file():
        raise SystemExit(f"{full} is not an `mbdl data icons` folder (no split.txt)")
    classes = sorted(d.name for d in full.iterdir() if d.is_dir())[::every]
    out.mkdir(parents=True)
    for name in classes:
        shutil.copytree(full / name, out / name)
    assignment = read_split_file(split_file)
    lines = [f"{name} {assignment[name]}" for name in classes if name in assignment]
    (out / "split.txt").write_text("\n".join(lines) + "\n")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()
    images = sum(1 for f in files if f != "split.txt")
    return {
        "from": str(full),
        "every": every,
        "classes": len(classes),
        "images": images,
        "files_sha256": digest,
    }


def fashion_subset(full: Path, out: Path) -> dict[str, Any]:
    """``benchmarks/make_fashion_subset.py --per-class FASHION_PER_CLASS --seed 0`` into ``out``."""
    script = Path(__file__).resolve().parent / "make_fashion_subset.py"
    subprocess.run(
        [
            sys.executable,
            str(script),
            "--root",
            str(full),
            "--per-class",
            str(FASHION_PER_CLASS),
            "--seed",
            "0",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return {"from": str(full), "per_class": FASHION_PER_CLASS, "seed": 0}


def grid_batch(train_classes: int) -> tuple[int, int]:
    """The grid's batch composition: P = min(16, classes), K = GRID_BATCH / P."""
    p = min(16, train_classes)
    return p, math.ceil(GRID_BATCH / p)


def scaled_epochs(steps: int, scale: float, pass_steps: int) -> tuple[int, int]:
    """``steps`` x ``scale`` (at least 5) as ``(epochs, steps per epoch)``: 5 epochs
    (validations), more where an epoch would be longer than one pass of the sampler
    (``pass_steps`` batches: an epoch never is)."""
    total = max(5, round(steps * scale))
    epochs = max(min(5, total), math.ceil(total / max(1, pass_steps)))
    return epochs, math.ceil(total / epochs)


def scaled_budget(steps: int, scale: float, pass_steps: int) -> list[str]:
    """:func:`scaled_epochs` as the keys ``train.epochs`` and ``train.max_steps_per_epoch``."""
    epochs, per_epoch = scaled_epochs(steps, scale, pass_steps)
    return [
        f"train.epochs={epochs}",
        f"train.max_steps_per_epoch={per_epoch}",
        "train.warmup_epochs=1",
    ]


def command(overrides: list[str], threads: int, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mbdl",
        "train",
        *overrides,
        f"train.num_threads={threads}",
        "eval.report=false",
        f"out={out}",
    ]


def auto_steps(keys: list[str], labels: Any) -> tuple[int, int, str]:
    """The auto default's resolved optimiser steps for ``keys``, the steps of one pass of its
    batches over the training ``labels`` and its one-line description, from the library in this
    process (what ``mbdl train`` resolves; untimed)."""
    from mbdl.config import load_config
    from mbdl.recipe import resolve_auto

    config = load_config(None, keys)
    resolve_auto(config)
    line = config.recipe.describe() if config.recipe is not None else ""
    train = config.train
    one_pass = pass_steps(labels, train.batch_classes, train.batch_per_class)
    steps = min(train.max_steps_per_epoch or one_pass, one_pass)
    return int(train.epochs) * int(steps), one_pass, line


ETA_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}


def data_line_eta(line: str) -> float | None:
    """The seconds of ``ETA ~1.2 min`` in a data line (None: no ETA)."""
    import re

    found = re.search(r"ETA ~([0-9.]+) (s|min|h)\b", line)
    return float(found.group(1)) * ETA_UNITS[found.group(2)] if found else None


def steps_run(log: Path) -> int | None:
    """The optimiser steps the run took (the last record of log.jsonl)."""
    if not log.is_file():
        return None
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return int(json.loads(lines[-1])["step"]) if lines else None


def training_seconds(log: Path, batch: int) -> float | None:
    """Seconds of the training steps alone: each epoch's images over its images/s (log.jsonl)."""
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    total, step = 0.0, 0
    for record in records:
        rate = record.get("images_per_s")
        if not rate:
            return None
        total += (record["step"] - step) * batch / rate
        step = record["step"]
    return total


def run(overrides: list[str], threads: int) -> dict[str, Any]:
    """One ``mbdl train`` in a fresh process: wall time, metrics, the resolved config."""
    with tempfile.TemporaryDirectory(prefix="auto-recipe-") as tmp:
        out = Path(tmp) / "run"
        load = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(command(overrides, threads, out), capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            return {"overrides": overrides, "error": done.stderr.strip().splitlines()[-1:]}
        metrics = json.loads((out / "metrics.json").read_text())
        import yaml

        config = yaml.safe_load((out / "config.yaml").read_text())
        data_line = [line for line in done.stderr.splitlines() if line.startswith("data ")]
        batch = config["train"]["batch_classes"] * config["train"]["batch_per_class"]
        train_s = training_seconds(out / "log.jsonl", batch)
        steps = steps_run(out / "log.jsonl")
    return {
        "overrides": overrides,
        "wall_s": wall,
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg()[0],
        "val_map@r": metrics["validation"].get("map@r"),
        "test_map@r": metrics["test"]["map@r"],
        "test_recall@1": metrics["test"].get("recall@1"),
        "data_line": data_line[:1],
        "eta_s": data_line_eta(data_line[0]) if data_line else None,
        "train_s": train_s,
        "resolved": {
            "model.backbone": config["model"]["backbone"],
            "data.image_size": config["data"]["image_size"],
            "train.batch": config["train"]["batch_classes"] * config["train"]["batch_per_class"],
            "train.steps": steps,
        },
    }


def train_labels(dataset_keys: list[str]) -> Any:
    """The training labels of a data set (after carving validation classes)."""
    from mbdl.config import load_config
    from mbdl.runconfig import load_data

    config = load_config(None, [*dataset_keys, "model.backbone=smallcnn", "data.image_size=32"])
    return load_data(config).train.labels


def pass_steps(labels: Any, batch_classes: int, batch_per_class: int) -> int:
    """The batches of one pass of the trainer's sampler over ``labels`` (an epoch's most)."""
    from mbdl.data import ClassBalancedBatchSampler

    return len(ClassBalancedBatchSampler(labels, batch_classes, batch_per_class))


def build_data(args: argparse.Namespace, tmp: Path, results: dict[str, Any]) -> dict[str, str]:
    """The data sets' folders (built into ``tmp``) for the keys' placeholders."""
    values = {"weights": args.weights}
    names = args.datasets.split(",")
    built = results.setdefault("data", {})
    if "icons" in names:
        values["icons"] = str(tmp / "icons")
        built["icons"] = icons_subset(Path(os.path.expanduser(args.icons)), tmp / "icons")
    if "fashion" in names:
        values["fashion"] = str(tmp / "fashion-100")
        built["fashion"] = fashion_subset(Path(args.fashion_full), tmp / "fashion-100")
    return values


def glyphs_eta(keys: list[str], steps: int, threads: int) -> float | None:
    """The estimate the data line would print for the glyphs' default recipe (it prints none)."""
    from mbdl.config import load_config
    from mbdl.recipe import images_per_second

    config = load_config(None, keys)
    speed = images_per_second("smallvgg", int(config.data.image_size or 32), threads=threads)
    batch = config.train.batch_classes * config.train.batch_per_class
    return None if speed is None else steps * batch / speed


def plan(args: argparse.Namespace, name: str, values: dict[str, str]) -> dict[str, Any]:
    """A data set's entry: its keys, its training split's size and every run's overrides (the
    auto default's and each grid cell's, budgets resolved and scaled), before any run."""
    keys = [k.format(**values) for k in DATASETS[name]]
    labels = train_labels(keys)
    classes = len(set(labels.tolist()))
    steps, one_pass, line = auto_steps(keys, labels)
    auto_keys = keys + (scaled_budget(steps, args.scale, one_pass) if args.scale != 1.0 else [])
    p, k = grid_batch(classes)
    cell_pass = pass_steps(labels, p, k)
    cells: dict[str, dict[str, Any]] = {
        "auto": {"description": line, "overrides": auto_keys, "seeds": {}}
    }
    for cell, (description, overrides, passes) in GRID.items():
        cell_steps = math.ceil(passes * len(labels) / (p * k))
        cell_keys = [o.format(**values) for o in overrides]
        cell_keys += [f"train.batch_classes={p}", f"train.batch_per_class={k}"]
        cell_keys += scaled_budget(cell_steps, args.scale, cell_pass)
        epochs, per_epoch = scaled_epochs(cell_steps, args.scale, cell_pass)
        cells[cell] = {
            "description": f"{description} ({epochs * per_epoch} steps x {p * k})",
            "overrides": keys + cell_keys,
            "seeds": {},
        }
    return {
        "keys": keys,
        "train_classes": classes,
        "train_images": len(labels),
        "auto_resolved_steps_unscaled": steps,
        "runs": cells,
    }


def benchmark(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results: dict[str, Any] = {
        "machine": machine(),
        "threads": args.threads,
        "scale": args.scale,
        "seeds": seeds,
        "grid_passes": list(GRID_PASSES),
        "datasets": {},
    }
    values = build_data(args, tmp, results)
    names = args.datasets.split(",")
    for name in names:
        results["datasets"][name] = plan(args, name, values)
    for seed in seeds:  # every data set's seed 0 first: a cut-short run still compares
        for name in names:
            entry = results["datasets"][name]
            for cell, cell_entry in entry["runs"].items():
                result = run([*cell_entry["overrides"], f"seed={seed}"], args.threads)
                if cell == "auto" and name == "glyphs" and "resolved" in result:
                    steps = result["resolved"]["train.steps"]
                    result["eta_s"] = glyphs_eta(cell_entry["overrides"], steps, args.threads)
                    result["eta_from"] = (
                        "computed by the benchmark (the default recipe prints none)"
                    )
                cell_entry["seeds"][str(seed)] = result
                print(name, cell, seed, json.dumps(result)[:300], flush=True)
                summarize(entry)
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(entry: dict[str, Any]) -> None:
    """Each run's means over its seeds; the grid's best on mean validation MAP@R, and the auto
    default's ratios to it (of the means over the seeds both have, and per seed)."""
    for cell_entry in entry["runs"].values():
        done = [r for r in cell_entry["seeds"].values() if "error" not in r]
        for key in ("val_map@r", "test_map@r", "wall_s", "train_s"):
            cell_entry[key] = _mean([r[key] for r in done if r.get(key) is not None])
    grid = {
        cell: e
        for cell, e in entry["runs"].items()
        if cell != "auto" and e["val_map@r"] is not None
    }
    auto = entry["runs"]["auto"]
    if not grid or auto["test_map@r"] is None:
        return
    best = max(grid, key=lambda cell: grid[cell]["val_map@r"])
    seeds = [
        seed
        for seed, r in auto["seeds"].items()
        if "error" not in r and "error" not in grid[best]["seeds"].get(seed, {"error": 1})
    ]
    pairs = [(auto["seeds"][seed], grid[best]["seeds"][seed]) for seed in seeds]
    if not pairs:
        return
    entry["best_on_validation"] = best
    entry["map_ratio"] = _mean([a["test_map@r"] for a, _ in pairs]) / _mean(
        [b["test_map@r"] for _, b in pairs]
    )
    entry["time_ratio"] = _mean([a["wall_s"] for a, _ in pairs]) / _mean(
        [b["wall_s"] for _, b in pairs]
    )
    entry["per_seed"] = {
        seed: {
            "map_ratio": a["test_map@r"] / b["test_map@r"],
            "time_ratio": a["wall_s"] / b["wall_s"],
        }
        for seed, (a, b) in zip(seeds, pairs, strict=True)
    }
    entry["meets_target"] = entry["map_ratio"] >= 0.9 and entry["time_ratio"] <= 1.5


def _load_range(results: dict[str, Any]) -> str:
    """The 1-minute load averages seen at the runs' starts and ends, as ``low-high``."""
    loads = [
        run_[key]
        for entry in results["datasets"].values()
        for cell_entry in entry["runs"].values()
        for run_ in cell_entry["seeds"].values()
        for key in ("load_average_at_start", "load_average_at_end")
        if key in run_
    ]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "unknown"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def seed_cells(runs: list[dict[str, Any] | None], key: str, fmt: str) -> str:
    """Each seed's ``key``, in seed order: ``not run`` where the seed did not run that cell."""
    return " / ".join(
        "not run" if r is None else "failed" if "error" in r else format(r[key], fmt) for r in runs
    )


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    scale = results.get("scale", 1.0)
    seeds = results["seeds"]
    data = results.get("data", {})
    icons = data.get("icons", {})
    passes = ", ".join(str(p) for p in results["grid_passes"])
    command_line = (
        f"python benchmarks/auto_recipe.py --scale {scale} --threads {results['threads']} "
        f"--seeds {','.join(str(s) for s in seeds)}"
    )
    lines = [
        "## auto_recipe: `model.backbone=auto` against a grid of recipes",
        "",
        " then ".join(f"`{c}`" for c in results.get("commands", [command_line]))
        + f", {m['date']}, {m['cpus']} CPUs "
        f"(1-minute load average {_load_range(results)} at the runs' starts and ends), torch "
        f"{m['torch']}, each run with each seed of the table, one after another in fresh processes. "
        "The auto default is one `mbdl train` with only the data set's keys (and `seed=`); the "
        "grid is the same for every data set: {smallvgg from scratch at 32 px, MobileNetV2 "
        "with ImageNet weights at 64 px (freeze_bn, head lr x10)} x {" + passes + "} passes "
        "over the training images, batches of 64 (P = min(16, training classes)). "
        + (
            f"Every budget (the auto default's resolved one and the grid's) is scaled by {scale} "
            "and cut into 5 epochs (more where an epoch would be longer than one pass over the "
            "training images), so that the comparison fits the machine; the auto default's "
            "scaled budget is given as `train.epochs` / `train.max_steps_per_epoch`, which "
            "change only the budget of its choice. "
            if scale != 1.0
            else ""
        )
        + "The grid's best is chosen on the **validation** classes' MAP@R (mean over the "
        "seeds); the ratios are the auto default's **test** MAP@R and whole-run wall time over "
        "the chosen cell's (means over the seeds; per seed in the JSON). Target: >= 0.9x MAP@R "
        "within 1.5x the time. The script builds its data: icons: every "
        f"{icons.get('every', ICONS_EVERY)}th class name (sorted) of an `mbdl data icons` folder "
        f"({icons.get('classes', '?')} names, {icons.get('images', '?')} drawings, its "
        "split.txt; the file list's SHA-256 is in the JSON); Fashion-MNIST: "
        f"{FASHION_PER_CLASS} images per class, seed 0 (`benchmarks/make_fashion_subset.py`), "
        "`data.val_fraction=0.4`; glyphs: the full default data set.",
        "",
        "| data set | seeds | auto picked | auto test MAP@R | auto wall s | best on validation | "
        "its test MAP@R | its wall s | MAP@R ratio | time ratio | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["datasets"].items():
        auto = entry["runs"]["auto"]
        if "best_on_validation" not in entry:
            errors = [r.get("error") for r in auto["seeds"].values() if "error" in r]
            lines.append(f"| {name} | | failed: {errors[:1]} | | | | | | | | |")
            continue
        best = entry["runs"][entry["best_on_validation"]]
        r = next(r["resolved"] for r in auto["seeds"].values() if "resolved" in r)
        size = f"{r['data.image_size']} px" if r["data.image_size"] else "at the source's size"
        picked = f"{r['model.backbone']} {size}, {r['train.steps']} x {r['train.batch']}"
        ran = ", ".join(sorted(auto["seeds"], key=int))
        lines.append(
            f"| {name} | {ran} | {picked} | {auto['test_map@r']:.3f} | {auto['wall_s']:.0f} | "
            f"{entry['best_on_validation']} | {best['test_map@r']:.3f} | {best['wall_s']:.0f} | "
            f"{entry['map_ratio']:.2f} | {entry['time_ratio']:.2f} | "
            f"{'met' if entry['meets_target'] else '**missed**'} |"
        )
    lines += [
        "",
        "The ETA: what the auto default's data line printed (`training ETA ~...`: its training "
        "images over `mbdl.recipe.images_per_second`, a table measured with 2 threads on a "
        "quiet machine) against the same run's measured training seconds (the steps alone, "
        "from `log.jsonl`) and its whole wall time (start, data, validations and the test "
        "evaluation included). The glyphs keep the default recipe, whose data line prints no "
        "ETA: their estimate is the same formula computed by the benchmark.",
        "",
        "| data set | seed | ETA printed | training s | wall s | training / ETA | wall / ETA |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["datasets"].items():
        for seed, auto in entry["runs"]["auto"]["seeds"].items():
            eta, train_s, wall = auto.get("eta_s"), auto.get("train_s"), auto.get("wall_s")
            if not eta or wall is None:
                lines.append(
                    f"| {name} | {seed} | none | {_seconds(train_s)} | {_seconds(wall)} | | |"
                )
                continue
            computed = " (computed)" if "eta_from" in auto else ""
            ratio = f"{train_s / eta:.2f}" if train_s else ""
            lines.append(
                f"| {name} | {seed} | {eta:.0f} s{computed} | {_seconds(train_s)} | {wall:.0f} "
                f"| {ratio} | {wall / eta:.2f} |"
            )
    lines += [
        "",
        "Read with care: few seeds, and the load moved between runs (the 1-minute load average "
        "at each start and end is in the JSON).",
        *[f"\n{note}" for note in results.get("notes", [])],
        "",
        "Every run (validation and test MAP@R, wall seconds; each seed's, in seed order, and "
        "their mean):",
        "",
        "| data set | run | val MAP@R | test MAP@R | wall s | mean val | mean test | mean wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["datasets"].items():
        for cell, cell_entry in entry["runs"].items():
            per_seed = [cell_entry["seeds"].get(str(s)) for s in seeds]
            if cell_entry["val_map@r"] is None:
                lines.append(f"| {name} | {cell} | failed | | | | | |")
                continue
            lines.append(
                f"| {name} | {cell} | {seed_cells(per_seed, 'val_map@r', '.3f')} | "
                f"{seed_cells(per_seed, 'test_map@r', '.3f')} | {seed_cells(per_seed, 'wall_s', '.0f')} | "
                f"{cell_entry['val_map@r']:.3f} | "
                f"{cell_entry['test_map@r']:.3f} | {cell_entry['wall_s']:.0f} |"
            )
    lines += ["", "The runs:", ""]
    for name, entry in results["datasets"].items():
        lines.append(
            f"- {name} ({entry['train_images']:,} training images, "
            f"{entry['train_classes']} classes): "
            + "; ".join(
                cell_entry["description"]
                if cell_entry["description"].startswith(f"{cell}:")
                else f"{cell}: {cell_entry['description']}"
                for cell, cell_entry in entry["runs"].items()
            )
        )
    return "\n".join(lines) + "\n"


def add_data_arguments(parser: argparse.ArgumentParser, datasets: str) -> None:
    """The options every auto-recipe benchmark shares: where its data and weights come from,
    the threads and seeds of its runs, and ``--publish``."""
    parser.add_argument(
        "--icons", default="~/.cache/mbdl/icons", help="an `mbdl data icons` output folder"
    )
    parser.add_argument(
        "--fashion-full",
        default="/usr/share/datasets/fashion-mnist",
        help="the full Fashion-MNIST IDX files (Debian's dataset-fashion-mnist)",
    )
    parser.add_argument("--weights", default=None, help="MobileNetV2 weights file")
    parser.add_argument("--datasets", default=datasets)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", default="0,1", help="the seeds of every run, comma-separated")
    parser.add_argument("--publish", default=None, help="render a stored run into the docs")


def run_or_publish(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    name: str,
    benchmark: Any,
    markdown: Any,
) -> None:
    """``--publish FILE``: render a stored run; otherwise find the MobileNetV2 weights (unless
    ``--weights``), run ``benchmark(args, tmp)`` with a temporary data folder. Either way the
    results go to ``benchmarks/results/<name>.json`` and docs/benchmarks.md."""
    if args.publish:
        results = json.loads(Path(args.publish).read_text())
    else:
        if args.weights is None:
            from mbdl.recipe import find_weights

            args.weights = find_weights(None).files.get("mobilenet_v2")
            if args.weights is None:
                parser.error("no MobileNetV2 weights found: pass --weights FILE")
        with tempfile.TemporaryDirectory(prefix=f"{name.replace('_', '-')}-data-") as tmp:
            results = benchmark(args, Path(tmp))
    write_results(name, results, markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, "icons,fashion,glyphs")
    parser.add_argument("--scale", type=float, default=1.0, help="budget multiplier, every run")
    parser.add_argument(
        "--out", default="auto_recipe_run.json", help="the raw results, as they come"
    )
    run_or_publish(parser, parser.parse_args(), "auto_recipe", benchmark, markdown)


if __name__ == "__main__":
    main()
