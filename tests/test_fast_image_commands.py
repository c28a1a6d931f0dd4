"""`mbdl embed --images` and `mbdl index build --images` read their files through the fast path
(mbdl.data.fastpath: uint8 batches, normalised on the device): the same embeddings as the
per-image PIL path (read_image + transform_from_spec) for every kind of file the reader takes,
and bad files refused or skipped with the same message as before."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_data import make_small_model_dir
from mbdl.catalog import build_catalog
from mbdl.catalog.build import Embedder
from mbdl.cli import main
from mbdl.data.files import ImageReadError, read_image
from mbdl.embedstore import FolderImages, ImageFiles, embed_to_files, list_images
from mbdl.export import load_state, state_preprocessing, transform_from_spec

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour gradients with a little noise (JPEG-like content), ``uint8 [H, W, 3]``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
    noisy = smooth.astype(np.int16) + rng.integers(-3, 4, smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _png_16_bit_colour(path: Path, pixels: np.ndarray) -> None:
    """``uint16 [H, W, 3]`` written as a 16-bit colour PNG (PIL does not write one)."""
    big_endian = pixels.astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in big_endian)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    path.write_bytes(png + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _write_kinds(root: Path) -> list[str]:
    """One image of each kind the reader takes, in two class folders; their names."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(_photo(50, 37, 0)).save(root / "a" / "colour.jpg", quality=90)
    Image.fromarray(_photo(120, 90, 1)).save(root / "a" / "large.jpg", quality=85)
    Image.fromarray(_photo(31, 44, 2)).save(root / "a" / "colour.png")
    Image.fromarray(_photo(40, 30, 3)).convert("L").save(root / "b" / "grey.jpg", quality=90)
    Image.fromarray(_photo(40, 30, 4)).convert("L").save(root / "b" / "grey.png")
    rgba = np.dstack([_photo(36, 28, 5), np.linspace(0, 255, 36 * 28).reshape(28, 36)])
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(root / "b" / "alpha.png")
    grey16 = np.random.default_rng(6).integers(0, 65536, (26, 33), dtype=np.uint16)
    Image.fromarray(grey16).save(root / "b" / "grey16.png")
    _png_16_bit_colour(root / "b" / "colour16.png", _photo(30, 24, 7).astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.fromarray(_photo(48, 30, 8)).save(root / "b" / "rotated.jpg", exif=exif.tobytes())
    return [
        "colour.jpg",
        "large.jpg",
        "colour.png",
        "grey.jpg",
        "grey.png",
        "alpha.png",
        "grey16.png",
        "colour16.png",
        "rotated.jpg",
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small model, its preprocessing made to matter: resized to 20 then cropped to 16,
    ImageNet's mean and standard deviation."""
    from mbdl.export import save_pretrained
    from mbdl.train.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("fast-commands")
    default = make_small_model_dir(folder / "default")
    state = torch.load(folder / "default" / "model.pt", weights_only=False)
    preprocessing = {
        **state_preprocessing(load_state(default)),
        "resize": 20,
        "crop_fraction": 0.8,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "statistics_from": "imagenet",
    }
    save_checkpoint(folder / "model.pt", {**state, "preprocessing": preprocessing})
    made = save_pretrained(folder / "model.pt", folder / "model")
    assert state_preprocessing(load_state(made))["std"] == preprocessing["std"]
    return made


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kinds") / "images"
    names = _write_kinds(root)
    assert sorted(Path(p).name for p in list_images(root)[0]) == sorted(names)
    return root


def _per_image_embeddings(model_dir: Path, paths: list[Path]) -> np.ndarray:
    """The old path: each file read by the checked reader, through the PIL transform."""
    state = load_state(model_dir)
    spec = state_preprocessing(state)
    transform = transform_from_spec(spec)
    embedder = Embedder.load(model_dir)
    batch = torch.stack([transform(read_image(p, str(spec["color_mode"]))) for p in paths])
    return embedder.embed(batch)


def test_the_fast_folder_gives_the_transforms_tensors(model_dir: Path, images: Path) -> None:
    spec = state_preprocessing(load_state(model_dir))
    transform = transform_from_spec(spec)
    fast = FolderImages(images, spec)
    old = ImageFiles(images, transform, str(spec["color_mode"]))
    assert len(fast) == len(old) == 9 and fast.class_names == old.class_names
    for i in range(len(fast)):
        image, label = fast[i]
        assert image.dtype == torch.uint8 and label == old[i][1]
        assert fast.describe(i) == old.describe(i)
        assert torch.equal(fast.model_input(image[None], "cpu")[0], old[i][0]), fast.describe(i)


def test_embed_images_equals_the_per_image_path(
    model_dir: Path, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "g.npy"
    command = ["embed", str(model_dir), "--images", str(images), "-o", str(out)]
    assert main([*command, "--batch-size", "4", "--device", "cpu", "--no-progress"]) == 0
    paths = [images / line for line in (tmp_path / "g.paths.txt").read_text().splitlines()]
    expected = _per_image_embeddings(model_dir, paths)
    embedded = np.load(out)
    assert embedded.shape == expected.shape == (9, 8)
    np.testing.assert_allclose(embedded, expected, rtol=0, atol=1e-6)
    # the old dataset through the same writer: the same files
    spec = state_preprocessing(load_state(model_dir))
    embedder = Embedder.load(model_dir)
    old = ImageFiles(images, transform_from_spec(spec), str(spec["color_mode"]))
    embed_to_files(embedder.model, old, tmp_path / "old.npy", dim=8, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "old.npy"), embedded, rtol=0, atol=1e-6)
    assert np.array_equal(np.load(tmp_path / "old.labels.npy"), np.load(tmp_path / "g.labels.npy"))


def test_index_build_equals_the_per_image_path_and_keeps_file_facts(
    model_dir: Path, images: Path, tmp_path: Path
) -> None:
    import hashlib

    report = build_catalog(
        model_dir, tmp_path / "catalog", images=images, batch_size=4, progress=False
    )
    catalog = report.catalog
    assert len(catalog) == 9 and not report.skipped
    ids = catalog.ids()
    items = catalog.items(ids.tolist())
    paths = [Path(item.path) for item in items]
    expected = _per_image_embeddings(model_dir, paths)
    np.testing.assert_allclose(catalog.vectors(ids), expected, rtol=0, atol=1e-6)
    for item, path in zip(items, paths, strict=True):
        facts = path.stat()
        assert item.size == facts.st_size and item.mtime == facts.st_mtime
        assert item.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def _reader_reason(path: Path) -> str:
    """What the per-image reader says of ``path``."""
    with pytest.raises(ImageReadError) as refused:
        read_image(path)
    return str(refused.value)


@pytest.fixture
def with_bad(images: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the images with a truncated JPEG and a JPEG that is not one."""
    import shutil

    root = tmp_path / "with-bad"
    shutil.copytree(images, root)
    truncated = root / "a" / "truncated.jpg"
    truncated.write_bytes((images / "a" / "large.jpg").read_bytes()[:-600])
    garbage = root / "b" / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    return root, truncated, garbage


def test_embed_images_refuses_a_bad_file_as_before(
    model_dir: Path,
    with_bad: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, truncated, garbage = with_bad
    garbage.unlink()
    out = tmp_path / "g.npy"
    command = ["embed", str(model_dir), "--images", str(root), "-o", str(out), "--device", "cpu"]
    code = main([*command, "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert _reader_reason(truncated) in error and "truncated" in error
    assert [p.name for p in tmp_path.iterdir()] == ["with-bad"]  # nothing written


def test_index_build_skips_or_refuses_bad_files_as_before(
    model_dir: Path, with_bad: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, truncated, garbage = with_bad
    report = build_catalog(model_dir, tmp_path / "catalog", images=root, progress=False)
    assert len(report.catalog) == 9
    reasons = dict(report.skipped)
    assert set(reasons) == {str(truncated.resolve()), str(garbage.resolve())}
    for path in (truncated, garbage):
        # the reason the per-image path recorded: the reader's message without the path
        where = str(path.resolve())
        expected = _reader_reason(Path(where)).replace(f" {where}", "").replace(where, "")
        assert reasons[where] == " ".join(expected.split())[:200]


@pytest.mark.gpu
@needs_gpu
def test_embed_and_index_on_a_gpu_equal_the_per_image_path_on_the_cpu(
    model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uint8 batches from pinned memory, normalised and made channels-last on the GPU, loader
    workers: the per-image PIL path's embeddings on the CPU, to float32 rounding (TF32 off)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    out = tmp_path / "g.npy"
    command = ["embed", str(model_dir), "--images", str(images), "-o", str(out)]
    assert main([*command, "--device", "cuda", "--workers", "2", "--no-progress"]) == 0
    paths = [images / line for line in (tmp_path / "g.paths.txt").read_text().splitlines()]
    expected = _per_image_embeddings(model_dir, paths)
    np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-4)
    report = build_catalog(
        model_dir, tmp_path / "catalog", images=images, device="cuda", workers=2, progress=False
    )
    ids = report.catalog.ids()
    indexed = [Path(item.path) for item in report.catalog.items(ids.tolist())]
    np.testing.assert_allclose(
        report.catalog.vectors(ids), _per_image_embeddings(model_dir, indexed), rtol=0, atol=1e-4
    )


def test_the_commands_benchmark_runs_both_paths_to_the_same_embeddings(tmp_path: Path) -> None:
    """benchmarks/image_commands.py --smoke (what gpu_check.sh --smoke runs): every variant
    measured, and the per-image PIL path (put back by the benchmark) gives the same vectors."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = str(root / "benchmarks" / "image_commands.py")
    done = subprocess.run(
        [sys.executable, script, "--smoke", "--device", "cpu", "--out", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "image_commands.json").read_text())
    assert payload["images"] == 24 and payload["smoke"] is True
    commands = {"embed_pil", "embed_fast", "index_pil", "index_fast"}
    assert set(payload["images_per_s"]) == {"network", *commands, *(f"{c}_data" for c in commands)}
    assert all(rate > 0 for rate in payload["images_per_s"].values())
    assert payload["max_abs_difference"] == {"embed": 0.0, "index": 0.0}
