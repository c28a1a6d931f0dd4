"""Checkpoints that cannot run code, written atomically and read within bounds.

A checkpoint is a dict of tensors and plain Python values (str, int, float, bool, None, lists,
dicts), saved with ``torch.save`` into a temporary file in the same directory and moved into
place with ``os.replace``: a reader sees the old file or the new one, never half of one. It is
read back with ``torch.load(..., weights_only=True)``, which refuses any pickle that would import
or call code, so a checkpoint received from someone else is safe to open.

Keys: ``format`` ("mbdl-checkpoint"), ``version``, ``config`` (the run's nested config),
``model_args`` (for :func:`mbdl.models.build_model`), ``data_args`` (source, root, image_size,
channels), ``model_state``, and from version 2 the rest of the model's record
(:mod:`mbdl.model.record`): ``preprocessing``, ``distance``, ``mbdl_version``; ``best.pt`` adds
``validation`` and ``verification``; ``last.pt`` adds the training state (see
:mod:`mbdl.train.checkpoint`). Version-1 checkpoints (without the record fields) still load: the
record derives those fields as mbdl did then.

A checkpoint received from someone else is read within bounds: the file must be torch's zip
format whose declared contents fit in the file (no compressed "bomb"), and after loading every
field of the record is checked (types, :data:`LIMITS`, finite thresholds, means and stds,
channels agreeing with the model) and every tensor's shape against the model it describes,
before the model is built or loaded. Any mismatch is a :class:`mbdl.errors.UserError` naming the
file and the field.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from mbdl.errors import UserError, terminal_safe
from mbdl.fileio import default_file_mode, naming
from mbdl.model.record import LIMITS, check_data_args, record_from_fields

FORMAT = "mbdl-checkpoint"
VERSION = 2

#: how much more than its own size a checkpoint file may declare as contents (zip overhead)
_DECLARED_SLACK_BYTES = 1 << 20


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
    except BaseException as error:
        Path(temp_name).unlink(missing_ok=True)
        raise naming(error, target) from None


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint dict (tensors and plain values only) atomically to ``path``; a state
    with ``model_args`` gets the record fields it lacks (``preprocessing``, ``distance``,
    ``mbdl_version``: :func:`mbdl.model.record.record_from_fields`)."""
    import mbdl

    fields = {k: v for k, v in state.items() if k not in ("format", "version")}
    try:
        record = record_from_fields(fields, str(path)) if "model_args" in fields else None
    except UserError:
        record = None  # written as given: the reader refuses what is wrong in it
    if record is not None:
        if fields.get("preprocessing") is None:
            fields["preprocessing"] = dict(record.preprocessing)
        if fields.get("distance") is None:
            fields["distance"] = record.distance
        if fields.get("mbdl_version") is None:
            fields["mbdl_version"] = mbdl.__version__
    atomic_torch_save({"format": FORMAT, "version": VERSION, **fields}, path)


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
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read checkpoint {str(file)!r}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{str(file)!r} is not an mbdl checkpoint")
    version = state.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
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
    present (all of them with ``need_model``): ``config``, the record's fields (``model_args``,
    ``data_args``, ``preprocessing``, ``distance``, ``verification``:
    :func:`mbdl.model.record.record_from_fields`) and ``model_state`` (a dict of tensors)."""
    where = Path(where)
    required = ("config", "model_args", "model_state") if need_model else ()
    for key in required:
        if key not in state:
            raise UserError(f"{terminal_safe(where)}: the checkpoint has no {key!r}")
    if "config" in state:
        _field(state, "config", dict, where)
    if "model_args" in state:
        record_from_fields(state, str(where))
    elif "data_args" in state:
        check_data_args(state["data_args"], None, str(where))
    if "model_state" in state:
        weights = _field(state, "model_state", dict, where)
        bad = [
            k
            for k, v in weights.items()
            if not isinstance(k, str) or not isinstance(v, torch.Tensor)
        ]
        if bad:
            raise UserError(
                f"{terminal_safe(where)}: model_state entry {terminal_safe(bad[0])[:80]!r} is "
                "not a tensor"
            )


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
    args = dict(record_from_fields(state, "the checkpoint").model_args)
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
    "save_checkpoint",
]
