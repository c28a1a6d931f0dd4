"""MultiSimilarityLoss (Wang et al. 2019) with its mining: reference loop, PML parity, dtypes."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from mbdl.functional.multisimilarity import (
    cosine_similarity,
    log_one_plus_sum_exp,
    multisimilarity_loss,
    multisimilarity_mining,
)
from mbdl.functional.pairs import pair_masks
from mbdl.losses import MultiSimilarityLoss
from reference_losses_b import LAYOUTS, batch, ref_multisimilarity


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [2, 5, 16, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed, batch_size, layout):
    x, labels = batch(seed, batch_size, layout)
    for params in ({}, {"alpha": 1.0, "beta": 10.0, "base": 0.2, "epsilon": 0.5}):
        got = multisimilarity_loss(x, labels, **params)
        assert got.dtype == torch.float64
        expected = ref_multisimilarity(x, labels, **params)
        assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("layout", ["p_by_k", "random"])
@pytest.mark.parametrize("batch_size", [4, 16, 64])
@pytest.mark.parametrize("epsilon", [0.1, 0.5])
def test_parity_with_pml(batch_size, layout, epsilon):
    x, labels = batch(13, batch_size, layout, dim=8)
    pairs = pml_miners.MultiSimilarityMiner(epsilon=epsilon)(x, labels)
    expected = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(x, labels, pairs)
    got = MultiSimilarityLoss(epsilon=epsilon)(x, labels)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_mining_matches_pml_miner():
    x, labels = batch(3, 32, "p_by_k", dim=8)
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(epsilon=0.1)(x, labels)
    positive, negative = pair_masks(labels)
    kept_pos, kept_neg = multisimilarity_mining(cosine_similarity(x), positive, negative, 0.1)

    def as_set(rows, cols):
        return set(zip(rows.tolist(), cols.tolist(), strict=True))

    assert as_set(*kept_pos.nonzero(as_tuple=True)) == as_set(a1, p)
    assert as_set(*kept_neg.nonzero(as_tuple=True)) == as_set(a2, n)
    assert 0 < len(as_set(a1, p)) < int(positive.sum())


def test_log_one_plus_sum_exp_is_stable_and_zero_on_empty_rows():
    logits = torch.tensor([[1000.0, 0.0], [-1000.0, 3.0], [5.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    out = log_one_plus_sum_exp(logits, mask)
    expected = torch.tensor([1000.0, torch.log1p(torch.tensor(3.0).exp()).item(), 0.0])
    torch.testing.assert_close(out, expected.double())


def test_reference_set_matches_reference_loop_and_self_reference():
    x, labels = batch(4, 10, "random")
    ref, ref_labels = batch(5, 14, "random")
    labels, ref_labels = labels % 4, ref_labels % 4
    got = multisimilarity_loss(x, labels, ref, ref_labels, epsilon=0.3)
    expected = ref_multisimilarity(x, labels, ref, ref_labels, epsilon=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    both = torch.cat([ref[:3], x, ref[3:]])
    both_labels = torch.cat([ref_labels[:3], labels, ref_labels[3:]])
    got = multisimilarity_loss(x, labels, both, both_labels, anchor_offset=3)
    expected = ref_multisimilarity(x, labels, both, both_labels, anchor_offset=3)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(
        multisimilarity_loss(x, labels, x, labels, anchor_offset=0), multisimilarity_loss(x, labels)
    )


@pytest.mark.parametrize("layout", ["one_class", "singletons"])
def test_zero_and_differentiable_when_nothing_is_valid(layout):
    x, labels = batch(0, 6, layout)
    x.requires_grad_(True)
    loss = MultiSimilarityLoss()(x, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_gradcheck():
    x, labels = batch(2, 8, "p_by_k", dim=4)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda e: multisimilarity_loss(e, labels, beta=5.0, epsilon=0.5), (x,)
    )
    ref, ref_labels = batch(3, 6, "p_by_k", dim=4)
    ref.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda e, r: multisimilarity_loss(e, labels, r, ref_labels, beta=5.0, epsilon=0.5), (x, ref)
    )


def test_value_errors():
    for bad in ({"alpha": 0.0}, {"beta": -1.0}, {"base": float("nan")}, {"epsilon": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MultiSimilarityLoss(**bad)
