"""Pairwise distances on the B x M matrix of a batch against itself or a reference set.

All functions are pure: tensors in, tensors out, no state. They keep the input dtype; the
losses upcast half precision to float32 before calling them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mbdl.functional.reductions import upcast

Distance = Literal["euclidean", "squared_euclidean", "cosine"]
DISTANCES: tuple[str, ...] = ("euclidean", "squared_euclidean", "cosine")


def check_distance(distance: str) -> None:
    """Raise ``ValueError`` unless ``distance`` is one of :data:`DISTANCES`."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(DISTANCES)}; got {distance!r}")


NORMALIZE_EPS = 1e-12  # as torch.nn.functional.normalize: x / max(||x||, eps)


class _EuclideanMatrix(torch.autograd.Function):
    """``D_ij = ||x_i - y_j||^2`` (``root=False``) or ``||x_i - y_j||`` (``root=True``), of the
    rows or (``normalize=True``) of the rows L2-normalised, with a hand-written backward: two
    matrix products, where autograd through the normalisation, the expansion
    ``|x_i|^2 + |y_j|^2 - 2 x_i.y_j`` and the square root runs a dozen passes over ``B x M``.

    With ``G = dL/dD^2`` (for the root ``dL/dD / (2 D)``, 0 where ``D = 0``):
    ``dL/dx = 2 (rowsum(G) x - G y)`` and ``dL/dy = 2 (colsum(G) y - G^T x)``. Entries clamped
    at 0 (rounding below zero) and, with ``y=None``, the exact-0 diagonal get no gradient.
    Through ``u = x / c``, ``c = max(||x||, eps)``: ``dL/dx = (dL/du - u (u . dL/du) [||x|| >=
    eps]) / c``, as autograd through :func:`torch.nn.functional.normalize` gives.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor | None, root: bool, normalize: bool) -> Tensor:
        x_norm = y_norm = None
        if normalize:
            x_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            x = x / x_norm.clamp_min(NORMALIZE_EPS)
            if y is not None:
                y_norm = torch.linalg.vector_norm(y, dim=1, keepdim=True)
                y = y / y_norm.clamp_min(NORMALIZE_EPS)
        other = x if y is None else y
        x_sq = x.pow(2).sum(dim=1, keepdim=True)
        y_sq = x_sq if y is None else other.pow(2).sum(dim=1, keepdim=True)
        sq = torch.addmm(x_sq + y_sq.T, x, other.T, alpha=-2.0)
        kept = None if root else sq >= 0  # the root's gradient is 0 at 0 anyway
        sq.clamp_min_(0)
        if y is None:
            sq.diagonal().zero_()
        out = sq.sqrt_() if root else sq
        ctx.root = root
        ctx.save_for_backward(x, y, out if root else kept, x_norm, y_norm)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, y, saved, x_norm, y_norm = ctx.saved_tensors
        if ctx.root:  # dL/dD^2 = dL/dD / (2 D): the 1/2 is folded into the factor 2 below
            grad = (grad / saved).masked_fill_(saved == 0, 0.0)
            factor = 1.0
        else:
            grad = grad * saved
            factor = 2.0
        grad_x = grad_y = None
        if y is None:
            grad.diagonal().zero_()
            both = grad + grad.T  # x on both sides of every pair
            grad_x = torch.addmm(x * both.sum(dim=1, keepdim=True), both, x, alpha=-1.0)
            return _unnormalized(grad_x.mul_(factor), x, x_norm), None, None, None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(x * grad.sum(dim=1, keepdim=True), grad, y, alpha=-1.0)
            grad_x = _unnormalized(grad_x.mul_(factor), x, x_norm)
        if ctx.needs_input_grad[1]:
            grad_y = torch.addmm(y * grad.sum(dim=0)[:, None], grad.T, x, alpha=-1.0)
            grad_y = _unnormalized(grad_y.mul_(factor), y, y_norm)
        return grad_x, grad_y, None, None


def _unnormalized(grad_unit: Tensor, unit: Tensor, norm: Tensor | None) -> Tensor:
    """The gradient through ``unit = x / max(||x||, eps)`` (``norm=None``: no normalisation)."""
    if norm is None:
        return grad_unit
    along = (unit * grad_unit).sum(dim=1, keepdim=True)
    along = torch.where(norm >= NORMALIZE_EPS, along, 0.0)  # a clamped norm passes no gradient
    return grad_unit.sub_(unit * along).div_(norm.clamp_min(NORMALIZE_EPS))


def squared_euclidean_distance(x: Tensor, y: Tensor | None = None) -> Tensor:
    """``D_ij = ||x_i - y_j||^2`` as ``|x_i|^2 + |y_j|^2 - 2 x_i.y_j``, clamped at 0.

    With ``y=None`` the matrix is of ``x`` against itself and its diagonal is exactly 0.
    """
    result: Tensor = _EuclideanMatrix.apply(x, y, False, False)
    return result


def euclidean_distance(x: Tensor, y: Tensor | None = None) -> Tensor:
    """``D_ij = ||x_i - y_j||_2``; a finite (zero) gradient at zero distance (duplicates,
    self-pairs), where autograd through ``sqrt`` would give inf."""
    result: Tensor = _EuclideanMatrix.apply(x, y, True, False)
    return result


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
        if distance != "cosine":  # normalised inside, with one hand-written backward
            result: Tensor = _EuclideanMatrix.apply(x, y, distance == "euclidean", normalize)
            return result
        if normalize:
            x = torch.nn.functional.normalize(x, dim=1)
            y = None if y is None else torch.nn.functional.normalize(y, dim=1)
        return pairwise_distance(x, y, distance)
