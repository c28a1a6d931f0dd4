from __future__ import annotations

import pytest
import torch

from mbdl.functional.knn import blockwise_topk_smallest, faiss_available, knn

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")


def full_matrix_topk(query, gallery, k, distance, exclude_self):
    q, g = query.double(), gallery.double()
    if distance == "euclidean":
        d = torch.cdist(q, g)
    elif distance == "squared_euclidean":
        d = torch.cdist(q, g) ** 2
    else:
        d = 1 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    values, indices = d.topk(k, dim=1, largest=False)
    return d, values, indices


def assert_same_neighbours(d_full, values_ref, dist, idx, exclude_self, atol=1e-4, power=2):
    """Tie-robust: sorted distances agree, and every index returned has the distance returned.

    Compared squared (``power=2``): sqrt amplifies float32 rounding near zero distance
    (duplicates, self); squared euclidean distances are compared as they are (``power=1``).
    """
    torch.testing.assert_close(dist.double() ** power, values_ref**power, atol=atol, rtol=0)
    torch.testing.assert_close(d_full.gather(1, idx) ** power, values_ref**power, atol=atol, rtol=0)
    if exclude_self:
        assert not (idx == torch.arange(idx.shape[0]).unsqueeze(1)).any()
    # indices of a row are distinct
    assert all(len(set(row)) == len(row) for row in idx.tolist())


def _power(distance):
    return 1 if distance == "squared_euclidean" else 2


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("budget", [1, 4_000, 50_000, 2**30])
def test_chunked_knn_equals_full_matrix_topk(distance, budget):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 8, generator=g)
    x[10] = x[20]  # duplicates: ties
    x[30] = x[31] = x[32]
    for k in (1, 7, 300):
        d_full, values, _ = full_matrix_topk(x, x, k, distance, True)
        dist, idx = knn(
            x, None, k, distance=distance, exclude_self=True, memory_budget_bytes=budget
        )
        assert dist.shape == idx.shape == (301, k)
        assert_same_neighbours(d_full, values, dist, idx, True, power=_power(distance))


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_query_gallery_knn(distance):
    g = torch.Generator().manual_seed(1)
    query, gallery = torch.randn(50, 16, generator=g), torch.randn(700, 16, generator=g)
    d_full, values, _ = full_matrix_topk(query, gallery, 5, distance, False)
    for budget in (100, 30_000, 2**30):
        dist, idx = knn(query, gallery, 5, distance=distance, memory_budget_bytes=budget)
        assert_same_neighbours(d_full, values, dist, idx, False, power=_power(distance))


def test_exclude_self_keeps_exact_duplicates():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    dist, idx = knn(x, None, 2, exclude_self=True)
    for i in range(3):
        assert i not in idx[i].tolist()
        assert set(idx[i].tolist()) == {0, 1, 2} - {i}
        assert dist[i].tolist() == [0.0, 0.0]


def test_blockwise_topk_matches_topk_with_ties():
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 50, (40, 64 * 40), generator=g).float()  # many ties
    for k in (1, 3, 10):
        values, idx = blockwise_topk_smallest(scores, k)
        expected, _ = torch.topk(scores, k, dim=1, largest=False)
        assert torch.equal(values, expected)
        assert torch.equal(scores.gather(1, idx), values)
        assert all(len(set(row)) == k for row in idx.tolist())


@needs_faiss
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_faiss_backend_equals_torch_backend(distance, exclude_self):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 12, generator=g)
    x[5] = x[6]
    dist_t, _ = knn(x, None, 6, distance=distance, exclude_self=exclude_self, backend="torch")
    dist_f, idx_f = knn(x, None, 6, distance=distance, exclude_self=exclude_self, backend="faiss")
    power = _power(distance)
    torch.testing.assert_close(dist_f**power, dist_t**power, atol=1e-4, rtol=0)
    d_full, values, _ = full_matrix_topk(x, x, 6, distance, exclude_self)
    assert_same_neighbours(d_full, values, dist_f, idx_f, exclude_self, power=power)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_knn_on_gpu_equals_cpu():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1000, 32, generator=g)
    d_full, values, _ = full_matrix_topk(x, x, 8, "euclidean", True)
    dist, idx = knn(x.cuda(), None, 8, exclude_self=True, memory_budget_bytes=100_000)
    assert dist.is_cuda
    assert_same_neighbours(d_full, values, dist.cpu(), idx.cpu(), True, atol=1e-3)


def test_squared_euclidean_ranks_as_euclidean_and_returns_squared_distances():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(120, 6, generator=g)
    dist, idx = knn(x, None, 9, distance="euclidean", exclude_self=True)
    dist_sq, idx_sq = knn(x, None, 9, distance="squared_euclidean", exclude_self=True)
    assert torch.equal(idx_sq, idx)
    torch.testing.assert_close(dist_sq, dist**2, atol=1e-5, rtol=1e-5)
    huge = x.double() * 1e19  # scaled internally; distances reported in the input's units
    dist_huge, idx_huge = knn(huge, None, 3, distance="squared_euclidean", exclude_self=True)
    assert torch.equal(idx_huge, idx[:, :3])
    torch.testing.assert_close(dist_huge / 1e38, dist_sq[:, :3].double(), rtol=1e-4, atol=1e-6)


def test_knn_errors():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="k=10"):
        knn(x, None, 10, exclude_self=True)
    with pytest.raises(ValueError, match="k=0"):
        knn(x, None, 0)
    with pytest.raises(ValueError, match="distance"):
        knn(x, None, 2, distance="manhattan")
    with pytest.raises(ValueError, match="backend"):
        knn(x, None, 2, backend="annoy")
    with pytest.raises(ValueError, match="exclude_self"):
        knn(x, torch.randn(11, 4), 2, exclude_self=True)
    with pytest.raises(ValueError, match="same width"):
        knn(x, torch.randn(11, 5), 2)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        knn(x, None, 2, memory_budget_bytes=0)
