"""The HTML run report: content, escaping, self-containment, retrieval grid, and a Chromium render."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mbdl.data.base import ImageDataset
from mbdl.report import retrieval_examples, write_report
from mbdl.report.html import flatten_config
from mbdl.report.plots import project_2d, recall_at_k, validation_metrics

EVIL_CLASS = "<script>alert(1)</script>"
EVIL_PATH_PART = 'a&b"<c>'
COLOURS = ["#ef4444", "#f59e0b", "#10b981", "#3b82f6", "#8b5cf6", "#ec4899", "#14b8a6"]


class TinyDataset(ImageDataset):
    """In-memory images following the ImageDataset contract: class c is a shape in colour c."""

    def __init__(self, labels: np.ndarray, class_names: list[str]) -> None:
        self.labels = labels.astype(np.int64)
        self.class_names = class_names

    def load_image(self, index: int) -> Image.Image:
        label = int(self.labels[index])
        image = Image.new("RGB", (40, 32), "white")
        draw = ImageDraw.Draw(image)
        offset = index % 5
        colour = COLOURS[label % len(COLOURS)]
        if label % 2:
            draw.ellipse((4 + offset, 4, 30 + offset, 28), fill=colour)
        else:
            draw.rectangle((5 + offset, 6, 30 + offset, 26), fill=colour)
        return image

    def describe(self, index: int) -> str:
        return f"/data/{EVIL_PATH_PART}/img_{index}.png"


def _synthetic_run(
    num_classes: int = 6, per_class: int = 10, dim: int = 16
) -> tuple[dict, list[dict], dict, torch.Tensor, torch.Tensor, TinyDataset]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    centres = torch.randn(num_classes, dim, generator=generator) * 2
    embeddings = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    names = [EVIL_CLASS, "a & b", *[f"class {i}" for i in range(2, num_classes)]]
    dataset = TinyDataset(labels.numpy(), names)
    config = {
        "data": {"source": "glyphs", "root": f"/tmp/{EVIL_PATH_PART}", "image_size": 32},
        "model": {"backbone": "smallcnn", "embedding_dim": dim},
        "loss": {"name": "mdl", "margin": 0.2},
        "train": {
            "epochs": 4,
            "batch_classes": 32,
            "batch_per_class": 4,
            "lr": 1e-3,
            "select_metric": "map@r",
        },
        "eval": {"ks": [1, 2, 4, 8], "distance": "cosine"},
        "seed": 0,
        "out": Path("/tmp/runs/demo"),
        "note": None,
    }
    history = []
    for epoch in range(1, 5):
        record = {
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "lr": 1e-3 * (1 - epoch / 5),
            "images_per_s": 900.0 + epoch,
            "elapsed_s": 20.0 * epoch,
        }
        if epoch % 2 == 0:  # validation every other epoch, both log styles
            if epoch == 2:
                record["val/map@r"] = 0.5
                record["val/recall@1"] = 0.7
            else:
                record["validation"] = {"map@r": 0.6, "recall@1": 0.8, "nmi": 0.55}
        history.append(record)
    metrics = {
        "validation": {
            "recall@1": 0.8125,
            "recall@2": 0.875,
            "recall@4": 0.9,
            "recall@8": 0.95,
            "precision@1": 0.8125,
            "r_precision": 0.61,
            "map@r": 0.6,
            "nmi": 0.55,
            "f1": 0.4,
        },
        "test": {
            "recall@1": 0.7342,
            "recall@2": 0.8111,
            "recall@4": 0.8765,
            "recall@8": 0.9321,
            "precision@1": 0.7342,
            "r_precision": 0.5012,
            "map@r": 0.4567,
            "nmi": 0.6789,
            "f1": 0.3456,
            # metrics.json's flat layout of earlier runs: run metadata among the metrics
            "kmeans/backend=torch": 1.0,
            "kmeans/restarts": 3.0,
            "kmeans/seed": 0.0,
            "tar@far=0.001": 0.4321,
            "eer": 0.1234,
            "genuine_pairs": 40080.0,
            "impostor_pairs": 1000000.0,
            "tar@threshold": 0.4444,
        },
        "verification": {
            "threshold": 0.8321,
            "far": 0.001,
            "distance": "cosine",
            "chosen_on": "validation",
            "validation_tar": 0.7,
        },
    }
    return config, history, metrics, embeddings, labels, dataset


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("run")
    config, history, metrics, embeddings, labels, dataset = _synthetic_run()
    path = write_report(
        out,
        config=config,
        history=history,
        metrics=metrics,
        test_embeddings=embeddings,
        test_labels=labels,
        test_dataset=dataset,
    )
    return path, path.read_text(encoding="utf-8")


def test_report_is_written_atomically_in_the_run_directory(report: tuple[Path, str]) -> None:
    path, text = report
    assert path.name == "report.html"
    assert text.startswith("<!DOCTYPE html>")
    assert text.rstrip().endswith("</html>")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left


def test_report_contains_the_metric_values(report: tuple[Path, str]) -> None:
    _, text = report
    for value in ("0.7342", "0.8111", "0.5012", "0.4567", "0.6789", "0.3456", "0.8125", "0.6100"):
        assert value in text
    for label in (
        "Recall@1",
        "Recall@8",
        "MAP@R",
        "R-Precision",
        "NMI",
        "F1",
        "Validation",
        "Test",
    ):
        assert label in text


def test_report_groups_the_metrics_and_keeps_run_metadata_apart(report: tuple[Path, str]) -> None:
    _, text = report
    table = text[text.index('<table class="metrics">') : text.index("</table>")]
    groups = re.findall(r'<th scope="rowgroup"[^>]*>([^<]+)</th>', table)
    assert groups == ["Retrieval", "Clustering", "Verification"]
    clustering = table[table.index(">Clustering<") : table.index(">Verification<")]
    assert "NMI" in clustering and "MAP@R" not in clustering
    verification = table[table.index(">Verification<") :]
    assert "0.4321" in verification and "0.1234" in verification and "0.4444" in verification
    # one column per split: the verification block is not a split
    assert table.count('<th scope="col"') == 3
    for meta in ("kmeans", "pairs", "40080", "1000000"):
        assert meta not in table
    block = text[text.index('<ul class="meta"') :]
    block = block[: block.index("</ul>")]
    assert "kmeans/backend torch" in block and "kmeans/restarts 3" in block
    assert "genuine_pairs 40080," in block and "impostor_pairs 1000000" in block
    assert "40080.0000" not in text and "0.8321" in block and "FAR 0.001" in block


def test_report_escapes_class_names_paths_and_config_values(report: tuple[Path, str]) -> None:
    _, text = report
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "a &amp; b" in text
    assert "a&amp;b&quot;&lt;c&gt;" in text  # the dataset path and the config's data.root
    assert 'a&b"<c>' not in text
    assert "<c>" not in text


def test_report_is_self_contained(report: tuple[Path, str]) -> None:
    _, text = report
    sources = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", text, flags=re.I)
    assert sources, "the report should inline its plots and thumbnails"
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    for forbidden in ("http://", "https://", "file:", "<link", "@import", "url(", "<script"):
        assert forbidden not in text.lower()
    # 3 plots + 8 queries x (1 query + 5 results) thumbnails
    assert len(sources) == 3 + 8 * 6


def test_report_shows_config_history_and_retrievals(report: tuple[Path, str]) -> None:
    _, text = report
    assert "<code>loss.margin</code>" in text and "<code>0.2</code>" in text
    assert "<code>eval.ks</code>" in text and "<code>[1, 2, 4, 8]</code>" in text
    assert "<code>note</code>" in text and "<code>null</code>" in text
    assert text.count('class="tile query"') == 8
    assert text.count('class="tile correct"') + text.count('class="tile wrong"') == 40
    assert text.count("✓ #") == text.count('class="tile correct"')
    assert text.count("✗ #") == text.count('class="tile wrong"')
    assert "1m 20s" in text  # training time: the largest elapsed_s
    assert "cosine distance" in text  # the config's eval.distance ranks the retrievals


def test_report_without_history_or_validation(tmp_path: Path) -> None:
    _, _, metrics, embeddings, labels, dataset = _synthetic_run(num_classes=3, per_class=3)
    path = write_report(
        tmp_path,
        config={},
        history=[],
        metrics={"validation": {}, "test": metrics["test"]},  # a run without validation classes
        test_embeddings=embeddings,
        test_labels=labels,
        test_dataset=dataset,
        num_queries=2,
        projection="pca",
    )
    text = path.read_text(encoding="utf-8")
    assert "0.4567" in text and "Validation" not in text
    assert "No configuration was recorded" in text
    assert text.count('class="tile query"') == 2


def test_report_rejects_mismatched_inputs(tmp_path: Path) -> None:
    config, history, metrics, embeddings, labels, dataset = _synthetic_run()
    with pytest.raises(ValueError, match="disagree"):
        write_report(
            tmp_path,
            config=config,
            history=history,
            metrics=metrics,
            test_embeddings=embeddings[:-1],
            test_labels=labels,
            test_dataset=dataset,
        )
    with pytest.raises(ValueError, match="projection"):
        project_2d(embeddings, method="umap")


def _reference_distances(x: torch.Tensor, query: int) -> dict[int, float]:
    """Plain loop: the euclidean distance from the query to every other item."""
    return {
        j: math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(x[query], x[j], strict=True)))
        for j in range(x.shape[0])
        if j != query
    }


def test_retrieval_examples_match_a_plain_loop_and_exclude_the_query_by_index() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, dtype=torch.float64, generator=generator).float()
    labels = torch.arange(30) % 4
    x[7] = x[3]  # an exact duplicate: must be retrieved first for query 3, query 3 itself never
    examples = retrieval_examples(x, labels, num_queries=30, k=4, seed=0)
    assert sorted(e.query for e in examples) == list(range(30))
    assert len({int(labels[e.query]) for e in examples[:4]}) == 4  # distinct classes first
    for example in examples:
        assert example.query not in example.neighbours
        reference = _reference_distances(x, example.query)
        nearest = sorted(reference.values())[:4]
        # ties (the duplicate pair) may come in any order: compare distances, then each index's own
        assert example.distances == pytest.approx(nearest, abs=1e-5)
        assert [reference[j] for j in example.neighbours] == pytest.approx(nearest, abs=1e-5)
        assert len(set(example.neighbours)) == 4
        assert example.correct == [
            bool(labels[j] == labels[example.query]) for j in example.neighbours
        ]
        assert example.distances == sorted(example.distances)
    by_query = {e.query: e for e in examples}
    assert 7 in by_query[3].neighbours and 3 in by_query[7].neighbours
    assert by_query[3].distances[0] == pytest.approx(0, abs=1e-3)


def test_retrieval_queries_are_seeded_and_skip_singleton_classes() -> None:
    x = torch.randn(12, 3)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 5, 5])
    first = retrieval_examples(x, labels, num_queries=5, k=2, seed=3)
    again = retrieval_examples(x, labels, num_queries=5, k=2, seed=3)
    assert [e.query for e in first] == [e.query for e in again]
    assert all(int(labels[e.query]) not in (2, 3, 4) for e in first)


def test_validation_metrics_accepts_flat_and_nested_records() -> None:
    assert validation_metrics({"epoch": 1, "train_loss": 0.3}) == {}
    assert validation_metrics({"val/map@r": 0.5, "validation": {"nmi": 0.25}}) == {
        "map@r": 0.5,
        "nmi": 0.25,
    }
    assert recall_at_k({"recall@10": 0.9, "recall@2": 0.5, "nmi": 0.1}) == [(2, 0.5), (10, 0.9)]
    assert flatten_config({"a": {"b": 1, "c": {"d": "x"}}, "e": {}}) == {
        "a.b": 1,
        "a.c.d": "x",
        "e": {},
    }


def test_pca_projection_matches_scikit_learn_up_to_sign() -> None:
    decomposition = pytest.importorskip("sklearn.decomposition")
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(2)) * torch.arange(1, 9)
    points, method = project_2d(x, method="pca")
    expected = decomposition.PCA(n_components=2).fit_transform(x.double().numpy())
    assert method == "PCA"
    np.testing.assert_allclose(np.abs(points), np.abs(expected), atol=1e-8)
    again, _ = project_2d(x, method="pca")
    np.testing.assert_array_equal(points, again)


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.chromium
def test_report_renders_in_headless_chromium(report: tuple[Path, str], tmp_path: Path) -> None:
    chromium = _find_chromium()
    if chromium is None:
        pytest.skip(
            "headless Chromium is not installed (Debian packages chromium, chromium-driver)"
        )
    path, _ = report
    screenshot = tmp_path / "report.png"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={screenshot}",
        "--window-size=1200,2000",
        path.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert screenshot.exists(), f"no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    not_white = (pixels < 245).any(axis=2).mean()
    assert len(colours) > 500, f"only {len(colours)} colours: the page looks blank"
    assert not_white > 0.1, f"only {not_white:.1%} of the pixels are not white"
