"""Evaluation splits decoded once (``data.cache``) against decoding them at every evaluation.

A folder of 64-px PNGs (``benchmarks/train.py``'s: 300 classes x 12 images), its test split
read item by item as ``embed_dataset`` reads it: every file decoded and transformed again (the
path before), against :func:`mbdl.data.cache.decoded_evaluation_split` (decoded once, then a
``uint8`` copy and ``ToTensor`` per item). One thread, ``time.thread_time`` per pass (robust to
other jobs), medians of interleaved passes; the one-time decoding (worker processes sized to the
machine) in wall-clock seconds. Also checks that both passes give equal tensors.

    python benchmarks/eval_cache.py     # writes benchmarks/results/eval_cache.json
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write_results
from benchmarks.train import write_png_folder
from mbdl.data import load_splits
from mbdl.data.cache import decoded_evaluation_split


def one_pass(dataset: Any) -> float:
    start = time.thread_time()
    for i in range(len(dataset)):
        dataset[i]
    return time.thread_time() - start


def main() -> None:
    torch.set_num_threads(1)
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-eval-cache-") as tmp:
        root = Path(tmp) / "png64"
        write_png_folder(root)
        test = load_splits("folder", root, image_size=64, seed=0).test
        started = time.perf_counter()
        cached = decoded_evaluation_split(test, mode="memory")
        decode_s = time.perf_counter() - started
        equal = all(torch.equal(cached[i][0], test[i][0]) for i in range(len(test)))
        passes: dict[str, list[float]] = {"files": [], "cached": []}
        for _ in range(3):
            passes["files"].append(one_pass(test))
            passes["cached"].append(one_pass(cached))
    loads.append(os.getloadavg()[0])
    files_s, cached_s = (statistics.median(passes[k]) for k in ("files", "cached"))
    payload = {
        **machine(),
        "images": len(test),
        "load_average": ", ".join(f"{x:.1f}" for x in loads),
        "pass_cpu_s": {"files": files_s, "cached": cached_s},
        "decode_once_wall_s": decode_s,
        "equal_tensors": equal,
        "raw": passes,
    }
    table = "\n".join(
        [
            "## eval_cache: evaluation splits decoded once",
            "",
            f"`python benchmarks/eval_cache.py`, {payload['date']}, torch {payload['torch']}, "
            f"{payload['cpus']} CPUs, load average {payload['load_average']}. The test split of "
            f"a folder of 64-px PNGs ({len(test)} images) read item by item as an evaluation "
            "reads it; CPU seconds of one pass on one thread (medians of 3 interleaved). Equal "
            f"tensors: {equal}.",
            "",
            "| pass | CPU s per evaluation | images/s |",
            "|---|---:|---:|",
            f"| files decoded every evaluation (before) | {files_s:.2f} | "
            f"{len(test) / files_s:.0f} |",
            f"| decoded once (`data.cache=auto`) | {cached_s:.3f} | {len(test) / cached_s:.0f} |",
            "",
            f"Decoding it once took {decode_s:.1f} s wall-clock (worker processes sized to the "
            f"machine), paid once per run instead of at every validation; ratio per evaluation "
            f"{cached_s / files_s:.3f}.",
        ]
    )
    print(table)
    write_results("eval_cache", payload, table + "\n")


if __name__ == "__main__":
    main()
