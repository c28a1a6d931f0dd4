"""The gallery index: exact search equals brute force, approximate recall is reported, no pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from mbdl.index import GalleryIndex, model_fingerprint


def _gallery(n: int = 300, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    return emb, np.arange(n) % 30


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_exact_index_equals_brute_force(distance: str) -> None:
    emb, labels = _gallery()
    queries = torch.nn.functional.normalize(torch.randn(20, 16), dim=1)
    index = GalleryIndex.build(emb, labels, model_id="m", distance=distance)
    distances, indices = index.search(queries, 5, model_id="m")
    full = (
        torch.cdist(queries.double(), emb.double())
        if distance == "euclidean"
        else 1 - queries.double() @ emb.double().T
    )
    expected, expected_ids = full.topk(5, dim=1, largest=False)
    assert np.allclose(distances, expected.numpy(), atol=1e-5)
    assert (indices == expected_ids.numpy()).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_reports_recall(kind: str) -> None:
    emb, labels = _gallery(n=400)
    index = GalleryIndex.build(emb, labels, model_id="m", kind=kind, nlist=8, nprobe=8)
    recall = index.build_report["recall@10_vs_exact"]
    assert 0.5 <= recall <= 1.0
    if kind == "ivf":  # nprobe == nlist visits every list: exact
        assert recall == 1.0


def test_save_load_roundtrip_without_pickle(tmp_path: Path) -> None:
    emb, labels = _gallery()
    paths = [f"img/{i}.png" for i in range(len(labels))]
    index = GalleryIndex.build(emb, labels, model_id="abc", paths=paths, class_names=["x"] * 30)
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # overwriting an index replaces it whole
    loaded = GalleryIndex.load(tmp_path / "idx")
    assert loaded.paths == paths and loaded.model_id == "abc" and len(loaded) == len(labels)
    assert (loaded.labels == labels).all()
    q = emb[:3]
    assert (loaded.search(q, 4, model_id="abc")[1] == index.search(q, 4, model_id="abc")[1]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary leftovers


def test_refuses_another_model_and_bad_input(tmp_path: Path) -> None:
    emb, labels = _gallery()
    index = GalleryIndex.build(emb, labels, model_id="abc")
    with pytest.raises(ValueError, match="rebuild the index"):
        index.search(emb[:2], 3, model_id="other")
    with pytest.raises(ValueError, match="dimension"):
        index.search(torch.randn(2, 8), 3, model_id="abc")
    with pytest.raises(ValueError, match="NaN"):
        GalleryIndex.build(emb * float("nan"), labels, model_id="abc")
    with pytest.raises(ValueError, match="kind"):
        GalleryIndex.build(emb, labels, model_id="abc", kind="lsh")
    with pytest.raises(ValueError, match="not an mbdl index"):
        GalleryIndex.load(tmp_path)


def test_model_fingerprint_changes_with_weights() -> None:
    model = torch.nn.Linear(3, 2)
    first = model_fingerprint(model.state_dict())
    assert first == model_fingerprint(model.state_dict())
    with torch.no_grad():
        model.weight[0, 0] += 1e-3
    assert model_fingerprint(model.state_dict()) != first
