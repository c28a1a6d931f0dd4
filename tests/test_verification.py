from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from mbdl.functional.verification import (
    equal_error_rate,
    far_name,
    pair_distances,
    paired_distances,
    rates_at_threshold,
    threshold_at_far,
    verification_metrics,
    verification_pairs,
)


def clustered(seed=0, num_classes=8, per_class=7, dim=6, noise=1.5):
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + noise * torch.randn(labels.numel(), dim, generator=g), labels


def brute_force_pairs(x, labels, query=None, query_labels=None):
    """Every pair by a plain loop: (genuine distances, impostor distances)."""
    genuine, impostor = [], []
    if query is None:
        pairs = itertools.combinations(range(len(labels)), 2)
        rows = [(x[i], labels[i], x[j], labels[j]) for i, j in pairs]
    else:
        rows = [
            (query[i], query_labels[i], x[j], labels[j])
            for i in range(len(query_labels))
            for j in range(len(labels))
        ]
    for a, la, b, lb in rows:
        d = math.sqrt(sum((float(u) - float(v)) ** 2 for u, v in zip(a, b, strict=True)))
        (genuine if int(la) == int(lb) else impostor).append(d)
    return sorted(genuine), sorted(impostor)


def brute_force_tar_at_far(genuine, impostor, far):
    """Scan every candidate threshold (each distance, and below all): best TAR with FAR <= far."""
    best = (0.0, -math.inf)
    for t in [-math.inf, *genuine, *impostor]:
        fa = sum(d <= t for d in impostor) / len(impostor)
        ta = sum(d <= t for d in genuine) / len(genuine)
        if fa <= far and (ta, t) > best:
            best = (ta, t)
    return best


@pytest.mark.parametrize("seed", range(3))
def test_all_pairs_match_a_brute_force_enumeration(seed):
    x, labels = clustered(seed)
    genuine, impostor, exhaustive = pair_distances(x, labels)
    assert exhaustive
    ref_genuine, ref_impostor = brute_force_pairs(x.tolist(), labels.tolist())
    assert torch.allclose(torch.sort(genuine)[0], torch.tensor(ref_genuine, dtype=torch.float64))
    assert torch.allclose(torch.sort(impostor)[0], torch.tensor(ref_impostor, dtype=torch.float64))


def test_query_gallery_pairs_match_a_brute_force_enumeration():
    x, labels = clustered(4)
    query, query_labels = x[::4], labels[::4]
    genuine, impostor, _ = pair_distances(
        x, labels, query_embeddings=query, query_labels=query_labels
    )
    ref_genuine, ref_impostor = brute_force_pairs(
        x.tolist(), labels.tolist(), query.tolist(), query_labels.tolist()
    )
    assert torch.allclose(torch.sort(genuine)[0], torch.tensor(ref_genuine, dtype=torch.float64))
    assert torch.allclose(torch.sort(impostor)[0], torch.tensor(ref_impostor, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
def test_tar_at_far_matches_a_threshold_scan_and_sklearn_roc(seed):
    x, labels = clustered(seed, num_classes=12, per_class=9)
    genuine, impostor, _ = pair_distances(x, labels)
    fars = (0.2, 0.05, 1e-2, 1e-3)
    metrics = verification_metrics(genuine, impostor, fars)
    scores = -torch.cat([genuine, impostor]).numpy()
    truth = np.r_[np.ones(genuine.numel()), np.zeros(impostor.numel())]
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    for far in fars:
        name = far_name(far)
        tar = metrics[f"tar@far={name}"]
        assert tar == pytest.approx(tpr[fpr <= far].max(), abs=1e-12)
        ref_tar, _ = brute_force_tar_at_far(genuine.tolist(), impostor.tolist(), far)
        assert tar == pytest.approx(ref_tar, abs=1e-12)
        threshold = metrics[f"threshold@far={name}"]
        assert rates_at_threshold(genuine, impostor, threshold) == pytest.approx(
            (tar, metrics[f"far@far={name}"]), abs=1e-12
        )
        assert metrics[f"far@far={name}"] <= far
        # the threshold is the largest with FAR <= far: the next impostor distance breaks it
        next_impostor = impostor[impostor > threshold].min()
        assert rates_at_threshold(genuine, impostor, float(next_impostor))[1] > far


def test_ties_between_genuine_and_impostor_distances():
    genuine = torch.tensor([0.1, 0.5, 0.5, 0.9])
    impostor = torch.tensor([0.5, 0.7, 0.8, 1.0])
    metrics = verification_metrics(genuine, impostor, (0.25, 0.5))
    # FAR <= 0.25 allows one impostor, the one at 0.5, and accepting it accepts the tied
    # genuine pairs too; FAR <= 0.5 adds the impostor at 0.7, but no genuine pair
    assert metrics["tar@far=0.25"] == 0.75 and metrics["far@far=0.25"] == 0.25
    assert 0.5 <= metrics["threshold@far=0.25"] < 0.7
    assert metrics["tar@far=5e-1"] == 0.75 and metrics["far@far=5e-1"] == 0.5
    assert far_name(1e-3) == "1e-3" and far_name(1e-4) == "1e-4"


def test_far_below_one_over_the_impostor_count_accepts_no_impostor():
    genuine = torch.tensor([0.1, 0.2, 0.6], dtype=torch.float64)
    impostor = torch.tensor([0.3, 0.4, 0.5], dtype=torch.float64)
    metrics = verification_metrics(genuine, impostor, (1e-2,))
    assert metrics["far@far=1e-2"] == 0.0
    assert metrics["tar@far=1e-2"] == pytest.approx(2 / 3)
    assert 0.2 <= metrics["threshold@far=1e-2"] < 0.3
    assert threshold_at_far(genuine, impostor, 1e-2) == metrics["threshold@far=1e-2"]


@pytest.mark.parametrize("seed", range(3))
def test_eer_matches_a_threshold_scan_and_sklearn_roc(seed):
    x, labels = clustered(seed, num_classes=10, per_class=6, noise=2.5)
    genuine, impostor, _ = pair_distances(x, labels)
    eer, threshold = equal_error_rate(genuine, impostor)
    best = None
    for t in sorted(set(genuine.tolist()) | set(impostor.tolist())):
        fa = sum(d <= t for d in impostor.tolist()) / impostor.numel()
        fr = sum(d > t for d in genuine.tolist()) / genuine.numel()
        if best is None or abs(fa - fr) < best[0]:
            best = (abs(fa - fr), (fa + fr) / 2, t)
    assert best is not None
    assert eer == pytest.approx(best[1], abs=1e-12) and threshold == best[2]
    scores = -torch.cat([genuine, impostor]).numpy()
    truth = np.r_[np.ones(genuine.numel()), np.zeros(impostor.numel())]
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    i = np.argmin(np.abs(fpr - (1 - tpr)))
    assert eer == pytest.approx((fpr[i] + 1 - tpr[i]) / 2, abs=1e-12)


def test_separated_classes_verify_perfectly():
    x, labels = clustered(0, noise=0.01)
    metrics = verification_metrics(*pair_distances(x, labels)[:2])
    assert metrics["eer"] == 0.0
    assert metrics["tar@far=1e-2"] == metrics["tar@far=1e-4"] == 1.0


def test_sampled_pairs_are_seeded_uniform_and_of_the_right_kind():
    labels = torch.arange(50).repeat_interleave(20)  # 9,500 genuine, 490,000 impostor pairs
    ga, gb, ia, ib, exhaustive = verification_pairs(labels, max_pairs=4000, seed=3)
    assert not exhaustive
    assert ga.numel() == 4000 and ia.numel() == 4000
    assert bool((labels[ga] == labels[gb]).all()) and bool((ga != gb).all())
    assert bool((labels[ia] != labels[ib]).all())
    again = verification_pairs(labels, max_pairs=4000, seed=3)
    assert all(torch.equal(u, v) for u, v in zip((ga, gb, ia, ib), again[:4], strict=True))
    # every class appears about equally often among the genuine pairs (equal class sizes)
    counts = torch.bincount(labels[ga], minlength=50).double()
    assert float(counts.min()) > 0.4 * 80 and float(counts.max()) < 2.0 * 80
    # genuine pairs fewer than max_pairs are all enumerated, impostors still sampled
    ga, gb, ia, _, exhaustive = verification_pairs(labels, max_pairs=20_000, seed=0)
    assert ga.numel() == 9500 and ia.numel() == 20_000 and not exhaustive
    assert len(set(zip(ga.tolist(), gb.tolist(), strict=True))) == 9500


def test_sampled_query_gallery_pairs():
    gallery_labels = torch.arange(30).repeat_interleave(10)
    query_labels = torch.arange(35).repeat_interleave(3)  # classes 30-34 absent from the gallery
    ga, gb, ia, ib, _ = verification_pairs(gallery_labels, query_labels, max_pairs=500, seed=0)
    assert bool((query_labels[ga] == gallery_labels[gb]).all())
    assert bool((query_labels[ia] != gallery_labels[ib]).all())
    assert int(query_labels[ga].max()) < 30


def test_huge_and_half_precision_embeddings():
    x, labels = clustered(1)
    reference = verification_metrics(*pair_distances(x, labels)[:2])
    huge = verification_metrics(*pair_distances(x * 1e19, labels)[:2])
    assert huge["eer"] == reference["eer"]
    assert huge["threshold@far=1e-2"] == pytest.approx(1e19 * reference["threshold@far=1e-2"])
    assert math.isfinite(
        verification_metrics(*pair_distances(x.double() * 1e200, labels)[:2])["eer_threshold"]
    )
    half = verification_metrics(*pair_distances(x.bfloat16(), labels)[:2])
    assert abs(half["eer"] - reference["eer"]) < 0.05


def test_paired_distances_kinds():
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(paired_distances(a, b), (a - b).norm(dim=1).double())
    assert torch.allclose(
        paired_distances(a, b, "squared_euclidean"), (a - b).pow(2).sum(1).double(), atol=1e-5
    )
    cos = torch.nn.functional.cosine_similarity(a, b).double()
    assert torch.allclose(paired_distances(a, b, "cosine"), 1 - cos, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="genuine pairs"):
        verification_pairs(torch.arange(5))
    with pytest.raises(ValueError, match="impostor pairs"):
        verification_pairs(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="FAR"):
        verification_metrics(torch.tensor([0.1]), torch.tensor([0.2]), (0.0,))
    with pytest.raises(ValueError, match="distance"):
        paired_distances(torch.zeros(2, 2), torch.zeros(2, 2), "manhattan")
    with pytest.raises(ValueError, match="max_pairs"):
        verification_pairs(torch.tensor([0, 0, 1]), max_pairs=0)
