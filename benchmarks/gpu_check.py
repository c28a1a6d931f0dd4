"""GPU figures: the trainer against the network alone, the losses at B = 4096, kNN at N = 1,000,000.

Run by ``benchmarks/gpu_check.sh`` on a CUDA machine (after the GPU-marked tests); ``--smoke``
runs every part at toy sizes on whatever device there is (the CPU fallback the test suite runs).

- *trainer vs network alone* (ResNet-50, 224 px, bf16 autocast, channels-last, P x K = 32 x 4,
  MDL): ``network`` is the trainer's own training step (:meth:`Trainer._train_step`: forward,
  loss, backward, AdamW) on one fixed batch already on the GPU: the speed the network allows;
  ``trainer`` is the trainer's epoch loop (:meth:`Trainer._run_epoch`: sampler, DataLoader with
  ``data.num_workers=auto`` worker processes and pinned memory, the same step). Three sources:
  (a) random ``uint8`` images in memory (an :class:`ArrayImageDataset`: the batched path of
  :mod:`mbdl.data.batched`, crops and flips on the GPU); (b) a folder of 500 x 375 JPEGs
  (``data.source=folder``, ``data.cache=off``: PIL decode, crop and flip per image in the
  workers, every epoch); (c) the same folder with ``data.cache=disk`` (decoded once into the
  memory-mapped cache at 256 x 256, :mod:`mbdl.data.cache`, then the batched path). A variant
  of (b), ``jpeg_gpu_decode``, reads the JPEG files' bytes and decodes them on the GPU
  (:func:`mbdl.data.decode.decode_jpeg_batch`, nvJPEG), random-resized-crops and flips there,
  then runs the same step. Interleaved repeats, medians; the ratio is trainer images/s over
  network images/s.
- *embed*: :func:`mbdl.data.fastpath.embed_images` over the folder (exact and ``exact=False``,
  loader workers = the CPUs but one) against the network alone (eval forward under bf16
  autocast on one fixed batch of 256 on the GPU).
- *losses*: every loss's forward + backward on ``B x 512`` normalised fp32 embeddings (K = 4
  per class), CUDA-event medians, and the floor: the euclidean distance matrix alone, forward +
  backward; peak memory above the inputs.
- *kNN*: ``mbdl.functional.knn.knn`` (exact, chunked, torch backend), ``Q`` queries against
  ``N x 128`` normalised fp32 gallery vectors, k = 10, checked against a plain ``cdist`` +
  ``topk`` on a few queries; k-means (torch backend) on 200,000 x 128 points, 1,000 clusters.

    python benchmarks/gpu_check.py --out DIR             # full sizes, writes DIR/gpu_check.json, .md
    python benchmarks/gpu_check.py --smoke --out DIR     # toy sizes, any device
    python benchmarks/gpu_check.py --publish DIR/gpu_check.json   # into benchmarks/results + docs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mbdl.config import load_config
from mbdl.data.base import Splits
from mbdl.data.splits import ArrayImageDataset, attach_transforms
from mbdl.functional.distances import pairwise_distance
from mbdl.functional.kmeans import kmeans
from mbdl.functional.knn import knn
from mbdl.losses import LOSSES, build_loss, loss_class
from mbdl.train import trainer as trainer_module

FULL = {
    "backbone": "resnet50",
    "image_size": 224,
    "jpeg_size": (500, 375),
    "classes": 400,
    "per_class": 16,
    "steps": 20,
    "repeats": 3,
    "batch_classes": 32,
    "batch_per_class": 4,
    "loss_batch": 4096,
    "loss_dim": 512,
    "knn_gallery": 1_000_000,
    "knn_queries": 50_000,
    "knn_dim": 128,
    "kmeans_points": 200_000,
    "kmeans_clusters": 1000,
}
SMOKE = {
    **FULL,
    "backbone": "resnet18",
    "image_size": 32,
    "jpeg_size": (48, 40),
    "classes": 40,
    "per_class": 8,
    "steps": 2,
    "repeats": 2,
    "batch_classes": 4,
    "batch_per_class": 2,
    "loss_batch": 64,
    "loss_dim": 32,
    "knn_gallery": 4000,
    "knn_queries": 500,
    "knn_dim": 16,
    "kmeans_points": 2000,
    "kmeans_clusters": 20,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_jpeg(job: tuple[str, int, tuple[int, int]]) -> None:
    from PIL import Image

    from benchmarks.jpeg_path import photo

    path, seed, (width, height) = job
    Image.fromarray(photo(seed, width, height)).save(path, quality=90)


def write_jpeg_folder(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> int:
    """``root/cNNN/iNN.jpg``; returns the number of bytes written."""
    jobs = []
    for c in range(classes):
        (root / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
        jobs += [
            (str(root / f"c{c:04d}" / f"i{i:02d}.jpg"), c * 1000 + i, size)
            for i in range(per_class)
        ]
    with Pool(max(1, min(16, (os.cpu_count() or 2) - 1))) as pool:
        pool.map(_write_jpeg, jobs, chunksize=32)
    return sum(Path(p).stat().st_size for p, _, _ in jobs)


def in_memory_splits(spec: dict[str, Any]) -> Splits:
    """Random uint8 images held in memory, the folder source's class-disjoint shape."""
    size, per_class = spec["image_size"], spec["per_class"]
    rng = np.random.default_rng(0)

    def part(classes: int) -> ArrayImageDataset:
        images = rng.integers(0, 256, (classes * per_class, size, size, 3), dtype=np.uint8)
        labels = np.repeat(np.arange(classes), per_class)
        return ArrayImageDataset(images, labels, [f"c{i}" for i in range(classes)])

    train_classes = int(spec["classes"] * 0.5 * 0.85)
    splits = Splits(
        train=part(train_classes),
        val=part(4),
        test=part(4),
        channels=3,
        image_size=size,
        source="memory",
    )
    return attach_transforms(splits, augment="auto")


def build_trainer(
    spec: dict[str, Any], device: str, out: Path, extra: list[str], data: Any = None
) -> Any:
    workers = 0 if spec is SMOKE else "auto"
    config = load_config(
        None,
        [
            f"model.backbone={spec['backbone']}",
            "model.embedding_dim=128",
            f"train.batch_classes={spec['batch_classes']}",
            f"train.batch_per_class={spec['batch_per_class']}",
            f"train.max_steps_per_epoch={spec['steps']}",
            "train.epochs=100",
            "train.warmup_epochs=0",
            "train.amp=auto",
            "train.channels_last=true",
            f"train.device={device}",
            "train.progress=false",
            f"data.num_workers={workers}",
            "eval.report=false",
            f"out={out}",
            *extra,
        ],
    )
    return trainer_module.Trainer(config, data=data)  # data=None: the config's


def time_trainer(trainer: Any, spec: dict[str, Any], decode_on_gpu: bool) -> dict[str, Any]:
    """Interleaved medians: the network alone (fixed device batch) vs the trainer's epoch loop."""
    device = trainer.device
    batch = spec["batch_classes"] * spec["batch_per_class"]
    steps = spec["steps"]
    trainer.sampler.set_epoch(0)
    images, labels = trainer._augmented(next(iter(trainer.loader)))
    fixed = images.to(device), labels.to(device)
    epoch = [0]

    def network() -> None:
        for _ in range(steps):
            trainer._train_step([fixed[0]], [fixed[1]])

    def run_trainer() -> None:
        trainer.progress.step_in_epoch = 0
        trainer._run_epoch(epoch[0])
        epoch[0] += 1

    variants: dict[str, Callable[[], None]] = {"network": network, "trainer": run_trainer}
    if decode_on_gpu:
        variants["jpeg_gpu_decode"] = gpu_decode_loop(trainer, spec)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up: cuDNN autotuning, workers, page cache
        fn()
    for repeat in range(spec["repeats"]):
        keys = list(variants)
        keys = keys[repeat % len(keys) :] + keys[: repeat % len(keys)]
        for key in keys:
            synchronize(device)
            start = time.perf_counter()
            variants[key]()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    images_per_s = {k: batch * steps / statistics.median(v) for k, v in times.items()}
    row: dict[str, Any] = {
        "network_images_per_s": images_per_s["network"],
        "trainer_images_per_s": images_per_s["trainer"],
        "ratio": images_per_s["trainer"] / images_per_s["network"],
        "num_workers": trainer.config.data.num_workers,
        "data_path": (trainer.splits.info or {}).get("data_path"),
        "amp": str(trainer.amp),
        "batched": trainer.batched is not None,
        "raw_s": times,
    }
    if decode_on_gpu:
        row["gpu_decode_images_per_s"] = images_per_s["jpeg_gpu_decode"]
        row["gpu_decode_ratio"] = images_per_s["jpeg_gpu_decode"] / images_per_s["network"]
    return row


def gpu_decode_loop(trainer: Any, spec: dict[str, Any]) -> Callable[[], None]:
    """Batches of the folder's training JPEGs decoded on the GPU, cropped and flipped there."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as F

    from mbdl.data.decode import decode_jpeg_batch

    dataset, device, size = trainer.splits.train, trainer.device, spec["image_size"]
    paths = [dataset.describe(i) for i in range(len(dataset))]
    labels_all = torch.as_tensor(dataset.labels)
    generator = torch.Generator().manual_seed(0)
    on_gpu = device.type == "cuda"

    def step_batches() -> None:
        trainer.sampler.set_epoch(0)
        for number, batch in enumerate(trainer.sampler):
            if number == spec["steps"]:
                break
            decoded = decode_jpeg_batch([paths[i] for i in batch], str(device) if on_gpu else "cpu")
            crops = []
            for image in decoded:
                top, left, h, w = RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                crop = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
                if torch.rand(1, generator=generator).item() < 0.5:
                    crop = F.horizontal_flip(crop)
                crops.append(crop)
            images = torch.stack(crops).to(device).float().div_(255)
            trainer._train_step([images], [labels_all[batch].to(device)])

    return step_batches


def time_embed(spec: dict[str, Any], device: torch.device, jpegs: Path) -> dict[str, Any]:
    """:func:`mbdl.data.fastpath.embed_images` over the folder (exact and not) against the
    network's eval forward alone on one fixed batch already on the device; interleaved medians."""
    from mbdl.data.fastpath import EvaluationImages, embed_images, normalise_batch
    from mbdl.embedstore import list_images
    from mbdl.models import build_model

    size = spec["image_size"]
    preprocessing = {
        "color_mode": "RGB",
        "resize": round(size * 256 / 224),
        "crop": size,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    relative, labels, _ = list_images(jpegs)
    paths = [jpegs / p for p in relative]
    on_gpu = device.type == "cuda"
    amp = torch.bfloat16 if on_gpu else None
    model = build_model(spec["backbone"], 128).to(device).eval()
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    workers = 0 if spec is SMOKE else max(1, (os.cpu_count() or 2) - 1)
    batch_size = 256 if spec is FULL else 32
    exact = EvaluationImages(paths, preprocessing, labels)
    fast = EvaluationImages(paths, preprocessing, labels, exact=False)
    fixed = normalise_batch(
        torch.stack([exact.image(i % len(exact)) for i in range(batch_size)]).to(device),
        preprocessing["mean"],
        preprocessing["std"],
    )
    if on_gpu:
        fixed = fixed.contiguous(memory_format=torch.channels_last)
    batches = -(-len(paths) // batch_size)

    def network() -> None:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=amp, enabled=amp is not None),
        ):
            for _ in range(batches):
                model(fixed).float().cpu()

    def run_with(dataset: EvaluationImages) -> Callable[[], None]:
        def run() -> None:
            embed_images(
                model,
                dataset,
                preprocessing,
                device=device,
                batch_size=batch_size,
                workers=workers,
                amp_dtype=amp,
            )

        return run

    variants = {"network": network, "embed_exact": run_with(exact), "embed_fast": run_with(fast)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for repeat in range(spec["repeats"]):
        keys = list(variants)
        for key in keys[repeat % len(keys) :] + keys[: repeat % len(keys)]:
            synchronize(device)
            start = time.perf_counter()
            variants[key]()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    handled = {"network": batches * batch_size, "embed_exact": len(paths), "embed_fast": len(paths)}
    rates = {k: handled[k] / statistics.median(v) for k, v in times.items()}
    return {
        "images": len(paths),
        "workers": workers,
        "batch_size": batch_size,
        "network_images_per_s": rates["network"],
        "embed_exact_images_per_s": rates["embed_exact"],
        "embed_fast_images_per_s": rates["embed_fast"],
        "exact_ratio": rates["embed_exact"] / rates["network"],
        "fast_ratio": rates["embed_fast"] / rates["network"],
        "raw_s": times,
    }


def time_cuda(fn: Callable[[], Any], device: torch.device, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, wall clock on CPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - began))
    return statistics.median(times)


def time_losses(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    batch, dim = spec["loss_batch"], spec["loss_dim"]
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    embeddings = embeddings.to(device)
    labels = torch.arange(batch // 4).repeat_interleave(4).to(device)

    def floor() -> None:
        x = embeddings.clone().requires_grad_(True)
        pairwise_distance(x).sum().backward()

    floor_ms = time_cuda(floor, device)
    rows: dict[str, Any] = {}
    for name in LOSSES:
        needs = loss_class(name).needs
        extra: dict[str, Any] = {}
        if "num_classes" in needs:
            extra["num_classes"] = batch // 4
        if "embedding_dim" in needs:
            extra["embedding_dim"] = dim
        loss = build_loss(name, **extra).to(device)

        def step(loss: Any = loss) -> None:
            x = embeddings.clone().requires_grad_(True)
            loss(x, labels).backward()

        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        ms = time_cuda(step, device)
        peak = (
            (torch.cuda.max_memory_allocated(device) - base) / 2**20
            if device.type == "cuda"
            else None
        )
        rows[name] = {"ms": ms, "ratio_to_floor": ms / floor_ms, "peak_mb": peak}
    return {"batch": batch, "dim": dim, "floor_ms": floor_ms, "losses": rows}


def time_knn(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    n, q, d = spec["knn_gallery"], spec["knn_queries"], spec["knn_dim"]
    generator = torch.Generator(device=device).manual_seed(0)
    gallery = torch.nn.functional.normalize(
        torch.randn(n, d, generator=generator, device=device), dim=1
    )
    queries = torch.nn.functional.normalize(
        torch.randn(q, d, generator=generator, device=device), dim=1
    )
    budget = 4 * 2**30 if device.type == "cuda" else 2**26

    def search() -> tuple[torch.Tensor, torch.Tensor]:
        return knn(queries, gallery, 10, memory_budget_bytes=budget)

    ms = time_cuda(search, device, repeats=3)
    distances, indices = search()
    probe = queries[:64]
    reference = torch.cdist(probe.double(), gallery.double()).topk(10, largest=False)
    agree = float((indices[:64] == reference.indices).float().mean())
    max_error = float((distances[:64].double() - reference.values).abs().max())
    points = spec["kmeans_points"]
    x = gallery[:points]
    kmeans_ms = time_cuda(lambda: kmeans(x, spec["kmeans_clusters"], backend="torch"), device, 2)
    return {
        "gallery": n,
        "queries": q,
        "dim": d,
        "k": 10,
        "ms": ms,
        "queries_per_s": q / (ms / 1000),
        "all_pairs_projected_s": (n / q) * ms / 1000,
        "index_agreement_with_cdist": agree,
        "max_distance_error": max_error,
        "kmeans_points": points,
        "kmeans_clusters": spec["kmeans_clusters"],
        "kmeans_ms": kmeans_ms,
    }


def markdown(payload: dict[str, Any]) -> str:
    if not payload.get("measured_on_gpu"):
        return (
            "## gpu_check: GPU paths and figures\n\n"
            "Not yet measured on a GPU: run `bash benchmarks/gpu_check.sh` on a CUDA machine.\n"
        )
    spec = payload["spec"]
    t = payload["trainer_vs_network"]
    lines = [
        "## gpu_check: GPU paths and figures",
        "",
        f"`bash benchmarks/gpu_check.sh`, {payload['date']}, {payload['gpu']}, torch "
        f"{payload['torch']}, {payload['cpus']} CPU cores. GPU-marked tests: "
        f"{payload.get('tests', 'not run')}.",
        "",
        f"**Trainer vs network alone**: {spec['backbone']}, {spec['image_size']} px, "
        f"amp {t['in_memory']['amp']}, channels-last, batch {spec['batch_classes']} x "
        f"{spec['batch_per_class']}, MDL; {spec['steps']} steps per measurement, medians of "
        f"{spec['repeats']} interleaved repeats. *Network*: the trainer's step on one fixed batch "
        "already on the GPU; *trainer*: its epoch loop (sampler, DataLoader with "
        f"data.num_workers={t['in_memory']['num_workers']} and pinned memory, the same step).",
        "",
        "| source | network images/s | trainer images/s | trainer / network |",
        "|---|---:|---:|---:|",
    ]

    def path(row: dict[str, Any]) -> str:
        if row.get("batched"):
            return "whole uint8 batches from memory, crop + flip on the GPU"
        return "PIL decode, crop + flip per image in the workers"

    width, height = spec["jpeg_size"]
    names = {
        "in_memory": f"(a) random uint8 images in memory ({path(t['in_memory'])})",
        "jpeg_folder": f"(b) folder of {width} x {height} JPEGs, data.cache=off "
        f"({path(t['jpeg_folder'])})",
        "jpeg_cache": f"(c) the same folder, data.cache=disk: decoded once in "
        f"{payload.get('jpeg_cache_trainer_build_s', 0):.0f} s, memory-mapped "
        f"({path(t['jpeg_cache'])})",
    }
    for key, label in names.items():
        row = t.get(key)
        if row is None:
            continue
        lines.append(
            f"| {label} | {row['network_images_per_s']:.0f} | {row['trainer_images_per_s']:.0f} "
            f"| {row['ratio']:.2f} |"
        )
    if "gpu_decode_images_per_s" in t.get("jpeg_folder", {}):
        row = t["jpeg_folder"]
        lines.append(
            f"| (b) decoded on the GPU (`decode_jpeg_batch`, nvJPEG; crop + flip on the "
            f"GPU, main process) | {row['network_images_per_s']:.0f} | "
            f"{row['gpu_decode_images_per_s']:.0f} | {row['gpu_decode_ratio']:.2f} |"
        )
    lines += ["", "Data lines (cache and loader workers, and why): "] + [
        f"{key}: {t[key].get('data_path')}" + ("; " if i < len(t) - 1 else ".")
        for i, key in enumerate(t)
    ]
    embed = payload.get("embed")
    if embed:
        lines += [
            "",
            f"**Embed** (`mbdl.data.fastpath.embed_images`, {embed['images']} JPEGs, batch "
            f"{embed['batch_size']}, {embed['workers']} loader workers, bf16 autocast): network "
            f"alone (eval forward on a fixed batch) {embed['network_images_per_s']:.0f} images/s; "
            f"exact {embed['embed_exact_images_per_s']:.0f} ({embed['exact_ratio']:.2f}); "
            f"exact=False {embed['embed_fast_images_per_s']:.0f} ({embed['fast_ratio']:.2f}).",
        ]
    if payload.get("note"):
        lines += ["", payload["note"]]
    losses = payload["losses"]
    lines += [
        "",
        f"**Losses** at B = {losses['batch']}, d = {losses['dim']}, fp32, forward + backward "
        f"(CUDA-event medians); floor (distance matrix alone) {losses['floor_ms']:.2f} ms.",
        "",
        "| loss | ms | ratio to floor | peak MB |",
        "|---|---:|---:|---:|",
    ]
    for name, row in losses["losses"].items():
        lines.append(
            f"| {name} | {row['ms']:.2f} | {row['ratio_to_floor']:.2f} | {row['peak_mb']:.0f} |"
        )
    k = payload["knn"]
    lines += [
        "",
        f"**kNN**: exact torch kNN, {k['queries']:,} queries against N = {k['gallery']:,} x "
        f"{k['dim']} (fp32, k = {k['k']}): {k['ms']:.0f} ms, {k['queries_per_s']:,.0f} queries/s "
        f"(all N items against each other: about {k['all_pairs_projected_s']:.0f} s); indices "
        f"agree with float64 `cdist` + `topk` on {k['index_agreement_with_cdist']:.1%} of 64 "
        f"probe queries' neighbours. k-means (torch) on {k['kmeans_points']:,} x {k['dim']}, "
        f"{k['kmeans_clusters']} clusters: {k['kmeans_ms']:.0f} ms.",
    ]
    return "\n".join(lines) + "\n"


def run(spec: dict[str, Any], out: Path, tests: str | None) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    payload: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "measured_on_gpu": device.type == "cuda" and spec is FULL,
        "smoke": spec is SMOKE,
        "spec": spec,
        "tests": tests,
        "trainer_vs_network": {},
    }
    if device.type == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("MBDL_CACHE", str(root / "cache"))
        trainer = build_trainer(
            spec, device.type, root / "run-memory", [], data=in_memory_splits(spec)
        )
        try:
            payload["trainer_vs_network"]["in_memory"] = time_trainer(trainer, spec, False)
        finally:
            trainer.close()
        print(
            f"gpu_check: in memory {payload['trainer_vs_network']['in_memory']['ratio']:.2f}",
            file=sys.stderr,
            flush=True,
        )
        jpegs = root / "jpegs"
        payload["jpeg_bytes"] = write_jpeg_folder(
            jpegs, spec["classes"], spec["per_class"], spec["jpeg_size"]
        )
        folder = [
            "data.source=folder",
            f"data.root={jpegs}",
            f"data.image_size={spec['image_size']}",
        ]
        for name, cache, gpu_decode in (
            ("jpeg_folder", "off", True),
            ("jpeg_cache", "disk", False),
        ):
            started = time.perf_counter()
            trainer = build_trainer(
                spec, device.type, root / f"run-{name}", [*folder, f"data.cache={cache}"]
            )
            payload[f"{name}_trainer_build_s"] = time.perf_counter() - started
            try:
                payload["trainer_vs_network"][name] = time_trainer(trainer, spec, gpu_decode)
            finally:
                trainer.close()
            print(
                f"gpu_check: {name} {payload['trainer_vs_network'][name]['ratio']:.2f}",
                file=sys.stderr,
                flush=True,
            )
        payload["embed"] = time_embed(spec, device, jpegs)
        print(
            f"gpu_check: embed {payload['embed']['exact_ratio']:.2f} "
            f"(exact=False {payload['embed']['fast_ratio']:.2f})",
            file=sys.stderr,
            flush=True,
        )
    payload["losses"] = time_losses(spec, device)
    print("gpu_check: losses done", file=sys.stderr, flush=True)
    payload["knn"] = time_knn(spec, device)
    print("gpu_check: knn done", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(payload))
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes, any device")
    parser.add_argument("--out", type=Path, default=Path("."), help="where to write the results")
    parser.add_argument("--tests", default=None, help="the GPU tests' summary line, recorded")
    parser.add_argument("--publish", type=Path, default=None, help="a gpu_check.json to publish")
    args = parser.parse_args()
    if args.publish is not None:
        from benchmarks.common import write_results

        payload = json.loads(args.publish.read_text())
        write_results("gpu_check", payload, markdown(payload))
        print(markdown(payload))
        return
    payload = run(SMOKE if args.smoke else FULL, args.out, args.tests)
    print(markdown(payload))


if __name__ == "__main__":
    main()
