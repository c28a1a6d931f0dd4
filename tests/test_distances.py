"""Pairwise distances of mbdl.functional.distances against torch.cdist and plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from mbdl.functional.distances import DISTANCES, loss_distances, pairwise_distance
from reference_losses import ref_distance


def _points(seed: int, n: int, d: int = 5, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_euclidean_and_squared_match_cdist(seed):
    x, y = _points(seed, 7), _points(seed + 10, 11)
    torch.testing.assert_close(pairwise_distance(x, y), torch.cdist(x, y))
    torch.testing.assert_close(pairwise_distance(x, y, "squared_euclidean"), torch.cdist(x, y) ** 2)
    torch.testing.assert_close(pairwise_distance(x), torch.cdist(x, x))


@pytest.mark.parametrize("distance", DISTANCES)
def test_every_distance_matches_a_loop(distance):
    x, y = _points(3, 6), _points(4, 9)
    x[2] = 0.0  # a zero vector: cosine treats it as orthogonal to everything
    expected = torch.tensor(
        [[ref_distance(a, b, distance) for b in y.tolist()] for a in x.tolist()],
        dtype=torch.float64,
    )
    torch.testing.assert_close(pairwise_distance(x, y, distance), expected)


def test_cosine_is_one_minus_cosine_similarity_and_scale_free():
    x, y = _points(5, 4), _points(6, 8)
    cos = torch.nn.functional.cosine_similarity(x[:, None, :], y[None, :, :], dim=2)
    torch.testing.assert_close(pairwise_distance(x, y, "cosine"), 1 - cos)
    torch.testing.assert_close(
        pairwise_distance(3 * x, 0.5 * y, "cosine"), pairwise_distance(x, y, "cosine")
    )


@pytest.mark.parametrize("distance", DISTANCES)
def test_self_distance_has_exact_zero_diagonal(distance):
    x = _points(7, 16, d=64, dtype=torch.float32) * 10
    dist = pairwise_distance(x, distance=distance)
    assert dist.shape == (16, 16)
    if distance != "cosine":
        assert torch.equal(dist.diagonal(), torch.zeros(16))
    else:
        assert dist.diagonal().abs().max() < 1e-6
    assert (dist >= 0).all() if distance != "cosine" else (dist >= -1e-6).all()


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradient_is_finite_at_zero_distance(distance):
    base = _points(8, 3)
    x = torch.cat([base, base, base[:1]]).requires_grad_()  # duplicates: off-diagonal zeros too
    pairwise_distance(x, distance=distance).sum().backward()
    assert torch.isfinite(x.grad).all()
    y = torch.cat([base, base]).requires_grad_()
    pairwise_distance(y, y.detach().clone(), distance).sum().backward()
    assert torch.isfinite(y.grad).all()


def test_euclidean_gradcheck_away_from_zero():
    x = _points(9, 4).requires_grad_()
    y = _points(10, 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: pairwise_distance(a, b), (x, y))


def test_loss_distances_upcasts_normalizes_and_promotes():
    x = _points(11, 6, dtype=torch.float32)
    half = loss_distances(x.bfloat16())
    assert half.dtype == torch.float32
    unit = torch.nn.functional.normalize(x.bfloat16().float(), dim=1)
    torch.testing.assert_close(half, pairwise_distance(unit))
    mixed = loss_distances(x, x.double(), normalize=False)
    assert mixed.dtype == torch.float64
    assert loss_distances(x, normalize=True).max() <= 2 + 1e-6


def test_unknown_distance_raises():
    x = _points(0, 3)
    with pytest.raises(ValueError, match="distance must be one of euclidean"):
        pairwise_distance(x, distance="manhattan")
    with pytest.raises(ValueError, match="'l1'"):
        loss_distances(x, distance="l1")
    assert math.isclose(float(pairwise_distance(x)[0, 0]), 0.0)


def test_loss_distances_stay_fp32_under_autocast():
    x = _points(12, 8, dtype=torch.float32).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pairwise_distance(x).dtype == torch.bfloat16  # what autocast alone would do
        dist = loss_distances(x)
    assert dist.dtype == torch.float32
    torch.testing.assert_close(dist, loss_distances(x.detach()))


def _autograd_distances(x, y, distance, normalize):
    """The matrix by autograd through the textbook formula (normalize, then differences)."""
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
        y = None if y is None else torch.nn.functional.normalize(y, dim=1)
    other = x if y is None else y
    sq = (x[:, None, :] - other[None, :, :]).pow(2).sum(dim=2)
    if distance == "squared_euclidean":
        return sq
    return torch.where(sq > 0, sq.clamp_min(1e-300).sqrt(), torch.zeros_like(sq))


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_ref", [False, True])
def test_hand_written_backward_equals_autograd_of_the_formula(distance, normalize, with_ref):
    x = _points(13, 9, d=6)
    x[4] = 0.0  # a zero vector: normalisation divides by eps
    x[7] = x[2]  # a duplicate: zero distance off the diagonal
    y = _points(14, 5, d=6) if with_ref else None
    weights = _points(15, 9 * (5 if with_ref else 9), d=1).view(9, -1)  # a generic dL/dD
    grads = []
    for fn in (loss_distances, _autograd_distances):
        a = x.clone().requires_grad_()
        b = None if y is None else y.clone().requires_grad_()
        if fn is loss_distances:
            dist = fn(a, b, distance=distance, normalize=normalize)
        else:
            dist = fn(a, b, distance, normalize)
        (dist * weights).sum().backward()
        grads.append((dist.detach(), a.grad, None if b is None else b.grad))
    (ours, ours_x, ours_y), (plain, plain_x, plain_y) = grads
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(ours_x, plain_x)
    if with_ref:
        torch.testing.assert_close(ours_y, plain_y)


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
def test_loss_distances_gradcheck_with_normalisation(distance):
    x = _points(16, 5).requires_grad_()
    y = _points(17, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: loss_distances(a, b, distance=distance), (x, y))
    assert torch.autograd.gradcheck(lambda a: loss_distances(a, distance=distance), (x,))


def test_only_the_inputs_that_need_it_get_a_gradient():
    x = _points(18, 5).requires_grad_()
    y = _points(19, 4)  # a fixed reference set
    loss_distances(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
