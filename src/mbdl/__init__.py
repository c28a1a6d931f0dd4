"""mbdl: deep metric learning with the Margin-based Discriminate Loss (Sun, Tang, Bai, S+SSPR 2018)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_embedder(path: Any, device: Any = "cpu") -> Any:
    """``(model, transform)`` of a model directory, run directory or checkpoint
    (:func:`mbdl.export.load_embedder`)."""
    from mbdl.export import load_embedder as load

    return load(path, device)


def search(index: Any, queries: Any, *, k: int = 5, threshold: Any = None, **options: Any) -> Any:
    """The ``k`` nearest items of a catalog index for each query (image paths, PIL images,
    tensors or an embeddings array), as :class:`mbdl.catalog.QueryResult` objects
    (:func:`mbdl.catalog.search`; :class:`Searcher` keeps the model loaded for many calls)."""
    from mbdl.catalog import search as run

    return run(index, queries, k=k, threshold=threshold, **options)


def __getattr__(name: str) -> Any:
    if name == "Searcher":  # imported on first use: `import mbdl` stays light
        from mbdl.catalog import Searcher

        return Searcher
    raise AttributeError(f"module 'mbdl' has no attribute {name!r}")


__all__ = ["Searcher", "__version__", "load_embedder", "search"]
