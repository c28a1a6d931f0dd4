"""Mean and sample standard deviation of the test (and validation) metrics of finished
``mbdl train`` run directories: ``python benchmarks/collect_runs.py RUN [RUN ...] --out FILE``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mbdl.compare import mean_std
from mbdl.fileio import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run directories (metrics.json inside)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    runs = []
    for run in args.runs:
        metrics = json.loads((Path(run) / "metrics.json").read_text(encoding="utf-8"))
        runs.append({"run": str(run), **metrics})
    summary: dict[str, object] = {"runs": runs}
    for split in ("validation", "test"):
        keys = [k for k, v in runs[0][split].items() if isinstance(v, (int, float))]
        table = {}
        for key in keys:
            mean, std = mean_std([float(r[split][key]) for r in runs if key in r[split]])
            table[key] = {"mean": mean, "std": std}
        summary[split] = table
    atomic_write_text(Path(args.out), json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
