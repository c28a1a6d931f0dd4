"""A run's state in its checkpoints: the one layout of ``last.pt`` and ``best.pt``
(:func:`checkpoint_state`) and its reader for a resumed run (:func:`restore`: every field checked
against the run before anything is put back; ``log.jsonl`` rewritten from the restored
history)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from mbdl.config import ConfigError
from mbdl.errors import UserError
from mbdl.fileio import atomic_write_text
from mbdl.model.preprocessing import config_preprocessing
from mbdl.train.checkpoint import check_state_matches, rng_state, set_rng_state
from mbdl.train.policies import v1_callback_states, v1_progress_fields
from mbdl.train.progress import Progress

if TYPE_CHECKING:
    from mbdl.train.trainer import Trainer


def checkpoint_state(
    trainer: Trainer, kind: Literal["last", "best"], **fields: Any
) -> dict[str, Any]:
    """The one checkpoint layout (:mod:`mbdl.train.checkpoint`): what rebuilds the model
    (config, model and data arguments, weights, loss parameters); for ``last`` also what
    resumes the run exactly (optimiser, scheduler, GradScaler, RNG states, progress, number
    of processes, cross-batch memory, the callbacks' state); then ``fields`` (``best``:
    epoch and validation)."""
    state: dict[str, Any] = {
        "kind": kind,
        "config": trainer.config_dict,
        "model_args": trainer.model_args,
        "data_args": {
            "source": trainer.config.data.source,
            "root": trainer.config.data.root,
            "image_size": int(trainer.splits.image_size),
            "channels": int(trainer.splits.channels),
        },
        "preprocessing": config_preprocessing(trainer.config, trainer.splits),
        "model_state": trainer.model.state_dict(),
        "loss_state": trainer.loss.state_dict(),
    }
    if kind == "last":
        callbacks = trainer.callbacks.state_dict()
        state.update(
            optimizer=trainer.optimizer.state_dict(),
            scheduler=trainer.scheduler.state_dict(),
            scaler=trainer.scaler.state_dict(),
            rng=rng_state(),
            progress=trainer.progress.to_state(v1_progress_fields(callbacks)),
            world_size=trainer.dist.world_size,
        )
        if trainer.memory is not None:
            state["xbm_state"] = trainer.memory.state_dict()
        state["callbacks"] = callbacks
    return {**state, **fields}


def restore(trainer: Trainer, state: dict[str, Any]) -> None:
    """Put ``state`` (a ``last.pt``) into ``trainer``: every field checked against the run
    first; the callbacks' state from ``callbacks``, or from a version-1 ``progress``."""
    last = trainer.checkpoints / "last.pt"
    saved_world = int(state.get("world_size", 1))
    if saved_world != trainer.dist.world_size:
        raise ConfigError(
            f"{last} was written by {saved_world} process(es); resume it with the same number "
            f"(torchrun --nproc_per_node ...), not {trainer.dist.world_size}"
        )
    if (trainer.memory is not None) != ("xbm_state" in state):
        raise ConfigError(f"{last} does not match train.xbm_size")
    try:
        check_state_matches(trainer.model.state_dict(), state["model_state"], f"{last} model")
        check_state_matches(trainer.loss.state_dict(), state["loss_state"], f"{last} loss")
        if trainer.memory is not None:
            check_state_matches(trainer.memory.state_dict(), state["xbm_state"], f"{last} xbm")
        trainer.model.load_state_dict(state["model_state"])
        trainer.loss.load_state_dict(state["loss_state"])
        if trainer.memory is not None:
            trainer.memory.load_state_dict(state["xbm_state"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        trainer.progress = Progress.from_state(state["progress"])
        trainer.should_stop = trainer.progress.stopped_early
        callbacks = state.get("callbacks")  # absent before callbacks had state
        trainer.callbacks.load_state_dict(
            callbacks if callbacks is not None else v1_callback_states(state["progress"])
        )
        set_rng_state(state["rng"])
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        raise ConfigError(
            f"{last} does not match this run ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); it is damaged or from "
            "another version: start a new run with another out="
        ) from None
    if trainer.dist.is_main:
        # log.jsonl may hold records written after this checkpoint: rewrite it from the history
        lines = "".join(json.dumps(r) + "\n" for r in trainer.progress.history)
        atomic_write_text(trainer.out / "log.jsonl", lines)


__all__ = ["checkpoint_state", "restore"]
