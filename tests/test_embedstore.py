"""Embedding a gallery at scale: streamed .npy files, shards under torchrun, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbdl.cli import main
from mbdl.embedstore import (
    ImageFiles,
    embed_to_files,
    list_images,
    load_embeddings,
    output_paths,
    shard,
)
from mbdl.evaluate import embed_dataset
from mbdl.export import load_embedder, save_pretrained
from mbdl.models import build_model
from mbdl.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _write_images(root: Path, count: int, seed: int = 0) -> None:
    """``count`` small images in three class folders, a nested folder and the root itself."""
    rng = np.random.default_rng(seed)
    places = ["a", "b", "c/nested", "."]
    for i in range(count):
        folder = root / places[i % len(places)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (20 + i % 7, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"img{i:04d}.png")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embedstore")
    torch.manual_seed(0)
    model = build_model("smallcnn", 8, in_channels=1)
    save_checkpoint(
        folder / "model.pt",
        {
            "config": {},
            "model_args": dict(model.build_args),
            "data_args": {"image_size": 32, "channels": 1},
            "model_state": model.state_dict(),
        },
    )
    return save_pretrained(folder / "model.pt", folder / "model")


def test_list_images_labels_first_level_folders(tmp_path: Path) -> None:
    _write_images(tmp_path, 8)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / ".hidden" / "x.png")
    paths, labels, classes = list_images(tmp_path)
    assert classes == ["a", "b", "c"]
    assert paths == [
        "img0003.png",
        "img0007.png",
        "a/img0000.png",
        "a/img0004.png",
        "b/img0001.png",
        "b/img0005.png",
        "c/nested/img0002.png",
        "c/nested/img0006.png",
    ]
    assert labels.tolist() == [-1, -1, 0, 0, 1, 1, 2, 2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "missing")


@pytest.mark.parametrize("count", [1, 2, 7, 100, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_item_once_in_order(count: int, world: int) -> None:
    items = [i for rank in range(world) for i in shard(count, rank, world)]
    assert items == list(range(count))


def test_streamed_files_equal_the_in_memory_embeddings(model_dir: Path, tmp_path: Path) -> None:
    _write_images(tmp_path / "images", 45)
    model, transform = load_embedder(model_dir)
    dataset = ImageFiles(tmp_path / "images", transform, "L")
    files = embed_to_files(
        model, dataset, tmp_path / "out" / "g.npy", dim=8, batch_size=8, progress=False
    )
    embeddings, labels, paths, info = load_embeddings(files["embeddings"])
    assert isinstance(embeddings, np.memmap) and embeddings.dtype == np.float32
    expected, expected_labels = embed_dataset(model, dataset, batch_size=45)
    np.testing.assert_allclose(embeddings, expected.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(labels, expected_labels.numpy())
    assert paths == dataset.paths and info["count"] == 45 and info["dim"] == 8
    assert sorted(os.listdir(tmp_path / "out")) == [
        "g.json",
        "g.labels.npy",
        "g.npy",
        "g.paths.txt",
    ]
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatL2(8)
    index.add(np.ascontiguousarray(embeddings[:20]))
    index.add(np.ascontiguousarray(embeddings[20:]))
    _, found = index.search(np.ascontiguousarray(embeddings[:5]), 1)
    assert found[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_an_unreadable_image_keeps_the_previous_output(model_dir: Path, tmp_path: Path) -> None:
    _write_images(tmp_path / "images", 12)
    out = tmp_path / "out" / "g.npy"
    assert (
        main(["embed", str(model_dir), "--images", str(tmp_path / "images"), "-o", str(out)]) == 0
    )
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    (tmp_path / "images" / "a" / "zz_broken.png").write_text("not a png")
    code = main(["embed", str(model_dir), "--images", str(tmp_path / "images"), "-o", str(out)])
    assert code == 2
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # no temp files left


def test_cli_embeds_a_folder_with_a_progress_bar(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_images(tmp_path / "images", 30)
    out = tmp_path / "g.npy"
    args = ["embed", str(model_dir), "--images", str(tmp_path / "images"), "-o", str(out)]
    assert main([*args, "--batch-size", "7"]) == 0
    captured = capsys.readouterr()
    assert "embedding" in captured.err and "30/30" in captured.err
    assert "wrote 30 embeddings" in captured.out
    info = json.loads((tmp_path / "g.json").read_text())
    assert info["class_names"] == ["a", "b", "c"] and info["preprocessing"]["crop"] == 32
    model, transform = load_embedder(model_dir)
    first = ImageFiles(tmp_path / "images", transform, "L")[0][0]
    with torch.inference_mode():
        expected = model(first.unsqueeze(0))[0].numpy()
    np.testing.assert_allclose(np.load(out, mmap_mode="r")[0], expected, atol=1e-6)
    assert main([*args[:-2], "-o", str(tmp_path / "g.npz")]) == 2
    assert "give -o FILE.npy" in capsys.readouterr().err


def test_torchrun_ranks_write_one_output(model_dir: Path, tmp_path: Path) -> None:
    _write_images(tmp_path / "images", 300)
    single = tmp_path / "single.npy"
    assert (
        main(
            [
                "embed",
                str(model_dir),
                "--images",
                str(tmp_path / "images"),
                "-o",
                str(single),
                "--no-progress",
            ]
        )
        == 0
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "mbdl",
            "embed",
            str(model_dir),
            "--images",
            str(tmp_path / "images"),
            "-o",
            str(tmp_path / "multi.npy"),
            "--device",
            "cpu",
            "--batch-size",
            "32",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote 300 embeddings") == 1  # rank 0 reports
    multi, multi_labels, multi_paths, _ = load_embeddings(tmp_path / "multi.npy")
    ref, ref_labels, ref_paths, _ = load_embeddings(single)
    np.testing.assert_allclose(multi, ref, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(multi_labels, ref_labels)
    assert multi_paths == ref_paths
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_output_names_are_checked() -> None:
    assert output_paths("x/g.npy")["labels"] == Path("x/g.labels.npy")
    with pytest.raises(ValueError, match=r"must end in \.npy"):
        output_paths("g.npz")
