"""Training-step throughput: the whole step (data path + network + loss) against the network alone.

For each setup this measures, interleaved so that machine load hits every variant alike:

- ``network``: forward + backward + AdamW of the model on one fixed in-memory batch (trivial loss
  ``embeddings.sum()``), with the trainer's precision and memory format (``train.amp=auto``,
  ``train.channels_last=true``): the network's own speed, the floor of a step;
- ``step_before`` / ``step_after``: a full training step as the trainer runs it, the next batch
  from the data path, forward, the MDL loss, backward, AdamW; *before* is the per-image path
  (each image a PIL image through its transform, in the main process, files decoded every
  epoch), *after* the trainer's path since issue 16 (glyphs: whole batches from memory,
  augmented as tensors, :mod:`mbdl.data.batched`; a folder: decoded once into memory,
  :mod:`mbdl.data.cache`, then the same batched path), with the trainer's default
  ``data.num_workers=auto`` (:mod:`mbdl.data.workers`: a persistent worker process draws,
  gathers and augments the next batch); ``step_after_0_workers`` the same in the main process;
- ``data_before`` / ``data_after`` / ``data_after_0_workers``: the data paths alone (with a
  worker: the main process's wait for the next batch).

The ratio that matters is ``network time / step time`` (target: at least 0.9). Setups: the
default ``smallvgg`` on 32-px glyphs (P x K = 32 x 4), the former default ``smallcnn`` on the
same, and ``smallcnn`` on a folder of 64-px PNGs (written by the script: 300 classes x 12
images; 3 channels, random-resized-crop augmentation). Torch uses 2 threads in the main process.

    python benchmarks/train.py            # all setups, writes benchmarks/results/train.json
    python benchmarks/train.py --quick    # a smoke run (2 repeats), writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write_results
from mbdl.data import ClassBalancedBatchSampler, load_splits
from mbdl.data.batched import batch_loader, batched_training_data
from mbdl.data.cache import decoded_training_split
from mbdl.data.workers import loader_workers
from mbdl.losses import build_loss
from mbdl.models import build_model
from mbdl.train.precision import amp_dtype
from mbdl.train.seeding import SeededBatches, SeededDataset

SETUPS: dict[str, dict[str, Any]] = {
    "smallvgg-glyphs32": {
        "backbone": "smallvgg",
        "source": "glyphs",
        "image_size": 32,
        "channels": 1,
        "steps": 8,
        "repeats": 7,
    },
    "smallcnn-glyphs32": {
        "backbone": "smallcnn",
        "source": "glyphs",
        "image_size": 32,
        "channels": 1,
        "steps": 8,
        "repeats": 7,
    },
    "smallcnn-folder64": {
        "backbone": "smallcnn",
        "source": "folder",
        "image_size": 64,
        "channels": 3,
        "steps": 4,
        "repeats": 6,
    },
}
CLASSES_PER_BATCH, SAMPLES_PER_CLASS, EMBEDDING_DIM = 32, 4, 64


class BatchStream:
    """Endless ``(images, labels)`` from the per-image loader or the trainer's batched one."""

    def __init__(self, dataset: Any, batched: bool, workers: int | str = 0) -> None:
        self.sampler = ClassBalancedBatchSampler(
            dataset.labels, CLASSES_PER_BATCH, SAMPLES_PER_CLASS, seed=0
        )
        self.batches = batched_training_data(dataset) if batched else None
        if batched and self.batches is None:
            raise ValueError("this dataset does not take the batched path")
        seeded = SeededBatches(self.sampler, 0)
        if self.batches is not None:  # as the trainer on a CPU: augmented in the loader
            self.batches.augment_in_loader = True
            self.workers = loader_workers(workers, self.batches, training=True)
            self.loader: Any = batch_loader(self.batches, seeded, workers=self.workers)
        else:
            self.workers = loader_workers(workers, SeededDataset(dataset), training=True)
            self.loader = DataLoader(
                SeededDataset(dataset),
                batch_sampler=seeded,
                num_workers=self.workers,
                persistent_workers=self.workers > 0,
            )
        self.epoch = 0
        self.sampler.set_epoch(0)
        self.iterator: Iterator[Any] = iter(self.loader)

    def next(self) -> tuple[Tensor, Tensor]:
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)
            self.iterator = iter(self.loader)
            batch = next(self.iterator)
        if self.batches is None:
            return batch[0], batch[1]
        images, labels, params = batch
        return self.batches.finish(images, params), labels


def write_png_folder(root: Path, classes: int = 300, per_class: int = 12, size: int = 64) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c:03d}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        for i in range(per_class):
            image = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
            shifted = np.roll(np.asarray(image), int(rng.integers(0, size)), axis=1)
            Image.fromarray(shifted).save(folder / f"{i:02d}.png")


def timed(fn: Callable[[], None], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return time.perf_counter() - start


def run_setup(name: str, spec: dict[str, Any], repeats: int, data_root: Path) -> dict[str, Any]:
    if spec["source"] == "folder":
        root = data_root / "png64"
        if not root.exists():
            write_png_folder(root, size=spec["image_size"])
        splits = load_splits("folder", root, image_size=spec["image_size"], seed=0)
        started = time.perf_counter()
        after_set = decoded_training_split(
            splits.train, spec["image_size"], spec["channels"], mode="memory"
        )
        cache_s = time.perf_counter() - started
    else:
        splits = load_splits("glyphs", image_size=spec["image_size"], seed=0)
        after_set, cache_s = splits.train, 0.0
    before_set = splits.train
    batch = CLASSES_PER_BATCH * SAMPLES_PER_CLASS
    steps = spec["steps"]
    torch.manual_seed(0)
    model = build_model(spec["backbone"], EMBEDDING_DIM, in_channels=spec["channels"])
    model.to(memory_format=torch.channels_last).train()
    amp = amp_dtype("auto", torch.device("cpu"))
    loss_fn = build_loss("mdl")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)  # tiny: the weights barely move
    before = BatchStream(before_set, batched=False)
    after_in_process = BatchStream(after_set, batched=True)
    after = BatchStream(after_set, batched=True, workers="auto")  # the trainer's default
    fixed_images, _ = after_in_process.next()

    def autocast() -> Any:
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=amp)

    def network_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            embeddings = model(fixed_images.contiguous(memory_format=torch.channels_last))
        embeddings.float().sum().backward()
        optimizer.step()

    def full_step(stream: BatchStream) -> Callable[[], None]:
        def step() -> None:
            images, labels = stream.next()
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                embeddings = model(images.contiguous(memory_format=torch.channels_last))
            loss_fn(embeddings.float(), labels).backward()
            optimizer.step()

        return step

    variants: dict[str, Callable[[], None]] = {
        "network": network_step,
        "step_before": full_step(before),
        "step_after": full_step(after),
        "step_after_0_workers": full_step(after_in_process),
        "data_before": lambda: before.next() and None,
        "data_after": lambda: after.next() and None,
        "data_after_0_workers": lambda: after_in_process.next() and None,
    }
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    for repeat in range(repeats):
        rotation = repeat % len(keys)
        for key in keys[rotation:] + keys[:rotation]:
            times[key].append(timed(variants[key], steps))
        print(f"  {name}: repeat {repeat + 1}/{repeats}", file=sys.stderr, flush=True)
    rate = {k: batch * steps / statistics.median(v) for k, v in times.items()}
    return {
        **spec,
        "batch_size": batch,
        "amp": str(amp),
        "train_images": len(before_set),
        "repeats": repeats,
        "cache_build_s": cache_s,
        "images_per_s": rate,
        "ratio_before": rate["step_before"] / rate["network"],
        "ratio_after": rate["step_after"] / rate["network"],
        "ratio_after_0_workers": rate["step_after_0_workers"] / rate["network"],
        "workers_after": after.workers,
        "data_share_before": rate["network"] / rate["data_before"],
        "data_share_after": rate["network"] / rate["data_after"],
        "data_share_after_0_workers": rate["network"] / rate["data_after_0_workers"],
        "raw_wall_s": times,
    }


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "## train: the whole training step against the network alone",
        "",
        f"`python benchmarks/train.py`, {payload['date']}, {payload['cpus']} CPUs, torch "
        f"{payload['torch']} with 2 threads, CPU; 1-minute load average "
        f"{payload['load_average']} at the start and end of each setup (other jobs shared the "
        "machine: every ratio below is between variants interleaved in the same run, medians). "
        "*Network*: forward + backward + AdamW on a fixed batch (bf16 autocast where "
        "`train.amp=auto` picks it, channels-last). *Step*: the same plus the next batch from the "
        "data path and the MDL loss; *before*: the per-image path (PIL transforms per image, "
        "files decoded every epoch); *after*: the trainer's path now (whole batches from memory "
        "augmented as tensors; a folder decoded once into memory first). *Data share*: the data "
        "path alone, as a fraction of the network step's time. *After* runs with the trainer's "
        "default `data.num_workers=auto` (the workers column: a persistent process draws, "
        "gathers and augments the next batch); *0 workers*: the same path in the main process. "
        "Target: step / network >= 0.9.",
        "",
        "| setup | network images/s | step before | step after | step / network, before "
        "| step / network, after (workers) | step / network, after, 0 workers "
        "| data share before | data share after | data share after, 0 workers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in payload["setups"].items():
        rate = r["images_per_s"]
        lines.append(
            f"| {name} ({r['backbone']}, {r['image_size']} px, {r['channels']} ch) | "
            f"{rate['network']:.0f} | {rate['step_before']:.0f} | {rate['step_after']:.0f} | "
            f"{r['ratio_before']:.2f} | {r['ratio_after']:.2f} ({r['workers_after']}) | "
            f"{r['ratio_after_0_workers']:.2f} | {r['data_share_before']:.0%} | "
            f"{r['data_share_after']:.0%} | {r['data_share_after_0_workers']:.0%} |"
        )
    loads = [float(x) for x in str(payload["load_average"]).split(", ") if x]
    if loads and max(loads) > payload["cpus"]:
        lines += [
            "",
            f"**Measured under load** (1-minute load average up to {max(loads):.1f} on "
            f"{payload['cpus']} CPUs, from other jobs; the benchmark ran at autogroup nice -10): "
            "interleaving spreads the contention over the variants, but a 2-thread network and a "
            "loader process do not suffer it alike, so these ratios are indicative only; rerun on a "
            "quiet machine before quoting them.",
        ]
    folder = payload["setups"].get("smallcnn-folder64")
    if folder:
        lines += [
            "",
            f"The folder set ({folder['train_images']} training PNGs of 64 px) is decoded once in "
            f"{folder['cache_build_s']:.1f} s; its data path alone runs at "
            f"{folder['images_per_s']['data_before']:.0f} images/s before and "
            f"{folder['images_per_s']['data_after']:.0f} after.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--quick", action="store_true", help="2 repeats, print, write nothing")
    args = parser.parse_args()
    torch.set_num_threads(2)
    payload: dict[str, Any] = {**machine(), "setups": {}}
    loads: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for name in args.setups:
            loads.append(f"{os.getloadavg()[0]:.1f}")
            repeats = 2 if args.quick else SETUPS[name]["repeats"]
            payload["setups"][name] = run_setup(name, SETUPS[name], repeats, Path(tmp))
            loads.append(f"{os.getloadavg()[0]:.1f}")
    payload["load_average"] = ", ".join(loads)
    table = markdown(payload)
    print(table)
    if not args.quick:
        write_results("train", payload, table)


if __name__ == "__main__":
    main()
