"""What the up-front image scan costs: mbdl.data.files.inspect_images (header, size limit, mode,
a cheap decode: JPEGs at 1/8 scale) against one full decode of every image (read_image, what
one epoch's data loading decodes), on the same files in the same run.

    python benchmarks/image_scan.py [--images 400] [--size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, median_time, write_results
from mbdl.data.files import inspect_images, read_image


def median_cpu_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median process CPU time of ``fn()`` in seconds (stable on a shared, loaded machine)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def make_images(folder: Path, count: int, size: int, fmt: str) -> list[Path]:
    """``count`` smooth-gradient-plus-noise colour images (photograph-like compressibility)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    paths = []
    for i in range(count):
        base = (ramp[None, :, None] + ramp[:, None, None] * (i % 7) / 7) % 256
        noise = rng.normal(0, 12, size=(size, size, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(
            buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {})
        )
        path = folder / f"{i}.{fmt.lower()}"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as base:
        for fmt in ("JPEG", "PNG"):
            paths = make_images(Path(base), args.images, args.size, fmt)
            decode = median_time(lambda p=paths: [read_image(x) for x in p], args.repeats)
            scan_1 = median_time(lambda p=paths: inspect_images(p, workers=1), args.repeats)
            scan_n = median_time(lambda p=paths: inspect_images(p), args.repeats)
            decode_cpu = median_cpu_time(lambda p=paths: [read_image(x) for x in p], args.repeats)
            scan_cpu = median_cpu_time(lambda p=paths: inspect_images(p, workers=1), args.repeats)
            assert all(reason is None for reason in inspect_images(paths))
            rows.append(
                {
                    "format": fmt,
                    "images": args.images,
                    "size": args.size,
                    "full_decode_s": decode,
                    "scan_1_thread_s": scan_1,
                    "scan_threads_s": scan_n,
                    "scan_1_thread_vs_decode": scan_1 / decode,
                    "scan_threads_vs_decode": scan_n / decode,
                    "full_decode_cpu_s": decode_cpu,
                    "scan_1_thread_cpu_s": scan_cpu,
                    "scan_vs_decode_cpu": scan_cpu / decode_cpu,
                }
            )
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else []
    payload = {"machine": machine(), "load_average": load, "rows": rows}
    lines = [
        "## image scan: the up-front check of every image, against one full decode",
        "",
        f"`python benchmarks/image_scan.py`, {payload['machine']['date']}, "
        f"{payload['machine']['cpus']} CPUs (1/5/15-minute load average at the end: "
        f"{', '.join(load)}). {args.images} colour images of {args.size} x {args.size} per "
        "format, page cache warm; medians of "
        f"{args.repeats} repeats; images/s are wall time (noisy under load), the ratio is process "
        "CPU time (stable under load). *Scan*: `mbdl.data.files.inspect_images` (regular file, "
        "header, pixel limit, mode, a decode of the first frame, JPEGs at 1/8 scale), on one "
        "thread and on the default thread pool. *Full decode*: `read_image` of every image on "
        "one thread, what one epoch's loading decodes. The scan runs once per data set load; "
        "the glyphs default data set is rendered in memory and is not scanned.",
        "",
        "| format | full decode (images/s) | scan, 1 thread (images/s) | scan, thread pool "
        "(images/s) | scan / full decode, CPU time | scan CPU ms per image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        n = row["images"]
        lines.append(
            f"| {row['format']} | {n / row['full_decode_s']:.0f} | {n / row['scan_1_thread_s']:.0f} "
            f"| {n / row['scan_threads_s']:.0f} | {row['scan_vs_decode_cpu']:.2f} "
            f"| {1000 * row['scan_1_thread_cpu_s'] / n:.2f} |"
        )
    write_results("image_scan", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
