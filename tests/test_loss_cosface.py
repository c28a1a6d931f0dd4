"""CosFaceLoss (Wang et al. 2018): reference loop, PML parity, relation to NormSoftmax, errors."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from mbdl.functional.cosface import cosface_loss
from mbdl.functional.normsoftmax import normsoftmax_loss
from mbdl.losses.cosface import CosFaceLoss
from proxy_loss_checks import (
    assert_proxies_declared,
    assert_proxies_learn,
    assert_proxy_input_errors,
    random_proxies,
)
from reference_losses_b import LAYOUTS, batch


def ref_cosface(embeddings, labels, proxies, *, margin=0.35, scale=64.0) -> float:
    """Wang et al. eq. 4, one item at a time: ``-log(e^{s(cos_y - m)} / (e^{s(cos_y - m)} +
    sum_{c != y} e^{s cos_c}))``, averaged over the batch."""

    def cos(a, b):
        dot = sum(p * q for p, q in zip(a, b, strict=True))
        return dot / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    ws = proxies.tolist()
    losses = []
    for x, y in zip(embeddings.tolist(), labels.tolist(), strict=True):
        logits = [scale * (cos(x, w) - (margin if c == y else 0.0)) for c, w in enumerate(ws)]
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(z - top) for z in logits))
        losses.append(log_sum - logits[y])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [1, 5, 32])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed, batch_size, layout):
    x, labels = batch(seed, batch_size, layout)
    proxies = random_proxies(int(labels.max()) + 3, x.shape[1], seed)
    for margin, scale in ((0.35, 64.0), (0.1, 8.0), (-0.2, 30.0)):
        got = cosface_loss(x, labels, proxies, margin=margin, scale=scale)
        assert got.dtype == torch.float64
        expected = ref_cosface(x, labels, proxies, margin=margin, scale=scale)
        assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("layout", ["p_by_k", "random", "one_class"])
@pytest.mark.parametrize(("margin", "scale"), [(0.35, 64.0), (0.2, 16.0)])
def test_parity_with_pml_given_the_same_weights(layout, margin, scale):
    # PML's weight is embedding_dim x num_classes: ours transposed
    x, labels = batch(21, 24, layout, dim=8)
    x.requires_grad_(True)
    x_pml = x.detach().clone().requires_grad_(True)
    num_classes = int(labels.max()) + 2
    ours = CosFaceLoss(num_classes, 8, margin=margin, scale=scale).double()
    pml = pml_losses.CosFaceLoss(num_classes, 8, margin=margin, scale=scale)
    pml.W.data = ours.proxies.data.T.clone()
    got, expected = ours(x, labels), pml(x_pml, labels)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    got.backward()
    expected.backward()
    torch.testing.assert_close(ours.proxies.grad, pml.W.grad.T, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(x.grad, x_pml.grad, rtol=1e-7, atol=1e-10)


def test_without_margin_it_is_normsoftmax():
    x, labels = batch(4, 16, "random", dim=8)
    proxies = random_proxies(int(labels.max()) + 1, 8)
    torch.testing.assert_close(
        cosface_loss(x, labels, proxies, margin=0.0, scale=20.0),
        normsoftmax_loss(x, labels, proxies, temperature=0.05),
    )
    # a margin makes the loss larger: the target logit is lowered
    assert cosface_loss(x, labels, proxies, margin=0.3, scale=20.0) > cosface_loss(
        x, labels, proxies, margin=0.0, scale=20.0
    )


def test_proxies_needs_and_declaration():
    loss = assert_proxies_declared(CosFaceLoss)
    assert CosFaceLoss.name == "cosface" and (loss.margin, loss.scale) == (0.35, 64.0)
    assert CosFaceLoss.search_grid[0] == "margin"


def test_proxies_learn():
    assert_proxies_learn(lambda: CosFaceLoss(4, 8, scale=16.0))


def test_gradcheck_and_half_precision():
    x, labels = batch(2, 8, "p_by_k", dim=4)
    proxies = random_proxies(5, 4).requires_grad_(True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda e, p: cosface_loss(e, labels, p, margin=0.3, scale=2.0), (x, proxies)
    )
    low = cosface_loss(x.detach().half(), labels, proxies.detach().float(), scale=8.0)
    assert low.dtype == torch.float32
    reference = cosface_loss(x.detach(), labels, proxies.detach(), scale=8.0)
    assert low.item() == pytest.approx(reference.item(), rel=1e-2)


def test_value_errors():
    assert_proxy_input_errors(CosFaceLoss)
    with pytest.raises(ValueError, match="margin must be a finite number"):
        CosFaceLoss(3, 4, margin=math.nan)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            CosFaceLoss(3, 4, scale=bad)
