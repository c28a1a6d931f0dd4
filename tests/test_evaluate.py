from __future__ import annotations

import pytest
import torch

import mbdl.evaluate as evaluate_module
from mbdl.evaluate import embed_dataset, evaluate
from mbdl.functional.clustering import adjusted_mutual_info, normalized_mutual_info, pair_f1
from mbdl.functional.kmeans import kmeans
from mbdl.functional.knn import faiss_available
from mbdl.functional.verification import pair_distances, verification_metrics


def clustered(seed=0, num_classes=10, per_class=6, dim=8, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + noise * torch.randn(labels.numel(), dim, generator=g), labels


def test_all_metrics_by_default():
    x, labels = clustered()
    result = evaluate(x, labels)
    expected = {"recall@1", "recall@2", "recall@4", "recall@8", "precision@1", "r_precision"}
    expected |= {"map@r", "nmi", "ami", "f1", "eer", "eer_threshold"}
    expected |= {"kmeans/backend=torch", "kmeans/restarts", "kmeans/seed"}
    expected |= {"genuine_pairs", "impostor_pairs"}
    for far in ("1e-2", "1e-3", "1e-4"):
        expected |= {f"tar@far={far}", f"far@far={far}", f"threshold@far={far}"}
    assert set(result) == expected
    assert all(isinstance(v, float) for v in result.values())
    counts = ("kmeans/", "threshold", "eer_", "genuine_", "impostor_", "ami")
    assert all(0.0 <= v <= 1.0 for k, v in result.items() if not k.startswith(counts))
    assert -1.0 <= result["ami"] <= 1.0
    assert result["recall@1"] == result["precision@1"]
    assert result["recall@1"] <= result["recall@2"] <= result["recall@4"] <= result["recall@8"]


def test_nmi_and_f1_come_from_one_seeded_kmeans_on_the_gallery():
    x, labels = clustered(1)
    result = evaluate(x, labels, metrics=["nmi", "ami", "f1"], seed=4)
    clusters = kmeans(x, 10, seed=4)
    assert result == {
        "nmi": normalized_mutual_info(labels, clusters),
        "ami": adjusted_mutual_info(labels, clusters),
        "f1": pair_f1(labels, clusters),
        "kmeans/backend=torch": 1.0,
        "kmeans/restarts": 3.0,
        "kmeans/seed": 4.0,
    }
    assert evaluate(x, labels, metrics=["nmi", "ami", "f1"], seed=4) == result
    one = evaluate(x, labels, metrics=["nmi"], seed=4, kmeans_restarts=1)
    assert one["nmi"] == normalized_mutual_info(labels, kmeans(x, 10, seed=4, restarts=1))
    assert one["kmeans/restarts"] == 1.0


@pytest.mark.skipif(not faiss_available(), reason="needs faiss")
def test_clustering_does_not_depend_on_faiss_being_installed(monkeypatch):
    x, labels = clustered(5)
    with_faiss = evaluate(x, labels, metrics=["nmi", "f1"])
    monkeypatch.setattr("mbdl.functional.kmeans.faiss_available", lambda: False)
    monkeypatch.setattr("mbdl.functional.knn.faiss_available", lambda: False)
    assert evaluate(x, labels, metrics=["nmi", "f1"]) == with_faiss
    assert "kmeans/backend=torch" in with_faiss


@pytest.mark.skipif(not faiss_available(), reason="needs faiss")
def test_faiss_backend_is_recorded_and_agrees():
    x, labels = clustered(6, num_classes=30, per_class=8, noise=2.0)
    ours = evaluate(x, labels, metrics=["nmi", "f1"])
    theirs = evaluate(x, labels, metrics=["nmi", "f1"], backend="faiss")
    assert theirs["kmeans/backend=faiss"] == 1.0 and "kmeans/backend=torch" not in theirs
    assert abs(ours["nmi"] - theirs["nmi"]) < 0.005


def test_verification_keys_come_from_the_pairs_of_the_set():
    x, labels = clustered(7, noise=2.0)
    result = evaluate(x, labels, metrics=["verification"], verify_fars=(0.1, 0.01))
    genuine, impostor, exhaustive = pair_distances(x, labels)
    assert exhaustive
    assert result == verification_metrics(genuine, impostor, (0.1, 0.01))
    queries, gallery = x[::3], torch.cat([x[1::3], x[2::3]])
    query_labels, gallery_labels = labels[::3], torch.cat([labels[1::3], labels[2::3]])
    cross = evaluate(
        gallery,
        gallery_labels,
        query_embeddings=queries,
        query_labels=query_labels,
        metrics=["verification"],
    )
    genuine, impostor, _ = pair_distances(
        gallery, gallery_labels, query_embeddings=queries, query_labels=query_labels
    )
    assert cross == verification_metrics(genuine, impostor)
    assert cross["genuine_pairs"] == 10 * 2 * 4  # per class: 2 queries x 4 gallery items


def test_huge_duplicate_and_half_precision_embeddings():
    x, labels = clustered(8)
    reference = evaluate(x, labels, metrics=["recall", "map@r", "nmi", "f1"])
    for scaled in (x * 1e19, x.double() * 1e200, x * 1e-30):
        result = evaluate(scaled, labels, metrics=["recall", "map@r", "nmi", "f1"])
        assert result == reference
        if faiss_available():
            assert (
                evaluate(scaled, labels, metrics=["map@r"], backend="faiss")["map@r"]
                == (reference["map@r"])
            )
    for dtype in (torch.float16, torch.bfloat16):
        assert abs(evaluate(x.to(dtype), labels)["map@r"] - reference["map@r"]) < 0.05
    same = evaluate(torch.ones(60, 4), labels)  # every row equal: defined, not a crash
    assert same["eer"] == 0.5 and same["nmi"] == 0.0
    duplicated = evaluate(torch.eye(10)[labels], labels)
    assert duplicated["map@r"] == duplicated["nmi"] == duplicated["f1"] == 1.0
    assert duplicated["eer"] == 0.0


def test_retrieval_in_query_blocks_equals_one_block():
    x, labels = clustered(9, noise=2.0)
    whole = evaluate(x, labels, metrics=["recall", "r_precision", "map@r"])
    # a budget so small that every block holds one query
    blocks = evaluate(x, labels, metrics=["recall", "r_precision", "map@r"], memory_budget_bytes=64)
    assert blocks == pytest.approx(whole, abs=1e-12)


def test_subset_skips_kmeans(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("k-means must not run for retrieval-only metrics")

    monkeypatch.setattr(evaluate_module, "kmeans_fit", fail)
    x, labels = clustered()
    result = evaluate(x, labels, metrics=["recall@3", "map@r"])
    assert set(result) == {"recall@3", "map@r"}


def test_query_gallery_mode_clusters_the_gallery():
    x, labels = clustered(2)
    queries, gallery = x[::3], torch.cat([x[1::3], x[2::3]])
    query_labels, gallery_labels = labels[::3], torch.cat([labels[1::3], labels[2::3]])
    result = evaluate(gallery, gallery_labels, query_embeddings=queries, query_labels=query_labels)
    alone = evaluate(gallery, gallery_labels, metrics=["nmi", "f1"])
    assert result["nmi"] == alone["nmi"] and result["f1"] == alone["f1"]


def test_torch_backend_and_cosine_run():
    x, labels = clustered(3)
    result = evaluate(x, labels, backend="torch", distance="cosine")
    assert 0.0 <= result["nmi"] <= 1.0


def test_errors():
    x, labels = clustered()
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        evaluate(bad, labels)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        evaluate(x, labels, query_embeddings=bad, query_labels=labels)
    with pytest.raises(ValueError, match="entries"):
        evaluate(x, labels[:-1])
    with pytest.raises(ValueError, match="larger than the 59 gallery items"):
        evaluate(x, labels, ks=[60])
    assert "recall@59" in evaluate(x, labels, ks=[59], metrics=["recall"])
    with pytest.raises(ValueError, match="at least two classes"):
        evaluate(x, torch.zeros(60, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown metric 'ndcg'"):
        evaluate(x, labels, metrics=["ndcg"])
    with pytest.raises(ValueError, match="distance"):
        evaluate(x, labels, distance="hamming")
    with pytest.raises(ValueError, match="backend"):
        evaluate(x, labels, backend="gpu")
    with pytest.raises(ValueError, match="given together"):
        evaluate(x, labels, query_embeddings=x)
    with pytest.raises(ValueError, match="ks"):
        evaluate(x, labels, ks=[0])
    with pytest.raises(ValueError, match="no query"):
        evaluate(x[::6], labels[::6], metrics=["recall"])  # every class has one item


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(10, 3, 4, 4, generator=g)
        self.labels = [i % 3 for i in range(10)]

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_embed_dataset():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5), torch.nn.Dropout(0.5))
    model.train()
    dataset = TinyDataset()
    embeddings, labels = embed_dataset(model, dataset, batch_size=4)
    assert embeddings.shape == (10, 5) and embeddings.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == dataset.labels
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(embeddings, model(dataset.images))  # dropout was off


def test_the_clustering_step_is_injectable():
    """``evaluate(..., kmeans=f)`` scores f's assignment (as PML's kmeans_func) and records its
    name instead of mbdl's k-means settings."""
    import numpy as np

    from mbdl.evaluate import evaluate

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(5)
    x = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    calls = []

    def perfect(embeddings, num_clusters):
        calls.append((tuple(embeddings.shape), num_clusters))
        return labels.numpy()[::-1].copy()  # a relabelling of the truth: a perfect clustering

    ours = evaluate(x, labels, ks=(1,), metrics=["nmi", "ami", "f1"], kmeans=perfect)
    assert calls == [((30, 8), 6)]
    assert ours["kmeans/backend=perfect"] == 1.0 and "kmeans/seed" not in ours
    default = evaluate(x, labels, ks=(1,), metrics=["nmi", "ami", "f1"])
    assert ours["nmi"] == pytest.approx(1.0) and ours["f1"] == pytest.approx(1.0)
    assert default["nmi"] < 1.0  # random embeddings: mbdl's k-means cannot find the classes
    with pytest.raises(ValueError, match="returned 3 assignments for 30 rows"):
        evaluate(x, labels, ks=(1,), metrics=["nmi"], kmeans=lambda e, k: np.zeros(3))


def test_split_metrics_separates_the_run_metadata():
    from mbdl.evaluate import split_metrics

    table, meta = split_metrics(
        {
            "map@r": 0.5,
            "kmeans/backend=torch": 1.0,
            "kmeans/restarts": 3.0,
            "kmeans/seed": 0.0,
            "genuine_pairs": 40080.0,
            "impostor_pairs": 1e6,
            "eer": 0.1,
        }
    )
    assert table == {"map@r": 0.5, "eer": 0.1}
    assert meta == {
        "kmeans/backend": "torch",
        "kmeans/restarts": 3,
        "kmeans/seed": 0,
        "genuine_pairs": 40080,
        "impostor_pairs": 1000000,
    }
    assert all(type(v) is int for k, v in meta.items() if k != "kmeans/backend")
    assert split_metrics(table) == (table, {})


def test_printed_metrics_keep_counts_as_integers_apart_from_the_table():
    """``mbdl train`` / ``mbdl eval`` print the metric table, then the run metadata on one line
    (counts as integers, not ``40080.0000``)."""
    from mbdl.runconfig import format_metrics

    text = format_metrics(
        {"map@r": 0.5, "kmeans/backend=torch": 1.0, "kmeans/seed": 0.0, "genuine_pairs": 40080.0}
    )
    lines = text.splitlines()
    assert lines[0].split() == ["map@r", "0.5000"]
    assert lines[1] == "(kmeans/backend torch, kmeans/seed 0, genuine_pairs 40080)"
    assert len(lines) == 2


def test_metrics_document_moves_run_metadata_into_a_meta_block():
    from mbdl.evaluate import metrics_document

    document = metrics_document(
        {
            "validation": {"map@r": 0.4, "kmeans/seed": 0.0},
            "test": {"map@r": 0.5, "impostor_pairs": 10.0},
            "verification": {"threshold": 0.7},
        }
    )
    assert document == {
        "validation": {"map@r": 0.4},
        "test": {"map@r": 0.5},
        "verification": {"threshold": 0.7},
        "meta": {"validation": {"kmeans/seed": 0}, "test": {"impostor_pairs": 10}},
    }
    assert metrics_document(document) == document
