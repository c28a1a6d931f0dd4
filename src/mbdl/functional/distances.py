"""Pairwise distances on the B x M matrix of a batch against itself or a reference set.

All functions are pure: tensors in, tensors out, no state. They keep the input dtype; the
losses upcast half precision to float32 before calling them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mbdl.functional.reductions import upcast

Distance = Literal["euclidean", "squared_euclidean", "cosine"]
DISTANCES: tuple[str, ...] = ("euclidean", "squared_euclidean", "cosine")


def check_distance(distance: str) -> None:
    """Raise ``ValueError`` unless ``distance`` is one of :data:`DISTANCES`."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(DISTANCES)}; got {distance!r}")


def squared_euclidean_distance(x: Tensor, y: Tensor | None = None) -> Tensor:
    """``D_ij = ||x_i - y_j||^2`` as ``|x_i|^2 + |y_j|^2 - 2 x_i.y_j``, clamped at 0.

    With ``y=None`` the matrix is of ``x`` against itself and its diagonal is exactly 0.
    """
    same = y is None
    y = x if y is None else y
    x_sq = x.pow(2).sum(dim=1, keepdim=True)
    y_sq = x_sq if same else y.pow(2).sum(dim=1, keepdim=True)
    sq = torch.addmm(x_sq + y_sq.T, x, y.T, alpha=-2.0).clamp_min(0)
    if same:
        sq = sq.masked_fill(torch.eye(sq.shape[0], dtype=torch.bool, device=sq.device), 0)
    return sq


class _SafeSqrt(torch.autograd.Function):
    """``sqrt`` of a non-negative tensor whose gradient is 0 (not inf) where the input is 0."""

    @staticmethod
    def forward(ctx: Any, sq: Tensor) -> Tensor:
        root = sq.clamp_min(0).sqrt_()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (root,) = ctx.saved_tensors
        # 1 / (2 root) where root > 0, exactly 0 where root == 0 (0 / tiny), without torch.where
        tiny = torch.finfo(root.dtype).tiny
        factor = (root > 0).to(root.dtype).div_(root.clamp_min(tiny)).mul_(0.5)
        return grad * factor


def safe_sqrt(sq: Tensor) -> Tensor:
    """``sqrt(sq)`` with value 0 and a finite (zero) gradient where ``sq <= 0``.

    A small autograd function with arithmetic masking: masking ``sqrt`` with ``torch.where``
    costs several times more on CPU (measurable at B = 1024).
    """
    return _SafeSqrt.apply(sq)


def euclidean_distance(x: Tensor, y: Tensor | None = None) -> Tensor:
    """``D_ij = ||x_i - y_j||_2``; finite gradient at zero distance (duplicates, self-pairs)."""
    return safe_sqrt(squared_euclidean_distance(x, y))


def cosine_distance(x: Tensor, y: Tensor | None = None) -> Tensor:
    """``D_ij = 1 - cos(x_i, y_j)``; zero vectors are treated as having cosine 0 with everything."""
    x_unit = torch.nn.functional.normalize(x, dim=1)
    y_unit = x_unit if y is None else torch.nn.functional.normalize(y, dim=1)
    return 1 - x_unit @ y_unit.T


def pairwise_distance(x: Tensor, y: Tensor | None = None, distance: str = "euclidean") -> Tensor:
    """The ``B x M`` distance matrix of rows of ``x`` (``B x d``) against rows of ``y`` (``M x d``).

    ``distance`` is ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"`` (``1 - cos``).
    ``y=None`` means ``y = x``.
    """
    check_distance(distance)
    if distance == "euclidean":
        return euclidean_distance(x, y)
    if distance == "squared_euclidean":
        return squared_euclidean_distance(x, y)
    return cosine_distance(x, y)


def loss_distances(
    embeddings: Tensor,
    ref_emb: Tensor | None = None,
    *,
    distance: str = "euclidean",
    normalize: bool = True,
) -> Tensor:
    """The ``B x M`` distance matrix a loss works on.

    fp16/bf16 are upcast to fp32 (mixed dtypes promoted; autocast is disabled here), both sets are optionally L2-normalised,
    then :func:`pairwise_distance` (``ref_emb=None``: the batch against itself, exact-0 diagonal).
    """
    check_distance(distance)
    x = upcast(embeddings)
    y = None if ref_emb is None else upcast(ref_emb)
    if y is not None and y.dtype != x.dtype:
        common = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(common), y.to(common)
    # under autocast the matrix product would run in half precision again: keep it in fp32
    with torch.autocast(device_type=x.device.type, enabled=False):
        if normalize:
            x = torch.nn.functional.normalize(x, dim=1)
            y = None if y is None else torch.nn.functional.normalize(y, dim=1)
        return pairwise_distance(x, y, distance)
