"""ContrastiveLoss: against a plain-Python loop and pytorch-metric-learning's ContrastiveLoss."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses

from mbdl.functional.contrastive import (
    contrastive_from_distances,
    contrastive_loss,
    contrastive_terms,
    mean_of_nonzero,
)
from mbdl.functional.pairs import pair_masks
from mbdl.losses import ContrastiveLoss
from reference_losses import LAYOUTS, make_labels, ref_contrastive

DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def _batch(seed: int, batch_size: int, layout: str, dim: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, dim, generator=g, dtype=dtype)
    return x, make_labels(layout, batch_size, g)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [2, 5, 16, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed, batch_size, layout):
    x, labels = _batch(seed, batch_size, layout)
    options = {"pos_margin": 0.3, "neg_margin": 1.2}
    got = contrastive_loss(x, labels, **options)
    assert got.item() == pytest.approx(ref_contrastive(x, labels, **options), abs=1e-6)


@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
def test_matches_reference_loop_other_distances(distance):
    for seed, layout in enumerate(LAYOUTS):
        x, labels = _batch(seed, 16, layout)
        options = {"pos_margin": 0.1, "neg_margin": 0.8, "distance": distance}
        got = contrastive_loss(x, labels, **options)
        assert got.item() == pytest.approx(ref_contrastive(x, labels, **options), abs=1e-6)


def test_matches_reference_with_ref_emb_and_offset():
    x, labels = _batch(0, 10, "random")
    memory, memory_labels = _batch(1, 14, "random")
    got = contrastive_loss(x, labels, memory, memory_labels)
    assert got.item() == pytest.approx(ref_contrastive(x, labels, memory, memory_labels), abs=1e-6)
    ref, ref_labels = torch.cat([memory, x]), torch.cat([memory_labels, labels])
    got = contrastive_loss(x, labels, ref, ref_labels, anchor_offset=14)
    expected = ref_contrastive(x, labels, ref, ref_labels, anchor_offset=14)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def _pml_distance(distance: str):
    if distance == "euclidean":
        return pml_distances.LpDistance(normalize_embeddings=True, p=2, power=1)
    return pml_distances.LpDistance(normalize_embeddings=True, p=2, power=2)


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("layout", ["p_by_k", "random"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_with_pytorch_metric_learning(seed, layout, distance):
    x, labels = _batch(seed, 48, layout, dim=8)
    ours_x, pml_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = ContrastiveLoss(pos_margin=0.1, neg_margin=0.9, distance=distance)(ours_x, labels)
    theirs = pml_losses.ContrastiveLoss(
        pos_margin=0.1, neg_margin=0.9, distance=_pml_distance(distance)
    )(pml_x, labels)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(ours_x.grad, pml_x.grad, rtol=1e-7, atol=1e-10)


def test_parity_with_pytorch_metric_learning_defaults_and_ref_emb():
    x, labels = _batch(4, 32, "random", dim=8)
    ref, ref_labels = _batch(5, 40, "random", dim=8)
    ours = ContrastiveLoss()(x, labels, ref, ref_labels)
    theirs = pml_losses.ContrastiveLoss()(x, labels, ref_emb=ref, ref_labels=ref_labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)


def test_parity_with_pytorch_metric_learning_cosine():
    # ours: D = 1 - cos; PML: similarity s = cos, margins on s. [D - a]_+ = [(1 - a) - s]_+.
    x, labels = _batch(6, 40, "p_by_k", dim=8)
    ours = ContrastiveLoss(pos_margin=0.1, neg_margin=0.7, distance="cosine")(x, labels)
    theirs = pml_losses.ContrastiveLoss(
        pos_margin=0.9, neg_margin=0.3, distance=pml_distances.CosineSimilarity()
    )(x, labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)


def test_fp32_parity_with_pytorch_metric_learning_at_a_training_batch_size():
    x, labels = _batch(7, 256, "p_by_k", dim=64, dtype=torch.float32)
    ours = ContrastiveLoss()(x, labels)
    theirs = pml_losses.ContrastiveLoss()(x, labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)


def test_fused_form_equals_autograd_through_the_readable_form():
    g = torch.Generator().manual_seed(0)
    labels, ref_labels = (
        torch.randint(0, 3, (10,), generator=g),
        torch.randint(0, 3, (17,), generator=g),
    )
    dist = 1.5 * torch.rand(10, 17, generator=g, dtype=torch.float64)
    positive, negative = pair_masks(labels, ref_labels)
    fused_dist, plain_dist = dist.clone().requires_grad_(), dist.clone().requires_grad_()
    fused = contrastive_from_distances(
        fused_dist, positive, negative, pos_margin=0.4, neg_margin=0.9
    )
    pos_terms, neg_terms = contrastive_terms(
        plain_dist, positive, negative, pos_margin=0.4, neg_margin=0.9
    )
    plain = mean_of_nonzero(pos_terms) + mean_of_nonzero(neg_terms)
    fused.backward()
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), abs=1e-12)
    torch.testing.assert_close(fused_dist.grad, plain_dist.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck(distance):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])

    def loss(e):
        return contrastive_loss(e, labels, pos_margin=0.05, neg_margin=1.0, distance=distance)

    assert loss(x).item() > 0
    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-5)


def test_no_non_zero_pair_gives_a_connected_zero():
    # singletons far apart (orthogonal, D = sqrt(2) > neg_margin): no positive, no active negative
    x = torch.eye(5, dtype=torch.float32).requires_grad_()
    loss = contrastive_loss(x, torch.arange(5), neg_margin=1.0)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("distance", DISTANCES)
def test_duplicates_zero_vectors_and_one_class_are_finite(distance):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    x = torch.cat([base, base, torch.zeros(2, 6)]).requires_grad_()
    loss = contrastive_loss(x, torch.tensor([0, 1, 2, 3, 0, 1, 3, 2, 0, 1]), distance=distance)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    y = torch.randn(6, 4, generator=g).requires_grad_()
    loss = contrastive_loss(y, torch.zeros(6, dtype=torch.long), distance=distance)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(y.grad).all()


def test_module_options():
    for bad in ({"pos_margin": math.nan}, {"neg_margin": math.inf}):
        with pytest.raises(ValueError, match="margin"):
            ContrastiveLoss(**bad)
    with pytest.raises(ValueError, match="distance"):
        ContrastiveLoss(distance="l1")
    x, labels = _batch(0, 4, "p_by_k")
    with pytest.raises(ValueError, match="neg_margin"):
        contrastive_loss(x, labels, neg_margin=math.nan)
