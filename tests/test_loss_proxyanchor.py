"""ProxyAnchorLoss (Kim et al. 2020): reference loop, PML parity, proxies, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from mbdl.functional.proxyanchor import proxy_anchor_loss
from mbdl.losses import ProxyAnchorLoss
from reference_losses_b import LAYOUTS, batch, ref_proxy_anchor


def _proxies(num_classes: int, dim: int, seed: int = 99) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [2, 5, 16, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed, batch_size, layout):
    x, labels = batch(seed, batch_size, layout)
    proxies = _proxies(int(labels.max()) + 3, x.shape[1], seed)
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
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(num_classes=400, embedding_dim=300)
    assert isinstance(loss.proxies, torch.nn.Parameter)
    assert loss.proxies.shape == (400, 300)
    # kaiming normal, fan_out = num_classes for a (C, d) weight: std = sqrt(2 / C)
    assert loss.proxies.std().item() == pytest.approx((2 / 400) ** 0.5, rel=0.02)
    assert ProxyAnchorLoss.needs == ("num_classes", "embedding_dim")


def test_proxies_learn():
    torch.manual_seed(0)
    x, labels = batch(0, 16, "p_by_k", dim=8)
    loss = ProxyAnchorLoss(4, 8).double()
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.5)
    before = loss(x, labels).item()
    for _ in range(20):
        optimizer.zero_grad()
        loss(x, labels).backward()
        optimizer.step()
    assert loss(x, labels).item() < before


def test_value_errors():
    x, labels = batch(0, 6, "p_by_k", dim=4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        ProxyAnchorLoss(2, 4)(x, labels)
    with pytest.raises(ValueError, match="dimension"):
        ProxyAnchorLoss(3, 5)(x, labels)
    with pytest.raises(ValueError, match="num_classes"):
        ProxyAnchorLoss(0, 4)
    with pytest.raises(ValueError, match="embedding_dim"):
        ProxyAnchorLoss(3, 1)
    with pytest.raises(ValueError, match="alpha"):
        ProxyAnchorLoss(3, 4, alpha=0.0)
