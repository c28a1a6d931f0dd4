"""MarginDiscriminateLoss: every property of docs/mdl-loss.md, against a plain-Python loop."""

from __future__ import annotations

import math

import pytest
import torch

from mbdl.functional.mdl import (
    discrimination_boundaries,
    margin_discriminate_loss,
    mdl_from_distances,
    mdl_per_anchor,
    violation_masks,
)
from mbdl.functional.pairs import pair_masks
from mbdl.losses import MarginDiscriminateLoss
from reference_losses import LAYOUTS, make_labels, ref_mdl, ref_strictly_discriminated

DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def _batch(seed: int, batch_size: int, layout: str, dim: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, dim, generator=g, dtype=dtype)
    return x, make_labels(layout, batch_size, g)


# ---------------------------------------------------------------- equality to the reference loop


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [2, 5, 16, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_loop(seed, batch_size, layout):
    x, labels = _batch(seed, batch_size, layout)
    got = margin_discriminate_loss(x, labels, margin=0.2)
    expected = ref_mdl(x, labels, margin=0.2)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
@pytest.mark.parametrize("batch_size", [2, 16, 64])
def test_matches_reference_loop_other_distances(batch_size, distance):
    for seed, layout in enumerate(LAYOUTS):
        x, labels = _batch(seed, batch_size, layout)
        got = margin_discriminate_loss(x, labels, margin=0.3, distance=distance)
        expected = ref_mdl(x, labels, margin=0.3, distance=distance)
        assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5, 1.5])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_margins_and_unnormalized(margin, normalize):
    for seed in range(3):
        x, labels = _batch(seed, 24, "random")
        got = margin_discriminate_loss(x, labels, margin=margin, normalize=normalize)
        assert got.item() == pytest.approx(
            ref_mdl(x, labels, margin=margin, normalize=normalize), abs=1e-6
        )


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_with_ref_emb(seed, distance):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (12,), generator=g)
    memory = torch.randn(20, 5, generator=g, dtype=torch.float64)
    memory_labels = torch.randint(0, 4, (20,), generator=g)
    # a separate reference set: every same-label item is a positive
    got = margin_discriminate_loss(x, labels, memory, memory_labels, distance=distance)
    assert got.item() == pytest.approx(
        ref_mdl(x, labels, memory, memory_labels, distance=distance), abs=1e-6
    )
    # the batch inside the reference set at offset 7: the anchor itself is skipped
    ref = torch.cat([memory[:7], x, memory[7:]])
    ref_labels = torch.cat([memory_labels[:7], labels, memory_labels[7:]])
    got = margin_discriminate_loss(x, labels, ref, ref_labels, distance=distance, anchor_offset=7)
    expected = ref_mdl(x, labels, ref, ref_labels, distance=distance, anchor_offset=7)
    assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("temperature", [0.05, 1.0])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_soft_boundary_matches_reference(temperature, layout, distance):
    for seed in range(2):
        x, labels = _batch(seed, 20, layout)
        got = margin_discriminate_loss(x, labels, soft_boundary=temperature, distance=distance)
        expected = ref_mdl(x, labels, soft_boundary=temperature, distance=distance)
        assert got.item() == pytest.approx(expected, abs=1e-6)


def test_soft_boundary_with_ref_emb_matches_reference():
    x, labels = _batch(5, 10, "random")
    ref, ref_labels = _batch(6, 15, "random")
    got = margin_discriminate_loss(x, labels, ref, ref_labels, soft_boundary=0.2)
    assert got.item() == pytest.approx(
        ref_mdl(x, labels, ref, ref_labels, soft_boundary=0.2), abs=1e-6
    )


def test_soft_boundary_approaches_hard_form_as_temperature_vanishes():
    x, labels = _batch(0, 32, "p_by_k")
    hard = margin_discriminate_loss(x, labels).item()
    gaps = [
        abs(margin_discriminate_loss(x, labels, soft_boundary=t).item() - hard)
        for t in (0.3, 0.03, 1e-3, 1e-5)
    ]
    assert gaps[-1] < 1e-4
    assert gaps[0] > gaps[-1]


# ---------------------------------------------------------------- strict discrimination


def _separated_batch(margin: float, num_classes: int = 4, per_class: int = 3):
    """Tight clusters around orthogonal directions: p_i is tiny, n_i is about sqrt(2)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8, dtype=torch.float64)[:num_classes]
    x = centres.repeat_interleave(per_class, 0) + 0.01 * torch.randn(
        num_classes * per_class, 8, generator=g, dtype=torch.float64
    )
    return x, torch.arange(num_classes).repeat_interleave(per_class)


def test_zero_exactly_on_strictly_discriminated_batch():
    x, labels = _separated_batch(margin=0.2)
    assert ref_strictly_discriminated(x, labels, margin=0.2)
    assert margin_discriminate_loss(x, labels, margin=0.2).item() == 0.0
    # the same batch with a margin wider than the gap is not strictly discriminated
    assert not ref_strictly_discriminated(x, labels, margin=2.0)
    assert margin_discriminate_loss(x, labels, margin=2.0).item() > 0


@pytest.mark.parametrize("margin", [0.0, 0.2, 0.6])
def test_zero_if_and_only_if_strictly_discriminated(margin):
    seen = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        # 4 classes in 4 dimensions at noise levels from tiny to large: both outcomes occur
        labels = torch.arange(4).repeat_interleave(3)
        centres = torch.randn(4, 4, generator=g, dtype=torch.float64).repeat_interleave(3, 0)
        noise = (0.01 + 0.08 * (seed % 5)) * torch.randn(12, 4, generator=g, dtype=torch.float64)
        x = centres + noise
        discriminated = ref_strictly_discriminated(x, labels, margin=margin)
        loss = margin_discriminate_loss(x, labels, margin=margin).item()
        assert (loss == 0.0) == discriminated
        assert loss >= 0
        seen.add(discriminated)
    assert seen == {True, False}


def test_violating_anchor_has_farthest_positive_and_nearest_negative_in_its_sets():
    for seed in range(10):
        x, labels = _batch(seed, 32, "random")
        dist = torch.cdist(
            torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(x, dim=1)
        )
        positive, negative = pair_masks(labels)
        p, n, valid = discrimination_boundaries(dist, positive, negative)
        vpos, vneg = violation_masks(dist, positive, negative, p, n, 0.2)
        for i in range(32):
            if not valid[i]:
                assert not vpos[i].any() or not negative[i].any()
                continue
            violating = p[i] + 0.2 > n[i]
            farthest = dist[i].masked_fill(~positive[i], -math.inf).argmax()
            nearest = dist[i].masked_fill(~negative[i], math.inf).argmin()
            assert bool(vpos[i, farthest]) == bool(violating)
            assert bool(vneg[i, nearest]) == bool(violating)
            # an anchor that holds the margin has empty violation sets
            if not violating:
                assert not vpos[i].any() and not vneg[i].any()


# ---------------------------------------------------------------- gradients


def test_every_violating_pair_gets_a_gradient_on_the_distance_matrix():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (10,), generator=g)
    ref_labels = torch.randint(0, 3, (30,), generator=g)
    dist = torch.rand(10, 30, generator=g, dtype=torch.float64).requires_grad_()
    positive, negative = pair_masks(labels, ref_labels)
    loss = mdl_from_distances(dist, positive, negative, margin=0.3)
    loss.backward()
    p, n, _ = discrimination_boundaries(dist.detach(), positive, negative)
    vpos, vneg = violation_masks(dist.detach(), positive, negative, p, n, 0.3)
    assert vpos.sum() > 10 and vneg.sum() > 10  # several violating pairs per anchor
    assert (dist.grad[vpos] > 0).all()  # pulled in
    assert (dist.grad[vneg] < 0).all()  # pushed out
    assert (dist.grad[~(vpos | vneg)] == 0).all()


def test_every_violating_reference_item_gets_a_gradient_on_the_embeddings():
    g = torch.Generator().manual_seed(1)
    anchor = torch.randn(1, 4, generator=g, dtype=torch.float64)
    ref = torch.randn(25, 4, generator=g, dtype=torch.float64).requires_grad_()
    ref_labels = torch.randint(0, 2, (25,), generator=g)
    label = torch.tensor([0])
    loss = margin_discriminate_loss(anchor, label, ref, ref_labels, margin=0.5)
    loss.backward()
    unit = torch.nn.functional.normalize
    dist = torch.cdist(unit(anchor, dim=1), unit(ref.detach(), dim=1))
    positive, negative = pair_masks(label, ref_labels)
    p, n, _ = discrimination_boundaries(dist, positive, negative)
    vpos, vneg = violation_masks(dist, positive, negative, p, n, 0.5)
    violating = (vpos | vneg)[0]
    assert vpos.sum() >= 2 and vneg.sum() >= 2
    assert (ref.grad[violating].norm(dim=1) > 0).all()
    assert (ref.grad[~violating] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_hard_form_equals_autograd_through_the_readable_form(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (12,), generator=g)
    ref_labels = torch.cat([torch.randint(0, 3, (18,), generator=g), torch.tensor([3])])
    labels[0] = 9  # an anchor without positives
    ref_labels[-1] = labels[1]  # anchor 1 has at least one positive
    dist = torch.rand(12, 19, generator=g, dtype=torch.float64)
    positive, negative = pair_masks(labels, ref_labels)
    fused_dist, plain_dist = dist.clone().requires_grad_(), dist.clone().requires_grad_()
    fused = mdl_from_distances(fused_dist, positive, negative, margin=0.25)
    per_anchor, valid = mdl_per_anchor(plain_dist, positive, negative, margin=0.25)
    plain = per_anchor.sum() / valid.sum()
    fused.backward()
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), abs=1e-12)
    torch.testing.assert_close(fused_dist.grad, plain_dist.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("soft_boundary", [None, 0.5])
def test_gradcheck(distance, soft_boundary):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])

    def loss(e):
        return margin_discriminate_loss(
            e, labels, margin=0.5, soft_boundary=soft_boundary, distance=distance
        )

    assert loss(x).item() > 0
    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("soft_boundary", [0.1])  # the hard form: tests/test_loss_contract.py
def test_permutation_and_relabel_invariance(soft_boundary):
    for seed in range(5):
        x, labels = _batch(seed, 30, "random")
        loss = margin_discriminate_loss(x, labels, soft_boundary=soft_boundary)
        g = torch.Generator().manual_seed(100 + seed)
        order = torch.randperm(30, generator=g)
        permuted = margin_discriminate_loss(x[order], labels[order], soft_boundary=soft_boundary)
        renamed = margin_discriminate_loss(x, labels * 7 + 1000, soft_boundary=soft_boundary)
        assert permuted.item() == pytest.approx(loss.item(), abs=1e-12)
        assert renamed.item() == loss.item()


# ---------------------------------------------------------------- degenerate batches and dtypes


def _loss_and_grad(x, labels, **options):
    x = x.clone().requires_grad_()
    loss = margin_discriminate_loss(x, labels, **options)
    loss.backward()
    return loss, x.grad


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("soft_boundary", [None, 0.1])
def test_duplicates_and_zero_vectors_are_finite(distance, soft_boundary):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    x = torch.cat([base, base, torch.zeros(2, 6)])  # exact duplicates and zero vectors
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 3, 2, 0, 1])
    loss, grad = _loss_and_grad(x, labels, distance=distance, soft_boundary=soft_boundary)
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(grad).all()
    # all items identical: every pair at distance 0, every anchor violates
    same = base[:1].repeat(6, 1)
    loss, grad = _loss_and_grad(same, torch.tensor([0, 0, 1, 1, 2, 2]), distance=distance)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2 * 0.2)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("layout", ["one_class", "singletons"])
@pytest.mark.parametrize("soft_boundary", [None, 0.1])
def test_no_valid_anchor_gives_a_connected_zero(layout, soft_boundary):
    x, labels = _batch(0, 12, layout, dtype=torch.float32)
    loss, grad = _loss_and_grad(x, labels, soft_boundary=soft_boundary)
    assert loss.item() == 0.0 and loss.requires_grad
    assert loss.dtype == torch.float32
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])  # euclidean: the contract
def test_half_precision_inputs_close_to_fp32(dtype, distance):
    x, labels = _batch(0, 32, "p_by_k", dtype=torch.float32)
    half = x.to(dtype).requires_grad_()
    loss = margin_discriminate_loss(half, labels, distance=distance)
    loss.backward()
    assert loss.dtype == torch.float32
    assert half.grad is not None and half.grad.dtype == dtype
    assert torch.isfinite(half.grad.float()).all() and half.grad.float().abs().sum() > 0
    full = margin_discriminate_loss(half.detach().float(), labels, distance=distance)
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)


def test_float32_close_to_float64():
    x, labels = _batch(1, 64, "random")
    assert margin_discriminate_loss(x.float(), labels).item() == pytest.approx(
        margin_discriminate_loss(x, labels).item(), rel=1e-5
    )


# ---------------------------------------------------------------- module, registry, errors


def test_module_equals_functional_and_is_registered():
    x, labels = _batch(0, 16, "random")
    module = MarginDiscriminateLoss(margin=0.3, soft_boundary=0.1, distance="cosine")
    expected = margin_discriminate_loss(x, labels, margin=0.3, soft_boundary=0.1, distance="cosine")
    assert module(x, labels).item() == expected.item()
    assert "margin=0.3" in repr(module)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"margin": -0.1}, "margin"),
        ({"margin": math.nan}, "margin"),
        ({"soft_boundary": 0.0}, "soft_boundary"),
        ({"soft_boundary": -1.0}, "soft_boundary"),
        ({"distance": "manhattan"}, "distance"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        MarginDiscriminateLoss(**options)
    x, labels = _batch(0, 4, "p_by_k")
    with pytest.raises(ValueError, match=message):
        margin_discriminate_loss(x, labels, **options)
