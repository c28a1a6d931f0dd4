"""ArcFaceLoss (Deng et al. 2019): reference loop, PML parity (and where PML departs from the
paper), relation to NormSoftmax, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from mbdl.functional.arcface import arcface_loss
from mbdl.functional.normsoftmax import normsoftmax_loss
from mbdl.losses.arcface import ArcFaceLoss
from proxy_loss_checks import (
    assert_proxies_declared,
    assert_proxies_learn,
    assert_proxy_input_errors,
    random_proxies,
)
from reference_losses_b import LAYOUTS, batch


def ref_arcface(embeddings, labels, proxies, *, margin=0.5, scale=64.0) -> float:
    """Deng et al. eq. 3, one item at a time: ``-log(e^{s cos(theta_y + m)} / (e^{s cos(theta_y +
    m)} + sum_{c != y} e^{s cos theta_c}))``, averaged over the batch."""

    def angle(a, b):
        dot = sum(p * q for p, q in zip(a, b, strict=True))
        return math.acos(dot / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b)))

    ws = proxies.tolist()
    losses = []
    for x, y in zip(embeddings.tolist(), labels.tolist(), strict=True):
        logits = [
            scale * math.cos(angle(x, w) + (margin if c == y else 0.0)) for c, w in enumerate(ws)
        ]
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(z - top) for z in logits))
        losses.append(log_sum - logits[y])
    return sum(losses) / len(losses)


def _pml(ours: ArcFaceLoss) -> pml_losses.ArcFaceLoss:
    """PML's ArcFace with our weights (transposed: PML's are embedding_dim x num_classes) and our
    margin in degrees (PML's unit)."""
    pml = pml_losses.ArcFaceLoss(
        ours.num_classes,
        ours.embedding_dim,
        margin=float(np.degrees(ours.margin)),
        scale=ours.scale,
    )
    pml.W.data = ours.proxies.data.T.clone()
    return pml


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [1, 5, 32])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed, batch_size, layout):
    x, labels = batch(seed, batch_size, layout)
    proxies = random_proxies(int(labels.max()) + 3, x.shape[1], seed)
    for margin, scale in ((0.5, 64.0), (0.1, 8.0), (1.2, 30.0)):
        got = arcface_loss(x, labels, proxies, margin=margin, scale=scale)
        assert got.dtype == torch.float64
        expected = ref_arcface(x, labels, proxies, margin=margin, scale=scale)
        assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("layout", ["p_by_k", "random", "one_class"])
@pytest.mark.parametrize(("margin", "scale"), [(0.5, 64.0), (0.2, 16.0)])
def test_parity_with_pml_where_every_angle_is_below_pi_minus_m(layout, margin, scale):
    x, labels = batch(21, 24, layout, dim=8)
    x.requires_grad_(True)
    x_pml = x.detach().clone().requires_grad_(True)
    torch.manual_seed(0)  # the proxies: not whatever the tests before left in the global generator
    ours = ArcFaceLoss(int(labels.max()) + 2, 8, margin=margin, scale=scale).double()
    pml = _pml(ours)
    with torch.no_grad():
        target = torch.nn.functional.normalize(ours.proxies[labels], dim=1)
        theta = torch.acos((torch.nn.functional.normalize(x, dim=1) * target).sum(1))
    assert bool((theta <= math.pi - margin).all())  # the setting where PML follows the paper
    got, expected = ours(x, labels), pml(x_pml, labels)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    got.backward()
    expected.backward()
    torch.testing.assert_close(ours.proxies.grad, pml.W.grad.T, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(x.grad, x_pml.grad, rtol=1e-7, atol=1e-10)


def test_beyond_pi_minus_m_the_paper_formula_not_pmls_fallback():
    # an embedding nearly opposite its own proxy: theta + m > pi. The paper keeps cos(theta + m);
    # PML (like the authors' code) switches to cos(theta) - m sin(m).
    ours = ArcFaceLoss(3, 4, margin=0.5, scale=4.0).double()
    with torch.no_grad():
        ours.proxies.copy_(torch.eye(3, 4, dtype=torch.float64))
    x = torch.tensor([[-1.0, 0.1, 0.0, 0.05], [0.2, 1.0, 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    got = ours(x, labels).item()
    assert got == pytest.approx(
        ref_arcface(x, labels, ours.proxies.detach(), margin=0.5, scale=4.0)
    )
    assert got != pytest.approx(_pml(ours)(x, labels).item(), rel=1e-3)


def test_without_margin_it_is_normsoftmax_and_the_margin_costs():
    x, labels = batch(4, 16, "random", dim=8)
    proxies = random_proxies(int(labels.max()) + 1, 8)
    torch.testing.assert_close(
        arcface_loss(x, labels, proxies, margin=0.0, scale=20.0),
        normsoftmax_loss(x, labels, proxies, temperature=0.05),
    )
    assert arcface_loss(x, labels, proxies, margin=0.3, scale=20.0) > arcface_loss(
        x, labels, proxies, margin=0.0, scale=20.0
    )


def test_gradient_is_finite_at_theta_zero_and_pi():
    proxies = torch.eye(2, 3, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = arcface_loss(x, torch.tensor([0, 1]), proxies)
    loss.backward()
    assert (
        torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(proxies.grad).all()
    )


def test_proxies_needs_and_declaration():
    loss = assert_proxies_declared(ArcFaceLoss)
    assert ArcFaceLoss.name == "arcface" and (loss.margin, loss.scale) == (0.5, 64.0)
    assert ArcFaceLoss.search_grid[0] == "margin"


def test_proxies_learn():
    assert_proxies_learn(lambda: ArcFaceLoss(4, 8, scale=16.0))


def test_gradcheck_and_half_precision():
    x, labels = batch(2, 8, "p_by_k", dim=4)
    proxies = random_proxies(5, 4).requires_grad_(True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda e, p: arcface_loss(e, labels, p, margin=0.5, scale=2.0), (x, proxies)
    )
    low = arcface_loss(x.detach().bfloat16(), labels, proxies.detach().float(), scale=8.0)
    assert low.dtype == torch.float32
    reference = arcface_loss(x.detach(), labels, proxies.detach(), scale=8.0)
    assert low.item() == pytest.approx(reference.item(), rel=5e-2)


def test_value_errors():
    assert_proxy_input_errors(ArcFaceLoss)
    with pytest.raises(ValueError, match=r"takes degrees: 28.6 degrees is 0.4992 radians"):
        ArcFaceLoss(3, 4, margin=28.6)
    for bad in (-0.1, math.pi / 2, math.nan):
        with pytest.raises(ValueError, match=r"margin must be in radians, in \[0, pi/2\)"):
            ArcFaceLoss(3, 4, margin=bad)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            ArcFaceLoss(3, 4, scale=bad)
