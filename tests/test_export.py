"""Export: the model directory, ONNX and TorchScript round trips, the preprocessing they record."""

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

import mbdl
from mbdl.cli import main
from mbdl.data import build_transforms
from mbdl.evaluate import split_metrics
from mbdl.export import (
    check_images,
    export_file,
    load_embedder,
    load_state,
    preprocessing_spec,
    save_pretrained,
    sidecar_path,
    transform_from_spec,
)
from mbdl.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "data.max_classes=40",
    "model.embedding_dim=16",
    "train.epochs=1",
    "train.batch_classes=8",
    "train.batch_per_class=4",
    "train.max_steps_per_epoch=2",
    "train.device=cpu",
    "train.num_threads=1",
    "eval.ks=[1, 2]",
    "eval.report=false",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", f"out={out}", *SMALL]) == 0
    return out


def _images(count: int, size: int, mode: str, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (size + 7, size + 3, 3) if mode == "RGB" else (size + 7, size + 3)
    return [
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(count)
    ]


@pytest.mark.parametrize(
    ("size", "channels", "imagenet_norm", "mode"),
    [(32, 1, False, "L"), (32, 3, False, "L"), (64, 3, True, "RGB"), (224, 1, True, "RGB")],
)
def test_preprocessing_spec_does_what_the_evaluation_transform_does(
    size: int, channels: int, imagenet_norm: bool, mode: str
) -> None:
    spec = preprocessing_spec(size, channels, imagenet_norm)
    json.dumps(spec)  # plain values
    ours = transform_from_spec(spec)
    reference = build_transforms(False, size, channels, imagenet_norm=imagenet_norm)
    for image in _images(3, size, mode):
        expected = reference(image)
        assert expected.shape == (channels, spec["crop"], spec["crop"])
        torch.testing.assert_close(ours(image), expected, rtol=0, atol=0)


def test_model_directory_round_trip(run_dir: Path, tmp_path: Path) -> None:
    target = save_pretrained(run_dir, tmp_path / "model")
    names = sorted(p.name for p in target.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "preprocessing.json"]
    info = json.loads((target / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert info["format"] == "mbdl-model"
    assert info["test"] == metrics["test"]
    assert split_metrics(info["validation"])[0] == metrics["validation"]
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert info["verification"] == best["verification"]  # the threshold chosen on validation
    assert json.loads((target / "preprocessing.json").read_text()) == info["preprocessing"]
    card = (target / "README.md").read_text()
    assert "Test classes" in card and "Validation classes" in card
    assert f"{metrics['test']['recall@1']:.4f}" in card
    assert "mbdl train" in card and "model.embedding_dim=16" in card

    model, transform = load_embedder(target)
    reference = model_from_checkpoint(run_dir / "checkpoints" / "best.pt")
    images = torch.stack([transform(image) for image in _images(5, 32, "L")])
    with torch.inference_mode():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
    assert mbdl.load_embedder(target)[0].embedding_dim == 16

    # re-saving a model directory keeps its metrics; a non-model directory is never overwritten
    again = save_pretrained(target, tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["test"] == metrics["test"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an mbdl model directory"):
        save_pretrained(run_dir, tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_model_directory_copies_a_verification_threshold(run_dir: Path, tmp_path: Path) -> None:
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    state["verification"] = {"threshold": 0.7, "metric": "euclidean", "far": 0.01}
    state = {k: v for k, v in state.items() if k not in ("format", "version")}
    save_checkpoint(tmp_path / "with.pt", state)
    target = save_pretrained(tmp_path / "with.pt", tmp_path / "model")
    info = json.loads((target / "config.json").read_text())
    assert info["verification"] == {"threshold": 0.7, "metric": "euclidean", "far": 0.01}
    assert '"threshold": 0.7' in (target / "README.md").read_text()
    assert load_state(target)["verification"]["threshold"] == 0.7


def test_model_directory_loads_in_a_fresh_process_without_the_training_config(
    run_dir: Path, tmp_path: Path
) -> None:
    target = save_pretrained(run_dir, tmp_path / "model")
    info = json.loads((target / "config.json").read_text())
    info["training_config"] = {}  # not needed to load and embed
    (target / "config.json").write_text(json.dumps(info))
    image_path = tmp_path / "image.png"
    _images(1, 40, "RGB")[0].save(image_path)
    code = (
        "import sys, mbdl, numpy, torch\n"
        "from PIL import Image\n"
        "model, transform = mbdl.load_embedder(sys.argv[1])\n"
        "with torch.inference_mode():\n"
        "    out = model(transform(Image.open(sys.argv[2])).unsqueeze(0))\n"
        "numpy.save(sys.argv[3], out.numpy())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(target), str(image_path), str(tmp_path / "out.npy")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    reference, transform = load_embedder(run_dir)
    with torch.inference_mode():
        expected = reference(transform(Image.open(image_path)).unsqueeze(0))
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected.numpy(), atol=1e-6)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_round_trip_on_cpu(
    fmt: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    output = tmp_path / f"embedder.{fmt}"
    assert main(["export", str(run_dir), "--format", fmt, "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "max |export - PyTorch|" in printed and "on 16 images" in printed
    sidecar = json.loads(sidecar_path(output).read_text())
    assert sidecar["preprocessing"] == preprocessing_spec(32, 1, False)
    assert sidecar["embedding_dim"] == 16
    assert sidecar["check"]["max_abs_diff"] <= 1e-4

    from mbdl.export import onnx_runner, torchscript_runner

    runner = (onnx_runner if fmt == "onnx" else torchscript_runner)(output)
    model, transform = load_embedder(run_dir)
    for count in (1, 7):  # batch sizes other than the traced one
        images = torch.stack([transform(image) for image in _images(count, 32, "L", seed=count)])
        with torch.inference_mode():
            torch.testing.assert_close(runner(images), model(images), rtol=0, atol=1e-5)


def test_export_above_the_tolerance_is_refused_and_writes_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mbdl.export as export

    real = export.torchscript_runner

    def noisy(path: str) -> object:
        run = real(path)
        return lambda images: run(images) + 1e-2

    monkeypatch.setattr(export, "torchscript_runner", noisy)
    images = check_images(load_state(run_dir))
    with pytest.raises(ValueError, match=r"differs from PyTorch by 0\.01"):
        export_file(run_dir, tmp_path / "m.pt", "torchscript", images)
    assert list(tmp_path.iterdir()) == []


def test_cli_commands_take_a_model_directory(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "model"
    assert main(["export", str(run_dir), "--format", "safetensors", "-o", str(model_dir)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["eval", str(model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_run
    assert main(["embed", str(model_dir), "-o", str(tmp_path / "e.npz")]) == 0
    assert np.load(tmp_path / "e.npz")["embeddings"].shape[1] == 16


def test_export_errors_are_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    assert main(["export", str(tmp_path / "nothing"), "--format", "onnx", "-o", "x.onnx"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    args = ["export", str(run_dir), "--format", "torchscript", "-o", str(tmp_path / "m.pt")]
    assert main([*args, "--images", str(bad), str(bad)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    moved = tmp_path / "moved.pt"  # a model whose training data is gone
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    state["config"]["data"]["source"] = "folder"
    state["config"]["data"]["root"] = str(tmp_path / "gone")
    save_checkpoint(moved, {k: v for k, v in state.items() if k not in ("format", "version")})
    assert (
        main(["export", str(moved), "--format", "torchscript", "-o", str(tmp_path / "m.pt")]) == 2
    )
    assert "give check images with --images" in capsys.readouterr().err
    good = str(tmp_path / "good.png")
    Image.new("L", (30, 30), 50).save(good)
    assert main([*args, "--images", good, good]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main(["export", str(run_dir), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'mbdl[export]'" in err


def test_hub_model_directories_offline(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = pytest.importorskip("huggingface_hub")
    local = save_pretrained(run_dir, tmp_path / "model")
    calls: list[tuple] = []

    def snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs["revision"], sorted(kwargs["allow_patterns"])))  # type: ignore[arg-type]
        return str(local)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    model, _ = load_embedder("hf://my-org/glyphs-embedder@v1")
    assert calls == [
        (
            "my-org/glyphs-embedder",
            "v1",
            ["README.md", "config.json", "model.safetensors", "preprocessing.json"],
        )
    ]
    reference, _ = load_embedder(local)
    images = torch.rand(3, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)

    uploads: list[tuple] = []

    class Api:
        def __init__(self, token: str | None = None) -> None:
            pass

        def create_repo(self, repo_id: str, **kwargs: object) -> None:
            uploads.append(("create", repo_id))

        def upload_folder(self, folder_path: str, repo_id: str) -> str:
            uploads.append(("upload", repo_id, sorted(os.listdir(folder_path))))
            return "https://huggingface.co/my-org/glyphs-embedder/commit/0"

    monkeypatch.setattr(hub, "HfApi", Api)
    from mbdl.export import push_to_hub

    assert push_to_hub(local, "my-org/glyphs-embedder").endswith("/commit/0")
    assert uploads == [
        ("create", "my-org/glyphs-embedder"),
        (
            "upload",
            "my-org/glyphs-embedder",
            ["README.md", "config.json", "model.safetensors", "preprocessing.json"],
        ),
    ]
    with pytest.raises(ValueError, match="not an mbdl model directory"):
        push_to_hub(run_dir, "my-org/x")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'mbdl\[hub\]'"):
        load_embedder("hf://my-org/glyphs-embedder")
