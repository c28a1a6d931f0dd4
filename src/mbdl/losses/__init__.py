"""Losses: one file per loss, each a thin ``nn.Module`` over a pure function of :mod:`mbdl.functional`.

Every loss is called as ``loss(embeddings, labels, ref_emb=None, ref_labels=None)``.
"""

from __future__ import annotations

import importlib
from typing import Any

from mbdl.losses.base import MetricLoss

# config name -> (module, class). Classes are imported on first use so `import mbdl.losses` is light.
LOSSES: dict[str, tuple[str, str]] = {
    "mdl": ("mbdl.losses.mdl", "MarginDiscriminateLoss"),
    "contrastive": ("mbdl.losses.contrastive", "ContrastiveLoss"),
    "triplet": ("mbdl.losses.triplet", "TripletMarginLoss"),
    "lifted": ("mbdl.losses.lifted", "LiftedStructureLoss"),
    "npair": ("mbdl.losses.npair", "NPairLoss"),
    "margin": ("mbdl.losses.margin", "MarginLoss"),
    "multisimilarity": ("mbdl.losses.multisimilarity", "MultiSimilarityLoss"),
    "proxyanchor": ("mbdl.losses.proxyanchor", "ProxyAnchorLoss"),
}
_BY_CLASS = {cls: module for module, cls in LOSSES.values()}

__all__ = ["LOSSES", "MetricLoss", "build_loss", "loss_class", *sorted(_BY_CLASS)]


def loss_class(name: str) -> type[MetricLoss]:
    """The loss class registered under the config name ``name`` (``mdl``, ``triplet``, ...)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    module, cls = LOSSES[name]
    found: type[MetricLoss] = getattr(importlib.import_module(module), cls)
    return found


def build_loss(name: str, **params: Any) -> MetricLoss:
    """Instantiate the loss registered as ``name`` with its hyper-parameters ``params``."""
    return loss_class(name)(**params)


def __getattr__(attr: str) -> Any:
    if attr in _BY_CLASS:
        return getattr(importlib.import_module(_BY_CLASS[attr]), attr)
    raise AttributeError(f"module 'mbdl.losses' has no attribute {attr!r}")
