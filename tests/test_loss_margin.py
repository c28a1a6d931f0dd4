"""MarginLoss (Wu et al. 2017): reference loop, PML parity, the distance-weighted sampler."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from mbdl.functional.distances import loss_distances
from mbdl.functional.margin import distance_weights, margin_loss, sample_negatives
from mbdl.functional.pairs import pair_masks
from mbdl.losses import MarginLoss
from reference_losses_b import (
    LAYOUTS,
    batch,
    ref_distance_weight,
    ref_margin,
)


def _sampled_triplets(x, labels, seed, ref=None, ref_labels=None, anchor_offset=None, **options):
    """The triplets ``margin_loss`` uses under ``Generator().manual_seed(seed)``, rebuilt from
    :func:`sample_negatives` (one drawn negative per positive, in column order)."""
    dist = loss_distances(x, ref, distance="euclidean", normalize=True)
    positive, negative = pair_masks(labels, ref_labels, anchor_offset)
    most = int(positive.sum(dim=1).max())
    if most == 0 or not bool((positive.any(1) & negative.any(1)).any()):
        return []
    g = torch.Generator().manual_seed(seed)
    drawn = sample_negatives(dist, negative, most, x.shape[1], generator=g, **options)
    triplets = []
    for i in range(x.shape[0]):
        if not bool(negative[i].any()):
            continue
        for r, j in enumerate(positive[i].nonzero()[:, 0].tolist()):
            triplets.append((i, j, int(drawn[i, r])))
    return triplets


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [2, 5, 16, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_all_triplets_match_reference_loop(seed, batch_size, layout):
    x, labels = batch(seed, batch_size, layout)
    for beta, nu in ((1.2, 0.0), (0.9, 0.1)):
        got = margin_loss(x, labels, beta=beta, nu=nu, sampling="all")
        expected = ref_margin(x, labels, beta=beta, nu=nu)
        assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [2, 5, 16, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_triplets_match_reference_loop(seed, batch_size, layout):
    x, labels = batch(seed, batch_size, layout, dim=4)  # low dim: many negatives within 1.4
    g = torch.Generator().manual_seed(seed)
    got = margin_loss(x, labels, generator=g)
    expected = ref_margin(x, labels, _sampled_triplets(x, labels, seed))
    assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_per_class_beta_matches_reference_loop():
    x, labels = batch(5, 24, "random")
    beta = [1.0 + 0.05 * c for c in range(int(labels.max()) + 1)]
    got = margin_loss(
        x, labels, beta=torch.tensor(beta, dtype=torch.float64), nu=0.2, sampling="all"
    )
    assert got.item() == pytest.approx(ref_margin(x, labels, beta=beta, nu=0.2), rel=1e-9)


@pytest.mark.parametrize("layout", ["p_by_k", "random"])
@pytest.mark.parametrize("batch_size", [4, 16, 48])
@pytest.mark.parametrize("per_class", [False, True])
def test_parity_with_pml_all_triplets(batch_size, layout, per_class):
    x, labels = batch(17, batch_size, layout, dim=8)
    num_classes = int(labels.max()) + 1 if per_class else None
    ours = MarginLoss(
        alpha=0.2,
        beta=1.1,
        nu=0.05,
        sampling="all",
        beta_per_class=per_class,
        num_classes=num_classes,
    ).double()
    pml = pml_losses.MarginLoss(
        margin=0.2, beta=1.1, nu=0.05, learn_beta=True, num_classes=num_classes
    )
    got, expected = ours(x, labels), pml(x, labels)
    torch.testing.assert_close(got, expected.double(), rtol=1e-6, atol=1e-9)
    if expected.requires_grad:  # PML returns a constant 0 when there is no triplet
        got.backward()
        expected.backward()
        # PML keeps beta in fp32: its gradient carries fp32 rounding
        torch.testing.assert_close(ours.beta.grad, pml.beta.grad.double(), rtol=1e-4, atol=1e-6)
    else:
        assert got.item() == 0.0


def test_reference_set_matches_reference_loop_and_self_reference():
    x, labels = batch(4, 10, "random", dim=4)
    ref, ref_labels = batch(5, 14, "random", dim=4)
    labels, ref_labels = labels % 4, ref_labels % 4
    got = margin_loss(x, labels, ref, ref_labels, sampling="all")
    assert got.item() == pytest.approx(ref_margin(x, labels, None, ref, ref_labels), rel=1e-9)
    both = torch.cat([ref[:3], x, ref[3:]])
    both_labels = torch.cat([ref_labels[:3], labels, ref_labels[3:]])
    got = margin_loss(
        x, labels, both, both_labels, anchor_offset=3, generator=torch.Generator().manual_seed(8)
    )
    triplets = _sampled_triplets(x, labels, 8, both, both_labels, 3)
    expected = ref_margin(x, labels, triplets, both, both_labels, anchor_offset=3)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(
        margin_loss(x, labels, x, labels, anchor_offset=0, sampling="all"),
        margin_loss(x, labels, sampling="all"),
    )


# ---------------------------------------------------------------- the sampler


def test_distance_weights_follow_inverse_sphere_density():
    dim = 16
    d = torch.tensor([[0.2, 0.5, 0.8, 1.0, 1.2, 1.39, 1.41, 1.9, 0.9]], dtype=torch.float64)
    negative = torch.ones_like(d, dtype=torch.bool)
    negative[0, -1] = False
    weights = distance_weights(d, negative, dim, cutoff=0.5, nonzero_loss_cutoff=1.4)[0]
    expected = [ref_distance_weight(v, dim, 0.5, 1.4) for v in d[0].tolist()]
    expected[-1] = 0.0
    top = max(expected)
    torch.testing.assert_close(weights, torch.tensor([e / top for e in expected]).double())
    # clipped below the cutoff, zero beyond nonzero_loss_cutoff and for non-negatives
    assert weights[0] == weights[1] and weights[6] == 0 and weights[8] == 0


def test_sampler_draws_with_the_weights():
    dim = 8
    d = torch.tensor([[0.6, 0.9, 1.1, 1.3, 1.35, 1.5]])
    negative = torch.ones_like(d, dtype=torch.bool)
    n = 200_000
    drawn = sample_negatives(d, negative, n, dim, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn[0], minlength=6).double()
    expected = [ref_distance_weight(v, dim, 0.5, 1.4) for v in d[0].tolist()]
    probs = torch.tensor(expected) / sum(expected)
    assert counts[5] == 0
    sigma = (n * probs * (1 - probs)).sqrt()
    assert bool(((counts - n * probs).abs() <= 5 * sigma + 1).all())


def test_sampler_falls_back_to_uniform_over_negatives():
    d = torch.tensor([[1.5, 1.6, 1.7, 1.8]])
    negative = torch.tensor([[True, False, True, True]])
    drawn = sample_negatives(d, negative, 30_000, 8, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(drawn[0], minlength=4)
    assert counts[1] == 0
    assert counts[[0, 2, 3]].min() > 9_000


def test_sampling_is_deterministic_under_a_seed():
    x, labels = batch(0, 32, "p_by_k", dim=4)
    first, second = MarginLoss(seed=5), MarginLoss(seed=5)
    a = [first(x, labels).item() for _ in range(3)]
    b = [second(x, labels).item() for _ in range(3)]
    assert a == b
    assert len(set(a)) > 1  # the generator advances between calls
    c = [MarginLoss(seed=6)(x, labels).item() for _ in range(1)]
    assert c[0] != a[0]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert (
        margin_loss(x, labels, generator=g1).item() == margin_loss(x, labels, generator=g2).item()
    )


# ---------------------------------------------------------------- module behaviour


@pytest.mark.parametrize("layout", ["one_class", "singletons"])
def test_zero_and_differentiable_when_nothing_is_valid(layout):
    x, labels = batch(0, 6, layout)
    x.requires_grad_(True)
    loss = MarginLoss(nu=0.1)
    value = loss(x, labels)
    assert value.item() == 0.0
    value.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_beta_is_learnable_or_fixed_and_per_class():
    assert isinstance(MarginLoss().beta, torch.nn.Parameter)
    fixed = MarginLoss(learn_beta=False)
    assert not isinstance(fixed.beta, torch.nn.Parameter) and fixed.beta.shape == (1,)
    per_class = MarginLoss(beta_per_class=True, num_classes=7, beta=1.0)
    assert per_class.beta.shape == (7,) and torch.equal(per_class.beta.data, torch.ones(7))
    x, labels = batch(2, 16, "p_by_k", dim=4)
    per_class(x, labels).backward()
    assert per_class.beta.grad is not None and per_class.beta.grad[:4].abs().sum() > 0
    assert MarginLoss.needs == ("num_classes",)


def test_sampled_negatives_of_half_precision_inputs():
    # the contract test covers fp16/bf16 with sampling="all"; this is the sampling path
    x64, labels = batch(1, 32, "p_by_k", dim=16)
    x16 = x64.bfloat16().requires_grad_(True)
    sampled = MarginLoss(seed=0)(x16, labels)
    assert sampled.dtype == torch.float32 and math.isfinite(sampled.item())
    sampled.backward()
    assert x16.grad is not None and x16.grad.dtype == torch.bfloat16


def test_gradcheck():
    x, labels = batch(2, 8, "p_by_k", dim=4)
    x.requires_grad_(True)
    beta = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda e, b: margin_loss(e, labels, beta=b, nu=0.1, sampling="all"), (x, beta)
    )
    assert torch.autograd.gradcheck(
        lambda e: margin_loss(e, labels, generator=torch.Generator().manual_seed(0)), (x,)
    )


def test_value_errors():
    with pytest.raises(ValueError, match="num_classes"):
        MarginLoss(beta_per_class=True)
    with pytest.raises(ValueError, match="sampling"):
        MarginLoss(sampling="hard")
    with pytest.raises(ValueError, match="alpha"):
        MarginLoss(alpha=-0.1)
    with pytest.raises(ValueError, match="cutoff"):
        MarginLoss(cutoff=1.5, nonzero_loss_cutoff=1.4)
    x, labels = batch(0, 6, "p_by_k", dim=4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        MarginLoss(beta_per_class=True, num_classes=2)(x, labels)
