"""The default glyphs recipe: validation MAP@R against CPU minutes for a few candidate recipes.

Each candidate is a full ``mbdl train`` run on the glyphs (MDL, the defaults of
``configs/glyphs_mdl.yaml`` except the keys the candidate sets), with ``train.num_threads``
threads. The curve is read from the run's ``log.jsonl`` (validation MAP@R after each epoch
against the training seconds so far); the wall time covers the whole run (data, training,
validation, the test evaluation). The default is chosen on validation MAP@R per minute only;
the test metrics are recorded in the JSON, the table shows the chosen recipe's.

    python benchmarks/recipe.py                   # every candidate, writes benchmarks/results/recipe.json
    python benchmarks/recipe.py --candidates vgg_bf16 --epochs 1   # a smoke run, writes nothing
    python benchmarks/recipe.py --publish results.json   # render a stored run into the docs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write_results
from mbdl.config import load_config
from mbdl.train import train

ROOT = Path(__file__).resolve().parent.parent

#: name -> (description, overrides of configs/glyphs_mdl.yaml)
CANDIDATES: dict[str, tuple[str, list[str]]] = {
    "cnn_fp32": (
        "smallcnn, fp32, contiguous (the recipe before issue 16)",
        ["model.backbone=smallcnn", "train.amp=off", "train.channels_last=false"],
    ),
    "cnn_bf16": (
        "smallcnn, bf16 autocast, channels-last",
        ["model.backbone=smallcnn", "train.amp=bf16", "train.channels_last=true"],
    ),
    "vgg_bf16": (
        "smallvgg, bf16 autocast, channels-last",
        ["model.backbone=smallvgg", "train.amp=bf16", "train.channels_last=true"],
    ),
    "vgg_fp32": (
        "smallvgg, fp32, channels-last",
        ["model.backbone=smallvgg", "train.amp=off", "train.channels_last=true"],
    ),
    "vgg_bf16_15ep": (
        "smallvgg, bf16 autocast, channels-last, 15 epochs",
        ["model.backbone=smallvgg", "train.amp=bf16", "train.epochs=15"],
    ),
    "vgg_bf16_20ep": (
        "smallvgg, bf16 autocast, channels-last, 20 epochs",
        ["model.backbone=smallvgg", "train.amp=bf16", "train.epochs=20"],
    ),
}


def run_candidate(name: str, threads: int, extra: list[str]) -> dict[str, Any]:
    description, overrides = CANDIDATES[name]
    with tempfile.TemporaryDirectory(prefix=f"recipe-{name}-") as tmp:
        out = Path(tmp) / "run"
        config = load_config(
            ROOT / "configs" / "glyphs_mdl.yaml",
            [
                *overrides,
                *extra,
                f"train.num_threads={threads}",
                f"out={out}",
                "eval.report=false",
                "train.progress=false",
            ],
        )
        load = os.getloadavg()[0]
        start = time.perf_counter()
        metrics = train(config)
        wall = time.perf_counter() - start
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    curve = [
        {
            "epoch": r["epoch"],
            "train_s": r["elapsed_s"],
            "val_map@r": r["validation"]["map@r"],
            "images_per_s": r["images_per_s"],
        }
        for r in log
        if "validation" in r
    ]
    best = max(curve, key=lambda point: point["val_map@r"])
    return {
        "description": description,
        "overrides": overrides + extra,
        "threads": threads,
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg()[0],
        "wall_s": wall,
        "train_s": log[-1]["elapsed_s"],
        "amp": log[-1].get("amp"),
        "curve": curve,
        "best_val_map@r": best["val_map@r"],
        "best_epoch": best["epoch"],
        "validation": metrics["validation"],
        "test": metrics["test"],
    }


def markdown(payload: dict[str, Any]) -> str:
    chosen = payload["chosen"]
    lines = [
        "## default recipe: validation MAP@R against CPU minutes (glyphs, MDL)",
        "",
        f"`python benchmarks/recipe.py`, {payload['date']}, {payload['cpus']} CPUs, torch "
        f"{payload['torch']}, `train.num_threads={payload['threads']}`, candidates run one "
        "after another (1-minute load average at each start and end in the JSON; other jobs "
        "shared the machine). Each row is a full `mbdl train` of `configs/glyphs_mdl.yaml` with "
        "the candidate's overrides; the curve is validation MAP@R (validation classes only) "
        "after each epoch against training minutes; wall = the whole run (data, training, "
        "validation, test). The default is the candidate with the best validation MAP@R "
        "reachable within the time budget; its test metrics are shown, the others' are in "
        "`benchmarks/results/recipe.json`.",
        "",
        "| candidate | amp | best val MAP@R (epoch) | train min | wall min | val MAP@R by epoch "
        "(training minutes) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, row in payload["candidates"].items():
        curve = ", ".join(f"{p['val_map@r']:.3f} ({p['train_s'] / 60:.1f})" for p in row["curve"])
        mark = " **(default)**" if name == chosen else ""
        lines.append(
            f"| {name}{mark}: {row['description']} | {row['amp']} | "
            f"{row['best_val_map@r']:.3f} ({row['best_epoch']}) | {row['train_s'] / 60:.1f} | "
            f"{row['wall_s'] / 60:.1f} | {curve} |"
        )
    if payload.get("note"):
        lines += ["", payload["note"]]
    if chosen in payload["candidates"]:
        row = payload["candidates"][chosen]
        test = row["test"]
        lines += [
            "",
            f"Chosen default: **{chosen}** ({row['description']}): test MAP@R "
            f"{test['map@r']:.3f}, Recall@1 {test['recall@1']:.3f}, NMI {test['nmi']:.3f} on the "
            f"unseen test classes, {row['wall_s'] / 60:.1f} minutes wall for the whole run with "
            f"{row['threads']} thread(s).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-min", type=float, default=3.0, help="wall minutes per run")
    parser.add_argument("--epochs", type=int, default=None, help="override (smoke runs)")
    parser.add_argument("--publish", type=Path, default=None, help="a stored JSON to publish")
    args = parser.parse_args()
    if args.publish is not None:
        stored = json.loads(args.publish.read_text())
        write_results("recipe", stored, markdown(stored))
        print(markdown(stored))
        return
    extra = [f"train.epochs={args.epochs}"] if args.epochs else []
    payload: dict[str, Any] = {**machine(), "threads": args.threads, "candidates": {}}
    for name in args.candidates:
        print(f"recipe: {name} ...", file=sys.stderr, flush=True)
        payload["candidates"][name] = run_candidate(name, args.threads, extra)
        row = payload["candidates"][name]
        print(
            f"recipe: {name}: best val MAP@R {row['best_val_map@r']:.4f}, "
            f"wall {row['wall_s']:.0f} s, test MAP@R {row['test']['map@r']:.4f}",
            file=sys.stderr,
            flush=True,
        )
    within = {n: r for n, r in payload["candidates"].items() if r["wall_s"] <= 60 * args.budget_min}
    pool = within or payload["candidates"]
    payload["chosen"] = max(pool, key=lambda n: pool[n]["best_val_map@r"])
    payload["budget_min"] = args.budget_min
    table = markdown(payload)
    print(table)
    if not args.epochs:
        write_results("recipe", payload, table)


if __name__ == "__main__":
    main()
