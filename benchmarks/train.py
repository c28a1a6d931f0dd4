"""Training-step throughput: each loss (with the sampler and data path) against the model alone.

For each setup (a small CNN on 32x32 glyphs, batch P x K = 32 x 4; resnet18 on 64x64 three-channel
glyphs, batch 8 x 4 = 32) this measures, interleaved so machine load hits every variant alike:

- ``model``: forward + backward + AdamW step of the model on one fixed in-memory batch, with the
  trivial loss ``embeddings.sum()``: the floor a training step cannot go below;
- ``<loss>`` (all 8 losses): a full training step as the trainer runs it: the next batch from a
  ``DataLoader`` over the real glyphs training split with ``ClassBalancedBatchSampler``
  (``num_workers=0``, the split's own training transforms), forward, the loss, backward, AdamW;
- ``data``: the data path alone (sampler, image loading, transforms, collation);
- each loss's own forward + backward on a fixed batch of embeddings.

The overhead of a loss is ``time(full step) / time(model alone) - 1``: what the loss, sampler and
data path add on top of the model's forward + backward (target: at most 10%). Each measurement
covers a few hundred images; the figure reported is the median over repeats. Torch uses 2 threads.

    python benchmarks/train.py            # both setups, writes benchmarks/results/train.json
    python benchmarks/train.py --quick    # a smoke run (few repeats), writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, machine, write_results
from mbdl.data import ClassBalancedBatchSampler, load_splits
from mbdl.losses import LOSSES, MetricLoss, build_loss, loss_class
from mbdl.models import build_model

SETUPS: dict[str, dict[str, Any]] = {
    "smallcnn-glyphs32": {
        "backbone": "smallcnn",
        "image_size": 32,
        "channels": 1,
        "classes_per_batch": 32,
        "samples_per_class": 4,
        "embedding_dim": 64,
        "batches_per_measurement": 3,  # 384 images
    },
    "resnet18-glyphs64": {
        "backbone": "resnet18",
        "image_size": 64,
        "channels": 3,
        "classes_per_batch": 8,
        "samples_per_class": 4,
        "embedding_dim": 128,
        "batches_per_measurement": 4,  # 128 images (a step takes seconds on 2 shared cores)
    },
}


class BatchStream:
    """Endless batches from a DataLoader over a class-balanced sampler, epoch after epoch."""

    def __init__(self, dataset: Any, classes_per_batch: int, samples_per_class: int) -> None:
        self.sampler = ClassBalancedBatchSampler(
            dataset.labels, classes_per_batch, samples_per_class, seed=0
        )
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=0)
        self.epoch = 0
        self.iterator: Iterator[tuple[Tensor, Tensor]] = iter(self.loader)

    def next(self) -> tuple[Tensor, Tensor]:
        try:
            return next(self.iterator)
        except StopIteration:
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)
            self.iterator = iter(self.loader)
            return next(self.iterator)


def make_loss(name: str, num_classes: int, embedding_dim: int) -> MetricLoss:
    """The loss with its defaults, given the constructor arguments it ``needs`` (as the trainer)."""
    needs = loss_class(name).needs
    extra: dict[str, Any] = {}
    if "num_classes" in needs:
        extra["num_classes"] = num_classes
    if "embedding_dim" in needs:
        extra["embedding_dim"] = embedding_dim
    return build_loss(name, **extra)


def timed(fn: Callable[[], None], count: int) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` for ``count`` calls of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_setup(name: str, spec: dict[str, Any], repeats: int, losses: list[str]) -> dict[str, Any]:
    splits = load_splits("glyphs", image_size=spec["image_size"], channels=spec["channels"], seed=0)
    train_set = splits.train
    num_classes = len(train_set.class_names)
    batch = spec["classes_per_batch"] * spec["samples_per_class"]
    steps = spec["batches_per_measurement"]
    torch.manual_seed(0)
    model = build_model(spec["backbone"], spec["embedding_dim"], in_channels=spec["channels"])
    model.train()
    stream = BatchStream(train_set, spec["classes_per_batch"], spec["samples_per_class"])
    fixed_images, fixed_labels = stream.next()
    loss_modules = {n: make_loss(n, num_classes, spec["embedding_dim"]) for n in losses}
    optimizers = {
        key: torch.optim.AdamW(
            list(model.parameters()) + (list(module.parameters()) if module is not None else []),
            lr=1e-5,  # tiny: the weights barely move, so every variant times the same model
        )
        for key, module in [("model", None), *loss_modules.items()]
    }
    fixed_embeddings = torch.randn(batch, spec["embedding_dim"])
    fixed_embeddings = nn.functional.normalize(fixed_embeddings, dim=1)

    def model_step() -> None:
        optimizer = optimizers["model"]
        optimizer.zero_grad(set_to_none=True)
        model(fixed_images).sum().backward()
        optimizer.step()

    def full_step(loss_name: str) -> Callable[[], None]:
        loss_fn, optimizer = loss_modules[loss_name], optimizers[loss_name]

        def step() -> None:
            images, labels = stream.next()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images).float(), labels)
            loss.backward()
            optimizer.step()

        return step

    def loss_only(loss_name: str) -> Callable[[], None]:
        loss_fn = loss_modules[loss_name]

        def step() -> None:
            embeddings = fixed_embeddings.clone().requires_grad_(True)
            loss_fn(embeddings, fixed_labels).backward()

        return step

    def data_only() -> None:
        stream.next()

    variants: dict[str, tuple[Callable[[], None], int]] = {"model": (model_step, steps)}
    variants["data"] = (data_only, steps)
    for loss_name in losses:
        variants[loss_name] = (full_step(loss_name), steps)
        variants[f"{loss_name}:loss_only"] = (loss_only(loss_name), 10)

    for fn, _ in variants.values():  # warm-up: allocator, first-call costs, glyph cache
        fn()
    times: dict[str, list[float]] = {key: [] for key in variants}
    cpu_times: dict[str, list[float]] = {key: [] for key in variants}
    keys = list(variants)
    for repeat in range(repeats):
        rotation = repeat % len(keys)  # rotate the order so no variant always runs first
        for key in keys[rotation:] + keys[:rotation]:
            fn, count = variants[key]
            wall, cpu = timed(fn, count)
            times[key].append(wall)
            cpu_times[key].append(cpu)
        print(f"  {name}: repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        **spec,
        "batch_size": batch,
        "images_per_measurement": batch * steps,
        "repeats": repeats,
        "train_images": len(train_set),
        "train_classes": num_classes,
        "loss_only_calls": 10,
        "raw_wall_s": times,
        "raw_cpu_s": cpu_times,
    }
    return summarize(result, losses)


def summarize(result: dict[str, Any], losses: list[str]) -> dict[str, Any]:
    """Add the medians and ratios to ``result`` from its raw per-repeat times.

    Two overhead figures per loss, both from medians of interleaved repeats:

    - ``overhead_*`` (end to end): ``time(full step) / time(model alone) - 1``. It subtracts two
      large, separately measured times, so on a busy machine its noise (tens of percent) can
      exceed the overhead itself;
    - ``overhead_parts_cpu``: ``(CPU time of the data path alone + CPU time of the loss's own
      forward + backward) / CPU time of the model step``: the same quantity built from the parts,
      each measured on its own, which stays stable under load.
    """
    steps = result["batches_per_measurement"]
    images = result["images_per_measurement"]
    calls = result["loss_only_calls"]
    times, cpu_times = result["raw_wall_s"], result["raw_cpu_s"]
    model_s = statistics.median(times["model"])
    model_cpu = statistics.median(cpu_times["model"])
    data_s = statistics.median(times["data"])
    data_cpu = statistics.median(cpu_times["data"])
    result.update(
        {
            "model_images_per_s": images / model_s,
            "model_step_cpu_ms": 1000 * model_cpu / steps,
            "data_images_per_s": images / data_s,
            "data_overhead": data_s / model_s,
            "data_overhead_cpu": data_cpu / model_cpu,
            "losses": {},
        }
    )
    for loss_name in losses:
        full_s = statistics.median(times[loss_name])
        full_cpu = statistics.median(cpu_times[loss_name])
        loss_s = statistics.median(times[f"{loss_name}:loss_only"]) / calls
        loss_cpu = statistics.median(cpu_times[f"{loss_name}:loss_only"]) / calls
        result["losses"][loss_name] = {
            "step_images_per_s": images / full_s,
            "overhead": full_s / model_s - 1.0,
            "overhead_cpu": full_cpu / model_cpu - 1.0,
            "overhead_parts_cpu": (data_cpu + steps * loss_cpu) / model_cpu,
            "loss_fwd_bwd_ms": 1000 * loss_s,
            "loss_fwd_bwd_cpu_ms": 1000 * loss_cpu,
            "loss_share_of_model_step_cpu": loss_cpu / (model_cpu / steps),
        }
    return result


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "## train: training-step throughput, each loss against the model alone",
        "",
        f"`python benchmarks/train.py`, {payload['date']}, {payload['cpus']} CPUs, torch "
        f"{payload['torch']} with {payload['torch_threads']} threads, CPU (1-minute load average "
        f"{payload.get('load_average', '?')} at the start and end of each setup; above about 2 "
        "other jobs shared the 2 cores). *Model alone*: forward + "
        "backward (loss `embeddings.sum()`) + AdamW on a fixed batch. *Step*: the same plus the "
        "next batch from a `DataLoader` (class-balanced sampler, glyphs training split with its "
        "training transforms, `num_workers=0`) and the loss. *Overhead, end to end* = step time / "
        "model-alone time - 1 (wall and process CPU time, medians of interleaved repeats): on this "
        "busy machine its noise is tens of percent, larger than the effect. *Overhead, from parts* "
        "= (CPU time of the data path alone + CPU time of the loss's own forward + backward) / CPU "
        "time of the model step: the same quantity from parts measured on their own, stable under "
        "load; the 10% target is judged on it. *Loss*: the loss's forward + backward on a fixed "
        "batch of embeddings (CPU ms per batch).",
        "",
    ]
    for setup, result in payload["setups"].items():
        lines += [
            f"**{setup}**: {result['backbone']}, {result['image_size']}x{result['image_size']}x"
            f"{result['channels']}, batch {result['classes_per_batch']} x "
            f"{result['samples_per_class']} = {result['batch_size']}, {result['embedding_dim']}-d; "
            f"model alone {result['model_images_per_s']:.0f} images/s (wall), "
            f"{result['model_step_cpu_ms']:.0f} CPU ms per batch; the data path alone costs "
            f"{result['data_overhead_cpu']:.1%} of the model step (CPU time); "
            f"{result['images_per_measurement']} images per measurement, "
            f"{result['repeats']} repeats.",
            "",
            "| loss | step images/s | overhead, end to end (wall / CPU) | loss fwd+bwd (ms) "
            "| overhead, from parts | within 10% |",
            "|---|---:|---:|---:|---:|:---:|",
        ]
        for loss_name, row in result["losses"].items():
            ok = "yes" if row["overhead_parts_cpu"] <= 0.10 else "no"
            lines.append(
                f"| {loss_name} | {row['step_images_per_s']:.0f} | {row['overhead']:+.0%} / "
                f"{row['overhead_cpu']:+.0%} | {row['loss_fwd_bwd_cpu_ms']:.1f} | "
                f"{row['overhead_parts_cpu']:.1%} | {ok} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="repeats per variant")
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--losses", nargs="*", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--quick", action="store_true", help="2 repeats, print, write nothing")
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="recompute the tables from the raw times stored in benchmarks/results/train.json",
    )
    args = parser.parse_args()
    if args.rerender:
        stored = json.loads((RESULTS / "train.json").read_text())
        for result in stored["setups"].values():
            summarize(result, list(result["losses"]))
        write_results("train", stored, markdown(stored))
        print(markdown(stored))
        return
    torch.set_num_threads(2)
    payload: dict[str, Any] = {**machine(), "setups": {}}
    loads: list[str] = []
    for name in args.setups:
        loads.append(f"{os.getloadavg()[0]:.1f}")
        default_repeats = 5 if SETUPS[name]["backbone"] == "smallcnn" else 3
        repeats = 2 if args.quick else (args.repeats or default_repeats)
        start = time.perf_counter()
        payload["setups"][name] = run_setup(name, SETUPS[name], repeats, args.losses)
        payload["setups"][name]["wall_s"] = time.perf_counter() - start
        loads.append(f"{os.getloadavg()[0]:.1f}")
    payload["load_average"] = ", ".join(loads)
    table = markdown(payload)
    print(table)
    if not args.quick:
        write_results("train", payload, table)


if __name__ == "__main__":
    main()
