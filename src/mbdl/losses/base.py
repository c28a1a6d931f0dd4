"""The base class of every mbdl loss: its declaration, input validation and the call signature."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mbdl.functional.checks import loss_inputs_checked
from mbdl.plugins import PluginError

#: Constructor arguments the trainer can supply from the data (``needs``).
TRAINER_SUPPLIED = ("num_classes", "embedding_dim")


class LossDeclarationError(PluginError):
    """A loss class whose declaration (``name``, ``needs``, ``accepts_ref``, ``search_grid``) is invalid."""


class MetricLoss(nn.Module):
    """``loss(embeddings, labels, ref_emb=None, ref_labels=None, *, anchor_offset=None)``.

    Anchors are the rows of ``embeddings``; positives and negatives come from ``ref_emb`` when
    given (cross-batch memory, embeddings gathered from other GPUs), else from the batch itself.
    ``anchor_offset=k`` says that ``ref_emb[k + i]`` is ``embeddings[i]`` itself, so that pair is
    skipped (the batch itself is always skipped when ``ref_emb`` is None).
    Subclasses implement :meth:`compute` over the pure functions of :mod:`mbdl.functional`.

    A loss is declared once, by class attributes that everything else reads (config choices,
    ``mbdl compare``'s grids, the docs):

    - ``name``: the config name (``loss.name=...``); a class of the ``mbdl.losses`` package that
      sets it is registered.
    - ``needs``: the constructor arguments the trainer supplies (``"num_classes"``,
      ``"embedding_dim"``), for losses with parameters of their own.
    - ``accepts_ref``: whether it takes ``ref_emb``/``ref_labels`` (cross-batch memory).
    - ``search_grid``: ``(constructor keyword, values)`` that ``mbdl compare`` searches, the
      constructor's default first. Required with ``name``.
    """

    name: ClassVar[str | None] = None
    needs: ClassVar[tuple[str, ...]] = ()
    accepts_ref: ClassVar[bool] = True  # False for losses that cannot take a reference set
    search_grid: ClassVar[tuple[str, tuple[float, ...]] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_declaration(cls)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        anchor_offset: int | None = None,
    ) -> Tensor:
        # validated here, once: the kernel's own check of these same tensors is skipped
        with loss_inputs_checked(embeddings, labels, ref_emb, ref_labels):
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


def constructor_defaults(cls: type) -> dict[str, Any]:
    """Keyword parameter -> default of ``cls.__init__`` (``inspect.Parameter.empty`` if required)."""
    parameters = inspect.signature(cls).parameters.values()
    return {
        p.name: p.default for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def check_declaration(cls: type[nn.Module]) -> None:
    """Raise :class:`LossDeclarationError` unless ``cls``'s declaration is complete and valid.

    ``needs`` must list constructor arguments the trainer supplies; a class that sets ``name``
    (in its own body) must also declare a ``search_grid`` whose keyword is a constructor
    argument and whose first value is that argument's default.
    """
    label = f"loss class {cls.__module__}.{cls.__qualname__}"
    defaults = constructor_defaults(cls)
    needs = getattr(cls, "needs", ())
    if not isinstance(needs, tuple) or any(n not in TRAINER_SUPPLIED for n in needs):
        raise LossDeclarationError(
            f"{label}: needs must be a tuple of {', '.join(TRAINER_SUPPLIED)}; got {needs!r}"
        )
    missing = [n for n in needs if n not in defaults]
    if missing:
        raise LossDeclarationError(
            f"{label}: needs lists {', '.join(missing)} but __init__ takes no such argument"
        )
    undeclared = [
        n for n in TRAINER_SUPPLIED if defaults.get(n) is inspect.Parameter.empty and n not in needs
    ]
    if undeclared:
        raise LossDeclarationError(
            f"{label}: __init__ requires {', '.join(undeclared)}, which only the trainer knows: "
            f"declare needs = {tuple(undeclared)!r}"
        )
    if not isinstance(getattr(cls, "accepts_ref", True), bool):
        raise LossDeclarationError(f"{label}: accepts_ref must be True or False")
    if vars(cls).get("name") is None:
        return
    name = vars(cls)["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise LossDeclarationError(
            f"{label}: name must be lower-case letters, digits and _ (a config name); got {name!r}"
        )
    grid = getattr(cls, "search_grid", None)
    if grid is None:
        raise LossDeclarationError(
            f"{label} (loss.name={name}) declares no search_grid: add e.g. "
            "search_grid = ('margin', (0.2, 0.1, 0.4)) (a constructor keyword, its default first) "
            "so that mbdl compare can tune it"
        )
    if not (
        isinstance(grid, tuple)
        and len(grid) == 2
        and isinstance(grid[0], str)
        and isinstance(grid[1], tuple)
        and grid[1]
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in grid[1])
    ):
        raise LossDeclarationError(
            f"{label}: search_grid must be (keyword, (numbers, ...)); got {grid!r}"
        )
    param, values = grid
    if param not in defaults or param in TRAINER_SUPPLIED:
        raise LossDeclarationError(
            f"{label}: search_grid searches {param!r}, which is not a keyword of its __init__"
        )
    if defaults[param] != values[0]:
        raise LossDeclarationError(
            f"{label}: search_grid must start with the default {param}={defaults[param]!r}; "
            f"got {values[0]!r}"
        )


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


class ProxyLoss(MetricLoss):
    """A loss over one learnable proxy per class: holds ``proxies`` (``num_classes x
    embedding_dim``, Kaiming-normal initialised with ``fan_out`` as in proxy anchor's code).
    The proxies are the anchors or the targets, so a reference set is refused with a
    ``ValueError`` that gives ``reference_refusal`` as the reason; labels must be in
    ``[0, num_classes)``. Subclasses implement :meth:`proxy_loss`.
    """

    needs = ("num_classes", "embedding_dim")
    accepts_ref = False
    reference_refusal: ClassVar[str] = "its anchors are the class proxies"

    def __init__(self, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1; got {num_classes!r}")
        if not (isinstance(embedding_dim, int) and embedding_dim >= 2):
            raise ValueError(f"embedding_dim must be an integer >= 2; got {embedding_dim!r}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        anchor_offset: int | None,
    ) -> Tensor:
        if ref_emb is not None or anchor_offset is not None:
            raise ValueError(
                f"{type(self).__name__} takes no reference set (ref_emb/anchor_offset): "
                f"{self.reference_refusal}"
            )
        return self.proxy_loss(embeddings, labels)

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``embeddings`` against :attr:`proxies`."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"
