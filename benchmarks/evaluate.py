"""Evaluation benchmark: mbdl.evaluate against a floor and pytorch-metric-learning.

Random clustered data (class centres + Gaussian noise, 5 items per class, noise scaled with
d^(1/4) so the metrics stay non-trivial), N in {10,000; 60,000}, d = 128. Tasks:

- retrieval: P@1, R-Precision, MAP@R (ours: ``metrics=[precision@1, r_precision, map@r]``;
  PML: the same three, ``k="max_bin_count"``, its default faiss kNN). ``floor``: a bare torch
  GEMM + top-k of the same k neighbours over the same data, in query chunks under the same
  1 GiB budget, no metric computed: what any exact kNN must pay.
- clustering: ours NMI + AMI + F1 from one k-means (greedy k-means++ seeding batched by
  rejection sampling, Lloyd with Hamerly's bounds measuring only moved centroids, torch, the
  default ``kmeans_restarts="auto"``: the lowest-inertia of 3 runs while N x k <= 1e8, else one
  run; ``mbdl-3-restarts``: 3 runs always; ``mbdl-faiss``: Lloyd in faiss); PML NMI (faiss
  k-means from random points, niter=20, one run). k = number of classes (N / 5: 12,000 at
  N = 60,000, where the default is one run). ``time_ratio_mbdl-3-restarts_over_mbdl`` is what
  the restarts cost there.

Each (library, task, N, d) measurement runs in its own fresh process (wall time of the call,
peak RSS of the process), the libraries interleaved. Torch and faiss use 2 threads. The load
average of the machine (``os.getloadavg``) is recorded before and after each row.

    python benchmarks/evaluate.py [--budget-s 2400]

Configurations that would start after the time budget are recorded as not measured.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ("floor", "retrieval"): """
xt = torch.from_numpy(x)
k = {per_class}  # the R nearest others (R = {per_class} - 1) plus the query itself
start = time.perf_counter()
norms = xt.pow(2).sum(dim=1)
chunk = max(1, 2**30 // (2 * 4 * N))
found = []
for i in range(0, N, chunk):
    scores = torch.addmm(norms, xt[i : i + chunk], xt.T, alpha=-2.0)
    found.append(torch.topk(scores, k, dim=1, largest=False).indices)
out = {{"neighbours": float(torch.cat(found).shape[0])}}
wall = time.perf_counter() - start
""",
    ("mbdl", "clustering"): """
from mbdl.evaluate import evaluate
start = time.perf_counter()
out = evaluate(torch.from_numpy(x), torch.from_numpy(y), metrics=["nmi", "ami", "f1"])
wall = time.perf_counter() - start
""",
    ("mbdl-3-restarts", "clustering"): """
from mbdl.evaluate import evaluate
start = time.perf_counter()
out = evaluate(torch.from_numpy(x), torch.from_numpy(y), metrics=["nmi", "ami", "f1"], kmeans_restarts=3)
wall = time.perf_counter() - start
""",
    ("mbdl-faiss", "clustering"): """
from mbdl.evaluate import evaluate
start = time.perf_counter()
out = evaluate(torch.from_numpy(x), torch.from_numpy(y), metrics=["nmi", "ami", "f1"], backend="faiss")
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
    (10_000, 128, "retrieval", ("mbdl", "floor", "pml"), 2),
    (60_000, 128, "retrieval", ("mbdl", "floor"), 2),
    (10_000, 128, "clustering", ("mbdl", "mbdl-faiss", "pml"), 2),
    (60_000, 128, "clustering", ("pml", "mbdl", "mbdl-3-restarts"), 2),
]


def measure(library: str, task: str, n: int, d: int, timeout: float) -> dict[str, Any] | None:
    """One measurement in a fresh process; ``None`` if it ran past ``timeout`` seconds."""
    code = SETUP.format(n=n, d=d, per_class=PER_CLASS)
    code += TASKS[(library, task)].replace("{per_class}", str(PER_CLASS)).replace("{{", "{")
    code = code.replace("}}", "}")
    code += "RESULT = {'wall_s': wall, 'metrics': {k: float(v) for k, v in out.items()}}\n"
    try:
        return peak_rss_of(code, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget-s", type=float, default=2400, help="total wall time; later runs are cut off"
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
        load_before = os.getloadavg()
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
        row["load_average_1_5_15_before"] = list(load_before)
        row["load_average_1_5_15_after"] = list(os.getloadavg())
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
        for ours, reference in (
            ("mbdl", "pml"),
            ("mbdl", "floor"),
            ("mbdl-3-restarts", "pml"),
            ("mbdl-3-restarts", "mbdl"),
        ):
            if ours in row and reference in row:
                row[f"time_ratio_{ours}_over_{reference}"] = (
                    row[ours]["wall_s_median"] / row[reference]["wall_s_median"]
                )
        rows.append(row)
        # written after every row, so an interrupted run keeps what it measured
        payload = {
            "benchmark": "evaluate",
            "machine": machine(),
            "note": "shared 2-core machine (other engineers' jobs ran at the same time: see "
            "each row's load averages); each measurement in a fresh process; medians over the "
            "repeats listed; ratios are between measurements of the same run",
            "total_s": time.perf_counter() - began,
            "rows": rows,
        }
        write_results("evaluate", payload, markdown(rows))


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "## Evaluation (`benchmarks/evaluate.py`)",
        "",
        "mbdl `evaluate` vs a floor (bare torch GEMM + top-k of the same neighbours, same 1 GiB "
        "budget) and pytorch-metric-learning `AccuracyCalculator` on random clustered data "
        "(5 items per class), 2 threads, each measurement in its own process, on a shared 2-core "
        "machine (load average over 1 minute before/after each row shown: above 2 means other "
        "jobs competed for the cores, which slows every library of the row alike). retrieval = "
        "P@1 + R-Precision + MAP@R; clustering = our NMI + AMI + F1 from one k-means with k = number of classes (greedy "
        "k-means++ batched by rejection sampling, Lloyd measuring only moved centroids, torch, "
        "default restarts: the best of 3 runs while N x k <= 1e8, else 1; `mbdl-3-restarts`: 3 "
        "runs always; `mbdl-faiss`: Lloyd in faiss) vs "
        "PML's NMI (faiss k-means from random points, 20 iterations, 1 run).",
        "",
        "Reproduce: `python benchmarks/evaluate.py`.",
        "",
        "| N | d | task | library | wall s (median) | peak RSS MB | vs floor | vs PML "
        "| load | metrics |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reference = {
            name: row[name]["wall_s_median"] if name in row else None for name in ("floor", "pml")
        }
        before = row.get("load_average_1_5_15_before", [float("nan")])[0]
        after = row.get("load_average_1_5_15_after", [float("nan")])[0]
        for library in [k for k in row if isinstance(row[k], dict)]:
            r = row[library]
            shown = ", ".join(f"{k}={v:.3f}" for k, v in r["metrics"].items())
            ratios = [
                f"{r['wall_s_median'] / ref:.2f}x" if ref else "n/a" for ref in reference.values()
            ]
            lines.append(
                f"| {row['n']} | {row['d']} | {row['task']} | {library} | {r['wall_s_median']:.2f} "
                f"| {r['peak_rss_mb_max']:.0f} | {ratios[0]} | {ratios[1]} "
                f"| {before:.1f}/{after:.1f} | {shown} |"
            )
        for library in row["not_measured"]:
            lines.append(
                f"| {row['n']} | {row['d']} | {row['task']} | {library} | not measured "
                "(time budget) | | | | | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
