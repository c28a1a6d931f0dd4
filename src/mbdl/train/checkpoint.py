"""Training-only parts of a checkpoint (RNG states); the checkpoint format itself lives in
:mod:`mbdl.model.checkpoint` and its names are re-exported here for code written before it moved.

``last.pt`` adds to the model's fields the training state: optimiser, scheduler, GradScaler, loss
parameters, RNG states (:func:`rng_state`), position, best metric, history, ``world_size`` (the
number of processes that wrote it) and ``xbm_state`` (the cross-batch memory when
``train.xbm_size > 0``).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from mbdl.model.checkpoint import (
    FORMAT,
    LIMITS,
    VERSION,
    atomic_torch_save,
    check_checkpoint,
    check_state_matches,
    check_stored_plugins,
    load_checkpoint,
    model_from_checkpoint,
    model_from_state,
    resolve_checkpoint,
    save_checkpoint,
)

# ---------------------------------------------------------------------------------------------
# RNG states as plain values


def rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global and torch's CPU (and CUDA) generators."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


__all__ = [
    "FORMAT",
    "LIMITS",
    "VERSION",
    "atomic_torch_save",
    "check_checkpoint",
    "check_state_matches",
    "check_stored_plugins",
    "load_checkpoint",
    "model_from_checkpoint",
    "model_from_state",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
