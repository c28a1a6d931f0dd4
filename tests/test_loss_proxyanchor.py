"""ProxyAnchorLoss (Kim et al. 2020): reference loop, PML parity, proxies, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from mbdl.functional.proxyanchor import proxy_anchor_loss
from mbdl.losses import ProxyAnchorLoss
from proxy_loss_checks import (
    assert_proxies_declared,
    assert_proxies_learn,
    assert_proxy_input_errors,
    random_proxies,
)
from reference_losses_b import LAYOUTS, batch, ref_proxy_anchor


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [2, 5, 16, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed, batch_size, layout):
    x, labels = batch(seed, batch_size, layout)
    proxies = random_proxies(int(labels.max()) + 3, x.shape[1], seed)
    for margin, alpha in ((0.1, 32.0), (0.3, 4.0)):
        got = proxy_anchor_loss(x, labels, proxies, margin=margin, alpha=alpha)
        expected = ref_proxy_anchor(x, labels, proxies, margin=margin, alpha=alpha)
        assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("layout", ["p_by_k", "random", "one_class"])
@pytest.mark.parametrize("batch_size", [4, 16, 64])
def test_parity_with_pml_given_the_same_proxies(batch_size, layout):
    x, labels = batch(21, batch_size, layout, dim=8)
    num_classes = int(labels.max()) + 2
    ours = ProxyAnchorLoss(num_classes, 8).double()
    pml = pml_losses.ProxyAnchorLoss(num_classes, 8, margin=0.1, alpha=32)
    pml.proxies.data = ours.proxies.data.clone()
    torch.testing.assert_close(ours(x, labels), pml(x, labels), rtol=1e-9, atol=1e-12)
    # gradients wrt the proxies too
    ours(x, labels).backward()
    pml(x, labels).backward()
    torch.testing.assert_close(ours.proxies.grad, pml.proxies.grad, rtol=1e-7, atol=1e-10)


def test_proxies_are_kaiming_normal_fan_out():
    assert_proxies_declared(ProxyAnchorLoss)


def test_proxies_learn():
    assert_proxies_learn(lambda: ProxyAnchorLoss(4, 8), lr=0.5, below=1.0)


def test_value_errors():
    assert_proxy_input_errors(ProxyAnchorLoss)
    with pytest.raises(ValueError, match="alpha"):
        ProxyAnchorLoss(3, 4, alpha=0.0)
