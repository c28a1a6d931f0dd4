"""Training images/s of the same JPEGs kept as a folder, a Hugging Face dataset and WebDataset
shards, through the trainer's data path (decode + random-resized crop at 224 + flip + P x K
batching; no network), measured in one run.

The images: 32 classes x 50 synthetic photographs (smooth colour fields with shapes and noise,
320 x 240, JPEG quality 90) written three ways: class folders (``data.source=folder``), a
``datasets`` ``save_to_disk`` directory with an ``Image`` column (``data.source=hf``) and 8
uncompressed tar shards with ``classes.txt`` (``data.source=webdataset``). Each source's loader
is built by ``mbdl.train.data`` as the trainer builds it (``data.cache=off``: every image decoded
every time, as a stream must; ``data.num_workers=0``, one torch thread) and draws batches of
8 classes x 4 images, epoch after epoch; interleaved repeats, medians. A last row is the folder
with the decode cache on (``data.cache=memory``), the path a stream cannot take.

    python benchmarks/source_throughput.py          # writes results/source_throughput.json + docs
    python benchmarks/source_throughput.py --quick  # fewer batches, prints only
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mbdl.config import load_config
from mbdl.distributed import DistributedInfo
from mbdl.train.data import training_loader, training_sampler, training_splits

CLASSES = 32
PER_CLASS = 50
SIZE = (320, 240)
P, K = 8, 4


def photograph(seed: int, label: int) -> bytes:
    """A JPEG of a smooth colour field with a few shapes and noise (class-dependent palette)."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(label).integers(0, 256, (2, 3))
    x = np.linspace(0, 1, SIZE[0])[None, :, None]
    y = np.linspace(0, 1, SIZE[1])[:, None, None]
    mix = (x * rng.uniform(0.3, 1) + y * rng.uniform(0.3, 1)) / 2
    field = palette[0] * (1 - mix) + palette[1] * mix + rng.normal(0, 12, (SIZE[1], SIZE[0], 3))
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, SIZE[0] - 40), rng.integers(0, SIZE[1] - 40)
        box = (int(x0), int(y0), int(x0 + rng.integers(20, 120)), int(y0 + rng.integers(20, 90)))
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_sources(base: Path) -> dict[str, Path]:
    """The same images as a folder, a saved Hugging Face dataset and WebDataset shards."""
    import datasets
    import webdataset

    images = [(c, k, photograph(1000 * c + k, c)) for c in range(CLASSES) for k in range(PER_CLASS)]
    names = [f"class_{c:02d}" for c in range(CLASSES)]
    folder = base / "folder"
    for c, k, data in images:
        (folder / names[c]).mkdir(parents=True, exist_ok=True)
        (folder / names[c] / f"{k:03d}.jpg").write_bytes(data)
    hf = base / "hf"
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": d, "path": None} for _, _, d in images],
            "label": [c for c, _, _ in images],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
        ),
    )
    table.save_to_disk(str(hf))
    shards = base / "shards"
    shards.mkdir()
    (shards / "classes.txt").write_text("".join(n + "\n" for n in names))
    order = np.random.default_rng(0).permutation(len(images))  # classes mixed across shards
    for shard, part in enumerate(np.array_split(order, 8)):
        with webdataset.TarWriter(str(shards / f"shard-{shard:02d}.tar")) as writer:
            for i in part:
                c, k, data = images[int(i)]
                writer.write({"__key__": f"{c:02d}_{k:03d}", "jpg": data, "cls": c})
    return {"folder": folder, "hf": hf, "webdataset": shards}


class Batches:
    """The trainer's training batches of one source, epoch after epoch."""

    def __init__(self, source: str, root: Path, cache: str) -> None:
        config = load_config(
            None,
            [
                f"data.source={source}",
                f"data.root={root}",
                "data.image_size=224",
                "data.augment=crop",
                f"data.cache={cache}",
                "data.num_workers=0",
                "model.backbone=smallcnn",
                f"train.batch_classes={P}",
                f"train.batch_per_class={K}",
                "train.device=cpu",
                "train.progress=false",
            ],
        )
        dist = DistributedInfo()
        start = time.perf_counter()
        splits = training_splits(config, dist)  # the source's up-front checks included
        self.setup_seconds = time.perf_counter() - start
        self.sampler, _ = training_sampler(config, splits.train, dist)
        self.loader, _ = training_loader(
            config, splits.train, self.sampler, torch.device("cpu"), torch.Generator()
        )
        self.epoch = 0
        self.left = 0
        self.iterator: Any = None

    def take(self, count: int) -> int:
        """Draw ``count`` batches; the number of images."""
        images = 0
        for _ in range(count):
            if self.left == 0:
                self.sampler.set_epoch(self.epoch)
                self.epoch += 1
                self.iterator, self.left = iter(self.loader), len(self.sampler)
            batch = next(self.iterator)
            self.left -= 1
            assert tuple(batch[0].shape) == (P * K, 3, 224, 224)
            images += int(batch[0].shape[0])
        return images


def measure(batches: dict[str, Batches], count: int, repeats: int) -> dict[str, float]:
    for stream in batches.values():
        stream.take(1)  # warm
    rates: dict[str, list[float]] = {name: [] for name in batches}
    for _ in range(repeats):
        for name, stream in batches.items():
            start = time.perf_counter()
            images = stream.take(count)
            rates[name].append(images / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    count, repeats = (4, 1) if args.quick else (25, 3)
    with tempfile.TemporaryDirectory() as tmp:
        roots = write_sources(Path(tmp))
        sizes = {
            name: sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
            for name, root in roots.items()
        }
        batches = {
            "folder": Batches("folder", roots["folder"], "off"),
            "hf": Batches("hf", roots["hf"], "off"),
            "webdataset": Batches("webdataset", roots["webdataset"], "off"),
            "folder, data.cache=memory": Batches("folder", roots["folder"], "memory"),
        }
        load = os.getloadavg()[0]
        rates = measure(batches, count, repeats)
        setup = {name: b.setup_seconds for name, b in batches.items()}
    ratios = {name: rate / rates["folder"] for name, rate in rates.items()}
    from benchmarks.common import machine

    payload = {
        "machine": machine(),
        "load_average": load,
        "images": CLASSES * PER_CLASS,
        "image_size": list(SIZE),
        "megabytes_on_disk": sizes,
        "batch": f"{P} x {K}",
        "batches_per_repeat": count,
        "repeats": repeats,
        "setup_seconds": setup,
        "images_per_second": rates,
        "ratio_to_folder": ratios,
    }
    rows = "\n".join(
        f"| {name} | {rates[name]:.0f} | {ratios[name]:.2f} | {setup[name]:.1f} |" for name in rates
    )
    text = (
        "## source_throughput: the same images as a folder, a Hugging Face dataset and "
        "WebDataset shards\n\n"
        f"`python benchmarks/source_throughput.py`, {payload['machine']['date']}, "
        f"{payload['machine']['cpus']} CPUs shared with other jobs (load average {load:.1f}; "
        "compare the ratios, measured in the same run), one process, one torch thread, "
        f"no loader workers. {CLASSES * PER_CLASS} synthetic JPEGs of {SIZE[0]} x {SIZE[1]} "
        f"(quality 90; {sizes['folder']:.1f} MB as files, {sizes['webdataset']:.1f} MB as 8 "
        f"shards, {sizes['hf']:.1f} MB saved by datasets); the trainer's loader of each source "
        f"(`mbdl.train.data`), random-resized crop to 224 + flip, batches of {P} x {K}, "
        "`data.cache=off` (every image decoded every time, as a stream must), medians of "
        f"{repeats} interleaved repeats of {count} batches. The stream's batches come from the "
        "streaming P x K batcher; the others from the class-balanced sampler. *Setup*: loading "
        "the splits with the source's up-front checks (folder: every image file's header and a "
        "cheap decode; hf: its columns and every row's image, checked the same way; webdataset: "
        "every shard's tar "
        "headers and label members; "
        "the cached folder also decodes the training images once), measured once.\n\n"
        "| source | images/s | ratio to the folder | setup s |\n|---|---:|---:|---:|\n"
        f"{rows}\n\n"
        "On a loaded machine the three uncached rows moved by about 15% against each other "
        "from run to run (webdataset 0.99 and hf 0.84 of the folder in an earlier run): read "
        "them as equal within that; decoding dominates all three, and the stream reads its "
        "images at offsets found by the header pass, so it pays no tar parsing per epoch.\n"
    )
    print(text)
    if not args.quick:
        from benchmarks.common import write_results

        write_results("source_throughput", payload, text)


if __name__ == "__main__":
    main()
