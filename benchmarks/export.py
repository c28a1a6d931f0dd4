"""Export benchmark: export time, file size and largest difference to PyTorch of each format, and
inference images/s of PyTorch, TorchScript and ONNX Runtime on CPU, measured in the same run.

Models: the glyphs default (smallcnn, 1 x 32 x 32, 64-d) and resnet18 (3 x 224 x 224, 128-d),
randomly initialised (speed and exactness do not depend on training). The check images are real:
glyphs test images through each model's preprocessing. Every runtime gets the same number of
threads (``--threads``, default 1) and the same batches; images/s is the median of ``--repeats``
timed batches after a warm-up, the runtimes interleaved.

Also ``mbdl embed --images`` peak memory on folders of two sizes (each in a fresh process): it
streams, so memory should not grow with the number of images.

    python benchmarks/export.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.common import machine, peak_rss_of, write_results
from mbdl.export import (
    export_file,
    load_embedder,
    onnx_runner,
    preprocessing_spec,
    save_pretrained,
    torchscript_runner,
    transform_from_spec,
)
from mbdl.models import build_model
from mbdl.train.checkpoint import save_checkpoint

MODELS = {
    "smallcnn-32px": {"backbone": "smallcnn", "dim": 64, "size": 32, "channels": 1, "batch": 256},
    "resnet18-224px": {"backbone": "resnet18", "dim": 128, "size": 224, "channels": 3, "batch": 16},
}
EMBED_SIZES = (1000, 4000)


def glyph_images(count: int) -> list[Any]:
    from mbdl.data import load_splits

    test = load_splits("glyphs", None, image_size=32).test
    return [test.load_image(i) for i in range(count)]


def checkpoint(folder: Path, spec: dict[str, Any]) -> Path:
    torch.manual_seed(0)
    model = build_model(spec["backbone"], spec["dim"], in_channels=spec["channels"])
    path = folder / f"{spec['backbone']}.pt"
    save_checkpoint(
        path,
        {
            "config": {},
            "model_args": dict(model.build_args),
            "data_args": {"image_size": spec["size"], "channels": spec["channels"]},
            "model_state": model.state_dict(),
        },
    )
    return path


def bench_model(name: str, spec: dict[str, Any], folder: Path, threads: int, repeats: int) -> dict:
    source = checkpoint(folder, spec)
    pre = preprocessing_spec(spec["size"], spec["channels"], imagenet_norm=spec["channels"] == 3)
    transform = transform_from_spec(pre)
    images = glyph_images(spec["batch"])
    batch = torch.stack([transform(image) for image in images])
    check = batch[:16]
    exports = {}
    for fmt, path in (
        ("safetensors", folder / f"{name}-model"),
        ("torchscript", folder / f"{name}.torchscript"),
        ("onnx", folder / f"{name}.onnx"),
    ):
        result = export_file(source, path, fmt, check)
        exports[fmt] = {k: result[k] for k in ("export_s", "bytes", "max_abs_diff", "images")}
        print(name, fmt, exports[fmt], flush=True)
    model, _ = load_embedder(folder / f"{name}-model")
    torch.set_num_threads(threads)

    def eager() -> Any:
        with torch.inference_mode():
            return model(batch)

    scripted = torchscript_runner(folder / f"{name}.torchscript")
    session = onnx_runner(folder / f"{name}.onnx", threads)
    runners = {
        "pytorch": eager,
        "torchscript": lambda: scripted(batch),
        "onnxruntime": lambda: session(batch),
    }
    reference = eager()
    for fn in runners.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {runtime: [] for runtime in runners}
    for _ in range(repeats):  # interleaved: a load change on the shared machine hits all three
        for runtime, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[runtime].append(time.perf_counter() - start)
    speed = {}
    for runtime, fn in runners.items():
        diff = float((fn() - reference).abs().max())
        seconds = statistics.median(times[runtime])
        speed[runtime] = {"images_per_s": len(batch) / seconds, "max_abs_diff_batch": diff}
        print(name, runtime, speed[runtime], flush=True)
    base = speed["pytorch"]["images_per_s"]
    for values in speed.values():
        values["vs_pytorch"] = values["images_per_s"] / base
    return {"spec": spec, "exports": exports, "inference": speed, "batch": len(batch)}


EMBED_CODE = """
import sys
from mbdl.cli import main
code = main(["embed", {model!r}, "--images", {images!r}, "-o", {out!r}, "--no-progress",
             "--batch-size", "64"])
RESULT = {{"exit": code}}
"""


def bench_embed(folder: Path) -> list[dict[str, Any]]:
    from PIL import Image

    model_dir = save_pretrained(checkpoint(folder, MODELS["smallcnn-32px"]), folder / "embedder")
    rows = []
    rng = np.random.default_rng(0)
    for count in EMBED_SIZES:
        images = folder / f"images-{count}"
        for i in range(count):
            sub = images / f"c{i % 50:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(sub / f"{i:06d}.png")
        start = time.perf_counter()
        result = peak_rss_of(
            EMBED_CODE.format(model=str(model_dir), images=str(images), out=str(folder / "g.npy"))
        )
        seconds = time.perf_counter() - start
        rows.append({"images": count, "wall_s": seconds, "peak_rss_mb": result["peak_rss_mb"]})
        print("embed", rows[-1], flush=True)
    return rows


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "## export: formats, sizes, exactness and CPU inference speed (`benchmarks/export.py`)",
        "",
        f"Randomly initialised models, real check images (glyphs test images through each "
        f"model's preprocessing), {payload['threads']} thread(s) for every runtime, the same "
        "batches, runtimes interleaved; "
        f"images/s is the median of {payload['repeats']} batches. Load average at the start: "
        f"{payload['loadavg'][0]:.2f} on {payload['machine']['cpus']} cores (a shared machine). "
        "Max diff: largest |export - PyTorch| over the 16 check images in a batch of 16 and of "
        "15 (the batch axis is dynamic).",
        "",
        "| model | format | export s | file MiB | max diff |",
        "|---|---|---|---|---|",
    ]
    for name, row in payload["models"].items():
        for fmt, values in row["exports"].items():
            lines.append(
                f"| {name} | {fmt} | {values['export_s']:.2f} | {values['bytes'] / 2**20:.2f} | "
                f"{values['max_abs_diff']:.1e} |"
            )
    lines += [
        "",
        "| model | batch | runtime | images/s | vs PyTorch | max diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in payload["models"].items():
        for runtime, values in row["inference"].items():
            lines.append(
                f"| {name} | {row['batch']} | {runtime} | {values['images_per_s']:.3g} | "
                f"{values['vs_pytorch']:.2f}x | {values['max_abs_diff_batch']:.1e} |"
            )
    lines += [
        "",
        "`mbdl embed --images` (smallcnn, 48 x 48 PNG files, batch 64, one process): peak memory "
        "should not grow with the number of images.",
        "",
        "| images | wall s | peak RSS MB |",
        "|---|---|---|",
    ]
    for row in payload["embed"]:
        lines.append(f"| {row['images']} | {row['wall_s']:.1f} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {
        "machine": machine(),
        "loadavg": list(os.getloadavg()),
        "threads": args.threads,
        "repeats": args.repeats,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        for name, spec in MODELS.items():
            payload["models"][name] = bench_model(
                name, spec, Path(folder), args.threads, args.repeats
            )
        payload["embed"] = bench_embed(Path(folder))
    write_results("export", payload, markdown(payload))


if __name__ == "__main__":
    main()
