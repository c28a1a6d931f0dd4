"""The run directory: created empty for a new run, checked against the saved config (and its
``last.pt`` read) for ``resume=true``; held with :mod:`mbdl.train.runlock` while training."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from mbdl.config import Config, ConfigError, config_differences, config_to_flat, load_config
from mbdl.distributed import DistributedInfo, broadcast_object
from mbdl.train.checkpoint import load_checkpoint
from mbdl.train.runlock import RUN_LOCK, acquire_run_lock, remove_debris


def _default_out(config: Config) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{config.data.source}-{config.loss.name}-{stamp}")


def prepare_run_dir(config: Config) -> tuple[Path, dict[str, Any] | None]:
    """Create or check ``config.out``; returns it and the ``last.pt`` state to resume (or None).

    A fresh run needs an empty or missing directory; ``resume=true`` needs the same config as
    the one saved there (keys in ``RESUME_FREE_KEYS`` may differ) and starts fresh when no
    checkpoint was written yet.
    """
    if config.out is None:
        if config.resume:
            raise ConfigError("resume=true needs out=RUN_DIR (the run to continue)")
        config.out = _default_out(config)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={config.out} exists and is not a directory")
    has_content = out.is_dir() and any(path.name != RUN_LOCK for path in out.iterdir())
    if not config.resume:
        if has_content:
            raise ConfigError(
                f"out={config.out} already exists and is not empty; continue it with resume=true "
                "or choose another out="
            )
        acquire_run_lock(out)
        return out, None
    acquire_run_lock(out)
    remove_debris(out)  # the temporary files of a writer killed mid-save
    saved = out / "config.yaml"
    if saved.is_file():
        previous = load_config(saved)
        differences = config_differences(config_to_flat(previous), config_to_flat(config))
        if differences:
            old, new = config_to_flat(previous), config_to_flat(config)
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differences[:4])
            raise ConfigError(
                f"cannot resume {config.out} with a different config ({shown}); "
                "start a new run with another out="
            )
    elif has_content:
        raise ConfigError(f"out={config.out} is not an mbdl run directory (no config.yaml)")
    last = out / "checkpoints" / "last.pt"
    state = load_checkpoint(last) if last.is_file() else None
    return out, state


def prepare_run_dir_on_ranks(
    config: Config, dist: DistributedInfo
) -> tuple[Path, dict[str, Any] | None]:
    """:func:`prepare_run_dir` on rank 0; the other ranks get its directory and state."""
    if not dist.enabled:
        return prepare_run_dir(config)
    outcome: tuple[str, Any, Any]
    if dist.is_main:
        try:
            out, state = prepare_run_dir(config)
            outcome = ("ok", str(out), state)
        except ConfigError as error:
            outcome = ("error", str(error), None)
    else:
        outcome = ("", None, None)
    kind, value, state = broadcast_object(outcome)
    if kind == "error":
        raise ConfigError(value)
    config.out = value
    return Path(value), state


__all__ = ["prepare_run_dir", "prepare_run_dir_on_ranks"]
