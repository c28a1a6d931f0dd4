"""mbdl: deep metric learning with the Margin-based Discriminate Loss (Sun, Tang, Bai, S+SSPR 2018)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_embedder(path: Any, device: Any = "cpu") -> Any:
    """``(model, transform)`` of a model directory, run directory or checkpoint
    (:func:`mbdl.export.load_embedder`)."""
    from mbdl.export import load_embedder as load

    return load(path, device)


__all__ = ["__version__", "load_embedder"]
