"""The data path alone, per-image against batched, with one thread: ms per batch of 128.

The glyphs training split (32 px, affine jitter) and a folder of 64-px PNGs (random-resized
crop): the per-image path (PIL transforms per image; the folder decoded every epoch) against the
trainer's path (whole batches augmented as tensors; the folder decoded once first). Interleaved
repeats, medians; prints one JSON line, writes nothing.

    python benchmarks/data_path.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train import BatchStream, write_png_folder
from mbdl.data import load_splits
from mbdl.data.cache import decoded_training_split


def compare(before: BatchStream, after: BatchStream, repeats: int = 7) -> dict[str, float]:
    for stream in (before, after):
        stream.next()
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(repeats):
        for key, stream in (("before", before), ("after", after)):
            start = time.perf_counter()
            for _ in range(5):
                stream.next()
            times[key].append((time.perf_counter() - start) / 5 * 1000)
    result = {f"{k}_ms": statistics.median(v) for k, v in times.items()}
    result["speedup"] = result["before_ms"] / result["after_ms"]
    return result


def main() -> None:
    torch.set_num_threads(1)
    out: dict[str, object] = {"load_average": os.getloadavg()[0]}
    glyphs = load_splits("glyphs", image_size=32, seed=0).train
    out["glyphs32"] = compare(BatchStream(glyphs, False), BatchStream(glyphs, True))
    with tempfile.TemporaryDirectory() as tmp:
        write_png_folder(Path(tmp) / "png64", classes=100, per_class=12)
        folder = load_splits("folder", Path(tmp) / "png64", image_size=64, seed=0).train
        cached = decoded_training_split(folder, 64, 3, mode="memory")
        out["folder64"] = compare(BatchStream(folder, False), BatchStream(cached, True))
    out["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
