"""The CUDA paths: AMP fp16 with a GradScaler, bf16, one-process NCCL under torchrun, kNN and
k-means on the GPU, pinned-memory loading. Skipped without a GPU (``benchmarks/gpu_check.sh``
runs them on a CUDA machine); the CPU side of each choice is tested here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mbdl.config import ConfigError, load_config
from mbdl.evaluate import evaluate
from mbdl.functional.kmeans import kmeans
from mbdl.functional.knn import knn
from mbdl.train import train
from mbdl.train.checkpoint import load_checkpoint
from mbdl.train.precision import amp_dtype, cpu_has_bf16_matrix_units
from mbdl.train.trainer import Trainer

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SMALL = [
    "data.max_classes=40",
    "model.embedding_dim=16",
    "train.epochs=1",
    "train.batch_classes=8",
    "train.batch_per_class=4",
    "train.max_steps_per_epoch=4",
    "train.warmup_epochs=0",
    "train.progress=false",
    "train.num_threads=1",
    "eval.ks=[1, 2]",
    "eval.report=false",
]


def small_config(tmp_path: Path, *extra: str) -> object:
    return load_config(None, [*SMALL, f"data.root={tmp_path / 'cache'}", *extra])


def log_records(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# --- the choice of precision (CPU side always runs) -------------------------------------------


def test_amp_choice_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    expected = torch.bfloat16 if cpu_has_bf16_matrix_units() else None
    assert amp_dtype("auto", cpu) is expected
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        amp_dtype("fp16", cpu)


def test_cpu_bf16_training_logs_its_precision(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = small_config(tmp_path, f"out={out}", "train.device=cpu", "train.amp=bf16")
    metrics = train(config)  # type: ignore[arg-type]
    assert 0.0 <= metrics["test"]["map@r"] <= 1.0
    assert log_records(out)[-1]["amp"] == "bf16"


# --- GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
def test_amp_auto_on_gpu() -> None:
    cuda = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert amp_dtype("auto", cuda) is expected
    assert amp_dtype("fp16", cuda) is torch.float16


@pytest.mark.gpu
@needs_gpu
def test_fp16_training_with_grad_scaler_on_gpu(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = small_config(tmp_path, f"out={out}", "train.device=cuda", "train.amp=fp16")
    metrics = train(config)  # type: ignore[arg-type]
    assert 0.0 <= metrics["test"]["map@r"] <= 1.0
    assert log_records(out)[-1]["amp"] == "fp16"
    scaler = load_checkpoint(out / "checkpoints" / "last.pt")["scaler"]
    assert scaler.get("scale", 0) > 0  # the GradScaler was enabled and stepped
    assert all(
        torch.isfinite(v).all()
        for v in load_checkpoint(out / "checkpoints" / "best.pt")["model_state"].values()
        if v.is_floating_point()
    )


@pytest.mark.gpu
@needs_gpu
def test_bf16_training_on_gpu_resumes_and_keeps_channels_last(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = small_config(tmp_path, f"out={out}", "train.device=cuda", "train.amp=bf16")
    trainer = Trainer(config)  # type: ignore[arg-type]
    try:
        conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_cuda
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        trainer.fit()
        metrics = trainer.test()
    finally:
        trainer.close()
    assert 0.0 <= metrics["test"]["map@r"] <= 1.0
    assert log_records(out)[-1]["amp"] == "bf16"


@pytest.mark.gpu
@needs_gpu
def test_pinned_memory_loading_on_gpu(tmp_path: Path) -> None:
    config = small_config(tmp_path, f"out={tmp_path / 'run'}", "train.device=cuda")
    trainer = Trainer(config)  # type: ignore[arg-type]
    try:
        trainer.sampler.set_epoch(0)
        batch = next(iter(trainer.loader))  # glyphs: uint8 images, labels, parameters
        assert trainer.batched is not None and len(batch) == 3
        assert all(tensor.is_pinned() for tensor in batch)
        on_gpu = batch[0].to(trainer.device, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.cpu(), batch[0])
        images, _ = trainer._augmented(batch)
        assert images.is_cuda and images.dtype == torch.float32
    finally:
        trainer.close()


@pytest.mark.gpu
@needs_gpu
def test_knn_kmeans_and_metrics_on_gpu_equal_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 32, generator=g) * 4
    labels = torch.arange(20).repeat_interleave(50)
    x = centres[labels] + 0.5 * torch.randn(1000, 32, generator=g)
    dist_cpu, idx_cpu = knn(x, None, 8, exclude_self=True)
    dist_gpu, idx_gpu = knn(x.cuda(), None, 8, exclude_self=True, memory_budget_bytes=100_000)
    assert dist_gpu.is_cuda
    torch.testing.assert_close(dist_gpu.cpu(), dist_cpu, atol=1e-3, rtol=0)
    assert (idx_gpu.cpu() == idx_cpu).float().mean() > 0.99  # ties may order differently
    assign_cpu = kmeans(x, 20, seed=3, backend="torch")
    assign_gpu = kmeans(x.cuda(), 20, seed=3, backend="torch")
    assert assign_gpu.is_cuda
    assert torch.equal(assign_gpu.cpu(), assign_cpu)  # well separated: no boundary points
    metrics_cpu = evaluate(x, labels, backend="torch")
    metrics_gpu = evaluate(x.cuda(), labels.cuda(), backend="torch")
    for key, value in metrics_cpu.items():
        assert metrics_gpu[key] == pytest.approx(value, abs=1e-6), key


NCCL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from mbdl.distributed import _GatherWithGrad, broadcast_object
    from mbdl.losses import build_loss

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    model = torch.nn.Linear(8, 4).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    x = torch.randn(16, 8, device=device)
    labels = torch.arange(4, device=device).repeat_interleave(4)
    gathered = _GatherWithGrad.apply(torch.nn.functional.normalize(ddp(x), dim=1))
    loss = build_loss("mdl")(gathered.float(), labels)
    loss.backward()
    total = torch.ones(3, device=device)
    dist.all_reduce(total)
    found = {
        "backend": dist.get_backend(),
        "world": dist.get_world_size(),
        "loss": float(loss),
        "grad_finite": bool(torch.isfinite(model.weight.grad).all()),
        "all_reduce": total.tolist(),
        "broadcast": broadcast_object("hello"),
    }
    dist.destroy_process_group()
    print("RESULT " + json.dumps(found))
    """
)


@pytest.mark.gpu
@needs_gpu
def test_one_process_nccl_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "nccl_check.py"
    script.write_text(NCCL_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "1", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    found = json.loads(line.removeprefix("RESULT "))
    assert found["backend"] == "nccl" and found["world"] == 1
    assert found["grad_finite"] and found["all_reduce"] == [1.0, 1.0, 1.0]
    assert found["broadcast"] == "hello"


# --- the GPU check script: syntax and its CPU fallback ----------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_script_syntax_and_cpu_fallback(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    assert payload["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert payload["smoke"] is True
    for name in ("in_memory", "jpeg_folder", "jpeg_cache"):
        row = payload["trainer_vs_network"][name]
        assert row["network_images_per_s"] > 0 and row["trainer_images_per_s"] > 0
    assert "cache on disk" in payload["trainer_vs_network"]["jpeg_cache"]["data_path"]
    assert "data.cache=off" in payload["trainer_vs_network"]["jpeg_folder"]["data_path"]
    embed = payload["embed"]
    assert embed["network_images_per_s"] > 0 and embed["embed_exact_images_per_s"] > 0
    assert embed["embed_fast_images_per_s"] > 0
    assert all(v["ms"] > 0 for v in payload["losses"]["losses"].values())
    assert payload["knn"]["ms"] > 0


@pytest.mark.gpu
@needs_gpu
def test_batched_augmentation_on_gpu_equals_cpu() -> None:
    import numpy as np

    from mbdl.data.batched import BatchAugment

    rng = np.random.default_rng(0)
    seeds = np.arange(64, dtype=np.uint64) * 7919 + 5
    grey = torch.from_numpy(rng.integers(0, 256, (64, 1, 32, 32), dtype=np.uint8))
    affine = BatchAugment("affine", 32, 1)
    params = affine.draw(seeds, 32, 32)
    on_cpu, on_gpu = affine(grey, params), affine(grey.cuda(), params).cpu()
    # nearest sampling: a grid point on a pixel boundary may round either way
    assert (on_cpu == on_gpu).float().mean() > 0.999
    rgb = torch.from_numpy(rng.integers(0, 256, (64, 3, 48, 40), dtype=np.uint8))
    crop = BatchAugment("crop", 32, 3)
    params = crop.draw(seeds, 48, 40)
    on_cpu, on_gpu = crop(rgb, params), crop(rgb.cuda(), params).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, atol=1.01 / 255, rtol=0)  # uint8 vs float resize


# --- the fast JPEG path on the GPU (mbdl.data.decode, mbdl.data.fastpath, the disk cache) -----


def _write_photos(root: Path, count: int, size: tuple[int, int]) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        paths.append(root / f"{i}.jpg")
        image.save(paths[-1], quality=90)
    return paths


@pytest.mark.gpu
@needs_gpu
def test_batched_gpu_jpeg_decoding_matches_the_cpu_reader(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from mbdl.data.decode import decode_jpeg_batch
    from mbdl.data.files import ImageReadError, read_image

    paths = _write_photos(tmp_path, 6, (160, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: torchvision's GPU decoder ignores it
    with Image.open(paths[5]) as image:
        pixels = image.copy()
    pixels.save(paths[5], quality=90, exif=exif.tobytes())
    decoded = decode_jpeg_batch(paths, "cuda", checked=False)
    assert len(decoded) == 6
    for path, image in zip(paths, decoded, strict=True):
        shape = (3, 160, 120) if path == paths[5] else (3, 120, 160)
        assert image.device.type == "cuda" and image.shape == shape
        expected = torch.from_numpy(np.asarray(read_image(path))).permute(2, 0, 1)
        # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a few levels
        difference = (image.cpu().float() - expected.float()).abs()
        assert difference.mean() < 2.0
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:100])
    with pytest.raises(ImageReadError, match=r"broken\.jpg"):
        decode_jpeg_batch([*paths, broken], "cuda", checked=False)


@pytest.mark.gpu
@needs_gpu
def test_fast_embedding_on_gpu_equals_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mbdl.data.fastpath import EvaluationImages, embed_images

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 on both sides

    spec = {"color_mode": "RGB", "resize": 73, "crop": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
    paths = _write_photos(tmp_path, 10, (200, 150))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    dataset = EvaluationImages(paths, spec)
    on_cpu, _ = embed_images(model, dataset, spec, device="cpu", batch_size=4)
    on_gpu, _ = embed_images(model.cuda(), dataset, spec, device="cuda", batch_size=4, workers=2)
    assert on_gpu.shape == on_cpu.shape == (10, 8)
    torch.testing.assert_close(
        torch.from_numpy(on_gpu), torch.from_numpy(on_cpu), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])]
)
def test_training_from_the_disk_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    for c in range(8):
        _write_photos(tmp_path / "data" / f"c{c}", 6, (160, 120))
    monkeypatch.setenv("MBDL_CACHE", str(tmp_path / "cache"))
    config = load_config(
        None,
        [
            *[o for o in SMALL if not o.startswith(("data.max_classes", "train.batch_"))],
            "data.source=folder",
            f"data.root={tmp_path / 'data'}",
            "data.image_size=64",
            "data.cache=disk",
            "data.val_fraction=0",
            "train.batch_classes=2",
            "train.batch_per_class=2",
            "model.backbone=smallcnn",
            f"train.device={device}",
            f"out={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(config)
    try:
        assert trainer.batched is not None  # crops and flips on the device, from the memory map
        assert "cache on disk" in trainer.splits.info["data_path"]
        trainer.fit()
    finally:
        trainer.close()
    assert list((tmp_path / "cache").glob("decoded-*.u8"))
