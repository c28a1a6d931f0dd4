"""ClassBalancedBatchSampler: P x K composition, epoch coverage, determinism, resumption, ranks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mbdl.data import ClassBalancedBatchSampler
from mbdl.data.sampler import max_full_batches
from mbdl.data.splits import ArrayImageDataset


def random_labels(seed: int, num_classes: int = 30, low: int = 1, high: int = 25) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(low, high, size=num_classes)
    labels = np.repeat(rng.permutation(1000)[:num_classes], sizes)  # arbitrary label values
    return labels[rng.permutation(len(labels))]


def assert_p_by_k(batches: list[list[int]], labels: np.ndarray, p: int, k: int) -> None:
    for batch in batches:
        assert len(batch) == p * k
        counts = Counter(labels[batch].tolist())
        assert len(counts) == p
        assert set(counts.values()) == {k}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("p", "k"), [(2, 2), (4, 3), (8, 4)])
def test_batches_are_p_classes_by_k_images(seed: int, p: int, k: int) -> None:
    labels = random_labels(seed)
    sampler = ClassBalancedBatchSampler(labels, p, k, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    assert_p_by_k(batches, labels, p, k)


def test_exact_epoch_uses_every_image_once() -> None:
    # 12 classes x 8 images, K=4: 24 groups, 6 batches of P=4: nothing padded, nothing dropped
    labels = np.repeat(np.arange(12), 8)
    sampler = ClassBalancedBatchSampler(labels, 4, 4, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        used = np.concatenate(list(sampler))
        assert np.array_equal(np.sort(used), np.arange(len(labels)))


@pytest.mark.parametrize("seed", range(5))
def test_epoch_coverage_drops_fewer_than_p_groups(seed: int) -> None:
    labels = random_labels(seed, num_classes=40, low=1, high=12)
    p, k = 8, 4
    sampler = ClassBalancedBatchSampler(labels, p, k, seed=seed)
    counts = np.bincount(np.unique(labels, return_inverse=True)[1])
    groups = np.maximum(1, -(-counts // k))
    assert groups.max() <= sampler.total_batches  # no dominant class here
    assert groups.sum() - len(sampler) * p < p  # fewer than P groups left out
    used = np.concatenate(list(sampler))
    # every image is in some group; at most P - 1 groups (of K images) are left out
    assert len(np.unique(used)) >= len(labels) - (p - 1) * k
    # "about once": an image repeats only to complete its class's last group
    assert np.bincount(used).max() <= k


def test_max_full_batches_is_the_largest_feasible() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(1, 10, size=rng.integers(2, 12))
        p = int(rng.integers(2, len(counts) + 1))
        b = max_full_batches(counts, p)
        assert np.minimum(counts, b).sum() >= b * p
        assert all(np.minimum(counts, c).sum() < c * p for c in range(b + 1, counts.sum() + 1))


def test_dominant_class_is_capped_at_one_group_per_batch() -> None:
    labels = np.concatenate([np.zeros(400, dtype=np.int64), np.repeat(np.arange(1, 6), 4)])
    sampler = ClassBalancedBatchSampler(labels, 3, 4, seed=0)
    # 100 groups of class 0, one of each other class: sum_c min(groups_c, b) >= 3b gives b = 2
    # (b = 3 would need 3 + 5 >= 9); the excess groups of class 0 are left out
    assert len(sampler) == 2
    assert_p_by_k(list(sampler), labels, 3, 4)


def test_small_classes_sampled_with_replacement_by_default() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    sampler = ClassBalancedBatchSampler(labels, 2, 4, seed=0)
    batches = list(sampler)
    assert_p_by_k(batches, labels, 2, 4)
    assert len(batches) == 2
    assert sorted(np.unique(np.concatenate(batches)).tolist()) == list(range(10))
    dropping = ClassBalancedBatchSampler(
        np.array([0, 1, 1, 1, 1, 2, 2, 2, 2]), 2, 4, replacement_for_small_classes=False
    )
    assert 0 not in np.concatenate(list(dropping))
    assert len(dropping) == 1


def test_deterministic_under_seed_and_epoch() -> None:
    labels = random_labels(7)
    first = ClassBalancedBatchSampler(labels, 4, 2, seed=11)
    second = ClassBalancedBatchSampler(labels, 4, 2, seed=11)
    other = ClassBalancedBatchSampler(labels, 4, 2, seed=12)
    first.set_epoch(5)
    second.set_epoch(5)
    other.set_epoch(5)
    assert list(first) == list(second)
    assert list(first) == list(first)  # iterating again repeats the epoch
    assert list(first) != list(other)


def test_set_epoch_changes_order_but_not_length() -> None:
    labels = random_labels(8)
    sampler = ClassBalancedBatchSampler(labels, 4, 2, seed=0)
    epochs = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
        assert len(epochs[-1]) == len(sampler)
    assert all(epochs[i] != epochs[j] for i in range(4) for j in range(i))


def test_start_batch_skips_to_the_tail_of_the_epoch() -> None:
    labels = random_labels(9)
    sampler = ClassBalancedBatchSampler(labels, 4, 3, seed=2, num_replicas=2, rank=1)
    sampler.set_epoch(3)
    full = list(sampler)
    for start in (0, 1, len(full) // 2, len(full)):
        sampler.set_epoch(3, start_batch=start)
        assert list(sampler) == full[start:]
    sampler.set_epoch(4)
    assert len(list(sampler)) == len(sampler)
    with pytest.raises(ValueError, match="start_batch"):
        sampler.set_epoch(0, start_batch=len(sampler) + 1)


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_get_disjoint_batches_of_equal_number(replicas: int) -> None:
    labels = np.repeat(np.arange(20), 8)  # no padding: images are disjoint iff batches are
    samplers = [
        ClassBalancedBatchSampler(labels, 4, 4, seed=5, num_replicas=replicas, rank=r)
        for r in range(replicas)
    ]
    single = ClassBalancedBatchSampler(labels, 4, 4, seed=5)
    assert len({len(s) for s in samplers}) == 1
    assert len(samplers[0]) == len(single) // replicas
    for epoch in (0, 1):
        per_rank = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            per_rank.append(np.concatenate(list(sampler)))
        used = np.concatenate(per_rank)
        assert len(np.unique(used)) == len(used)  # no image on two ranks (or twice)


def test_accepts_tensor_labels_and_feeds_a_dataloader() -> None:
    labels = np.repeat(np.arange(6), 5)
    images = np.random.default_rng(0).integers(0, 256, size=(30, 8, 8), dtype=np.uint8)
    dataset = ArrayImageDataset(images, labels, [str(c) for c in range(6)])
    dataset.transform = lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32))
    sampler = ClassBalancedBatchSampler(torch.as_tensor(labels), 3, 2, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    batches = list(loader)
    assert len(batches) == len(sampler) == len(loader)
    x, y = batches[0]
    assert x.shape == (6, 8, 8)
    assert sorted(Counter(y.tolist()).values()) == [2, 2, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes_per_batch": 5}, "at least classes_per_batch=5 classes"),
        ({"samples_per_class": 1}, r"samples_per_class \(K\)"),
        ({"classes_per_batch": 1}, r"classes_per_batch \(P\)"),
        ({"num_replicas": 2, "rank": 2}, "rank must be in 0..1"),
        ({"rank": -1}, "rank must be"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"num_replicas": 50}, "fewer than num_replicas"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, message: str) -> None:
    args = {"classes_per_batch": 2, "samples_per_class": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        ClassBalancedBatchSampler(np.repeat(np.arange(4), 3), **args)


def test_bad_labels_raise_value_error() -> None:
    with pytest.raises(ValueError, match="integers"):
        ClassBalancedBatchSampler(np.array([0.0, 1.0, 0.0, 1.0]), 2, 2)
    with pytest.raises(ValueError, match="one-dimensional"):
        ClassBalancedBatchSampler(np.zeros((4, 2), dtype=np.int64), 2, 2)
    with pytest.raises(ValueError, match="with >= 4 images"):
        ClassBalancedBatchSampler(
            np.array([0, 0, 0, 0, 1, 1]), 2, 4, replacement_for_small_classes=False
        )
