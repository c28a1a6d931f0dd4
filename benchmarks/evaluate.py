"""Evaluation benchmark: mbdl.evaluate against pytorch-metric-learning's AccuracyCalculator.

Random clustered data (class centres + Gaussian noise, 5 items per class, noise scaled with
d^(1/4) so the metrics stay non-trivial), N in {10,000; 60,000}, d in {128; 512}. Tasks:

- retrieval: P@1, R-Precision, MAP@R (ours: ``metrics=[precision@1, r_precision, map@r]``;
  PML: the same three, ``k="max_bin_count"``, its default faiss kNN).
- clustering: ours NMI + F1 (one k-means); PML NMI (faiss k-means, niter=20).

Each (library, task, N, d) measurement runs in its own fresh process (wall time of the call,
peak RSS of the process), ours and PML interleaved. Torch and faiss use 2 threads.

    python benchmarks/evaluate.py [--budget-s 1500]

Configurations that would start after the time budget are recorded as not measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, machine, peak_rss_of, write_results

PER_CLASS = 5

SETUP = """
import time
import numpy as np
import torch
torch.set_num_threads(2)
import faiss
faiss.omp_set_num_threads(2)
N, D = {n}, {d}
rng = np.random.default_rng(0)
centres = rng.standard_normal((N // {per_class}, D), dtype=np.float32)
y = np.repeat(np.arange(N // {per_class}), {per_class})
x = centres[y] + np.float32(1.4 * (D / 128) ** 0.25) * rng.standard_normal((N, D), dtype=np.float32)
"""

TASKS = {
    ("mbdl", "retrieval"): """
from mbdl.evaluate import evaluate
start = time.perf_counter()
out = evaluate(torch.from_numpy(x), torch.from_numpy(y), metrics=["precision@1", "r_precision", "map@r"])
wall = time.perf_counter() - start
""",
    ("mbdl", "clustering"): """
from mbdl.evaluate import evaluate
start = time.perf_counter()
out = evaluate(torch.from_numpy(x), torch.from_numpy(y), metrics=["nmi", "f1"])
wall = time.perf_counter() - start
""",
    ("mbdl-torch-kmeans", "clustering"): """
from mbdl.evaluate import evaluate
start = time.perf_counter()
out = evaluate(torch.from_numpy(x), torch.from_numpy(y), metrics=["nmi", "f1"], backend="torch")
wall = time.perf_counter() - start
""",
    ("pml", "retrieval"): """
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
calc = AccuracyCalculator(
    include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count"
)
start = time.perf_counter()
out = calc.get_accuracy(x, y)
wall = time.perf_counter() - start
""",
    ("pml", "clustering"): """
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
calc = AccuracyCalculator(include=("NMI",))
start = time.perf_counter()
out = calc.get_accuracy(x, y)
wall = time.perf_counter() - start
""",
}

# (n, d, task, libraries, repeats), in priority order.
PLAN: list[tuple[int, int, str, tuple[str, ...], int]] = [
    (10_000, 128, "retrieval", ("mbdl", "pml"), 3),
    (10_000, 128, "clustering", ("mbdl", "mbdl-torch-kmeans", "pml"), 2),
    (10_000, 512, "retrieval", ("mbdl", "pml"), 2),
    (10_000, 512, "clustering", ("mbdl", "pml"), 1),
    (60_000, 128, "retrieval", ("mbdl", "pml"), 2),
    (60_000, 128, "clustering", ("mbdl", "mbdl-torch-kmeans", "pml"), 1),
    (60_000, 512, "retrieval", ("mbdl", "pml"), 1),
    (60_000, 512, "clustering", ("mbdl", "pml"), 1),
]


def measure(library: str, task: str, n: int, d: int, timeout: float) -> dict[str, Any] | None:
    """One measurement in a fresh process; ``None`` if it ran past ``timeout`` seconds."""
    code = SETUP.format(n=n, d=d, per_class=PER_CLASS) + TASKS[(library, task)]
    code += "RESULT = {'wall_s': wall, 'metrics': {k: float(v) for k, v in out.items()}}\n"
    try:
        return peak_rss_of(code, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget-s", type=float, default=1500, help="total wall time; later runs are cut off"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="N,D,TASK",
        help="rerun only these configurations and keep the other rows of the last results file",
    )
    args = parser.parse_args()
    only = {(int(n), int(d), task) for n, d, task in (o.split(",") for o in args.only)}
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    previous: dict[tuple[int, int, str], dict[str, Any]] = {}
    if only and (RESULTS / "evaluate.json").exists():
        for row in json.loads((RESULTS / "evaluate.json").read_text())["rows"]:
            previous[(row["n"], row["d"], row["task"])] = row
    for n, d, task, libraries, repeats in PLAN:
        if only and (n, d, task) not in only:
            if (n, d, task) in previous:
                rows.append(previous[(n, d, task)])
            continue
        runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libraries}
        for _ in range(repeats):
            for library in libraries:  # interleaved, so load hits every library alike
                remaining = args.budget_s - (time.perf_counter() - began)
                result = measure(library, task, n, d, remaining) if remaining > 30 else None
                if result is None:
                    print(f"n={n} d={d} {task} {library}: not measured (time budget)", flush=True)
                    continue
                runs[library].append(result)
                print(
                    f"n={n} d={d} {task} {library}: {result['wall_s']:.2f} s, "
                    f"{result['peak_rss_mb']:.0f} MB, {result['metrics']}",
                    flush=True,
                )
        row: dict[str, Any] = {"n": n, "d": d, "task": task, "repeats": repeats}
        row["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        row["not_measured"] = [lib for lib, results in runs.items() if not results]
        for library, results in runs.items():
            if not results:
                continue
            row[library] = {
                "wall_s_median": statistics.median(r["wall_s"] for r in results),
                "wall_s_all": [r["wall_s"] for r in results],
                "peak_rss_mb_max": max(r["peak_rss_mb"] for r in results),
                "metrics": results[-1]["metrics"],
            }
        if "mbdl" in row and "pml" in row:
            row["time_ratio_mbdl_over_pml"] = (
                row["mbdl"]["wall_s_median"] / row["pml"]["wall_s_median"]
            )
        rows.append(row)
    payload = {
        "benchmark": "evaluate",
        "machine": machine(),
        "note": "shared 2-core machine (other engineers' jobs ran at the same time); "
        "each measurement in a fresh process; medians over the repeats listed",
        "total_s": time.perf_counter() - began,
        "rows": rows,
    }
    write_results("evaluate", payload, markdown(rows))


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "## Evaluation (`benchmarks/evaluate.py`)",
        "",
        "mbdl `evaluate` vs pytorch-metric-learning `AccuracyCalculator` on random clustered data "
        "(5 items per class), 2 threads, each measurement in its own process, on a shared 2-core "
        "machine. retrieval = P@1 + R-Precision + MAP@R; clustering = our NMI + F1 (one k-means: "
        "faiss; `mbdl-torch-kmeans` = our torch k-means) vs PML's NMI (faiss k-means, 20 iterations).",
        "",
        "| N | d | task | library | wall s (median) | peak RSS MB | time vs PML | metrics |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pml_time = row["pml"]["wall_s_median"] if "pml" in row else None
        for library in [k for k in row if isinstance(row[k], dict)]:
            r = row[library]
            shown = ", ".join(f"{k}={v:.3f}" for k, v in r["metrics"].items())
            ratio = f"{r['wall_s_median'] / pml_time:.2f}x" if pml_time else "n/a"
            lines.append(
                f"| {row['n']} | {row['d']} | {row['task']} | {library} | {r['wall_s_median']:.2f} "
                f"| {r['peak_rss_mb_max']:.0f} | {ratio} | {shown} |"
            )
        for library in row["not_measured"]:
            lines.append(
                f"| {row['n']} | {row['d']} | {row['task']} | {library} | not measured "
                "(time budget) | | | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
