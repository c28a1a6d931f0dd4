"""``mbdl index build`` and ``mbdl search --index``: the index search equals the plain search of
the split, an approximate index prints its recall, and a checkpoint with other weights is refused
with a one-line error (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("faiss")

from mbdl.cli import main
from mbdl.config import load_config
from mbdl.index import GalleryIndex, model_fingerprint
from mbdl.inference import load_data
from mbdl.train import train
from mbdl.train.checkpoint import load_checkpoint, save_checkpoint

SMALL = [
    "data.max_classes=30",
    "model.embedding_dim=16",
    "train.epochs=1",
    "train.batch_classes=8",
    "train.batch_per_class=4",
    "train.max_steps_per_epoch=1",
    "train.warmup_epochs=0",
    "train.progress=false",
    "train.device=cpu",
    "eval.ks=[1]",
    "eval.report=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("index-cli")
    out = root / "run"
    config = load_config(None, [*SMALL, f"data.root={root / 'cache'}", f"out={out}"])
    train(config)
    checkpoint = out / "checkpoints" / "best.pt"
    other = root / "other.pt"  # the same architecture with different weights
    state = load_checkpoint(checkpoint)
    state["model_state"] = {k: v + 0.01 for k, v in state["model_state"].items()}
    save_checkpoint(other, state)
    test = load_data(config).test
    queries = []
    for i in (0, 7):
        path = root / f"query{i}.png"
        test.load_image(i).save(path)
        queries.append((path, test.describe(i)))
    return {"root": root, "checkpoint": checkpoint, "other": other, "queries": queries}


def results(text: str) -> dict[str, list[str]]:
    """query -> the gallery items (class name and description) listed for it, in order."""
    found: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("query "):
            current = line.removeprefix("query ")
            found[current] = []
        elif line.strip():
            found[current].append(line.split(None, 2)[2])  # class name and item, not distance
    return found


def test_build_and_search_equal_the_plain_search(
    run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index_dir = tmp_path / "gallery.index"
    assert main(["index", "build", str(run["checkpoint"]), "-o", str(index_dir)]) == 0
    built = capsys.readouterr().out
    assert "indexed" in built and "kind flat" in built
    index = GalleryIndex.load(index_dir)
    state = load_checkpoint(run["checkpoint"])
    assert index.model_id == model_fingerprint(state["model_state"])
    assert index.info["split"] == "test" and index.info["image_size"] == 32
    meta = json.loads((index_dir / "meta.json").read_text())
    assert meta["items"] == len(index) == len(index.paths)

    images = [str(path) for path, _ in run["queries"]]
    args = [str(run["checkpoint"]), *images, "-k", "4"]
    assert main(["search", "--index", str(index_dir), *args]) == 0
    with_index = capsys.readouterr().out
    assert main(["search", *args]) == 0
    plain = capsys.readouterr().out
    assert results(with_index) == results(plain)
    for path, item in run["queries"]:  # each query image is itself the nearest gallery item
        assert results(with_index)[str(path)][0].endswith(f"  {item}")
        first = with_index.split(f"query {path}\n")[1].splitlines()[0].split()
        assert float(first[1]) < 1e-3


def test_search_refuses_another_model(
    run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index_dir = tmp_path / "gallery.index"
    assert main(["index", "build", str(run["checkpoint"]), "-o", str(index_dir)]) == 0
    capsys.readouterr()
    image = str(run["queries"][0][0])
    code = main(["search", "--index", str(index_dir), str(run["other"]), image])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("mbdl: error: checkpoint ")
    assert "is not the model index" in captured.err and captured.err.count("\n") == 1
    code = main(["search", "--index", str(tmp_path / "missing"), str(run["checkpoint"]), image])
    assert code == 2 and "not an mbdl index" in capsys.readouterr().err


def test_ivf_index_prints_its_recall(
    run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index_dir = tmp_path / "ivf.index"
    args = ["--kind", "ivf", "--nlist", "8", "--nprobe", "2", "-o", str(index_dir)]
    assert main(["index", "build", str(run["checkpoint"]), "--split", "test", *args]) == 0
    out = capsys.readouterr().out
    assert "kind ivf" in out and "nlist 8" in out and "nprobe 2" in out
    recall = float(out.split("recall@10_vs_exact ")[1].split()[0].rstrip(","))
    index = GalleryIndex.load(index_dir)
    assert recall == pytest.approx(index.build_report["recall@10_vs_exact"], abs=1e-4)
    assert 0.0 < recall <= 1.0
    image = str(run["queries"][0][0])
    assert main(["search", "--index", str(index_dir), str(run["checkpoint"]), image]) == 0
    assert results(capsys.readouterr().out)[image]  # approximate, but finds neighbours


def test_fingerprint_of_the_loaded_model_equals_the_checkpoints(run: dict[str, Any]) -> None:
    from mbdl.train.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(run["checkpoint"])
    state = load_checkpoint(run["checkpoint"])["model_state"]
    assert model_fingerprint(model.state_dict()) == model_fingerprint(state)
    scalars = [k for k, v in state.items() if v.ndim == 0]  # BatchNorm's num_batches_tracked
    assert scalars
    changed = {**state, scalars[0]: state[scalars[0]] + 1}
    assert model_fingerprint(changed) != model_fingerprint(state)
