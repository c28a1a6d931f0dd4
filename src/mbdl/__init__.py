"""mbdl: deep metric learning with the Margin-based Discriminate Loss (Sun, Tang, Bai, S+SSPR 2018).

The library under the commands is imported on first use (``import mbdl`` stays light):

- :func:`load_model` (a :class:`mbdl.model.LoadedModel`: module, record, transform),
  :func:`read_record` (the :class:`mbdl.model.ModelRecord`), :func:`load_embedder`;
- :func:`embed`, :func:`embed_images`, :func:`verify`, :func:`evaluate_model`,
  :func:`search_split` (:mod:`mbdl.inference`), each returning a dataclass.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: name -> the module it lives in, imported on first use
_LAZY = {
    "load_embedder": "mbdl.model.loading",
    "load_model": "mbdl.model.loading",
    "read_record": "mbdl.model.record",
    "ModelRecord": "mbdl.model.record",
    "embed": "mbdl.inference",
    "embed_images": "mbdl.inference",
    "verify": "mbdl.inference",
    "evaluate_model": "mbdl.inference",
    "search_split": "mbdl.inference",
    "Searcher": "mbdl.catalog",
    "search": "mbdl.catalog",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
