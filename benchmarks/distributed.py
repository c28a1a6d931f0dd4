"""Training throughput with one process and with two (``torchrun``, gloo) on this machine.

The glyphs default model (smallcnn, 64-d embedding, P x K = 32 x 4 images per rank and step, 1
channel, 32 px) is trained by the real trainer (``mbdl train``: class-balanced sampler, data path,
MDL loss on the gathered batch, AdamW) for ``--steps`` steps per rank, in two setups:

- ``1 process x 2 threads``: ``python -m mbdl train ... train.num_threads=2``;
- ``2 processes x 1 thread``: ``torchrun --standalone --nproc_per_node 2 -m mbdl train ...
  train.num_threads=1`` (DistributedDataParallel over gloo, each step sees 2 x 128 images);
- ``1 process x 1 thread``: the baseline that both scale from.

Both use the same two CPU cores. The figure is the ``images_per_s`` that ``log.jsonl`` records:
global training images per second of step time (data loading, forward, loss, backward, gradient
all-reduce, optimiser step), without start-up, validation or the test. The two setups run
alternately, ``--repeats`` times each, and the median is reported.

    python benchmarks/distributed.py            # writes benchmarks/results/distributed.json
    python benchmarks/distributed.py --quick    # a smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write_results

SETUPS = {
    "1 process x 2 threads": {"processes": 1, "threads": 2},
    "2 processes x 1 thread": {"processes": 2, "threads": 1},
    "1 process x 1 thread": {"processes": 1, "threads": 1},  # a baseline for the other two
}


def run_once(setup: dict[str, int], steps: int, workdir: Path, cache: Path) -> dict[str, Any]:
    """Train ``steps`` steps per rank in a fresh run directory; the run's log record."""
    out = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    args = [
        "train",
        f"data.root={cache}",
        "data.val_fraction=0",
        "model.backbone=smallcnn",
        "model.embedding_dim=64",
        "train.batch_classes=32",
        "train.batch_per_class=4",
        "train.epochs=1",
        f"train.max_steps_per_epoch={steps}",
        f"train.num_threads={setup['threads']}",
        "train.device=cpu",
        "train.progress=false",
        "eval.report=false",
        f"out={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(setup["threads"])}
    if setup["processes"] == 1:
        command = [sys.executable, "-m", "mbdl", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(setup["processes"]), "-m", "mbdl", *args]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=1800)
    record: dict[str, Any] = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per rank and run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 repeat")
    args = parser.parse_args()
    steps, repeats = (3, 1) if args.quick else (args.steps, args.repeats)
    loads = [os.getloadavg()[0]]
    rates: dict[str, list[float]] = {name: [] for name in SETUPS}
    worlds: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cache = workdir / "glyphs-cache"
        for _ in range(repeats):  # alternate, so machine load hits both setups alike
            for name, setup in SETUPS.items():
                record = run_once(setup, steps, workdir, cache)
                rates[name].append(float(record["images_per_s"]))
                worlds[name] = int(record["world_size"])
                loads.append(os.getloadavg()[0])
                print(f"{name}: {record['images_per_s']:.0f} images/s", flush=True)
    results = {
        name: {
            "processes": SETUPS[name]["processes"],
            "threads_per_process": SETUPS[name]["threads"],
            "world_size_logged": worlds[name],
            "images_per_s_median": statistics.median(values),
            "images_per_s_runs": values,
        }
        for name, values in rates.items()
    }
    payload = {
        "machine": machine(),
        "load_average_1min": loads,
        "setup": {
            "model": "smallcnn, 64-d, glyphs 32 px 1 channel",
            "batch_per_rank": "32 x 4",
            "loss": "mdl (gathered over ranks)",
            "steps_per_rank_and_run": steps,
            "repeats": repeats,
            "backend": "gloo",
        },
        "results": results,
        "gpu": "no GPU in this task: no GPU figure",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(results, indent=2))
    if args.quick:
        return
    one, two, single = (results[name]["images_per_s_median"] for name in SETUPS)
    rows = "\n".join(
        f"| {name} | {r['processes']} | {r['threads_per_process']} | "
        f"{r['images_per_s_median']:.0f} | {', '.join(f'{v:.0f}' for v in r['images_per_s_runs'])} |"
        for name, r in results.items()
    )
    shared = max(loads) > 2.5
    markdown = f"""## distributed: training throughput with 1 and 2 processes (CPU, gloo)

The glyphs default model (smallcnn, 64-d, 32 px, P x K = 32 x 4 images per rank and step, MDL on
the batch gathered from every rank, AdamW) trained by `mbdl train` for {steps} steps per rank;
images/s is the global training throughput that `log.jsonl` records (step time: data, forward,
loss, backward, all-reduce, optimiser; no start-up or evaluation). Medians of {repeats} runs per
setup, the setups alternating. `python benchmarks/distributed.py` reproduces it.

| setup | processes | threads each | images/s (median) | runs |
|---|---|---|---|---|
{rows}
| 1 GPU (glyphs default) | - | - | no GPU in this task: not measured | - |

Against one process with one thread: two threads in one process give {one / single:.2f}x, two
processes with one thread each {two / single:.2f}x (on the same {payload["machine"]["cpus"]} CPU cores).
{"The machine was shared with other jobs while this ran (1-minute load average " + f"{min(loads):.1f} to {max(loads):.1f} on {payload['machine']['cpus']} cores), so the figures are noisy and lower than on an idle machine." if shared else f"Load average during the runs: {min(loads):.1f} to {max(loads):.1f}."}
"""
    write_results("distributed", payload, markdown)


if __name__ == "__main__":
    main()
