"""What a trained model is: the record that travels with its weights, the checkpoint format and
loading (:func:`load_model`).

- :mod:`mbdl.model.record`: :class:`ModelRecord`, read through :func:`read_record`;
- :mod:`mbdl.model.checkpoint`: the checkpoint format (save, load within bounds, check);
- :mod:`mbdl.model.loading`: :func:`load_model`, :func:`load_state`, :func:`load_embedder`;
- :mod:`mbdl.model.preprocessing`: the preprocessing spec and its transform.

Names are imported on first use, so ``import mbdl.model`` stays light.
"""

from __future__ import annotations

from typing import Any

from mbdl.model.preprocessing import preprocessing_spec, transform_from_spec

_LAZY = {
    "ModelRecord": "mbdl.model.record",
    "VerificationRecord": "mbdl.model.record",
    "Provenance": "mbdl.model.record",
    "read_record": "mbdl.model.record",
    "LoadedModel": "mbdl.model.loading",
    "load_model": "mbdl.model.loading",
    "load_state": "mbdl.model.loading",
    "load_embedder": "mbdl.model.loading",
    "is_model_dir": "mbdl.model.loading",
    "load_checkpoint": "mbdl.model.checkpoint",
    "save_checkpoint": "mbdl.model.checkpoint",
    "model_from_state": "mbdl.model.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["preprocessing_spec", "transform_from_spec", *_LAZY]
