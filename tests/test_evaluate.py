from __future__ import annotations

import pytest
import torch

import mbdl.evaluate as evaluate_module
from mbdl.evaluate import embed_dataset, evaluate
from mbdl.functional.clustering import normalized_mutual_info, pair_f1
from mbdl.functional.kmeans import kmeans


def clustered(seed=0, num_classes=10, per_class=6, dim=8, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + noise * torch.randn(labels.numel(), dim, generator=g), labels


def test_all_metrics_by_default():
    x, labels = clustered()
    result = evaluate(x, labels)
    expected = {"recall@1", "recall@2", "recall@4", "recall@8", "precision@1", "r_precision"}
    assert set(result) == expected | {"map@r", "nmi", "f1"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in result.values())
    assert result["recall@1"] == result["precision@1"]
    assert result["recall@1"] <= result["recall@2"] <= result["recall@4"] <= result["recall@8"]


def test_nmi_and_f1_come_from_one_seeded_kmeans_on_the_gallery():
    x, labels = clustered(1)
    result = evaluate(x, labels, metrics=["nmi", "f1"], seed=4)
    clusters = kmeans(x, 10, seed=4)
    assert result == {
        "nmi": normalized_mutual_info(labels, clusters),
        "f1": pair_f1(labels, clusters),
    }
    assert evaluate(x, labels, metrics=["nmi", "f1"], seed=4) == result


def test_subset_skips_kmeans(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("k-means must not run for retrieval-only metrics")

    monkeypatch.setattr(evaluate_module, "kmeans", fail)
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
