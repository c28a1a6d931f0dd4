"""Checkpoints that cannot run code, written atomically.

A checkpoint is a dict of tensors and plain Python values (str, int, float, bool, None, lists,
dicts), saved with ``torch.save`` into a temporary file in the same directory and moved into
place with ``os.replace``: a reader sees the old file or the new one, never half of one. It is
read back with ``torch.load(..., weights_only=True)``, which refuses any pickle that would import
or call code, so a checkpoint received from someone else is safe to open.

Keys: ``format`` ("mbdl-checkpoint"), ``version``, ``config`` (the run's nested config),
``model_args`` (for :func:`mbdl.models.build_model`), ``data_args`` (source, root, image_size,
channels, imagenet_norm), ``model_state``; ``last.pt`` adds the training state (optimiser,
scheduler, GradScaler, loss parameters, RNG states, position, best metric, history,
``world_size``: the number of processes that wrote it, and ``xbm_state``: the cross-batch memory
when ``train.xbm_size > 0``).
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbdl.fileio import default_file_mode

FORMAT = "mbdl-checkpoint"
VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` into ``path`` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp_name, default_file_mode())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint dict (tensors and plain values only) atomically to ``path``."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """Read an mbdl checkpoint with ``torch.load(weights_only=True)``.

    Raises ``ValueError`` naming the file when it does not exist, is not a checkpoint, or
    contains anything but tensors and plain values (a pickle that could run code is refused).
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"checkpoint {str(file)!r} does not exist")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"refusing to load {str(file)!r}: it is not a plain checkpoint of tensors and values "
            f"(torch.load weights_only=True: {first})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot read checkpoint {str(file)!r}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(file)!r} is not an mbdl checkpoint")
    if state.get("version", 0) > VERSION:
        raise ValueError(
            f"{str(file)!r} is checkpoint version {state['version']}; this mbdl reads up to "
            f"{VERSION}: upgrade mbdl"
        )
    return state


def model_from_state(state: dict[str, Any], device: str | torch.device = "cpu") -> torch.nn.Module:
    """The :class:`mbdl.models.EmbeddingModel` of a loaded checkpoint, in eval mode."""
    from mbdl.models import build_model

    args = dict(state["model_args"])
    model = build_model(
        args.pop("backbone"),
        args.pop("embedding_dim"),
        pretrained=None,  # the weights come from the checkpoint, never from the network
        **args,
    )
    model.load_state_dict(state["model_state"])
    return model.to(device).eval()


def model_from_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load the embedding model stored in checkpoint ``path`` (``best.pt`` or ``last.pt``)."""
    return model_from_state(load_checkpoint(path), device)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or a run directory meaning its ``checkpoints/best.pt`` (else ``last.pt``)."""
    target = Path(path)
    if target.is_dir():
        for name in ("best.pt", "last.pt"):
            candidate = target / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise ValueError(f"{str(target)!r} is not a run directory with checkpoints/best.pt")
    if not target.exists():
        raise ValueError(f"{str(target)!r} does not exist (give a run directory or a .pt file)")
    return target


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
