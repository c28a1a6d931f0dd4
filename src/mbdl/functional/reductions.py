"""Small reductions shared by the loss kernels."""

from __future__ import annotations

import torch
from torch import Tensor


def connected_zero(*tensors: Tensor) -> Tensor:
    """A scalar 0 that is still connected to ``tensors``: ``backward()`` runs and gives zero gradients."""
    total = sum((t.sum() * 0 for t in tensors), start=torch.zeros((), device=tensors[0].device))
    return total


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 to fp32, for numerically safe loss maths; other dtypes are returned unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
