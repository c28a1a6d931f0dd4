from __future__ import annotations

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from mbdl.functional.clustering import contingency_table, normalized_mutual_info, pair_f1
from mbdl.functional.kmeans import kmeans
from mbdl.functional.knn import faiss_available
from reference_metrics import lloyd_reference, nmi_reference, pair_f1_reference

BACKENDS = ["torch", *(["faiss"] if faiss_available() else [])]


def random_clustering(seed, n=80, num_labels=7, num_clusters=9):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, (n,), generator=g) * 3 + 5  # non-contiguous ids
    clusters = torch.randint(0, num_clusters, (n,), generator=g)
    # make the clustering partly agree with the labels
    agree = torch.rand(n, generator=g) < 0.5
    clusters[agree] = labels[agree] % num_clusters
    return labels, clusters


def test_contingency_table():
    labels = torch.tensor([3, 3, 7, 7, 7, 9])
    clusters = torch.tensor([0, 1, 1, 1, 5, 5])
    assert contingency_table(labels, clusters).tolist() == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]


@pytest.mark.parametrize("seed", range(5))
def test_nmi_matches_reference_and_sklearn(seed):
    labels, clusters = random_clustering(seed)
    ours = normalized_mutual_info(labels, clusters)
    assert ours == pytest.approx(nmi_reference(labels.tolist(), clusters.tolist()), abs=1e-12)
    assert ours == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)


def test_nmi_edge_cases_follow_sklearn():
    labels = torch.tensor([0, 0, 1, 1])
    assert normalized_mutual_info(labels, torch.tensor([5, 5, 2, 2])) == pytest.approx(1.0)
    independent = torch.tensor([0, 1, 0, 1])
    assert normalized_mutual_info(labels, independent) == 0.0
    assert normalized_mutual_info_score(labels, independent) == 0.0
    one_cluster = torch.zeros(4, dtype=torch.long)
    assert normalized_mutual_info(labels, one_cluster) == normalized_mutual_info_score(
        labels, one_cluster
    )


@pytest.mark.parametrize("seed", range(5))
def test_pair_f1_matches_pair_enumeration(seed):
    labels, clusters = random_clustering(seed)
    expected = pair_f1_reference(labels.tolist(), clusters.tolist())
    assert pair_f1(labels, clusters) == pytest.approx(expected, abs=1e-12)


def test_pair_f1_edge_cases():
    labels = torch.tensor([0, 0, 1, 1])
    assert pair_f1(labels, torch.tensor([1, 1, 0, 0])) == 1.0
    singletons = torch.arange(4)
    assert (
        pair_f1(labels, singletons)
        == 0.0
        == pair_f1_reference(labels.tolist(), singletons.tolist())
    )
    assert pair_f1(singletons, labels) == 0.0


def blobs(seed, num_classes=6, per_class=20, dim=5):
    g = torch.Generator().manual_seed(seed)
    centres = 20 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(labels.numel(), dim, generator=g), labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_is_deterministic_under_a_seed(backend):
    x, _ = blobs(0, num_classes=10, per_class=15)
    x = x + 8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    a = kmeans(x, 10, seed=3, backend=backend)
    b = kmeans(x, 10, seed=3, backend=backend)
    assert torch.equal(a, b)
    assert a.dtype == torch.long and a.shape == (x.shape[0],)
    assert int(a.min()) >= 0 and int(a.max()) < 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_converges_to_a_lloyd_fixed_point(backend):
    # At convergence each point's cluster has the nearest centroid among the cluster means.
    x, _ = blobs(1, num_classes=6, per_class=20)
    x = x + 10 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assignment = kmeans(x, 6, seed=0, backend=backend, max_iter=200)
    used = torch.unique(assignment)
    means = torch.stack([x[assignment == c].mean(dim=0) for c in used.tolist()])
    nearest = used[torch.cdist(x.double(), means.double()).argmin(dim=1)]
    assert torch.equal(nearest, assignment)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_separates_two_blobs(backend):
    x, labels = blobs(1, num_classes=2, per_class=30)
    for seed in range(3):
        assert normalized_mutual_info(labels, kmeans(x, 2, seed=seed, backend=backend)) == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_torch_kmeans_equals_plain_lloyd(seed):
    # Hamerly's bounds skip work but must give plain Lloyd's assignments.
    x, _ = blobs(seed, num_classes=8, per_class=12, dim=4)
    x = x + 12 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 10))
    for max_iter in (1, 3, 50):
        ours = kmeans(x, 8, seed=seed, backend="torch", max_iter=max_iter)
        start = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:8]
        expected = lloyd_reference(x.double().tolist(), x[start].double().tolist(), max_iter)
        assert ours.tolist() == expected


def test_torch_kmeans_chunked_equals_unchunked():
    x, _ = blobs(2, num_classes=8, per_class=30)
    a = kmeans(x, 8, seed=1, backend="torch", memory_budget_bytes=512)
    b = kmeans(x, 8, seed=1, backend="torch")
    assert torch.equal(a, b)


def test_kmeans_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 11)
    with pytest.raises(ValueError, match="backend"):
        kmeans(x, 2, backend="sklearn")
    with pytest.raises(ValueError, match="max_iter"):
        kmeans(x, 2, max_iter=0)
