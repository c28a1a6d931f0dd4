"""CPU time of each part of a training step, one thread: robust to other jobs on the machine.

``benchmarks/train.py`` measures wall-clock ratios, which a loaded machine distorts (a 2-thread
network slows far more than a 1-thread loader). This script measures what each part *costs*:
the thread CPU time (``time.thread_time``) per batch of 128 with ``torch.set_num_threads(1)``, in
the main process, for the setups of ``benchmarks/train.py``:

- ``network``: forward + backward + AdamW on a fixed batch (bf16 autocast where ``amp=auto``
  picks it, channels-last), the trivial loss ``embeddings.sum()``;
- ``loss``: the MDL loss forward + backward on the batch's embeddings;
- ``data``: the next batch from the trainer's batched path, in the main process (draw, gather,
  augment);
- ``data_per_image``: the per-image path (PIL transforms; a folder's files decoded every epoch).

``cpu_ratio = network / (network + loss + data)``: the step / network ratio of a single core
with no overlap (a loader worker can only raise it).

    python benchmarks/train_cpu_time.py     # writes benchmarks/results/train_cpu_time.json
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write_results
from benchmarks.train import (
    CLASSES_PER_BATCH,
    EMBEDDING_DIM,
    SAMPLES_PER_CLASS,
    SETUPS,
    BatchStream,
    write_png_folder,
)
from mbdl.data import load_splits
from mbdl.data.cache import decoded_training_split
from mbdl.losses import build_loss
from mbdl.models import build_model
from mbdl.train.precision import amp_dtype


def cpu_ms(fn: Callable[[], Any], count: int, repeats: int) -> float:
    """Median over ``repeats`` of the thread CPU milliseconds per call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(count):
            fn()
        samples.append((time.thread_time() - start) / count * 1e3)
    return statistics.median(samples)


def measure(spec: dict[str, Any], data_root: Path) -> dict[str, Any]:
    if spec["source"] == "folder":
        root = data_root / "png64"
        if not root.exists():
            write_png_folder(root, size=spec["image_size"])
        splits = load_splits("folder", root, image_size=spec["image_size"], seed=0)
        batched_set = decoded_training_split(
            splits.train, spec["image_size"], spec["channels"], mode="memory"
        )
    else:
        splits = load_splits("glyphs", image_size=spec["image_size"], seed=0)
        batched_set = splits.train
    torch.manual_seed(0)
    model = build_model(spec["backbone"], EMBEDDING_DIM, in_channels=spec["channels"])
    model.to(memory_format=torch.channels_last).train()
    amp = amp_dtype("auto", torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    per_image, batched = BatchStream(splits.train, False), BatchStream(batched_set, True)
    images, labels = batched.next()
    images = images.contiguous(memory_format=torch.channels_last)
    loss_fn = build_loss("mdl")
    embeddings = torch.nn.functional.normalize(torch.randn(len(labels), EMBEDDING_DIM), dim=1)
    embeddings.requires_grad_()

    def network() -> None:
        optimizer.zero_grad(set_to_none=True)
        context = torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext()
        with context:
            out = model(images)
        out.float().sum().backward()
        optimizer.step()

    parts = {
        "network": cpu_ms(network, 3, 5),
        "loss": cpu_ms(lambda: loss_fn(embeddings, labels).backward(), 10, 5),
        "data": cpu_ms(batched.next, 5, 5),
        "data_per_image": cpu_ms(per_image.next, 2, 3),
    }
    return {
        **spec,
        "batch_size": CLASSES_PER_BATCH * SAMPLES_PER_CLASS,
        "cpu_ms": parts,
        "cpu_ratio": parts["network"] / (parts["network"] + parts["loss"] + parts["data"]),
        "cpu_ratio_per_image": parts["network"]
        / (parts["network"] + parts["loss"] + parts["data_per_image"]),
    }


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "## train_cpu_time: what each part of a step costs, one thread",
        "",
        f"`python benchmarks/train_cpu_time.py`, {payload['date']}, torch {payload['torch']}, "
        "1 thread, thread CPU time per batch of 128 (medians; robust to other jobs, unlike the "
        "wall-clock table above; load average "
        f"{payload['load_average']}). *CPU ratio*: network / (network + MDL loss + data path "
        "in the main process), the step / network ratio of one core without overlap.",
        "",
        "| setup | network ms | MDL loss ms | data ms (batched) | data ms (per image) "
        "| CPU ratio, batched | CPU ratio, per image |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in payload["setups"].items():
        ms = r["cpu_ms"]
        lines.append(
            f"| {name} | {ms['network']:.1f} | {ms['loss']:.2f} | {ms['data']:.2f} | "
            f"{ms['data_per_image']:.1f} | {r['cpu_ratio']:.3f} | {r['cpu_ratio_per_image']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    import os

    torch.set_num_threads(1)
    payload: dict[str, Any] = {**machine(), "setups": {}}
    loads = [f"{os.getloadavg()[0]:.1f}"]
    with tempfile.TemporaryDirectory(prefix="bench-train-cpu-") as tmp:
        for name, spec in SETUPS.items():
            payload["setups"][name] = measure(spec, Path(tmp))
            print(f"  {name}: {payload['setups'][name]['cpu_ms']}", file=sys.stderr, flush=True)
    loads.append(f"{os.getloadavg()[0]:.1f}")
    payload["load_average"] = ", ".join(loads)
    table = markdown(payload)
    print(table)
    write_results("train_cpu_time", payload, table)


if __name__ == "__main__":
    main()
