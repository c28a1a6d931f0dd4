"""Checks every proxy loss shares (one learnable class weight per class: ProxyAnchor, NormSoftmax,
CosFace, ArcFace), each called from that loss's test file with its own settings."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from reference_losses_b import batch


def random_proxies(num_classes: int, dim: int, seed: int = 99) -> torch.Tensor:
    """A fixed ``C x d`` float64 proxy matrix for the functional kernels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, dim, generator=g, dtype=torch.float64)


def assert_proxies_declared(cls: type[torch.nn.Module]) -> torch.nn.Module:
    """Kaiming-normal (fan_out) proxies of shape ``C x d``, the ``needs`` of a proxy loss, no
    reference set, and a search grid whose first value is the constructor's default and whose
    values the constructor keeps. Returns the ``(400, 300)`` instance."""
    torch.manual_seed(0)
    loss = cls(num_classes=400, embedding_dim=300)
    assert isinstance(loss.proxies, torch.nn.Parameter) and loss.proxies.shape == (400, 300)
    # kaiming normal, fan_out = num_classes for a (C, d) weight: std = sqrt(2 / C)
    assert loss.proxies.std().item() == pytest.approx((2 / 400) ** 0.5, rel=0.02)
    assert (cls.needs, cls.accepts_ref) == (("num_classes", "embedding_dim"), False)
    param, values = cls.search_grid
    assert values[0] == getattr(loss, param)
    assert all(getattr(cls(3, 4, **{param: v}), param) == v for v in values)
    return loss


def assert_proxies_learn(
    make: Callable[[], torch.nn.Module], *, lr: float = 0.05, below: float = 0.75
) -> None:
    """Twenty SGD steps on the proxies alone bring the loss of a fixed batch below ``below``
    times its start."""
    x, labels = batch(0, 16, "p_by_k", dim=8)
    torch.manual_seed(0)
    loss = make().double()
    optimizer = torch.optim.SGD(loss.parameters(), lr=lr)
    before = loss(x, labels).item()
    for _ in range(20):
        optimizer.zero_grad()
        loss(x, labels).backward()
        optimizer.step()
    assert loss(x, labels).item() < below * before


def assert_proxy_input_errors(cls: type[torch.nn.Module]) -> None:
    """A reference set, labels outside ``[0, C)``, a wrong embedding dimension, no classes and a
    one-dimensional embedding are each refused with a ``ValueError`` naming them."""
    x, labels = batch(0, 6, "p_by_k", dim=4)
    with pytest.raises(ValueError, match="no reference set"):
        cls(3, 4)(x, labels, x, labels)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        cls(2, 4)(x, labels)
    with pytest.raises(ValueError, match="dimension"):
        cls(3, 5)(x, labels)
    with pytest.raises(ValueError, match="num_classes"):
        cls(0, 4)
    with pytest.raises(ValueError, match="embedding_dim"):
        cls(3, 1)
