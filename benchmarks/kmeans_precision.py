"""k-means++ seeding with reduced-precision scoring: its error and what it does to NMI.

The seeding scores each pool's candidates from one GEMM that may round its inputs to bf16
(``reduced_precision_products``: oneDNN's bf16 fpmath mode on a CPU with bf16 units), while ``D^2`` stays float32. On the benchmark data of ``benchmarks/evaluate.py``
(class centres + noise, 5 items per class, d = 128) and on its L2-normalised copy, this script
measures:

- ``excess``: the error of the scored excess ``|s|^2 - 2 s.x = |x - s|^2 - |x|^2`` with inputs
  rounded to bf16 and float32 sums, against float64, for 2,000 rows and 2,000 random seeds and
  for each row's nearest other row (close pairs: the cancellation case), as a fraction of
  ``excess_error_bound`` (which must stay below 0.5: the bound is twice the worst case) and of
  the squared distance;
- ``nmi``: one k-means (``kmeans_fit``, default restarts, k = number of classes) with the
  scoring as this machine computes it (``fast``), with bf16 rounding simulated (inputs rounded
  to bf16, float32 GEMM: what bf16 fpmath does where it rounds) and with float32 scoring
  (``fast_scoring=False``: the exact reference);
- ``seeding_s``: the seeding's wall time at N = 60,000 with this machine's reduced-precision
  GEMM and with plain float32 GEMMs, in the same process.

    python benchmarks/kmeans_precision.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import mbdl.functional.kmeans as kmeans_module
from benchmarks.common import machine, write_results
from mbdl.functional.clustering import normalized_mutual_info

PER_CLASS = 5
DIM = 128


def data(n: int, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``benchmarks/evaluate.py``'s random clustered data (its SETUP), optionally L2-normalised."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n // PER_CLASS, DIM), dtype=np.float32)
    labels = np.repeat(np.arange(n // PER_CLASS), PER_CLASS)
    noise = np.float32(1.4) * rng.standard_normal((n, DIM), dtype=np.float32)
    x = torch.from_numpy(centres[labels] + noise)
    if normalise:
        x = torch.nn.functional.normalize(x, dim=1)
    return x, torch.from_numpy(labels)


def excess_errors(x: torch.Tensor) -> dict[str, float]:
    """The bf16-scored excess against float64: worst error / bound, and relative to |x - s|^2."""
    g = torch.Generator().manual_seed(0)
    picked = torch.randperm(x.shape[0], generator=g)[:2000]
    rows = x[picked]
    seeds = x[torch.randperm(x.shape[0], generator=g)[:2000]]
    nearest_index = []
    for start in range(0, rows.shape[0], 250):  # each row's nearest other row, in chunks
        part = torch.cdist(rows[start : start + 250], x)
        part[torch.arange(part.shape[0]), picked[start : start + 250]] = float("inf")
        nearest_index.append(part.argmin(dim=1))
    nearest = x[torch.cat(nearest_index)]
    # a copy 1% of its norm away: the cancellation of |x|^2 + |s|^2 - 2 x.s at its worst
    scale = 0.01 * rows.norm(dim=1, keepdim=True) / DIM**0.5
    perturbed = rows + scale * torch.randn(rows.shape, generator=g)
    out: dict[str, float] = {}
    for name, others in (("random", seeds), ("nearest", nearest), ("perturbed", perturbed)):
        left = torch.cat([-2 * others, others.pow(2).sum(1, keepdim=True)], dim=1)
        right = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
        scored = (right.bfloat16().float() @ left.bfloat16().float().T).double()
        exact = others.double().pow(2).sum(1) - 2 * rows.double() @ others.double().T
        if name != "random":  # each row with its own partner only
            scored, exact = scored.diagonal(), exact.diagonal()
            squared = (rows.double() - others.double()).pow(2).sum(1)
        else:
            exact_mode = "donot_use_mm_for_euclid_dist"  # differences: a row with itself is 0
            squared = torch.cdist(rows.double(), others.double(), compute_mode=exact_mode).pow(2)
        error = (scored - exact).abs()
        bound = kmeans_module.excess_error_bound(
            rows.norm(dim=1).double(), float(others.norm(dim=1).max()), DIM, True
        )
        bound = bound if name != "random" else bound.unsqueeze(1)
        out[f"{name}_max_error_over_bound"] = float((error / bound).max())
        relative = (error / squared)[squared > 0]  # a row paired with itself left out
        out[f"{name}_median_error_over_squared_distance"] = float(relative.median())
        out[f"{name}_max_error_over_squared_distance"] = float(relative.max())
    return out


def simulated_bf16(
    left: torch.Tensor, right_t: torch.Tensor, out: torch.Tensor, reduced: bool
) -> torch.Tensor:
    """The pool's GEMM with inputs rounded to bf16 and a float32 sum (bf16 fpmath)."""
    return torch.mm(left.bfloat16().float(), right_t.bfloat16().float(), out=out)


def clustering(x: torch.Tensor, labels: torch.Tensor, scoring: str) -> dict[str, float]:
    k = int(labels.max()) + 1
    original = (kmeans_module._scoring_products, kmeans_module.reduced_precision_switch)
    try:
        if scoring == "simulated_bf16":
            switch = type("Switch", (), {"fp32_precision": "ieee"})()
            kmeans_module.reduced_precision_switch = lambda device: (switch, "bf16")
            kmeans_module._scoring_products = simulated_bf16
        elif scoring == "float32":
            kmeans_module.reduced_precision_switch = lambda device: None
        start = time.perf_counter()
        result = kmeans_module.kmeans_fit(x, k)
        wall = time.perf_counter() - start
    finally:
        kmeans_module._scoring_products, kmeans_module.reduced_precision_switch = original
    return {
        "nmi": normalized_mutual_info(labels, result.assignment),
        "inertia": result.inertia,
        "restarts": result.restarts,
        "wall_s": wall,
    }


def seeding_time(x: torch.Tensor, k: int, fast_scoring: bool) -> float:
    start = time.perf_counter()
    kmeans_module.kmeans_plus_plus(
        x, k, torch.Generator().manual_seed(0), fast_scoring=fast_scoring
    )
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(2)
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for n in (10_000, 60_000):
        for normalise in (False, True):
            x, labels = data(n, normalise)
            row: dict[str, Any] = {"n": n, "d": DIM, "embedding": "l2" if normalise else "raw"}
            row["excess"] = excess_errors(x)
            row["nmi"] = {
                s: clustering(x, labels, s) for s in ("fast", "simulated_bf16", "float32")
            }
            print(row, flush=True)
            rows.append(row)
    x, labels = data(60_000, False)
    k = 60_000 // PER_CLASS
    seeding = {
        "reduced_precision_gemm": seeding_time(x, k, True),
        "float32_gemm": seeding_time(x, k, False),
    }
    print(seeding, flush=True)
    payload = {
        "benchmark": "kmeans_precision",
        "machine": machine(),
        "reduced_precision_switch": str(
            kmeans_module.reduced_precision_switch(torch.device("cpu"))
        ),
        "total_s": time.perf_counter() - began,
        "rows": rows,
        "seeding_s_at_60000": seeding,
    }
    write_results("kmeans_precision", payload, markdown(rows, seeding))


def markdown(rows: list[dict[str, Any]], seeding: dict[str, float]) -> str:
    lines = [
        "## kmeans_precision: reduced-precision scoring in the k-means++ seeding",
        "",
        "`python benchmarks/kmeans_precision.py`: the data of `benchmarks/evaluate.py` (5 items "
        "per class, d = 128, k = N / 5) raw and L2-normalised. Excess error: the scored "
        "`|s|^2 - 2 s.x` from bf16-rounded inputs against float64, as a fraction of "
        "`excess_error_bound` (must stay below 0.5) and of `|x - s|^2`, for random seeds and "
        "for each row's nearest other row. NMI of one `kmeans_fit` (default restarts) with "
        "this machine's scoring (`fast`), bf16 rounding simulated, and float32 scoring.",
        "",
        "| N | embedding | max error / bound (random, nearest, 1% copy) | median error / "
        "squared distance (random, nearest, 1% copy) | NMI fast | NMI bf16 simulated "
        "| NMI float32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        e, m = row["excess"], row["nmi"]
        lines.append(
            f"| {row['n']} | {row['embedding']} | {e['random_max_error_over_bound']:.3f}, "
            f"{e['nearest_max_error_over_bound']:.3f}, {e['perturbed_max_error_over_bound']:.3f} | "
            f"{e['random_median_error_over_squared_distance']:.1e}, "
            f"{e['nearest_median_error_over_squared_distance']:.1e}, "
            f"{e['perturbed_median_error_over_squared_distance']:.1e} | {m['fast']['nmi']:.4f} | "
            f"{m['simulated_bf16']['nmi']:.4f} | {m['float32']['nmi']:.4f} |"
        )
    lines += [
        "",
        f"Seeding at N = 60,000 (k = 12,000), same process: {seeding['reduced_precision_gemm']:.1f} s "
        f"with the reduced-precision GEMM switch, {seeding['float32_gemm']:.1f} s with float32 GEMMs.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    from mbdl.runtime import torch_tuning

    with torch_tuning():  # as mbdl.evaluate runs k-means: per-operation threads, bf16 scoring
        main()
