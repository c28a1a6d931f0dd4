"""The ``mbdl`` command line: exit codes, one-line errors, and train / eval / embed / search / data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import mbdl
from mbdl.cli import COMMANDS, main, split_overrides
from mbdl.errors import UserError

SMALL = [
    "data.max_classes=40",
    "model.embedding_dim=16",
    "train.epochs=1",
    "train.batch_classes=8",
    "train.batch_per_class=4",
    "train.max_steps_per_epoch=2",
    "train.device=cpu",
    "eval.ks=[1, 2]",
    "eval.report=false",
]


def run_mbdl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mbdl", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def assert_user_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mbdl: error: ")
    assert expected in lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mbdl {mbdl.__version__}"


def test_user_error_in_a_real_process_is_one_line_with_exit_code_2() -> None:
    assert_user_error(
        run_mbdl("train", "train.epoch=5"), "unknown key train.epoch; did you mean train.epochs"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "train.amp=fp32"], "choose one of auto, off, bf16, fp16"),
        (["train", "none.yaml"], "config file 'none.yaml' does not exist"),
        (["train", "a.yaml", "b.yaml"], "expected at most one config file"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["eval", "no-run"], "'no-run' does not exist"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["search", "no-run"], "give at least one query IMAGE"),
        (["embed", "no-run"], "the following arguments are required: -o/--output"),
        (["train", "out=x", "resume=true", "data.source=cub"], "needs data.root"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mbdl: error: "), captured.err
    assert expected in lines[0]


def test_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--print-config", "loss.name=triplet", "loss.margin=0.1"]) == 0
    out = capsys.readouterr().out
    assert "name: triplet" in out and "margin: 0.1" in out


def test_split_overrides() -> None:
    overrides, others = split_overrides(["run.yaml", "train.lr=0.1", "a/b=c.png", "seed=3"])
    assert overrides == ["train.lr=0.1", "seed=3"]
    assert others == ["run.yaml", "a/b=c.png"]


def test_registry_lists_the_commands() -> None:
    assert {"train", "eval", "embed", "search", "data"} <= set(COMMANDS)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    cache = str(tmp_path_factory.mktemp("glyph-cache"))
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", *SMALL, f"data.root={cache}", f"out={out}", "train.progress=false"])
    assert code == 0
    return out, cache


def test_train_prints_test_metrics(
    trained_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out, cache = trained_run
    metrics = json.loads((out / "metrics.json").read_text())
    # running again into the same directory is refused: finished results are never overwritten
    code = main(["train", *SMALL, f"data.root={cache}", f"out={out}"])
    captured = capsys.readouterr()
    assert code == 2
    assert "already exists and is not empty" in captured.err
    assert metrics["test"]["map@r"] >= 0


def test_eval_reproduces_the_test_metrics(
    trained_run: tuple[Path, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, _ = trained_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["eval", str(out), "--json", "-o", str(tmp_path / "m.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    from mbdl.evaluate import split_metrics

    table, meta = split_metrics(metrics["test"])  # metrics.json of an earlier layout: split here
    assert printed["metrics"] == pytest.approx(table)
    assert printed["meta"] == {**meta, **metrics.get("meta", {}).get("test", {})}
    assert all(isinstance(v, int) for k, v in printed["meta"].items() if k != "kmeans/backend")
    assert json.loads((tmp_path / "m.json").read_text()) == printed
    assert main(["eval", str(out / "checkpoints" / "best.pt"), "--split", "val"]) == 0
    text = capsys.readouterr().out
    assert "map@r" in text
    # only data.* / eval.* overrides make sense for a trained model
    assert main(["eval", str(out), "train.lr=0.1"]) == 2
    assert "only data.*, eval.* and seed overrides" in capsys.readouterr().err


def test_embed_writes_an_npz(trained_run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = trained_run
    target = tmp_path / "emb.npz"
    assert main(["embed", str(out / "checkpoints" / "best.pt"), "-o", str(target)]) == 0
    with np.load(target) as data:
        assert data["embeddings"].shape == (20 * 16, 16)
        assert data["labels"].shape == (20 * 16,)
        assert len(data["class_names"]) == 20
        assert len(data["items"]) == 20 * 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npz"]  # no temp file left


def test_search_prints_top_k(
    trained_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mbdl.data import load_splits

    out, cache = trained_run
    test = load_splits("glyphs", cache, max_classes=40).test
    query = tmp_path / "query.png"
    test.load_image(0).save(query)
    code = main(["search", str(out), "--gallery-split", "test", "-k", "3", str(query)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"query {query}"
    assert len(lines) == 4
    first = lines[1].split()
    assert first[0] == "1" and float(first[1]) == pytest.approx(0.0, abs=1e-4)
    assert test.describe(0) in lines[1]  # the image itself is its own nearest neighbour
    # a colour query of another size goes through the gallery's evaluation transform
    colour = tmp_path / "colour.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(colour)
    assert main(["search", str(out), str(colour), "-k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["search", str(out), str(broken)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def ycbcr_query(folder: Path) -> Path:
    """A colour TIFF stored as YCbCr: its grey reading (the Y plane) and its RGB reading
    converted to grey differ by one level on about 40% of the pixels."""
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = folder / "query.tif"
    Image.fromarray(pixels).convert("YCbCr").save(path, "TIFF")
    return path


def grey_query_distances(out: Path, cache: str, query: Path, mode: str) -> Any:
    """The float64 distances from ``query`` (read in ``mode``) to the glyph test split, by hand:
    the split's evaluation transform and the model, as the record and the data say."""
    import torch

    from mbdl.data import load_splits
    from mbdl.data.files import read_image
    from mbdl.evaluate import embed_dataset
    from mbdl.functional.distances import pairwise_distance
    from mbdl.model import load_model

    loaded = load_model(out)
    assert loaded.record.color_mode == "L"  # a grey model
    test = load_splits("glyphs", cache, max_classes=40).test
    gallery, _ = embed_dataset(loaded.module, test)
    with torch.inference_mode():
        query_embedding = loaded.module(test.transform(read_image(query, mode)).unsqueeze(0))
    return pairwise_distance(query_embedding.double(), gallery.double(), "euclidean")[0]


def test_search_split_reads_queries_in_the_models_colour_mode(
    trained_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from mbdl.inference import search_split

    out, cache = trained_run
    query = ycbcr_query(tmp_path)
    grey = grey_query_distances(out, cache, query, "L")
    via_rgb = grey_query_distances(out, cache, query, "RGB")
    assert not torch.equal(grey, via_rgb)  # the two readings give other embeddings
    result = search_split(out, [query], k=4, device="cpu")
    assert result.queries == [str(query)] and result.split == "test"
    expected, order = torch.topk(grey, 4, largest=False)
    found = result.neighbours[0]
    assert [n.index for n in found] == order.tolist()
    assert [n.distance for n in found] == expected.tolist()
    assert main(["search", str(out), str(query), "-k", "4"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert [row.split()[1] for row in rows] == [f"{d:.4f}" for d in expected.tolist()]


def test_data_glyphs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "glyphs", "--cache-dir", str(tmp_path)]) == 0
    assert "classes" in capsys.readouterr().out


def test_divergence_exits_1_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mbdl.train import trainer

    def nan_step(self: Any, images: Any, labels: Any) -> float:
        raise trainer.TrainingDiverged(f"the loss is nan {self._where()}. {self._advice()}")

    monkeypatch.setattr(trainer.Trainer, "_train_step", nan_step)
    code = main(["train", *SMALL, f"data.root={tmp_path / 'cache'}", f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("mbdl: error: the loss is nan at epoch 1, step 1")


def test_train_stores_a_validation_threshold_and_reports_test_rates_at_it(
    trained_run: tuple[Path, str],
) -> None:
    from mbdl.data import load_splits
    from mbdl.evaluate import embed_dataset
    from mbdl.functional.verification import pair_distances, rates_at_threshold, threshold_at_far
    from mbdl.train.checkpoint import load_checkpoint, model_from_state

    out, cache = trained_run
    metrics = json.loads((out / "metrics.json").read_text())
    state = load_checkpoint(out / "checkpoints" / "best.pt")
    stored = state["verification"]
    assert stored["far"] == 1e-3 and stored["distance"] == "euclidean"
    assert stored["chosen_on"] == "validation"
    assert metrics["verification"]["threshold"] == stored["threshold"]
    # the threshold is the validation classes' one, recomputed here from their pairs
    splits = load_splits("glyphs", cache, max_classes=40)
    model = model_from_state(state)
    val, val_labels = embed_dataset(model, splits.val)
    genuine, impostor, _ = pair_distances(val, val_labels)
    assert stored["threshold"] == threshold_at_far(genuine, impostor, 1e-3)
    assert stored["validation_far"] <= 1e-3
    # the test rates are measured at that threshold on the test classes' pairs
    test, test_labels = embed_dataset(model, splits.test)
    genuine, impostor, _ = pair_distances(test, test_labels)
    tar, far = rates_at_threshold(genuine, impostor, stored["threshold"])
    assert metrics["test"]["tar@threshold"] == pytest.approx(tar)
    assert metrics["test"]["far@threshold"] == pytest.approx(far)


def test_verify_answers_same_or_different(
    trained_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mbdl.data import load_splits

    out, cache = trained_run
    test = load_splits("glyphs", cache, max_classes=40).test
    first, again = tmp_path / "a.png", tmp_path / "a-again.png"
    test.load_image(0).save(first)
    test.load_image(0).save(again)
    assert main(["verify", str(out), str(first), str(again)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("same: euclidean distance 0.0000 <= threshold")
    assert "chosen on the validation classes at FAR 0.001" in line
    other = next(i for i in range(len(test)) if test.labels[i] != test.labels[0])
    second = tmp_path / "b.png"
    test.load_image(other).save(second)
    assert main(["verify", str(out), str(first), str(second), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    stored = json.loads((out / "metrics.json").read_text())["verification"]
    assert answer["threshold"] == stored["threshold"]
    assert answer["same"] == (answer["distance"] <= stored["threshold"])
    # an explicit threshold decides instead; 0 separates any two different images
    assert main(["verify", str(out), str(first), str(second), "--threshold", "0"]) == 0
    assert capsys.readouterr().out.startswith("different: ")
    assert main(["verify", str(out), str(first), str(second), "--threshold", "abc"]) == 2
    assert "--threshold must be a number" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["verify", str(out), str(first), str(broken)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_search_threshold_marks_matches(
    trained_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mbdl.data import load_splits

    out, cache = trained_run
    test = load_splits("glyphs", cache, max_classes=40).test
    query = tmp_path / "query.png"
    test.load_image(0).save(query)
    threshold = json.loads((out / "metrics.json").read_text())["verification"]["threshold"]
    assert main(["search", str(out), str(query), "-k", "5", "--threshold"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(rows) == 5
    for row in rows:
        distance = float(row.split()[1])
        assert (row.split()[2] == "match") == (distance <= threshold)
    assert rows[0].split()[2] == "match"  # the image itself, at distance 0
    # a distance is never negative: -1 (which matched nothing) is refused
    assert main(["search", str(out), str(query), "-k", "3", "--threshold", "-1"]) == 2
    assert "--threshold must be a finite distance >= 0" in capsys.readouterr().err


def test_threshold_option_needs_a_stored_threshold_or_a_number() -> None:
    from mbdl.cli import UsageError, _match_threshold
    from mbdl.model.record import VerificationRecord

    assert _match_threshold(None, None, "euclidean") is None
    assert _match_threshold("0.5", None, "euclidean") == 0.5
    stored = VerificationRecord(threshold=0.25, distance="euclidean", far=1e-3)
    assert _match_threshold("checkpoint", stored, "euclidean") == 0.25
    squared = VerificationRecord(threshold=0.25, distance="squared_euclidean", far=1e-3)
    assert _match_threshold("checkpoint", squared, "euclidean") == 0.5
    with pytest.raises(UsageError, match="no verification threshold"):
        _match_threshold("checkpoint", None, "euclidean")
    with pytest.raises(UserError, match=r"euclidean distance but the distance used is cosine"):
        _match_threshold("checkpoint", stored, "cosine")
    with pytest.raises(UsageError, match="finite"):
        _match_threshold("nan", None, "euclidean")
