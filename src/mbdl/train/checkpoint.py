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

A checkpoint received from someone else is read within bounds: the file must be torch's zip
format whose declared contents fit in the file (no compressed "bomb"), and after loading every
field that sizes an allocation (backbone, embedding size, channels, image size) is checked
against its type and :data:`LIMITS`, and every tensor's shape against the model it describes,
before the model is built or loaded. Any mismatch is a :class:`mbdl.errors.UserError` naming the
file and the field.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbdl.config import UPPER_BOUNDS
from mbdl.errors import UserError, terminal_safe
from mbdl.fileio import atomic_write

FORMAT = "mbdl-checkpoint"
VERSION = 1

#: bounds on the checkpoint fields that size allocations (inclusive)
LIMITS = {
    "embedding_dim": UPPER_BOUNDS["model.embedding_dim"],
    "image_size": UPPER_BOUNDS["data.image_size"],
}
#: how much more than its own size a checkpoint file may declare as contents (zip overhead)
_DECLARED_SLACK_BYTES = 1 << 20


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` into ``path`` atomically (:func:`mbdl.fileio.atomic_write`)."""
    atomic_write(path, lambda file: torch.save(obj, file))


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint dict (tensors and plain values only) atomically to ``path``."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def _check_container(file: Path) -> None:
    """Refuse a file that is not torch's zip format, or whose entries declare more data than
    the file holds (a compressed entry that would expand in memory)."""
    try:
        with zipfile.ZipFile(file) as archive:
            entries = archive.infolist()
    except zipfile.BadZipFile:
        raise UserError(
            f"{terminal_safe(file)} is not an mbdl checkpoint (not a torch zip file: truncated, "
            "or another format)"
        ) from None
    declared = sum(entry.file_size for entry in entries)
    size = file.stat().st_size
    if declared > size + _DECLARED_SLACK_BYTES or any(
        entry.compress_type != zipfile.ZIP_STORED for entry in entries
    ):
        raise UserError(
            f"refusing {terminal_safe(file)}: it declares {declared} bytes of (compressed) "
            f"contents in a {size}-byte file; torch never writes that, so it was altered"
        )


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """Read an mbdl checkpoint with ``torch.load(weights_only=True)``, within bounds.

    Raises :class:`mbdl.errors.UserError` naming the file when it does not exist, is not a
    checkpoint, declares more contents than it holds, contains anything but tensors and plain
    values (a pickle that could run code is refused), or has fields of the wrong type or size
    (:func:`check_checkpoint`).
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"checkpoint {str(file)!r} does not exist")
    _check_container(file)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = first.split(". ", 1)[0]  # torch's advice to drop weights_only is not ours
        raise UserError(
            f"refusing to load {str(file)!r}: it is not a plain checkpoint of tensors and values "
            f"(torch.load weights_only=True: {first})"
        ) from None
    except MemoryError:
        raise
    except Exception as error:  # a damaged pickle stream: IndexError, TypeError, ... as well
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read checkpoint {str(file)!r}: {first[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{str(file)!r} is not an mbdl checkpoint")
    version = state.get("version", 0)
    if not isinstance(version, int):
        raise UserError(f"{str(file)!r}: version must be an integer, got {type(version).__name__}")
    if version > VERSION:
        raise UserError(
            f"{str(file)!r} is checkpoint version {state['version']}; this mbdl reads up to "
            f"{VERSION}: upgrade mbdl"
        )
    check_checkpoint(state, file)
    return state


def _field(state: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value = state.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        expected = (
            kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        )
        raise UserError(
            f"{terminal_safe(where)}: field {key!r} must be {expected}, "
            f"got {type(value).__name__}; the checkpoint is damaged or not from mbdl"
        )
    return value


def check_checkpoint(
    state: dict[str, Any], where: Path | str = "checkpoint", *, need_model: bool = False
) -> None:
    """Check the fields of a loaded checkpoint that are used to build and size things, where
    present (all of them with ``need_model``): ``config``, ``model_args`` (backbone, embedding
    size, channels, flags, within :data:`LIMITS`), ``data_args`` and ``model_state`` (a dict of
    tensors)."""
    from mbdl.models import BACKBONES

    where = Path(where)
    required = ("config", "model_args", "model_state") if need_model else ()
    for key in required:
        if key not in state:
            raise UserError(f"{terminal_safe(where)}: the checkpoint has no {key!r}")
    if "config" in state:
        _field(state, "config", dict, where)
    if "model_args" in state:
        args = _field(state, "model_args", dict, where)
        _field(args, "backbone", str, where)
        if args["backbone"] not in BACKBONES:
            raise UserError(
                f"{terminal_safe(where)}: unknown backbone {terminal_safe(args['backbone'])!r} "
                f"(this mbdl has {BACKBONES.describe_choices()})"
            )
        dim = _field(args, "embedding_dim", int, where)
        if not 1 <= dim <= LIMITS["embedding_dim"]:
            raise UserError(
                f"{terminal_safe(where)}: embedding_dim {dim} is outside "
                f"1..{LIMITS['embedding_dim']}"
            )
        if _field(args, "in_channels", int, where) not in (1, 3):
            raise UserError(f"{terminal_safe(where)}: in_channels must be 1 or 3")
        for flag in ("freeze_bn", "head_bn", "normalize"):
            if flag in args:
                _field(args, flag, bool, where)
        known = {"backbone", "embedding_dim", "in_channels", "freeze_bn", "head_bn", "normalize"}
        if set(args) - known:
            raise UserError(
                f"{terminal_safe(where)}: unknown model_args {sorted(set(args) - known)[:3]}"
            )
    if "data_args" in state:
        data = _field(state, "data_args", dict, where)
        size = data.get("image_size", 32)
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or not 1 <= size <= LIMITS["image_size"]
        ):
            raise UserError(
                f"{terminal_safe(where)}: data_args image_size {size!r} is not an integer in "
                f"1..{LIMITS['image_size']}"
            )
    if "model_state" in state:
        weights = _field(state, "model_state", dict, where)
        bad = [
            k
            for k, v in weights.items()
            if not isinstance(k, str) or not isinstance(v, torch.Tensor)
        ]
        if bad:
            raise UserError(f"{terminal_safe(where)}: model_state entry {bad[0]!r} is not a tensor")


def check_state_matches(
    expected: dict[str, torch.Tensor], given: dict[str, Any], what: str
) -> None:
    """Refuse ``given`` (a state dict read from a file) unless it has exactly the keys and
    shapes of ``expected`` (dtypes are cast on loading); the error names ``what`` and the first
    difference."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{what} does not match the model ({detail})")
    for key, tensor in expected.items():
        value = given[key]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(
                f"{what} does not match the model: {key} has shape {shape}, the model "
                f"{tuple(tensor.shape)}"
            )


def model_from_state(state: dict[str, Any], device: str | torch.device = "cpu") -> torch.nn.Module:
    """The :class:`mbdl.models.EmbeddingModel` of a loaded checkpoint, in eval mode."""
    from mbdl.models import build_model

    check_checkpoint(state, "the checkpoint", need_model=True)
    args = dict(state["model_args"])
    model = build_model(
        args.pop("backbone"),
        args.pop("embedding_dim"),
        pretrained=None,  # the weights come from the checkpoint, never from the network
        **args,
    )
    check_state_matches(model.state_dict(), state["model_state"], "the checkpoint's model_state")
    model.load_state_dict(state["model_state"])
    return model.to(device).eval()


def model_from_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load the embedding model stored in checkpoint ``path`` (``best.pt`` or ``last.pt``)."""
    state = load_checkpoint(path)
    check_stored_plugins(state, str(path))
    return model_from_state(state, device)


def check_stored_plugins(state: dict[str, Any], where: str) -> dict[str, Any]:
    """Import-path plugins (``package.module:Name``) named by a loaded checkpoint or model
    directory load only with ``MBDL_TRUST_PLUGINS=1`` (:func:`mbdl.plugins.check_stored_name`),
    checked before anything imports them; resuming one's own run does not ask.

    The stored config is checked in its canonical flat form
    (:func:`mbdl.config.stored_config_values`, every spelling at once), which is returned: build
    a config from it, never from ``state["config"]`` itself."""
    from mbdl.config import stored_config_values
    from mbdl.plugins import check_stored_name

    model_args = state.get("model_args")
    if isinstance(model_args, dict):
        check_stored_name(model_args.get("backbone"), key="model.backbone", where=where)
    data_args = state.get("data_args")
    if isinstance(data_args, dict):
        check_stored_name(data_args.get("source"), key="data.source", where=where)
    return stored_config_values(state.get("config"), where)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or a run directory meaning its ``checkpoints/best.pt`` (else ``last.pt``)."""
    target = Path(path)
    if target.is_dir():
        for name in ("best.pt", "last.pt"):
            candidate = target / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise UserError(f"{str(target)!r} is not a run directory with checkpoints/best.pt")
    if not target.exists():
        raise UserError(f"{str(target)!r} does not exist (give a run directory or a .pt file)")
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
