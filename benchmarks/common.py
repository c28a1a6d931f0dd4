"""Helpers shared by the benchmark scripts: timing, peak memory in a fresh process, result files."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mbdl.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_of(code: str, timeout: float = 1800) -> dict[str, Any]:
    """Run ``code`` in a fresh Python process; it must set a dict ``RESULT``. Returns ``RESULT``
    plus ``peak_rss_mb``, the peak resident memory of that process (``VmHWM`` of its own address
    space; ``ru_maxrss`` is not used because Linux carries the parent's peak across fork+exec)."""
    wrapper = (
        "import json, sys\n"
        f"{code}\n"
        "peak = next(int(line.split()[1]) for line in open('/proc/self/status')\n"
        "            if line.startswith('VmHWM:')) / 1024\n"
        "print(json.dumps({**RESULT, 'peak_rss_mb': peak}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    """A short description of where a benchmark ran."""
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    """Write ``benchmarks/results/<name>.json`` and replace the ``<name>`` section of docs/benchmarks.md.

    Both writes go to a temporary file first, then rename, so a crash leaves the old files whole.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else f"{text.rstrip()}\n\n{section}\n"
    )
    atomic_write_text(BENCHMARKS_MD, text)
