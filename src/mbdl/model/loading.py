"""Loading a trained embedder: from a model directory (local or on the Hugging Face Hub), a run
directory (its best checkpoint) or a checkpoint file, through one function, :func:`load_model`.

A **model directory** (written by :func:`mbdl.export.save_pretrained`, the layout of Hugging Face
Hub model repositories) holds ``model.safetensors`` (the weights, readable without pickle),
``config.json`` (``format`` "mbdl-model", ``version`` and the model's record:
:mod:`mbdl.model.record`), ``preprocessing.json`` and a ``README.md`` model card.

Everything read is data: the stored config is parsed into its canonical form and checked against
the trust rule before anything it names is imported (:func:`check_stored_plugins`), and every
field of the record is checked before the model is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import mbdl
from mbdl.errors import UserError, terminal_safe
from mbdl.fileio import read_json_bounded
from mbdl.model.checkpoint import (
    check_stored_plugins,
    load_checkpoint,
    model_from_state,
    resolve_checkpoint,
)
from mbdl.model.preprocessing import transform_from_spec
from mbdl.model.record import ModelRecord, record_from_fields

MODEL_FORMAT = "mbdl-model"
MODEL_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESSING_FILE = "preprocessing.json"
CARD_FILE = "README.md"
HUB_PREFIX = "hf://"
#: the mappings a model directory's config.json may hold (each may be absent)
_SECTIONS = ("data_args", "preprocessing", "validation", "test", "training_config")


class MissingExtra(ImportError, ValueError):
    """An optional dependency is not installed (a user error: the CLI prints it in one line)."""


def missing_extra(package: str, extra: str) -> MissingExtra:
    """The one-line error for an optional dependency that is not installed."""
    return MissingExtra(f"{package} is not installed; run: pip install 'mbdl[{extra}]'")


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a model directory (holds ``config.json`` and ``model.safetensors``)."""
    target = Path(path)
    return (target / CONFIG_FILE).is_file() and (target / WEIGHTS_FILE).is_file()


def read_model_dir_info(directory: Path) -> dict[str, Any]:
    """The checked ``config.json`` of a model directory (format, version, section types; the
    record's fields are checked by :func:`mbdl.model.record.record_from_fields`)."""
    where = str(directory / CONFIG_FILE)
    info = read_json_bounded(directory / CONFIG_FILE)
    if not isinstance(info, dict) or info.get("format") != MODEL_FORMAT:
        raise UserError(f"{terminal_safe(directory)!r} is not an mbdl model directory")
    version = info.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(
            f"{terminal_safe(where)}: version must be an integer, got {type(version).__name__}"
        )
    if version > MODEL_VERSION:
        raise UserError(
            f"{terminal_safe(directory)!r} is model version {version}; this mbdl reads up to "
            f"{MODEL_VERSION}: upgrade mbdl"
        )
    for key in _SECTIONS:
        if info.get(key) is not None and not isinstance(info[key], dict):
            raise UserError(
                f"{terminal_safe(where)}: {key} must be a mapping, got {type(info[key]).__name__}"
                "; the file is damaged or not from mbdl"
            )
    if "model_args" not in info:
        raise UserError(f"{terminal_safe(where)}: no model_args (the architecture)")
    return info


def _load_model_dir(directory: Path) -> dict[str, Any]:
    """A checkpoint-like state of a model directory (its fields checked before the weights are
    read)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("safetensors is not installed; run: pip install safetensors") from None
    info = read_model_dir_info(directory)
    state: dict[str, Any] = {
        "model_args": info["model_args"],
        "data_args": info.get("data_args") or {},
        "config": info.get("training_config") or {},
        "validation": info.get("validation") or {},
        "test": info.get("test") or {},
        "model_dir": info,
    }
    for key in ("preprocessing", "distance", "verification", "mbdl_version", "command", "name"):
        if info.get(key) is not None:
            state[key] = info[key]
    record_from_fields(state, str(directory / CONFIG_FILE))  # checked before the weights
    try:
        state["model_state"] = load_file(str(directory / WEIGHTS_FILE))
    except Exception as error:  # safetensors raises its own error types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"cannot read {terminal_safe(directory / WEIGHTS_FILE)!r}: {terminal_safe(first)}"
        ) from None
    return state


def hub_download(spec: str) -> Path:
    """The local copy of the model directory ``hf://owner/name[@revision]`` on the Hugging Face
    Hub (``huggingface_hub``'s cache; only the model directory's files are fetched)."""
    repo, _, revision = spec.removeprefix(HUB_PREFIX).partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise missing_extra("huggingface_hub", "hub") from None
    try:
        folder = snapshot_download(
            repo,
            revision=revision or None,
            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, PREPROCESSING_FILE, CARD_FILE],
            library_name="mbdl",
            library_version=mbdl.__version__,
        )
    except Exception as error:  # network, authentication, missing repository
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"cannot download {spec} from the Hugging Face Hub: {first}") from None
    return Path(folder)


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint-like dict (``model_args``, ``data_args``, ``model_state``, ``config``, the
    record's fields, ...) from a model directory (local, or ``hf://owner/name[@revision]`` on
    the Hugging Face Hub), a run directory (its best checkpoint) or a checkpoint file; passed
    through the trust check, its ``config`` in the canonical nested form, its record's fields
    checked. Prefer :func:`load_model`, which returns the typed record."""
    from mbdl.config import nested_config_values

    if str(path).startswith(HUB_PREFIX):
        path = hub_download(str(path))
    target = Path(path)
    if is_model_dir(target):
        state = _load_model_dir(target)
    elif target.is_dir() and (target / CONFIG_FILE).is_file():
        raise UserError(f"{terminal_safe(target)!r} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    else:
        state = load_checkpoint(resolve_checkpoint(target))
        record_from_fields(state, str(target))  # a model's fields, all of them checked
    canonical = check_stored_plugins(state, str(target))
    if state.get("config") is not None:
        state["config"] = nested_config_values(canonical)  # one spelling for every reader
    return state


def state_record(state: Mapping[str, Any], source: str | None = None) -> ModelRecord:
    """The checked :class:`ModelRecord` of a loaded state."""
    return record_from_fields(state, source or "the checkpoint", source=source)


def state_preprocessing(state: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing of a loaded state (stored, or derived for version-1 checkpoints)."""
    return dict(state_record(state).preprocessing)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded embedder: ``module`` maps ``[B, C, H, W]`` images to L2-normalised ``[B, d]``
    embeddings (eval mode), ``transform`` a PIL image to its ``[C, H, W]`` input, ``record``
    says what it is."""

    module: nn.Module
    record: ModelRecord
    transform: Callable[[Any], Tensor]
    state: Mapping[str, Any]  # the loaded fields (weights included), for writing it back out

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device


def model_from_loaded_state(
    state: Mapping[str, Any], device: str | torch.device = "cpu", source: str | None = None
) -> LoadedModel:
    """The :class:`LoadedModel` of a state returned by :func:`load_state`."""
    record = state_record(state, source)
    module = model_from_state(dict(state), device)
    return LoadedModel(module, record, transform_from_spec(dict(record.preprocessing)), state)


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """The model at ``path`` (a model directory, ``hf://owner/name``, a run directory or a
    checkpoint), its record and its transform.

    Example:
        >>> model = load_model("my-model")  # doctest: +SKIP
        >>> embeddings = model.module(model.transform(image).unsqueeze(0))  # doctest: +SKIP
    """
    return model_from_loaded_state(load_state(path), device, str(path))


def load_embedder(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[nn.Module, Callable[[Any], Tensor]]:
    """``(model, transform)`` of :func:`load_model`: an ``nn.Module`` in eval mode mapping
    ``[B, C, H, W]`` images to ``[B, d]`` embeddings, and a PIL image -> ``[C, H, W]`` tensor
    transform.

    Example:
        >>> model, transform = load_embedder("my-model")  # doctest: +SKIP
        >>> embeddings = model(torch.stack([transform(image) for image in images]))  # doctest: +SKIP
    """
    loaded = load_model(path, device)
    return loaded.module, loaded.transform


__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "HUB_PREFIX",
    "MODEL_FORMAT",
    "MODEL_VERSION",
    "PREPROCESSING_FILE",
    "WEIGHTS_FILE",
    "LoadedModel",
    "MissingExtra",
    "hub_download",
    "is_model_dir",
    "load_embedder",
    "load_model",
    "load_state",
    "missing_extra",
    "model_from_loaded_state",
    "read_model_dir_info",
    "state_preprocessing",
    "state_record",
]
