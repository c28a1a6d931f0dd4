from __future__ import annotations

import numpy as np
import pytest
import torch

from mbdl.evaluate import evaluate
from mbdl.functional.retrieval import map_at_r, precision_at_1, r_precision, recall_at_k
from reference_metrics import retrieval_reference

RETRIEVAL = ["recall", "precision@1", "r_precision", "map@r"]


def make_set(seed, num_classes=12, dim=6, noise=1.2):
    """Random clustered data with classes of 1 to 9 items and exact duplicates within classes."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 10, (num_classes,), generator=g)
    sizes[0] = 1  # a class of one item (R = 0 in leave-one-out)
    labels = torch.arange(num_classes).repeat_interleave(sizes)
    centres = torch.randn(num_classes, dim, generator=g)
    x = centres[labels] + noise * torch.randn(labels.numel(), dim, generator=g)
    # duplicates: ties, including a query's own duplicate (self must be excluded by index only)
    same = (labels == labels[1]).nonzero().flatten()
    x[same[-1]] = x[same[0]]
    big = int(torch.argmax(sizes))
    members = (labels == big).nonzero().flatten()
    x[members[1]] = x[members[0]]
    x[members[2]] = x[members[0]]
    perm = torch.randperm(labels.numel(), generator=g)
    return x[perm], labels[perm]


def test_per_query_functions_on_a_hand_made_ranking():
    # query class matches at ranks 1, 3, 4; R = 3
    matches = torch.tensor([[True, False, True, True, False]])
    r = torch.tensor([3])
    assert recall_at_k(matches, 1).item() == 1.0
    assert recall_at_k(matches, 2).item() == 1.0
    assert precision_at_1(matches).item() == 1.0
    assert r_precision(matches, r).item() == pytest.approx(2 / 3)
    assert map_at_r(matches, r).item() == pytest.approx((1 / 1 + 2 / 3) / 3)
    misses_first = torch.tensor([[False, True, True]])
    assert recall_at_k(misses_first, 1).item() == 0.0
    assert map_at_r(misses_first, torch.tensor([2])).item() == pytest.approx((1 / 2) / 2)
    with pytest.raises(ValueError, match="max R"):
        r_precision(matches, torch.tensor([6]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_leave_one_out_matches_reference_loops(seed, distance):
    x, labels = make_set(seed)
    ks = [1, 2, 4, 8, 16]  # 16 > every class size
    ours = evaluate(
        x, labels, ks=ks, metrics=RETRIEVAL, distance=distance, memory_budget_bytes=4096
    )
    ref = retrieval_reference(x.double().tolist(), labels.tolist(), ks, distance=distance)
    assert set(ours) == set(ref)
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_query_gallery_matches_reference_loops(backend):
    x, labels = make_set(5, num_classes=15)
    gallery, gallery_labels = x[::2], labels[::2]
    queries, query_labels = x[1::2], labels[1::2]  # some query classes absent from the gallery
    ks = [1, 3, 10]
    ours = evaluate(
        gallery,
        gallery_labels,
        query_embeddings=queries,
        query_labels=query_labels,
        ks=ks,
        metrics=RETRIEVAL,
        backend=backend,
    )
    ref = retrieval_reference(
        gallery.double().tolist(),
        gallery_labels.tolist(),
        ks,
        queries=queries.double().tolist(),
        query_labels=query_labels.tolist(),
    )
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name


def test_self_excluded_by_index_not_by_dropping_the_first_neighbour():
    # item 0 and item 1 coincide and share a class; item 2 is another class, far away.
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [9.0, 9.0], [9.0, 9.5]])
    labels = torch.tensor([0, 0, 1, 1])
    result = evaluate(x, labels, ks=[1], metrics=RETRIEVAL)
    assert result["precision@1"] == 1.0
    assert result["map@r"] == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_pytorch_metric_learning(seed):
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, labels = make_set(seed, num_classes=20)
    calculator = pml.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
    )
    # PML removes the query by index among its k+1 neighbours (dropping the last one if the
    # query is not there), so duplicates within a class are fine for parity.
    theirs = calculator.get_accuracy(x.numpy(), labels.numpy())
    ours = evaluate(x.numpy(), labels.numpy(), metrics=["precision@1", "r_precision", "map@r"])
    assert ours["precision@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_per_class_keys_average_to_the_overall_result():
    x, labels = make_set(3)
    result = evaluate(x, labels, ks=[1, 2], metrics=RETRIEVAL, per_class=True)
    counts = torch.bincount(labels)
    scored = [c for c in range(len(counts)) if counts[c] > 1]
    for name in ("recall@1", "recall@2", "precision@1", "r_precision", "map@r"):
        per_class = {c: result[f"{name}/class={c}"] for c in scored}
        assert f"{name}/class=0" not in result  # class 0 has one item: no scored query
        weighted = sum(per_class[c] * int(counts[c]) for c in scored) / sum(
            int(counts[c]) for c in scored
        )
        assert weighted == pytest.approx(result[name], abs=1e-12)
    assert all(isinstance(v, float) for v in result.values())


def test_numpy_and_half_inputs_agree():
    x, labels = make_set(4)
    a = evaluate(x, labels, metrics=RETRIEVAL)
    b = evaluate(x.numpy(), np.asarray(labels.numpy(), dtype=np.int32), metrics=RETRIEVAL)
    assert a == b
    c = evaluate(x.half(), labels, metrics=["recall@1"])
    assert set(c) == {"recall@1"}
