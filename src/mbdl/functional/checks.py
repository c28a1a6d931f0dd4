"""Input validation shared by losses and metrics: one clear ``ValueError`` naming the problem."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

# identities of the (embeddings, labels, ref_emb, ref_labels) a loss module has just validated
_CHECKED: ContextVar[tuple[int, int, int, int] | None] = ContextVar(
    "mbdl_checked_loss_inputs", default=None
)


class NonFiniteError(ValueError):
    """Embeddings (or other values checked here) hold NaN or Inf."""


def check_number(
    name: str, value: float, *, minimum: float | None = None, above: float | None = None
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number, ``>= minimum`` and ``> above``
    where given: ``"<name> must be a finite number[ >= minimum | > above]; got <value>"``."""
    if minimum is not None:
        ok, bound = math.isfinite(value) and value >= minimum, f" >= {minimum:g}"
    elif above is not None:
        ok, bound = math.isfinite(value) and value > above, f" > {above:g}"
    else:
        ok, bound = math.isfinite(value), ""
    if not ok:
        raise ValueError(f"{name} must be a finite number{bound}; got {value}")


def check_embeddings(embeddings: Tensor, name: str = "embeddings") -> None:
    """Raise ``ValueError`` unless ``embeddings`` is a finite floating ``N x d`` tensor with ``d >= 2``."""
    if not isinstance(embeddings, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N x d); got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions per item; got shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"{name} must be floating point; got dtype {embeddings.dtype}")
    # a finite sum implies every element is finite (one cheap reduction); only a non-finite sum
    # (NaN/Inf, or an overflow of large finite values) needs the element-wise check
    values = embeddings.detach()
    if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        raise NonFiniteError(f"{name} contain NaN or Inf")


def check_labels(labels: Tensor, num_items: int, name: str = "labels") -> None:
    """Raise ``ValueError`` unless ``labels`` is a 1-D integer tensor of length ``num_items``."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integers; got dtype {labels.dtype}")
    if labels.shape[0] != num_items:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but the embeddings have {num_items} rows"
        )


def check_loss_inputs(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
) -> None:
    """Validate the ``(embeddings, labels, ref_emb, ref_labels)`` arguments every loss takes.

    Inside :func:`loss_inputs_checked` for these same tensor objects it returns at once, so a
    loss module that calls a kernel validates once per call (each check costs a host sync on GPU).
    """
    if _CHECKED.get() == _identities(embeddings, labels, ref_emb, ref_labels):
        return
    check_embeddings(embeddings)
    check_labels(labels, embeddings.shape[0])
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together")
    if ref_emb is not None and ref_labels is not None:
        check_embeddings(ref_emb, "ref_emb")
        check_labels(ref_labels, ref_emb.shape[0], "ref_labels")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb has dimension {ref_emb.shape[1]} but embeddings have {embeddings.shape[1]}"
            )


def _identities(*tensors: object) -> tuple[int, int, int, int]:
    first, second, third, fourth = (id(t) for t in tensors)
    return first, second, third, fourth


@contextmanager
def loss_inputs_checked(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
) -> Iterator[None]:
    """Validate the loss inputs now; inside the block, :func:`check_loss_inputs` of the same
    tensor objects (a kernel called by the module) skips the repeated check. Any other tensors
    (a kernel called on something else) are still checked."""
    check_loss_inputs(embeddings, labels, ref_emb, ref_labels)
    token = _CHECKED.set(_identities(embeddings, labels, ref_emb, ref_labels))
    try:
        yield
    finally:
        _CHECKED.reset(token)
