"""Losses: one file per loss, each a thin ``nn.Module`` over a pure function of :mod:`mbdl.functional`.

Every loss is called as ``loss(embeddings, labels, ref_emb=None, ref_labels=None)``.

The registry :data:`LOSSES` finds the built-in losses itself: every class of a module of this
package that declares a ``name`` (see :class:`~mbdl.losses.base.MetricLoss`) is registered under
it, so a new loss is its file and nothing else. ``loss.name`` also takes an import path
``my_package.my_module:MyLoss``, the name an installed package declares in the entry-point
group ``mbdl.losses`` (see :mod:`mbdl.plugins`) or ``pml:<LossClass>``, any loss of
pytorch-metric-learning (:mod:`mbdl.losses.pml`).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn

from mbdl.losses.base import (
    FunctionalLoss,
    LossDeclarationError,
    MetricLoss,
    check_declaration,
)
from mbdl.plugins import PluginError, Registry

#: the ``loss.name`` prefix of pytorch-metric-learning's losses (``pml:ContrastiveLoss``)
PML_PREFIX = "pml:"

__all__ = [
    "LOSSES",
    "FunctionalLoss",
    "LossDeclarationError",
    "MetricLoss",
    "build_loss",
    "builtin_losses",
    "check_loss_class",
    "loss_class",
    "search_grid",
]


def discover_losses(package: str, path: list[str]) -> dict[str, type[MetricLoss]]:
    """Config name -> class of every :class:`MetricLoss` that declares a ``name`` in the modules
    of ``package`` (found by listing its files: no hand-written list): MDL, the project's loss,
    first, then by module name."""
    found: dict[str, type[MetricLoss]] = {}
    for info in sorted(
        pkgutil.iter_modules(path), key=lambda module: (module.name != "mdl", module.name)
    ):
        module = importlib.import_module(f"{package}.{info.name}")
        for cls in vars(module).values():
            if not (
                isinstance(cls, type)
                and issubclass(cls, MetricLoss)
                and cls.__module__ == module.__name__
                and vars(cls).get("name") is not None
            ):
                continue
            name = str(cls.name)
            if name in found:
                raise LossDeclarationError(
                    f"loss name {name!r} is declared twice: by {found[name].__module__}."
                    f"{found[name].__qualname__} and by {cls.__module__}.{cls.__qualname__}"
                )
            found[name] = cls
    return found


class _BuiltinLosses(Mapping[str, Callable[[], type[MetricLoss]]]):
    """The built-in losses as the registry's ``name -> loader``, discovered on first use (so
    ``import mbdl.losses`` imports no loss module)."""

    def __init__(self) -> None:
        self._classes: dict[str, type[MetricLoss]] | None = None

    def classes(self) -> dict[str, type[MetricLoss]]:
        if self._classes is None:
            self._classes = discover_losses(__name__, list(__path__))
        return self._classes

    def __getitem__(self, name: str) -> Callable[[], type[MetricLoss]]:
        cls = self.classes()[name]
        return lambda: cls

    def __iter__(self) -> Iterator[str]:
        return iter(self.classes())

    def __len__(self) -> int:
        return len(self.classes())


def check_loss_class(found: Any, name: str) -> type[nn.Module]:
    """``found`` if it is a usable loss class, else :class:`PluginError` saying what is wrong.

    A usable loss is a :class:`MetricLoss` subclass, or an ``nn.Module`` subclass whose
    ``forward`` takes ``(embeddings, labels, ref_emb=None, ref_labels=None)`` (and
    ``anchor_offset=None`` unless it declares ``accepts_ref = False``), with a valid
    declaration (``needs``, ``accepts_ref``; ``search_grid`` when it sets ``name``).
    """
    what = f"loss {name!r}"
    if not isinstance(found, type):
        raise PluginError(
            f"{what} is a {type(found).__name__}, not a class: name a subclass of "
            "mbdl.losses.MetricLoss (or of torch.nn.Module)"
        )
    if not issubclass(found, nn.Module):
        raise PluginError(
            f"{what}: {found.__qualname__} is not a torch.nn.Module; subclass "
            "mbdl.losses.MetricLoss"
        )
    if issubclass(found, MetricLoss):
        return found  # its declaration was checked when the class was created
    check_declaration(found)
    forward = inspect.signature(found.forward)
    try:
        forward.bind(None, "embeddings", "labels")
        forward.bind(None, "embeddings", "labels", "ref_emb", "ref_labels")
    except TypeError:
        raise PluginError(
            f"{what}: {found.__qualname__}.forward{forward} must take (embeddings, labels, "
            "ref_emb=None, ref_labels=None); or subclass mbdl.losses.MetricLoss"
        ) from None
    if getattr(found, "accepts_ref", True):
        try:
            forward.bind(None, "embeddings", "labels", "ref_emb", "ref_labels", anchor_offset=0)
        except TypeError:
            raise PluginError(
                f"{what}: {found.__qualname__}.forward takes no anchor_offset keyword, which "
                "cross-batch memory passes: add anchor_offset=None, or set accepts_ref = False"
            ) from None
    return found


class LossRegistry(Registry[type[nn.Module]]):
    """The :class:`mbdl.plugins.Registry` of losses, which also wraps pytorch-metric-learning's
    losses, ``pml:<LossClass>`` (:mod:`mbdl.losses.pml`)."""

    def __contains__(self, name: object) -> bool:
        return (isinstance(name, str) and name.startswith(PML_PREFIX)) or super().__contains__(name)

    def get(self, name: str) -> type[nn.Module]:
        if name.startswith(PML_PREFIX):
            from mbdl.losses.pml import pml_loss_class

            return pml_loss_class(name)
        return super().get(name)


_BUILTIN = _BuiltinLosses()

#: Every loss by config name: the built-ins (discovered), ``pml:<LossClass>``, import paths,
#: installed plugins.
LOSSES: Registry[type[nn.Module]] = LossRegistry("loss", "mbdl.losses", _BUILTIN, check_loss_class)


def builtin_losses() -> dict[str, type[MetricLoss]]:
    """Config name -> class of every built-in loss, ordered by module name."""
    return dict(_BUILTIN.classes())


def loss_class(name: str) -> type[nn.Module]:
    """The loss class for ``loss.name``: a built-in name (``mdl``, ``triplet``, ...), the name an
    installed package declares in the entry-point group ``mbdl.losses``, or an import path
    ``my_package.my_module:MyLoss``. Raises :class:`PluginError` (a ``ValueError``) naming the
    problem."""
    return LOSSES.get(name)


def build_loss(name: str, **params: Any) -> nn.Module:
    """Instantiate the loss ``name`` (see :func:`loss_class`) with its hyper-parameters ``params``."""
    return loss_class(name)(**params)


def search_grid(name: str) -> tuple[str, tuple[float, ...]]:
    """``(constructor keyword, values)`` that ``mbdl compare`` searches for loss ``name``, the
    default first (the class's ``search_grid``)."""
    grid = getattr(loss_class(name), "search_grid", None)
    if grid is None:
        raise PluginError(
            f"loss {name!r} declares no search_grid, which mbdl compare needs: add e.g. "
            "search_grid = ('margin', (0.2, 0.1, 0.4)) to its class (a constructor keyword, its "
            "default first)"
        )
    param, values = grid
    return str(param), tuple(values)


def __getattr__(attr: str) -> Any:  # the loss classes by class name, imported on first use
    if attr.startswith("__"):
        raise AttributeError(attr)
    for cls in builtin_losses().values():
        if cls.__name__ == attr:
            return cls
    raise AttributeError(f"module 'mbdl.losses' has no attribute {attr!r}")
