"""The base class of every mbdl loss: input validation and the common call signature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from mbdl.functional.checks import check_loss_inputs


class MetricLoss(nn.Module):
    """``loss(embeddings, labels, ref_emb=None, ref_labels=None, *, anchor_offset=None)``.

    Anchors are the rows of ``embeddings``; positives and negatives come from ``ref_emb`` when
    given (cross-batch memory, embeddings gathered from other GPUs), else from the batch itself.
    ``anchor_offset=k`` says that ``ref_emb[k + i]`` is ``embeddings[i]`` itself, so that pair is
    skipped (the batch itself is always skipped when ``ref_emb`` is None).
    Subclasses implement :meth:`compute` over the pure functions of :mod:`mbdl.functional`.
    ``needs`` names the constructor arguments the trainer must supply (``"num_classes"``,
    ``"embedding_dim"``) for losses with parameters of their own.
    """

    needs: tuple[str, ...] = ()
    accepts_ref: bool = True  # False for losses that cannot take a reference set (proxy losses)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        anchor_offset: int | None = None,
    ) -> Tensor:
        check_loss_inputs(embeddings, labels, ref_emb, ref_labels)
        return self.compute(embeddings, labels, ref_emb, ref_labels, anchor_offset)

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        anchor_offset: int | None,
    ) -> Tensor:
        raise NotImplementedError


class FunctionalLoss(MetricLoss):
    """A loss that is one pure function of :mod:`mbdl.functional` and its hyper-parameters.

    Subclasses set ``loss_function`` (called as ``f(embeddings, labels, ref_emb, ref_labels,
    anchor_offset=..., **hyper_parameters)``) and ``hyper_parameters`` (attribute names, in
    the order ``repr`` shows them); their ``__init__`` only validates and stores those.
    """

    loss_function: ClassVar[Callable[..., Tensor]]
    hyper_parameters: ClassVar[tuple[str, ...]] = ()

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        anchor_offset: int | None,
    ) -> Tensor:
        values: dict[str, Any] = {name: getattr(self, name) for name in self.hyper_parameters}
        return type(self).loss_function(
            embeddings, labels, ref_emb, ref_labels, anchor_offset=anchor_offset, **values
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self.hyper_parameters)
