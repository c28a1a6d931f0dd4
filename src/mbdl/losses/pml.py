"""pytorch-metric-learning losses as mbdl losses: ``loss.name=pml:<LossClass>``.

:func:`pml_loss_class` wraps a loss class of ``pytorch_metric_learning.losses`` in a
:class:`~mbdl.losses.base.MetricLoss` whose constructor takes the PML class's own named keyword
arguments (so ``loss.<param>=...`` is validated like a built-in's), plus ``miner``: the name
``pml:<MinerClass>`` of a ``pytorch_metric_learning.miners`` miner built with its defaults,
whose mined tuples the loss gets. PML's ``embedding_size`` is mbdl's ``embedding_dim`` and,
with ``num_classes``, supplied by the trainer (``needs``). Integer defaults of PML's
hyper-parameters (e.g. ``ContrastiveLoss(pos_margin=0)``) are taken as floats, except the
counts in :data:`INTEGER_PARAMETERS`.

A reference set (cross-batch memory, embeddings of other processes) is passed as PML's
``ref_emb`` / ``ref_labels``; mbdl's ``anchor_offset`` (``ref_emb[anchor_offset + i]`` is
``embeddings[i]``) becomes an ``indices_tuple`` without those self pairs. Losses with class
weights (``num_classes``: ArcFace, ProxyAnchor, ...) take no reference set.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mbdl.losses import PML_PREFIX
from mbdl.losses.base import MetricLoss
from mbdl.plugins import PluginError

#: PML hyper-parameters with integer defaults that are counts (kept integers)
INTEGER_PARAMETERS = {"centers_per_class", "memory_size"}

#: PML classes whose ``margin`` is an integer multiplier
INTEGER_MARGIN = ("LargeMarginSoftmaxLoss", "SphereFaceLoss")

#: PML constructor arguments mbdl supplies (from the data): PML name -> mbdl name
SUPPLIED = {"num_classes": "num_classes", "embedding_size": "embedding_dim"}


def _pml(module: str) -> Any:
    try:
        import importlib

        return importlib.import_module(f"pytorch_metric_learning.{module}")
    except ImportError:
        raise PluginError(
            "pml: losses need the pytorch-metric-learning package: pip install 'mbdl[pml]'"
        ) from None


def _pml_class(name: str, module: str, base: str, what: str) -> type:
    """The class ``name`` of ``pytorch_metric_learning.<module>``, a subclass of ``base``."""
    class_name = name.removeprefix(PML_PREFIX)
    found = getattr(_pml(module), class_name, None) if class_name.isidentifier() else None
    required = getattr(_pml(module), base)
    if not isinstance(found, type):
        raise PluginError(
            f"{name!r} is not a class of pytorch_metric_learning.{module}; write "
            f"{PML_PREFIX}<{what}Class>, e.g. {PML_PREFIX}"
            f"{'ContrastiveLoss' if what == 'Loss' else 'MultiSimilarityMiner'}"
        )
    if not issubclass(found, required):
        raise PluginError(
            f"{name!r} is not a pytorch-metric-learning {what.lower()} "
            f"({found.__qualname__} is not a {base})"
        )
    return found


def pml_miner(name: str) -> nn.Module:
    """The miner ``pml:<MinerClass>`` with its default arguments."""
    cls = _pml_class(name, "miners", "BaseMiner", "Miner")
    try:
        return cls()
    except TypeError as error:
        raise PluginError(f"miner {name!r} cannot be built with its defaults: {error}") from None


def _default(cls: type, name: str, value: Any) -> Any:
    integer = name in INTEGER_PARAMETERS or (
        name == "margin" and any(c.__name__ in INTEGER_MARGIN for c in cls.__mro__)
    )
    if isinstance(value, int) and not isinstance(value, bool) and not integer:
        return float(value)
    return value


def without_self_pairs(indices: tuple[Tensor, ...], anchor_offset: int) -> tuple[Tensor, ...]:
    """A PML ``indices_tuple`` (pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``) without the
    pairs of an anchor with its own copy ``ref_emb[anchor_offset + a]``."""
    if len(indices) == 4:
        a1, p, a2, n = indices
        keep_p, keep_n = p != a1 + anchor_offset, n != a2 + anchor_offset
        return a1[keep_p], p[keep_p], a2[keep_n], n[keep_n]
    a, p, n = indices
    keep = (p != a + anchor_offset) & (n != a + anchor_offset)
    return a[keep], p[keep], n[keep]


class PmlLoss(MetricLoss):
    """The base of the generated wrappers: ``pml_class`` built with the constructor's
    arguments, called as PML's ``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)``."""

    pml_class: ClassVar[type]

    def __init__(self, miner: str | None = None, **params: Any) -> None:
        super().__init__()
        options = dict(params)
        if "embedding_dim" in options:
            options["embedding_size"] = options.pop("embedding_dim")
        self.miner_name = miner
        self.miner = pml_miner(miner) if miner is not None else None
        self.loss = type(self).pml_class(**options)

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        anchor_offset: int | None,
    ) -> Tensor:
        if ref_emb is not None and not self.accepts_ref:
            raise ValueError(
                f"{self.pml_class.__name__} takes no reference set: its anchors are class weights"
            )
        indices = None
        if self.miner is not None:
            indices = self.miner(embeddings, labels, ref_emb, ref_labels)
        if ref_emb is not None and anchor_offset is not None:
            if indices is None:
                from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

                indices = lmu.get_all_pairs_indices(labels, ref_labels)
            indices = without_self_pairs(tuple(indices), anchor_offset)
        loss = self.loss(embeddings, labels, indices, ref_emb, ref_labels)
        return loss if isinstance(loss, Tensor) else torch.as_tensor(loss)

    def extra_repr(self) -> str:
        return f"miner={self.miner_name!r}" if self.miner_name else ""


_CACHE: dict[str, type[MetricLoss]] = {}


def pml_loss_class(name: str) -> type[MetricLoss]:
    """The :class:`MetricLoss` wrapping ``pml:<LossClass>`` (one class per name, cached); a
    name that is not a PML loss: :class:`PluginError`."""
    if name in _CACHE:
        return _CACHE[name]
    cls = _pml_class(name, "losses", "BaseMetricLossFunction", "Loss")
    if not re.fullmatch(r"pml:[A-Za-z_][A-Za-z0-9_]*", name):
        raise PluginError(f"{name!r}: write {PML_PREFIX}<LossClass>")
    own = inspect.signature(cls).parameters
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    needs = []
    for param in own.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name in SUPPLIED:
            needs.append(SUPPLIED[param.name])
            parameters.append(inspect.Parameter(SUPPLIED[param.name], param.KEYWORD_ONLY))
            continue
        default = param.default
        if default is not param.empty:
            default = _default(cls, param.name, default)
        parameters.append(inspect.Parameter(param.name, param.KEYWORD_ONLY, default=default))
    parameters.append(inspect.Parameter("miner", inspect.Parameter.KEYWORD_ONLY, default=None))

    def __init__(self: PmlLoss, **params: Any) -> None:
        PmlLoss.__init__(self, **params)

    __init__.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    wrapper = type(
        f"Pml{cls.__name__}",
        (PmlLoss,),
        {
            "__init__": __init__,
            "__doc__": f"pytorch-metric-learning's {cls.__name__} ({PML_PREFIX}{cls.__name__}).",
            "__module__": __name__,
            "pml_class": cls,
            "needs": tuple(needs),
            "accepts_ref": "num_classes" not in own,
        },
    )
    _CACHE[name] = wrapper
    return wrapper
