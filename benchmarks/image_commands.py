"""`mbdl embed --images` and `mbdl index build --images` on a folder of JPEGs: the per-image PIL
path against the fast path, and both against the network alone.

A folder of photo-sized JPEGs (500 x 375 like CUB, quality 90) and a model directory (``--backbone``
with 256 / 224 preprocessing and ImageNet statistics, random weights). In one process, interleaved
repeats, medians:

- ``network``: the model's forward on one fixed batch already on the device, as many batches as
  the folder has: the speed the network allows;
- ``embed_pil``: :func:`mbdl.embedstore.embed_to_files` over :class:`mbdl.embedstore.ImageFiles`
  with the model's transform (``read_image`` + ``transform_from_spec`` per image): what
  ``embed --images`` did before the fast path;
- ``embed_fast``: the same over :class:`mbdl.embedstore.FolderImages` (what ``embed --images``
  runs now: :class:`mbdl.data.fastpath.EvaluationImages`, ``uint8`` batches normalised on the
  device);
- ``index_pil`` / ``index_fast``: :func:`mbdl.catalog.build_catalog` with ``images=`` (embedding,
  per-file size, mtime and SHA-256, faiss and SQLite): with the catalog's reading put back to the
  per-image PIL path (:func:`per_image_pil_path`) and as it runs now.

The two paths' embeddings are compared (``max_abs_difference``: they are the same tensors, so 0
on a CPU). Ratios are each variant's images/s over the network's and fast over PIL, measured in
the same run. On a CPU the run uses one thread and ``--workers`` loader processes (default 0).

    python benchmarks/image_commands.py                 # CPU: smallcnn, 400 JPEGs; writes results
    python benchmarks/image_commands.py --smoke         # tiny, prints only
    python benchmarks/image_commands.py --backbone resnet50 --images 2000 --workers 15 --out DIR
    python benchmarks/image_commands.py --publish DIR/image_commands.json   # results + docs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PREPROCESSING = {"resize": 256, "crop": 224, "crop_fraction": 224 / 256}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def write_model(folder: Path, backbone: str, dim: int, image_size: int) -> Path:
    """A model directory of ``backbone`` (random weights) whose preprocessing resizes the
    shorter side to ``image_size * 256 / 224`` and crops ``image_size``, ImageNet statistics."""
    from mbdl.export import save_pretrained
    from mbdl.model.loading import state_preprocessing
    from mbdl.models import build_model
    from mbdl.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(backbone, dim, in_channels=3)
    state: dict[str, Any] = {
        "config": {},
        "model_args": dict(model.build_args),
        "data_args": {"image_size": image_size, "channels": 3},
        "model_state": model.state_dict(),
    }
    preprocessing = {
        **state_preprocessing(state),
        "resize": round(image_size * 256 / 224),
        "crop_fraction": 224 / 256,
        **IMAGENET,
        "statistics_from": "imagenet",
    }
    save_checkpoint(folder / "model.pt", {**state, "preprocessing": preprocessing})
    return save_pretrained(folder / "model.pt", folder / "model")


@contextlib.contextmanager
def per_image_pil_path() -> Iterator[None]:
    """The catalog's reading as it was before the fast path: each file read by
    :func:`mbdl.data.files.read_image` and turned into the model's input by its PIL transform
    (``transform_from_spec``) in the loader, the float batch copied to the device."""
    from mbdl.catalog.build import Embedder
    from mbdl.data.files import read_image

    class Transformed:
        def __init__(self, paths: list[str], transform: Any, mode: str) -> None:
            self.paths, self.transform, self.mode = paths, transform, mode

        def image(self, position: int) -> torch.Tensor:
            return self.transform(read_image(self.paths[position], self.mode))

    def images(self: Embedder, paths: Any, labels: Any = None) -> Transformed:
        return Transformed(list(paths), self.transform, str(self.spec["color_mode"]))

    saved = Embedder.images, Embedder.embed_images
    Embedder.images, Embedder.embed_images = images, Embedder.embed  # type: ignore[method-assign]
    try:
        yield
    finally:
        Embedder.images, Embedder.embed_images = saved  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from benchmarks.gpu_check import write_jpeg_folder
    from mbdl.catalog import Catalog, build_catalog
    from mbdl.catalog.build import Embedder, _Files, list_sources
    from mbdl.data.fastpath import model_input
    from mbdl.embedstore import FolderImages, ImageFiles, embed_to_files
    from mbdl.model.loading import load_model

    device = torch.device(args.device)
    per_cpu_second = device.type == "cpu" and args.workers == 0
    if device.type == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="image-commands-") as tmp:
        root = Path(tmp)
        jpegs = root / "jpegs"
        classes = max(1, args.images // 20)
        write_jpeg_folder(jpegs, classes, -(-args.images // classes), tuple(args.jpeg_size))
        model_dir = write_model(root / "model", args.backbone, args.dim, args.image_size)
        loaded = load_model(model_dir, device)
        spec = dict(loaded.record.preprocessing)
        count = len(FolderImages(jpegs, spec))
        fixed = torch.stack(
            [FolderImages(jpegs, spec).normalised(i % count) for i in range(args.batch_size)]
        ).to(device)
        batches = -(-count // args.batch_size)

        def network() -> None:
            with torch.inference_mode():
                for _ in range(batches):
                    loaded.module(fixed).float().cpu()

        def embed_with(make: Callable[[], Any], name: str) -> Callable[[], None]:
            def embed() -> None:
                embed_to_files(
                    loaded.module,
                    make(),
                    root / f"{name}.npy",
                    dim=args.dim,
                    batch_size=args.batch_size,
                    device=device,
                    num_workers=args.workers,
                    progress=False,
                )

            return embed

        def index_with(pil: bool, name: str) -> Callable[[], None]:
            def index() -> None:
                shutil.rmtree(root / name, ignore_errors=True)
                with per_image_pil_path() if pil else contextlib.nullcontext():
                    build_catalog(
                        model_dir,
                        root / name,
                        images=jpegs,
                        device=str(device),
                        batch_size=args.batch_size,
                        workers=args.workers,
                        progress=False,
                    ).catalog.close()

            return index

        def embed_data_with(make: Callable[[], Any]) -> Callable[[], None]:
            """What embed_to_files does to each batch, the network left out."""

            def read() -> None:
                dataset = make()
                prepare = getattr(dataset, "model_input", None)
                loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
                for images, _ in loader:
                    images.to(device) if prepare is None else prepare(images, device)

            return read

        sources = list_sources(images=jpegs)

        def index_data_with(pil: bool) -> Callable[[], None]:
            """What the catalog's build does to each file (decode, preprocessing, size, mtime,
            SHA-256) and each batch, the network left out."""

            def read() -> None:
                with per_image_pil_path() if pil else contextlib.nullcontext():
                    embedder = Embedder.__new__(Embedder)
                    embedder.transform, embedder.spec = loaded.transform, spec
                    dataset = _Files(sources, embedder.images([s.path for s in sources]))
                    loader = DataLoader(
                        dataset,  # type: ignore[arg-type]
                        batch_size=args.batch_size,
                        num_workers=args.workers,
                        collate_fn=list,
                    )
                    for batch in loader:
                        stacked = torch.stack([row[1] for row in batch])
                        if pil:
                            stacked.to(device)
                        else:
                            model_input(stacked, spec["mean"], spec["std"], device)

            return read

        variants: dict[str, Callable[[], None]] = {
            "embed_pil_data": embed_data_with(
                lambda: ImageFiles(jpegs, loaded.transform, str(spec["color_mode"]))
            ),
            "embed_fast_data": embed_data_with(lambda: FolderImages(jpegs, spec)),
            "index_pil_data": index_data_with(True),
            "index_fast_data": index_data_with(False),
            "network": network,
            "embed_pil": embed_with(
                lambda: ImageFiles(jpegs, loaded.transform, str(spec["color_mode"])), "embed_pil"
            ),
            "embed_fast": embed_with(lambda: FolderImages(jpegs, spec), "embed_fast"),
            "index_pil": index_with(True, "index_pil"),
            "index_fast": index_with(False, "index_fast"),
        }
        # one process on a CPU: its CPU seconds (robust to other jobs on a shared machine);
        # with loader processes or a GPU: wall seconds
        clock = time.process_time if per_cpu_second else time.perf_counter
        times: dict[str, list[float]] = {key: [] for key in variants}
        for repeat in range(args.repeats + 1):  # the first round warms up, not counted
            keys = list(variants)
            for key in keys[repeat % len(keys) :] + keys[: repeat % len(keys)]:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = clock()
                variants[key]()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if repeat > 0:
                    times[key].append(clock() - started)
        differences = {
            "embed": float(
                np.abs(np.load(root / "embed_pil.npy") - np.load(root / "embed_fast.npy")).max()
            )
        }
        catalogs = [Catalog.open(root / name) for name in ("index_pil", "index_fast")]
        try:
            vectors = [c.vectors(c.ids()) for c in catalogs]
            differences["index"] = float(np.abs(vectors[0] - vectors[1]).max())
        finally:
            for catalog in catalogs:
                catalog.close()
    handled = {key: count for key in variants}
    handled["network"] = batches * args.batch_size
    rates = {key: handled[key] / statistics.median(value) for key, value in times.items()}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "smoke": args.smoke,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "jpeg_size": list(args.jpeg_size),
        "images": count,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "repeats": args.repeats,
        "clock": "process CPU seconds" if per_cpu_second else "wall seconds",
        "images_per_s": rates,
        "ratio_to_network": {key: rates[key] / rates["network"] for key in rates},
        "fast_over_pil": {
            "embed": rates["embed_fast"] / rates["embed_pil"],
            "index": rates["index_fast"] / rates["index_pil"],
            "embed_data": rates["embed_fast_data"] / rates["embed_pil_data"],
            "index_data": rates["index_fast_data"] / rates["index_pil_data"],
        },
        "max_abs_difference": differences,
        "raw_s": times,
    }


def markdown(payload: dict[str, Any]) -> str:
    rates, ratios = payload["images_per_s"], payload["ratio_to_network"]
    where = payload["gpu"] or f"CPU, {payload['threads']} thread(s)"
    lines = [
        "## image_commands: `embed --images` and `index build --images`, PIL path against the "
        "fast path",
        "",
        f"`python benchmarks/image_commands.py --backbone {payload['backbone']} --images "
        f"{payload['images']} --workers {payload['workers']} --repeats {payload['repeats']}`, "
        f"{payload['date']}, {where}, "
        f"torch {payload['torch']}, {payload['cpus']} CPUs (shared). {payload['images']} JPEGs "
        f"of {payload['jpeg_size'][0]} x {payload['jpeg_size'][1]}, {payload['backbone']} "
        f"(random weights) at {payload['image_size']} px, batch {payload['batch_size']}, "
        f"{payload['workers']} loader workers, medians of {payload['repeats']} interleaved "
        "repeats. Ratios are measured in the same run.",
        "",
        f"Images/s are per {payload.get('clock', 'wall seconds')[:-1]}. The `_data` rows are "
        "each command's work on the files and batches with the network left out.",
        "",
        "| variant | images/s | / network alone |",
        "|---|---:|---:|",
    ]
    for key in (
        "network",
        "embed_pil",
        "embed_fast",
        "index_pil",
        "index_fast",
        "embed_pil_data",
        "embed_fast_data",
        "index_pil_data",
        "index_fast_data",
    ):
        lines.append(f"| `{key}` | {rates[key]:.1f} | {ratios[key]:.2f} |")
    faster, difference = payload["fast_over_pil"], payload["max_abs_difference"]
    lines += [
        "",
        f"Fast over PIL: `embed --images` {faster['embed']:.2f}x (its data path alone "
        f"{faster['embed_data']:.2f}x), `index build --images` {faster['index']:.2f}x (data path "
        f"alone {faster['index_data']:.2f}x). Largest difference between the two paths' "
        f"embeddings: {difference['embed']:.1e} (embed), {difference['index']:.1e} (index).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, prints only")
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=(500, 375))
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write DIR/image_commands.json, .md")
    parser.add_argument(
        "--publish", type=Path, default=None, help="an image_commands.json to publish"
    )
    args = parser.parse_args()
    if args.publish is not None:
        from benchmarks.common import write_results

        payload = json.loads(args.publish.read_text())
        write_results("image_commands", payload, markdown(payload))
        print(markdown(payload))
        return
    if args.smoke:
        args.images, args.image_size, args.jpeg_size, args.repeats = 24, 32, (48, 40), 1
        args.batch_size = 8
    payload = run(args)
    text = markdown(payload)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "image_commands.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "image_commands.md").write_text(text)
    elif not args.smoke:
        from benchmarks.common import write_results

        write_results("image_commands", payload, text)
    print(text)


if __name__ == "__main__":
    main()
