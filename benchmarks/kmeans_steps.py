"""Time the k-means++ seeding and Lloyd's iterations separately on evaluate.py's data.

The per-step figures of docs/benchmarks.md ("What changed (issue 12, part 4)") came from the
same timing on each intermediate state of that work: one k-means run (k = N / 5, 2 threads),
printing the seeding's and Lloyd's wall times, NMI and inertia. No results file: the figures
are single runs, quoted in the text.

    python benchmarks/kmeans_steps.py [N] [runs]      # default N = 60,000, 1 run
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from mbdl.functional import kmeans as kmeans_module
from mbdl.functional.clustering import normalized_mutual_info


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    torch.set_num_threads(2)
    dim, per_class = 128, 5
    rng = np.random.default_rng(0)  # benchmarks/evaluate.py's SETUP
    centres = rng.standard_normal((n // per_class, dim), dtype=np.float32)
    labels = np.repeat(np.arange(n // per_class), per_class)
    noise = np.float32(1.4) * rng.standard_normal((n, dim), dtype=np.float32)
    x = torch.from_numpy(centres[labels] + noise)
    generator = torch.Generator().manual_seed(0)
    for _ in range(runs):
        start = time.perf_counter()
        seeds, nearest = kmeans_module.kmeans_plus_plus_assigned(x, n // per_class, generator)
        seeded = time.perf_counter()
        assignment = kmeans_module.lloyd(x, x[seeds], max_iter=50, assignment=nearest)
        done = time.perf_counter()
        nmi = normalized_mutual_info(torch.from_numpy(labels), assignment)
        inertia = kmeans_module.within_cluster_sum_of_squares(x, assignment)
        print(
            f"seeding {seeded - start:.2f} s, Lloyd {done - seeded:.2f} s, "
            f"total {done - start:.2f} s, NMI {nmi:.4f}, inertia {inertia:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    from mbdl.runtime import torch_tuning

    with torch_tuning():  # as mbdl.evaluate runs k-means: per-operation threads, bf16 scoring
        main()
