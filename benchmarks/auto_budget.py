"""The pretrained recipe's validation MAP@R against its budget: the evidence for the auto budget.

The grid's pretrained recipe of ``benchmarks/auto_recipe.py`` (MobileNetV2 with ImageNet weights,
64 px, freeze_bn, head lr x10, batches of 64) is trained on the icons subset and the
Fashion-MNIST subset of that benchmark at 50, 100, 200 and 400 optimiser steps (cut into 5
epochs), with each seed, one ``mbdl train`` after another in fresh processes. The table gives the
passes over the training images each budget is, and the validation MAP@R (what
:data:`mbdl.recipe.PASSES` was set from) beside the test MAP@R (reported, never used to choose).

    python benchmarks/auto_budget.py --threads 2 --icons ~/.cache/mbdl/icons
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.auto_recipe import (
    DATASETS,
    GRID_RECIPES,
    add_data_arguments,
    build_data,
    grid_batch,
    pass_steps,
    run,
    run_or_publish,
    scaled_budget,
    seed_cells,
    train_labels,
)
from benchmarks.common import machine

#: the budgets, in optimiser steps
STEPS = (50, 100, 200, 400)


def benchmark(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results: dict[str, Any] = {
        "machine": machine(),
        "threads": args.threads,
        "seeds": seeds,
        "steps": list(STEPS),
        "datasets": {},
    }
    values = build_data(args, tmp, results)
    recipe = GRID_RECIPES["mobilenet64"][1]
    setups = {}  # data set -> its keys, training labels, P, K and steps of one pass
    for name in args.datasets.split(","):
        keys = [k.format(**values) for k in DATASETS[name]]
        labels = train_labels(keys)
        p, k = grid_batch(len(set(labels.tolist())))
        setups[name] = keys, p, k, pass_steps(labels, p, k)
        results["datasets"][name] = {"train_images": len(labels), "batch": p * k, "runs": {}}
    for seed in seeds:
        for name, (keys, p, k, one_pass) in setups.items():
            entry = results["datasets"][name]
            for steps in STEPS:
                overrides = [
                    *keys,
                    *(o.format(**values) for o in recipe),
                    f"train.batch_classes={p}",
                    f"train.batch_per_class={k}",
                    *scaled_budget(steps, 1.0, one_pass),
                    f"seed={seed}",
                ]
                result = run(overrides, args.threads)
                entry["runs"][f"{steps}/{seed}"] = result
                print(name, steps, seed, json.dumps(result)[:200], flush=True)
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    seeds = results["seeds"]
    lines = [
        "## auto_budget: the pretrained recipe's validation MAP@R against its budget",
        "",
        f"`python benchmarks/auto_budget.py --threads {results['threads']} --seeds "
        f"{','.join(str(s) for s in seeds)}`, {m['date']}, {m['cpus']} CPUs, torch {m['torch']}: "
        "the grid's MobileNetV2 recipe of auto_recipe (64 px, ImageNet weights, freeze_bn, "
        "head lr x10) on its icons and Fashion-MNIST subsets. The auto budget "
        "(`mbdl.recipe.PASSES`) was set from the **validation** columns; test is reported, "
        "not used. Each cell: seed by seed.",
        "",
        "| data set | steps | passes | val MAP@R | test MAP@R | wall s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["datasets"].items():
        for steps in results["steps"]:
            runs = [entry["runs"].get(f"{steps}/{seed}") for seed in seeds]
            passes = steps * entry["batch"] / entry["train_images"]
            lines.append(
                f"| {name} | {steps} | {passes:.1f} | {seed_cells(runs, 'val_map@r', '.3f')} | "
                f"{seed_cells(runs, 'test_map@r', '.3f')} | {seed_cells(runs, 'wall_s', '.0f')} |"
            )
    lines += [*[f"\n{note}" for note in results.get("notes", [])]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, "icons,fashion")
    parser.add_argument("--out", default="auto_budget_run.json", help="the raw results")
    run_or_publish(parser, parser.parse_args(), "auto_budget", benchmark, markdown)


if __name__ == "__main__":
    main()
