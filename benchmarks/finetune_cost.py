"""The cost of ``train.ema`` and ``train.layer_decay`` per training step, as ratios to a plain step.

For each model (randomly initialised, built as ``mbdl train`` builds it), four variants of one
training step on a fixed P x K batch: forward, the default loss, backward, the optimiser of
:func:`mbdl.train.optim.build_optimizer` (AdamW; with ``train.layer_decay`` one parameter group
pair per depth), and with ``train.ema`` the update of :class:`mbdl.train.ema.ExponentialMovingAverage`
(``ema = decay * ema + (1 - decay) * weights`` over the whole state). Each variant has its own
copy of the same initial model; the variants are interleaved, ``--repeats`` rounds, and each
round's step time is the mean of ``--steps`` steps; the table gives medians and their ratio to
plain, all from the same run.

    python benchmarks/finetune_cost.py          # writes benchmarks/results/finetune_cost.json
    python benchmarks/finetune_cost.py --quick  # 2 rounds, writes nothing
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median_time, write_results
from mbdl.config import load_config
from mbdl.models import build_model
from mbdl.train.build import build_loss_from_config
from mbdl.train.ema import ExponentialMovingAverage
from mbdl.train.optim import build_optimizer

#: (model.backbone, input side, P classes x K images); sizes a CPU fine-tuning run would use
MODELS = (
    ("mobilenet_v2", 160, 8, 4),
    ("timm/vit_tiny_patch16_224", 224, 4, 4),
)

#: variant -> (train.ema, train.layer_decay)
VARIANTS = {
    "plain": (None, None),
    "ema": (0.999, None),
    "layer_decay": (None, 0.75),
    "ema+layer_decay": (0.999, 0.75),
}


def measure(backbone: str, side: int, classes: int, per_class: int, repeats: int, steps: int):
    torch.manual_seed(0)
    base = build_model(backbone, 128, in_channels=3).train()
    images = torch.rand(classes * per_class, 3, side, side)
    labels = torch.arange(classes).repeat_interleave(per_class)
    runs: dict[str, Any] = {}
    for name, (ema, decay) in VARIANTS.items():
        overrides = [f"model.backbone={backbone}", "model.embedding_dim=128"]
        overrides += [f"train.ema={ema}"] if ema is not None else []
        overrides += [f"train.layer_decay={decay}"] if decay is not None else []
        config = load_config(None, overrides)
        model = copy.deepcopy(base)
        loss = build_loss_from_config(config, labels.numpy())
        optimizer = build_optimizer(config, model, loss)
        average = None
        holder = SimpleNamespace(model=model)
        if ema is not None:
            average = ExponentialMovingAverage(ema)
            average.on_train_start(holder)  # type: ignore[arg-type]
        runs[name] = (model, loss, optimizer, average, holder, len(optimizer.param_groups))

    def step(name: str) -> float:
        model, loss, optimizer, average, holder, _ = runs[name]
        start = time.perf_counter()
        for number in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss(model(images), labels).backward()
            optimizer.step()
            if average is not None:
                average.on_step_end(holder, number, {})
        return (time.perf_counter() - start) / steps

    names = list(VARIANTS)
    for name in names:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            times[name].append(step(name))
    medians = {name: statistics.median(t) for name, t in times.items()}
    parts = {  # the added work alone, gradients in place from the last step
        "optimizer_step_plain": _median_ms(runs["plain"][2].step),
        "optimizer_step_layer_decay": _median_ms(runs["layer_decay"][2].step),
        "ema_update": _median_ms(
            lambda: runs["ema"][3].on_step_end(runs["ema"][4], 0, {})  # type: ignore[union-attr]
        ),
    }
    parameters = sum(p.numel() for p in base.parameters())
    return {
        "backbone": backbone,
        "input": side,
        "batch": classes * per_class,
        "parameters": parameters,
        "param_groups": {name: runs[name][5] for name in names},
        "ms_per_step": {name: 1000 * m for name, m in medians.items()},
        "ratio_to_plain": {name: m / medians["plain"] for name, m in medians.items()},
        "parts_ms": parts,
        "raw_s": times,
    }


def _median_ms(fn: Any, repeats: int = 21) -> float:
    return 1000 * median_time(fn, repeats=repeats)


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "## finetune_cost: EMA and layer decay per training step",
        "",
        f"`python benchmarks/finetune_cost.py`, {payload['date']}, {payload['cpus']} CPUs, "
        f"{payload['threads']} torch thread(s), torch {payload['torch']}; 1-minute load "
        f"average {payload['load_average']} at the start and end (other jobs shared the "
        "machine: only the ratios of one run are meaningful). One training step (forward, "
        "default loss, backward, AdamW; `train.ema=0.999` adds the average's update, "
        "`train.layer_decay=0.75` one parameter group pair per depth) on a fixed batch, "
        f"randomly initialised models, {payload['repeats']} interleaved rounds of "
        f"{payload['steps']} steps, medians; ratio to the plain step in brackets.",
        "",
        "| model | params | input, batch | plain ms | ema | layer_decay | both | groups "
        "(plain / layer decay) |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in payload["rows"]:
        ms, ratio = row["ms_per_step"], row["ratio_to_plain"]
        cells = " | ".join(
            f"{ms[n]:.0f} ({ratio[n]:.3f}x)" for n in ("ema", "layer_decay", "ema+layer_decay")
        )
        groups = row["param_groups"]
        lines.append(
            f"| {row['backbone']} | {row['parameters'] / 1e6:.1f} M | {row['input']} px, "
            f"{row['batch']} | {ms['plain']:.0f} | {cells} | {groups['plain']} / "
            f"{groups['layer_decay']} |"
        )
    lines += [
        "",
        "The added work alone (medians of 21 calls, same run): the EMA update, and AdamW's "
        "step with the plain parameter groups against the groups of layer decay.",
        "",
        "| model | EMA update ms (of a plain step) | AdamW step ms, plain | AdamW step ms, "
        "layer decay (added, of a plain step) |",
        "|---|---:|---:|---:|",
    ]
    for row in payload["rows"]:
        parts, plain = row["parts_ms"], row["ms_per_step"]["plain"]
        added = parts["optimizer_step_layer_decay"] - parts["optimizer_step_plain"]
        lines.append(
            f"| {row['backbone']} | {parts['ema_update']:.1f} "
            f"({100 * parts['ema_update'] / plain:.2f} %) | {parts['optimizer_step_plain']:.1f} | "
            f"{parts['optimizer_step_layer_decay']:.1f} ({100 * added / plain:+.2f} %) |"
        )
    lines += [
        "",
        "Neither option adds work to the forward or backward pass, so the whole-step ratios "
        "scatter around 1 by the machine's noise (a ratio below 1 is noise: each variant does "
        "at least the plain step's work); the added work alone is what they cost: the EMA "
        "update and the extra parameter groups of layer decay are each well under 1 % of a "
        "step at these sizes.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {
        **machine(),
        "threads": args.threads,
        "repeats": repeats,
        "steps": args.steps,
        "rows": [],
    }
    loads = [f"{os.getloadavg()[0]:.1f}"]
    for backbone, side, classes, per_class in MODELS:
        row = measure(backbone, side, classes, per_class, repeats, args.steps)
        payload["rows"].append(row)
        print(f"  {backbone} done", file=sys.stderr, flush=True)
    loads.append(f"{os.getloadavg()[0]:.1f}")
    payload["load_average"] = ", ".join(loads)
    table = markdown(payload)
    print(table)
    if not args.quick:
        write_results("finetune_cost", payload, table)


if __name__ == "__main__":
    main()
