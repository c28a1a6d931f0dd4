"""LiftedStructureLoss (Song et al. 2016, eq. 4): reference loop, PML parity, ref sets, dtypes."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from mbdl.functional.lifted import lifted_structure_loss
from mbdl.losses import LiftedStructureLoss
from reference_losses_b import LAYOUTS, batch, ref_lifted


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [2, 5, 16, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed, batch_size, layout):
    x, labels = batch(seed, batch_size, layout)
    for margin in (1.0, 0.3):
        got = lifted_structure_loss(x, labels, margin=margin)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(
            ref_lifted(x, labels, margin=margin), rel=1e-9, abs=1e-12
        )


def test_unnormalised_matches_reference_loop():
    x, labels = batch(3, 12, "p_by_k")
    got = lifted_structure_loss(x, labels, margin=2.0, normalize=False)
    assert got.item() == pytest.approx(ref_lifted(x, labels, margin=2.0, normalize=False), rel=1e-9)


@pytest.mark.parametrize("layout", ["p_by_k", "random", "singletons"])
@pytest.mark.parametrize("batch_size", [4, 16, 48])
def test_parity_with_pml(batch_size, layout):
    x, labels = batch(7, batch_size, layout, dim=8)
    expected = pml_losses.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.0)(x, labels)
    got = LiftedStructureLoss(margin=1.0)(x, labels)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_reference_set_matches_reference_loop_and_self_reference():
    x, labels = batch(4, 10, "random")
    ref, ref_labels = batch(5, 14, "random")
    ref_labels = ref_labels % 4
    labels = labels % 4
    got = lifted_structure_loss(x, labels, ref, ref_labels)
    assert got.item() == pytest.approx(ref_lifted(x, labels, ref, ref_labels), rel=1e-9)
    # the batch embedded in a bigger reference set at an offset
    both = torch.cat([ref[:3], x, ref[3:]])
    both_labels = torch.cat([ref_labels[:3], labels, ref_labels[3:]])
    got = lifted_structure_loss(x, labels, both, both_labels, anchor_offset=3)
    expected = ref_lifted(x, labels, both, both_labels, anchor_offset=3)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # the batch as its own reference set is the plain loss
    same = lifted_structure_loss(x, labels, x, labels, anchor_offset=0)
    torch.testing.assert_close(same, lifted_structure_loss(x, labels))


def test_reference_set_gradients_reach_both_sets():
    x, labels = batch(4, 8, "p_by_k")
    ref, ref_labels = batch(5, 8, "p_by_k")
    x.requires_grad_(True)
    ref.requires_grad_(True)
    lifted_structure_loss(x, labels, ref, ref_labels).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert ref.grad is not None and ref.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["one_class", "singletons"])
def test_zero_and_differentiable_when_nothing_is_valid(layout):
    x, labels = batch(0, 6, layout)
    x.requires_grad_(True)
    loss = LiftedStructureLoss()(x, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_value_errors():
    with pytest.raises(ValueError, match="margin"):
        LiftedStructureLoss(margin=float("nan"))
