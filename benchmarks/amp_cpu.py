"""CPU mixed precision: a training step in fp32 and bf16 autocast, contiguous and channels-last.

For the small backbones on 32-px grey glyph-sized batches (P x K = 32 x 4 = 128 images): forward
+ backward (loss ``embeddings.sum()``) + AdamW on a fixed batch, each of the four variants
timed in turn (interleaved repeats, medians), with 1 and 2 torch threads. ``train.amp=auto``
picks bf16 on a CPU with bf16 matrix units (:func:`mbdl.train.precision.cpu_has_bf16_matrix_units`);
the effect on the final metrics (same seeds) is in ``benchmarks/recipe.py``'s results.

    python benchmarks/amp_cpu.py          # writes benchmarks/results/amp_cpu.json
    python benchmarks/amp_cpu.py --quick  # 2 repeats, writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write_results
from mbdl.models import build_model
from mbdl.train.precision import cpu_has_bf16_matrix_units

VARIANTS = {  # name -> (bf16 autocast, channels-last)
    "fp32": (False, False),
    "fp32_channels_last": (False, True),
    "bf16": (True, False),
    "bf16_channels_last": (True, True),
}


def measure(backbone: str, threads: int, repeats: int, steps: int = 3) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(backbone, 64, in_channels=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = torch.rand(128, 1, 32, 32)

    def run(bf16: bool, channels_last: bool) -> float:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        images = batch.contiguous(memory_format=fmt)
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            context = (
                torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            )
            with context:
                embeddings = model(images)
            embeddings.float().sum().backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    for bf16, channels_last in VARIANTS.values():
        run(bf16, channels_last)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            times[name].append(run(*VARIANTS[name]))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "ms_per_batch": {name: 1000 * m for name, m in medians.items()},
        "speedup_over_fp32": {name: medians["fp32"] / m for name, m in medians.items()},
        "raw_s": times,
    }


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "## CPU bf16: a training step in fp32 and bf16, contiguous and channels-last",
        "",
        f"`python benchmarks/amp_cpu.py`, {payload['date']}, {payload['cpus']} CPUs "
        f"({payload['cpu_flags']}), torch {payload['torch']}; 1-minute load average "
        f"{payload['load_average']} at the start and end (other jobs shared the machine; the "
        "variants are interleaved, medians). Forward + backward + AdamW of a batch of 128 grey "
        "32-px images; ms per batch and speed-up over fp32 contiguous. `train.amp=auto` picks "
        f"bf16 on this CPU: {payload['auto_picks_bf16']}.",
        "",
        "| backbone | threads | fp32 ms | fp32 channels-last | bf16 | bf16 channels-last |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in payload["rows"]:
        ms, up = row["ms_per_batch"], row["speedup_over_fp32"]
        cells = " | ".join(
            f"{ms[n]:.0f} ({up[n]:.2f}x)"
            for n in ("fp32_channels_last", "bf16", "bf16_channels_last")
        )
        lines.append(f"| {row['backbone']} | {row['threads']} | {ms['fp32']:.0f} | {cells} |")
    lines += [
        "",
        "Final metrics, same seeds (full `mbdl train` runs of `benchmarks/recipe.py`, "
        "`benchmarks/results/recipe.json`): see the default-recipe section.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 2 if args.quick else 7
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    payload: dict[str, Any] = {
        **machine(),
        "cpu_flags": ", ".join(found) or "no bf16 matrix flags",
        "auto_picks_bf16": "yes" if cpu_has_bf16_matrix_units() else "no",
        "rows": [],
    }
    loads = [f"{os.getloadavg()[0]:.1f}"]
    for backbone in ("smallcnn", "smallvgg"):
        for threads in (1, 2):
            row = measure(backbone, threads, repeats)
            payload["rows"].append({"backbone": backbone, "threads": threads, **row})
            print(f"  {backbone} {threads} threads done", file=sys.stderr, flush=True)
    loads.append(f"{os.getloadavg()[0]:.1f}")
    payload["load_average"] = ", ".join(loads)
    table = markdown(payload)
    print(table)
    if not args.quick:
        write_results("amp_cpu", payload, table)


if __name__ == "__main__":
    main()
