"""TripletMarginLoss: against a plain-Python loop and pytorch-metric-learning (all triplets,
BatchHardMiner, TripletMarginMiner("semihard"))."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from mbdl.functional.triplet import MINING, triplet_margin_loss
from mbdl.losses import TripletMarginLoss
from reference_losses import LAYOUTS, make_labels, ref_triplet

DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def _batch(seed: int, batch_size: int, layout: str, dim: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, dim, generator=g, dtype=dtype)
    return x, make_labels(layout, batch_size, g)


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [2, 5, 16, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed, batch_size, layout, mining):
    x, labels = _batch(seed, batch_size, layout)
    got = triplet_margin_loss(x, labels, margin=0.3, mining=mining)
    expected = ref_triplet(x, labels, margin=0.3, mining=mining)
    assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
def test_matches_reference_loop_other_distances(distance, mining):
    for seed, layout in enumerate(LAYOUTS):
        x, labels = _batch(seed, 16, layout)
        got = triplet_margin_loss(x, labels, margin=0.3, mining=mining, distance=distance)
        expected = ref_triplet(x, labels, margin=0.3, mining=mining, distance=distance)
        assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("margin", [0.0, 0.05, 1.0])
def test_matches_reference_loop_margins(margin, mining):
    for seed in range(3):
        x, labels = _batch(seed, 24, "random")
        got = triplet_margin_loss(x, labels, margin=margin, mining=mining)
        expected = ref_triplet(x, labels, margin=margin, mining=mining)
        assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("mining", MINING)
def test_matches_reference_with_ref_emb_and_offset(mining):
    x, labels = _batch(0, 10, "random")
    memory, memory_labels = _batch(1, 14, "random")
    got = triplet_margin_loss(x, labels, memory, memory_labels, mining=mining)
    expected = ref_triplet(x, labels, memory, memory_labels, mining=mining)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    ref, ref_labels = torch.cat([x, memory]), torch.cat([labels, memory_labels])
    got = triplet_margin_loss(x, labels, ref, ref_labels, mining=mining, anchor_offset=0)
    expected = ref_triplet(x, labels, ref, ref_labels, mining=mining, anchor_offset=0)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def _pml(mining: str, margin: float, distance: str):
    pml_distance = {
        "euclidean": pml_distances.LpDistance(normalize_embeddings=True, p=2, power=1),
        "squared_euclidean": pml_distances.LpDistance(normalize_embeddings=True, p=2, power=2),
    }[distance]
    loss = pml_losses.TripletMarginLoss(margin=margin, distance=pml_distance)
    miner = {
        "all": None,
        "batch_hard": pml_miners.BatchHardMiner(distance=pml_distance),
        "semi_hard": pml_miners.TripletMarginMiner(
            margin=margin, type_of_triplets="semihard", distance=pml_distance
        ),
    }[mining]

    def call(x, labels, ref=None, ref_labels=None):
        triplets = None if miner is None else miner(x, labels, ref, ref_labels)
        return loss(x, labels, triplets, ref_emb=ref, ref_labels=ref_labels)

    return call


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("layout", ["p_by_k", "random"])
@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_pytorch_metric_learning(seed, layout, distance, mining):
    x, labels = _batch(seed, 48, layout, dim=8)
    ours_x, pml_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = TripletMarginLoss(margin=0.2, mining=mining, distance=distance)(ours_x, labels)
    theirs = _pml(mining, 0.2, distance)(pml_x, labels)
    ours.backward()
    theirs.backward()
    assert ours.item() > 0
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(ours_x.grad, pml_x.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("mining", MINING)
def test_parity_with_pytorch_metric_learning_ref_emb(mining):
    x, labels = _batch(2, 24, "random", dim=8)
    ref, ref_labels = _batch(3, 40, "random", dim=8)
    ours = triplet_margin_loss(x, labels, ref, ref_labels, mining=mining)
    theirs = _pml(mining, 0.2, "euclidean")(x, labels, ref, ref_labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)


@pytest.mark.parametrize("mining", MINING)
def test_fp32_parity_with_pytorch_metric_learning_at_a_training_batch_size(mining):
    x, labels = _batch(7, 128, "p_by_k", dim=32, dtype=torch.float32)
    ours = triplet_margin_loss(x, labels, mining=mining)
    theirs = _pml(mining, 0.2, "euclidean")(x, labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck(distance, mining):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])

    def loss(e):
        return triplet_margin_loss(e, labels, margin=0.5, mining=mining, distance=distance)

    assert loss(x).item() > 0
    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("mining", MINING)
def test_permutation_and_relabel_invariance(mining):
    x, labels = _batch(0, 30, "random")
    loss = triplet_margin_loss(x, labels, mining=mining)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    permuted = triplet_margin_loss(x[order], labels[order], mining=mining)
    assert permuted.item() == pytest.approx(loss.item(), abs=1e-12)
    assert triplet_margin_loss(x, labels + 99, mining=mining).item() == loss.item()


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("layout", ["one_class", "singletons"])
def test_no_triplet_gives_a_connected_zero(mining, layout):
    x, labels = _batch(0, 12, layout, dtype=torch.float32)
    x.requires_grad_()
    loss = triplet_margin_loss(x, labels, mining=mining)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("mining", MINING)
def test_no_violating_triplet_gives_a_connected_zero(mining):
    x = torch.eye(4).repeat_interleave(2, 0).requires_grad_()  # two exact copies per class
    loss = triplet_margin_loss(x, torch.arange(4).repeat_interleave(2), mining=mining)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("distance", DISTANCES)
def test_duplicates_and_zero_vectors_are_finite(distance, mining):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    x = torch.cat([base, base, torch.zeros(2, 6)]).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 3, 2, 0, 1])
    loss = triplet_margin_loss(x, labels, mining=mining, distance=distance)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, mining):
    x, labels = _batch(0, 32, "p_by_k", dtype=torch.float32)
    half = x.to(dtype).requires_grad_()
    loss = triplet_margin_loss(half, labels, mining=mining)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == dtype
    assert torch.isfinite(half.grad.float()).all() and half.grad.float().abs().sum() > 0
    full = triplet_margin_loss(half.detach().float(), labels, mining=mining)
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)


def test_all_triplets_at_a_large_batch_stays_in_quadratic_memory():
    # B = 1024 gives 1024 * 1023 * ~1000 ~ 1e9 triplets: a B^3 tensor would need gigabytes.
    x, labels = _batch(0, 1024, "p_by_k", dim=16, dtype=torch.float32)
    x.requires_grad_()
    loss = triplet_margin_loss(x, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(x.grad).all()


def test_module_options():
    with pytest.raises(ValueError, match="mining"):
        TripletMarginLoss(mining="hardest")
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="margin"):
            TripletMarginLoss(margin=bad)
    with pytest.raises(ValueError, match="distance"):
        TripletMarginLoss(distance="dot")
    x, labels = _batch(0, 4, "p_by_k")
    with pytest.raises(ValueError, match="mining"):
        triplet_margin_loss(x, labels, mining="easy")
