"""The JPEG data path alone at 224 px, one process and one thread: images per CPU-second.

A folder of photo-sized JPEGs (500 x 375 like CUB, quality 90: smooth noise, gradients and
shapes), and a second of 1000 x 750 for the DCT-scaled decode. Per image, in one process:

- ``pil_train``: the per-image training path (``read_image`` + ``RandomResizedCrop(224)`` + flip +
  ``ToTensor``), what each DataLoader worker does every epoch with ``data.cache=off``;
- ``pil_eval``: the per-image evaluation path (``read_image`` + ``transform_from_spec``: resize 256,
  centre crop 224, ``ToTensor``, ``Normalize``);
- ``fast_eval_exact``: :class:`mbdl.data.fastpath.EvaluationImages` (the checked decode of
  :func:`mbdl.data.decode.read_array`, then PIL's resize and crop to ``uint8``) and
  :func:`~mbdl.data.fastpath.normalise_batch` per batch of 128: bit-identical;
- ``fast_eval``: the same with ``exact=False`` (torch's ``uint8`` resize instead of PIL's);
- ``torchvision_decode``: bare ``torchvision.io.decode_jpeg`` + the same torch resize and crop
  (no header checks: the floor of the checked decode);
- ``cache_build``: decoding into the cache (:func:`mbdl.data.cache.load_for_cache` +
  ``decode_resized`` to 256 x 256), once per image for the whole run; ``cache_build_pil`` the
  cache before this benchmark (the source's PIL image, PIL's resize);
- ``from_cache_gather``: per batch of 128, gathering the cached rows (``InMemoryBatches`` with the
  crops left to the device): the loader's work per epoch when a GPU crops and flips;
- ``from_cache_cpu_crops``: the same with the random-resized crops and flips done on the CPU;

and on the 1000 x 750 folder ``large_pil_eval`` against ``large_fast_eval`` (DCT-scaled decode
at 1/2, torch resize) and ``large_cache_build`` against ``large_cache_build_full``, with the
difference of the inexact evaluation crops from the exact ones (grey levels, 0-255). Interleaved repeats, medians.
``cores_to_feed`` is the network speed (ResNet-50 bf16 224 px on an H200, docs/benchmarks.md,
3,380 images/s) over a variant's images/s per core.

    python benchmarks/jpeg_path.py            # writes benchmarks/results/jpeg_path.json + docs
    python benchmarks/jpeg_path.py --smoke    # tiny, prints only
    python benchmarks/jpeg_path.py --out DIR  # writes DIR/jpeg_path.json and .md only
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mbdl.data.files import read_image
from mbdl.data.transforms import build_transforms

#: ResNet-50, bf16, 224 px, the network alone on an H200 (docs/benchmarks.md, gpu_check)
NETWORK_IMAGES_PER_S = 3380.0

SPEC = {
    "color_mode": "RGB",
    "resize": 256,
    "crop": 224,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def photo(seed: int, width: int, height: int) -> np.ndarray:
    """A natural-looking ``height x width x 3`` image: smooth coloured noise at a few scales, a
    gradient, a few filled shapes, mild sensor noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    base = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((4, 0.6), (16, 0.3), (64, 0.1)):
        small = rng.random((max(2, height * cells // width), cells, 3)).astype(np.float32)
        up = Image.fromarray((small * 255).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        base += weight * np.asarray(up, np.float32)
    base += np.linspace(-30, 30, width, dtype=np.float32)[None, :, None]
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(10, width // 3), y0 + rng.integers(10, height // 3)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x0), int(y0), int(x1), int(y1)), fill=colour)
    noisy = np.asarray(image, np.int16) + rng.integers(-4, 5, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def write_folder(root: Path, count: int, width: int, height: int, classes: int = 20) -> list[Path]:
    from PIL import Image

    paths = []
    for i in range(count):
        folder = root / f"c{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(photo(i, width, height)).save(path, quality=90)
        paths.append(path)
    return paths


def per_image(fn: Callable[[Path], Any], paths: list[Path]) -> Callable[[], None]:
    def run() -> None:
        for path in paths:
            fn(path)

    return run


def build_variants(paths: list[Path], large: list[Path], root: Path) -> dict[str, Any]:
    """name -> (function over the whole set, images it handles)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import functional as TF
    from torchvision.transforms.v2 import functional as F

    from mbdl.data import load_splits
    from mbdl.data.batched import BatchAugment, InMemoryBatches
    from mbdl.data.cache import decode_resized, decoded_training_split, load_for_cache
    from mbdl.data.fastpath import EvaluationImages, normalise_batch
    from mbdl.model.preprocessing import transform_from_spec

    train_transform = build_transforms(True, 224, 3, augment="crop")
    eval_transform = transform_from_spec(SPEC)

    def pil_train(path: Path) -> None:
        train_transform(read_image(path))

    def pil_eval(path: Path) -> None:
        eval_transform(read_image(path))

    def fast_eval_of(dataset: EvaluationImages) -> Callable[[], None]:
        def run() -> None:
            for start in range(0, len(dataset), 128):
                batch = torch.stack(
                    [dataset.image(i) for i in range(start, min(start + 128, len(dataset)))]
                )
                normalise_batch(batch, SPEC["mean"], SPEC["std"])

        return run

    def tv_decode(path: Path) -> None:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        image = decode_jpeg(data, mode=ImageReadMode.RGB)
        F.center_crop(F.resize(image, [256], antialias=True), [224, 224]).contiguous()

    def pil_prepare(image: Any) -> np.ndarray:
        return np.asarray(TF.center_crop(TF.resize(image, 256), [256, 256]), dtype=np.uint8)

    splits = load_splits("folder", root / "small", image_size=224, seed=0, val_fraction=0.0)
    large_splits = load_splits("folder", root / "large", image_size=224, seed=0, val_fraction=0.0)
    train, large_train = splits.train, large_splits.train
    prepare = functools.partial(decode_resized, side=256, channels=3)

    def cache_build_of(dataset: Any, min_side: int | None, pil: bool = False) -> Callable[[], None]:
        def run() -> None:
            for i in range(len(dataset)):
                if pil:  # the cache before: the source's PIL image, PIL's resize
                    pil_prepare(dataset.load_image(i))
                else:
                    prepare(load_for_cache(dataset, i, min_side))

        return run

    cached = decoded_training_split(train, 224, 3, mode="disk", cache_dir=root / "cache")
    seeds = np.arange(len(cached), dtype=np.int64) * 7919 + 1
    keys = [
        list(zip(range(s, min(s + 128, len(cached))), seeds[s : s + 128].tolist(), strict=True))
        for s in range(0, len(cached), 128)
    ]
    on_device = InMemoryBatches(cached, BatchAugment("crop", 224, 3, imagenet_norm=True))
    on_cpu = InMemoryBatches(cached, BatchAugment("crop", 224, 3, imagenet_norm=True))
    on_cpu.augment_in_loader = True

    def from_cache(batches: InMemoryBatches) -> Callable[[], None]:
        def run() -> None:
            for key in keys:
                batches[key]

        return run

    return {
        "pil_train": (per_image(pil_train, paths), len(paths)),
        "pil_eval": (per_image(pil_eval, paths), len(paths)),
        "fast_eval_exact": (fast_eval_of(EvaluationImages(paths, SPEC)), len(paths)),
        "fast_eval": (fast_eval_of(EvaluationImages(paths, SPEC, exact=False)), len(paths)),
        "torchvision_decode": (per_image(tv_decode, paths), len(paths)),
        "cache_build_pil": (cache_build_of(train, 256, pil=True), len(train)),
        "cache_build": (cache_build_of(train, 256), len(train)),
        "from_cache_gather": (from_cache(on_device), len(cached)),
        "from_cache_cpu_crops": (from_cache(on_cpu), len(cached)),
        "large_pil_eval": (per_image(pil_eval, large), len(large)),
        "large_fast_eval": (
            fast_eval_of(EvaluationImages(large, SPEC, exact=False)),
            len(large),
        ),
        "large_cache_build_full": (cache_build_of(large_train, None), len(large_train)),
        "large_cache_build": (cache_build_of(large_train, 256), len(large_train)),
    }


def inexact_difference(paths: list[Path]) -> dict[str, float]:
    """Grey-level difference of ``exact=False`` from exact evaluation crops (uint8, 224 x 224)."""
    from mbdl.data.fastpath import EvaluationImages

    exact, fast = EvaluationImages(paths, SPEC), EvaluationImages(paths, SPEC, exact=False)
    stacked = torch.stack(
        [(fast.image(i).float() - exact.image(i).float()).abs() for i in range(len(paths))]
    )
    sample = stacked.flatten()[:: max(1, stacked.numel() // 2**24)]
    return {
        "mean_abs": float(stacked.mean()),
        "p99_abs": float(torch.quantile(sample, 0.99)),
        "max_abs": float(stacked.max()),
        "fraction_differing": float((stacked > 0).float().mean()),
    }


def run(smoke: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    count, large_count, repeats = (40, 12, 1) if smoke else (400, 80, 3)
    with tempfile.TemporaryDirectory(prefix="jpeg-path-") as tmp:
        root = Path(tmp)
        paths = write_folder(root / "small", count, 500, 375)
        large = write_folder(root / "large", large_count, 1000, 750)
        variants = build_variants(paths, large, root)
        for fn, _ in variants.values():  # warm-up (page cache, lazy imports)
            fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for repeat in range(repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                fn, _ = variants[name]
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                cpu[name].append(time.process_time() - start_cpu)
                times[name].append(time.perf_counter() - start)
        # per core: images per CPU-second of this process (one thread); wall time on a loaded
        # machine counts the time other jobs held the core
        rates = {k: variants[k][1] / statistics.median(v) for k, v in cpu.items()}
        wall_rates = {k: variants[k][1] / statistics.median(v) for k, v in times.items()}
        difference = {"500x375": inexact_difference(paths), "1000x750": inexact_difference(large)}
        jpeg_kb = statistics.mean(p.stat().st_size for p in paths) / 1024
    from benchmarks.common import machine

    return {
        "machine": machine(),
        "smoke": smoke,
        "images": count,
        "large_images": large_count,
        "mean_jpeg_kb_500x375": jpeg_kb,
        "repeats": repeats,
        "network_images_per_s": NETWORK_IMAGES_PER_S,
        "images_per_s_per_core": rates,
        "images_per_wall_s": wall_rates,
        "cores_to_feed": {k: NETWORK_IMAGES_PER_S / v for k, v in rates.items()},
        "ratios": {
            "fast_eval_exact_over_pil_eval": rates["fast_eval_exact"] / rates["pil_eval"],
            "fast_eval_over_pil_eval": rates["fast_eval"] / rates["pil_eval"],
            "cache_build_over_pil": rates["cache_build"] / rates["cache_build_pil"],
            "torchvision_decode_over_pil_eval": rates["torchvision_decode"] / rates["pil_eval"],
            "from_cache_gather_over_pil_train": rates["from_cache_gather"] / rates["pil_train"],
            "from_cache_cpu_crops_over_pil_train": rates["from_cache_cpu_crops"]
            / rates["pil_train"],
            "large_fast_eval_over_pil_eval": rates["large_fast_eval"] / rates["large_pil_eval"],
            "large_cache_build_reduced_over_full": rates["large_cache_build"]
            / rates["large_cache_build_full"],
        },
        "inexact_eval_crop_difference": difference,
        "raw_wall_s": times,
        "raw_cpu_s": cpu,
    }


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    rates, cores, r = payload["images_per_s_per_core"], payload["cores_to_feed"], payload["ratios"]
    small, large = (payload["inexact_eval_crop_difference"][k] for k in ("500x375", "1000x750"))
    rows = [
        ("pil_train", "per-image training: PIL decode + RandomResizedCrop + flip + ToTensor"),
        (
            "pil_eval",
            "per-image evaluation: PIL decode + resize 256 + crop 224 + ToTensor + Normalize",
        ),
        (
            "fast_eval_exact",
            "fastpath, exact: checked decode + PIL resize + crop, normalised per batch",
        ),
        ("fast_eval", "fastpath, exact=False: checked decode + torch uint8 resize + crop"),
        (
            "torchvision_decode",
            "bare torchvision.io.decode_jpeg + torch uint8 resize + crop (no header checks)",
        ),
        ("cache_build_pil", "decoding into the cache (256 x 256), PIL resize: once per image"),
        ("cache_build", "decoding into the cache (256 x 256), torch resize: once per image"),
        (
            "from_cache_gather",
            "from the cache, each epoch: gather the batch (crops + flips on the GPU)",
        ),
        ("from_cache_cpu_crops", "from the cache, each epoch: gather + crops + flips on the CPU"),
        ("large_pil_eval", "1000 x 750: per-image evaluation"),
        ("large_fast_eval", "1000 x 750: fastpath, exact=False (DCT-scaled decode at 1/2)"),
        ("large_cache_build_full", "1000 x 750: decoding into the cache, full decode"),
        ("large_cache_build", "1000 x 750: decoding into the cache, DCT-scaled decode at 1/2"),
    ]
    lines = [
        "## jpeg_path: the JPEG data path alone at 224 px, per core",
        "",
        f"`python benchmarks/jpeg_path.py`, {m['date']}, {m['cpus']} CPUs shared with other jobs "
        "(compare the ratios, measured in the same run, not the absolute figures), one process, "
        f"one torch thread, torch {m['torch']}. {payload['images']} JPEGs of 500 x 375 (quality 90, "
        f"mean {payload['mean_jpeg_kb_500x375']:.0f} KB) and {payload['large_images']} of "
        f"1000 x 750; medians of {payload['repeats']} interleaved repeats. *Per core*: images per "
        "CPU-second of the process (`time.process_time`, one thread; wall time on this loaded "
        "machine also counts the time other jobs held the core). *Cores to feed*: "
        f"{payload['network_images_per_s']:,.0f} images/s (ResNet-50 bf16 224 px, the network alone "
        "on an H200, gpu_check) over the images/s of one core of this machine.",
        "",
        "| path | images/s per core | cores to feed 3,380 images/s |",
        "|---|---:|---:|",
    ]
    for key, what in rows:
        lines.append(f"| {what} | {rates[key]:.0f} | {cores[key]:.1f} |")
    lines += [
        "",
        "Ratios in the same run: exact fastpath / per-image evaluation "
        f"{r['fast_eval_exact_over_pil_eval']:.2f}; exact=False / per-image evaluation "
        f"{r['fast_eval_over_pil_eval']:.2f}; torchvision decode / per-image evaluation "
        f"{r['torchvision_decode_over_pil_eval']:.2f}; cache build torch / PIL resize "
        f"{r['cache_build_over_pil']:.2f}; from the cache (gather) / per-image training "
        f"{r['from_cache_gather_over_pil_train']:.0f}; from the cache with CPU crops / per-image "
        f"training {r['from_cache_cpu_crops_over_pil_train']:.2f}; 1000 x 750, exact=False / "
        f"per-image evaluation {r['large_fast_eval_over_pil_eval']:.2f}, cache build DCT-scaled / "
        f"full {r['large_cache_build_reduced_over_full']:.2f}.",
        "",
        "Tolerance of `EvaluationImages(..., exact=False)` against the evaluation transform "
        "(uint8 crops 224 x 224, grey levels): 500 x 375 (no DCT scaling: the shorter side is "
        f"below 2 x 256; only the resize differs) mean {small['mean_abs']:.4f}, max "
        f"{small['max_abs']:.0f}, {100 * small['fraction_differing']:.2f}% of values differ; "
        f"1000 x 750 (decoded at 1/2) mean {large['mean_abs']:.2f}, 99th percentile "
        f"{large['p99_abs']:.0f}, max {large['max_abs']:.0f}. `exact=True` (the default) is "
        "bit-identical to the evaluation transform. The training cache uses the torch resize and "
        "the DCT-scaled decode (its crops are random anyway; below 64 px it stays exact).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; print, write nothing")
    parser.add_argument(
        "--out", type=Path, default=None, help="write jpeg_path.json here instead of publishing"
    )
    args = parser.parse_args()
    payload = run(args.smoke)
    text = markdown(payload)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "jpeg_path.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "jpeg_path.md").write_text(text)
    elif not args.smoke:
        from benchmarks.common import write_results

        write_results("jpeg_path", payload, text)
    print(json.dumps(payload["images_per_s_per_core"], indent=1))
    print(text)


if __name__ == "__main__":
    main()
