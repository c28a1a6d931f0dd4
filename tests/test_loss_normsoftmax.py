"""NormSoftmaxLoss (Zhai & Wu 2019): reference loop, PML parity, proxies, errors."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from mbdl.functional.normsoftmax import normsoftmax_loss
from mbdl.losses.normsoftmax import NormSoftmaxLoss
from proxy_loss_checks import (
    assert_proxies_declared,
    assert_proxies_learn,
    assert_proxy_input_errors,
    random_proxies,
)
from reference_losses_b import LAYOUTS, batch


def ref_normsoftmax(embeddings, labels, proxies, *, temperature=0.05) -> float:
    """Zhai & Wu eq. 2, one item at a time: ``-log(e^{cos(x, w_y)/T} / sum_c e^{cos(x, w_c)/T})``,
    averaged over the batch."""

    def cos(a, b):
        dot = sum(p * q for p, q in zip(a, b, strict=True))
        return dot / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    ws = proxies.tolist()
    losses = []
    for x, y in zip(embeddings.tolist(), labels.tolist(), strict=True):
        logits = [cos(x, w) / temperature for w in ws]
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
    for temperature in (0.05, 0.5):
        got = normsoftmax_loss(x, labels, proxies, temperature=temperature)
        assert got.dtype == torch.float64
        expected = ref_normsoftmax(x, labels, proxies, temperature=temperature)
        assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("layout", ["p_by_k", "random", "one_class", "singletons"])
@pytest.mark.parametrize("temperature", [0.05, 0.2])
def test_parity_with_pml_given_the_same_weights(layout, temperature):
    # PML normalises the weights only; on L2-normalised embeddings (what mbdl models emit) the
    # two are the same loss. PML's weight is embedding_dim x num_classes: ours transposed.
    x, labels = batch(21, 24, layout, dim=8)
    x = torch.nn.functional.normalize(x, dim=1).requires_grad_(True)
    x_pml = x.detach().clone().requires_grad_(True)
    num_classes = int(labels.max()) + 2
    ours = NormSoftmaxLoss(num_classes, 8, temperature=temperature).double()
    pml = pml_losses.NormalizedSoftmaxLoss(num_classes, 8, temperature=temperature)
    pml.W.data = ours.proxies.data.T.clone()
    got, expected = ours(x, labels), pml(x_pml, labels)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    got.backward()
    expected.backward()
    torch.testing.assert_close(ours.proxies.grad, pml.W.grad.T, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(x.grad, x_pml.grad, rtol=1e-7, atol=1e-10)


def test_embedding_norm_is_ignored_as_in_the_paper():
    x, labels = batch(3, 12, "p_by_k", dim=8)
    proxies = random_proxies(6, 8)
    scaled = x * torch.linspace(0.1, 10, 12, dtype=x.dtype)[:, None]
    torch.testing.assert_close(
        normsoftmax_loss(scaled, labels, proxies), normsoftmax_loss(x, labels, proxies)
    )


def test_proxies_needs_and_declaration():
    loss = assert_proxies_declared(NormSoftmaxLoss)
    assert NormSoftmaxLoss.name == "normsoftmax" and loss.temperature == 0.05
    assert NormSoftmaxLoss.search_grid[0] == "temperature"


def test_proxies_learn():
    assert_proxies_learn(lambda: NormSoftmaxLoss(4, 8))


def test_gradcheck_and_half_precision():
    x, labels = batch(2, 8, "p_by_k", dim=4)
    proxies = random_proxies(5, 4).requires_grad_(True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda e, p: normsoftmax_loss(e, labels, p, temperature=0.5), (x, proxies)
    )
    low = normsoftmax_loss(x.detach().bfloat16(), labels, proxies.detach().float())
    assert low.dtype == torch.float32
    reference = normsoftmax_loss(x.detach(), labels, proxies.detach())
    assert low.item() == pytest.approx(reference.item(), rel=5e-2)


def test_value_errors():
    assert_proxy_input_errors(NormSoftmaxLoss)
    x, labels = batch(0, 6, "p_by_k", dim=4)
    for bad in (0.0, -0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            NormSoftmaxLoss(3, 4, temperature=bad)
    with pytest.raises(ValueError, match="proxies contain NaN"):
        normsoftmax_loss(x, labels, torch.full((3, 4), math.nan, dtype=x.dtype))
