"""NPairLoss (Sohn 2016): reference loop, PML NPairsLoss parity, pair selection, ref sets, dtypes."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import regularizers as pml_regularizers

from mbdl.functional.npair import npair_indices, npair_loss
from mbdl.losses import NPairLoss
from reference_losses_b import LAYOUTS, batch, ref_npair


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [2, 5, 16, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed, batch_size, layout):
    x, labels = batch(seed, batch_size, layout)
    for l2_reg in (0.02, 0.0):
        got = npair_loss(x, labels, l2_reg=l2_reg)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(ref_npair(x, labels, l2_reg=l2_reg), rel=1e-9, abs=1e-12)


def test_pair_selection_is_first_and_second_item_of_each_class():
    labels = torch.tensor([5, 2, 5, 7, 2, 2, 9, 5])
    anchors, positives = npair_indices(labels)
    # classes in label order 2, 5, (7 and 9 have no pair)
    assert anchors.tolist() == [1, 0]
    assert positives.tolist() == [4, 2]


@pytest.mark.parametrize("layout", ["p_by_k", "random"])
@pytest.mark.parametrize("batch_size", [4, 16, 64])
def test_parity_with_pml(batch_size, layout):
    x, labels = batch(11, batch_size, layout, dim=8)
    pml = pml_losses.NPairsLoss(
        distance=pml_distances.DotProductSimilarity(normalize_embeddings=False),
        embedding_regularizer=pml_regularizers.LpRegularizer(p=2, power=2),
        embedding_reg_weight=0.02,
    )
    torch.testing.assert_close(
        NPairLoss(l2_reg=0.02)(x, labels), pml(x, labels), rtol=1e-9, atol=1e-12
    )


def test_reference_set_matches_reference_loop_and_self_reference():
    x, labels = batch(4, 10, "random")
    ref, ref_labels = batch(5, 14, "random")
    labels, ref_labels = labels % 4, ref_labels % 4
    got = npair_loss(x, labels, ref, ref_labels)
    assert got.item() == pytest.approx(ref_npair(x, labels, ref, ref_labels), rel=1e-9)
    both = torch.cat([ref[:3], x, ref[3:]])
    both_labels = torch.cat([ref_labels[:3], labels, ref_labels[3:]])
    got = npair_loss(x, labels, both, both_labels, anchor_offset=3)
    expected = ref_npair(x, labels, both, both_labels, anchor_offset=3)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(
        npair_loss(x, labels, x, labels, anchor_offset=0), npair_loss(x, labels)
    )


@pytest.mark.parametrize("layout", ["singletons"])
def test_zero_and_differentiable_when_no_class_has_a_pair(layout):
    x, labels = batch(0, 6, layout)
    x.requires_grad_(True)
    loss = NPairLoss()(x, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_value_errors():
    with pytest.raises(ValueError, match="l2_reg"):
        NPairLoss(l2_reg=-1.0)
