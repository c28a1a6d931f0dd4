"""Batched augmentation: CPU time per batch of this tree's :mod:`mbdl.data.batched` against an
earlier revision's (the reference, loaded from git in the same run), and whether the pixels agree.

    python benchmarks/augment_cpu.py [--reference 957c39c]   # writes results/augment_cpu.json

One thread, ``time.thread_time`` (robust to other jobs), medians of 5 rounds of 20 (affine,
glyphs 32 px, 128 images) and 5 of 5 (crop, 73-px RGB squares to 64 px, 128 images).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write_results
from mbdl.data import batched as current
from mbdl.data import load_splits

ROOT = Path(__file__).resolve().parent.parent


def reference_module(revision: str, folder: Path) -> Any:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:src/mbdl/data/batched.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = folder / "batched_reference.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("batched_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cpu_ms(fn: Callable[[], Any], count: int) -> float:
    fn()
    samples = []
    for _ in range(5):
        start = time.thread_time()
        for _ in range(count):
            fn()
        samples.append((time.thread_time() - start) / count * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default="957c39c", help="git revision of the reference")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = reference_module(args.reference, Path(tmp))
        glyphs = torch.from_numpy(load_splits("glyphs", image_size=32, seed=0).train.images)
        glyphs = glyphs[:2048].unsqueeze(1)
        rgb = np.random.default_rng(0).integers(0, 256, (2048, 73, 73, 3), dtype=np.uint8)
        cases = {
            "affine": ("affine", 32, 1, glyphs, 20),
            "crop": ("crop", 64, 3, torch.from_numpy(rgb).permute(0, 3, 1, 2), 5),
        }
        for name, (kind, size, channels, images, count) in cases.items():
            new_aug = current.BatchAugment(kind, size, channels)
            old_aug = old.BatchAugment(kind, size, channels)
            side = int(images.shape[-1])
            params = new_aug.draw(np.arange(len(images), dtype=np.uint64) * 7919 + 5, side, side)
            same = (new_aug(images, params) == old_aug(images, params)).float().mean().item()
            batch, batch_params = images[:128], params[:128]
            rows[name] = {
                "reference_ms": cpu_ms(lambda a=old_aug, x=batch, q=batch_params: a(x, q), count),
                "ms": cpu_ms(lambda a=new_aug, x=batch, q=batch_params: a(x, q), count),
                "equal_fraction": same,
                "compared_values": int(new_aug(images, params).numel()),
            }
            print(f"  {name}: {rows[name]}", file=sys.stderr, flush=True)
    payload = {**machine(), "reference": args.reference, "load_average": os.getloadavg()[0]}
    payload["cases"] = rows
    lines = [
        "## augment_cpu: batched augmentation against its earlier revision",
        "",
        f"`python benchmarks/augment_cpu.py --reference {args.reference}`, {payload['date']}, "
        f"torch {payload['torch']}, 1 thread, thread CPU time per batch of 128 (medians; load "
        f"average {payload['load_average']:.1f}). *Equal*: the fraction of output values equal "
        "to the reference's on 2048 images with the same parameters.",
        "",
        "| augmentation | reference ms | now ms | ratio | equal |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['reference_ms']:.2f} | {r['ms']:.2f} | "
            f"{r['ms'] / r['reference_ms']:.2f} | {r['equal_fraction']:.6f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    write_results("augment_cpu", payload, table)


if __name__ == "__main__":
    main()
