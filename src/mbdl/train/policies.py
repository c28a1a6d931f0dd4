"""The trainer's built-in policies, as callbacks with state: which checkpoint is chosen
(:class:`BestCheckpoint`), when to stop early (:class:`EarlyStopping`) and the verification
threshold stored with the chosen model (:class:`VerificationThreshold`).

Their state is saved in ``last.pt`` under ``callbacks`` like any callback's; the same values are
also written into ``progress`` (``best_value``, ``best_epoch``, ``best_validation``,
``bad_validations``: the layout of checkpoint version 1), and a ``last.pt`` without
``callbacks`` (written before the policies were callbacks) is resumed from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mbdl.config import Config
from mbdl.metrics import improves
from mbdl.runconfig import choose_verification_threshold, verification_at_threshold
from mbdl.train.callbacks import Callback, TestResult
from mbdl.train.checkpoint import load_checkpoint, save_checkpoint
from mbdl.train.ema import ExponentialMovingAverage

if TYPE_CHECKING:
    from mbdl.train.trainer import Trainer


class BestCheckpoint(Callback):
    """``checkpoints/best.pt`` whenever the validation ``metric`` improves (the model as
    :meth:`Callback.evaluation_weights` presents it); a run that never validated chooses its
    final model."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_validation: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "best_validation": dict(self.best_validation),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value = state["best_value"]
        self.best_epoch = state["best_epoch"]
        self.best_validation = dict(state["best_validation"])

    def on_validation_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        value = float(metrics[self.metric])
        if improves(self.metric, value, self.best_value):
            self.best_value, self.best_epoch, self.best_validation = value, epoch, dict(metrics)
            trainer.save("best", epoch=epoch, validation=dict(metrics))

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.best_value is None:
            trainer.save("best", epoch=trainer.progress.epoch, validation={})


class EarlyStopping(Callback):
    """Stop after ``patience`` validations in a row without improvement of ``metric``."""

    def __init__(self, metric: str, patience: int) -> None:
        self.metric = metric
        self.patience = patience
        self.best_value: float | None = None
        self.bad_validations = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value = state["best_value"]
        self.bad_validations = int(state["bad_validations"])

    def on_validation_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        value = float(metrics[self.metric])
        if improves(self.metric, value, self.best_value):
            self.best_value, self.bad_validations = value, 0
        else:
            self.bad_validations += 1
            if self.bad_validations >= self.patience:
                trainer.should_stop = True


class VerificationThreshold(Callback):
    """The distance threshold at FAR ``eval.verify_far``, chosen on the validation classes with
    the chosen model, stored in ``best.pt``; the test classes' TAR and FAR at it go to
    ``metrics.json`` (``verification`` and the test's ``tar@threshold``, ``far@threshold``)."""

    def on_test(self, trainer: Trainer, result: TestResult) -> None:
        chosen = choose_verification_threshold(
            trainer.model, trainer.splits, trainer.config, trainer.device
        )
        if chosen is None or torch.unique(result.labels).numel() < 2:
            return
        best = trainer.checkpoints / "best.pt"
        save_checkpoint(best, {**load_checkpoint(best), "verification": dict(chosen)})
        trainer.callbacks.on_checkpoint(trainer, best)
        test = verification_at_threshold(
            result.embeddings, result.labels, trainer.config, chosen["threshold"]
        )
        result.metrics["test"].update(test)
        result.metrics["verification"] = dict(chosen)


def builtin_callbacks(config: Config) -> list[Callback]:
    """The policies of ``config`` in the order they act: the weight average (``train.ema``),
    best-checkpoint selection, early stopping (``train.patience``), the verification threshold."""
    callbacks: list[Callback] = []
    if config.train.ema is not None:
        callbacks.append(ExponentialMovingAverage(config.train.ema))
    callbacks.append(BestCheckpoint(config.train.select_metric))
    if config.train.patience is not None:
        callbacks.append(EarlyStopping(config.train.select_metric, config.train.patience))
    callbacks.append(VerificationThreshold())
    return callbacks


def v1_progress_fields(states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The policies' state as checkpoint version 1 kept it in ``progress``."""
    best = states.get("BestCheckpoint", {})
    stopping = states.get("EarlyStopping", {})
    return {
        "best_value": best.get("best_value"),
        "best_epoch": best.get("best_epoch"),
        "best_validation": dict(best.get("best_validation", {})),
        "bad_validations": int(stopping.get("bad_validations", 0)),
    }


def v1_callback_states(progress: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The policies' state from a version-1 ``progress`` (a ``last.pt`` without ``callbacks``)."""
    best = {
        "best_value": progress.get("best_value"),
        "best_epoch": progress.get("best_epoch"),
        "best_validation": dict(progress.get("best_validation") or {}),
    }
    stopping = {
        "best_value": progress.get("best_value"),
        "bad_validations": int(progress.get("bad_validations", 0)),
    }
    return {"BestCheckpoint": best, "EarlyStopping": stopping}


__all__ = [
    "BestCheckpoint",
    "EarlyStopping",
    "VerificationThreshold",
    "builtin_callbacks",
    "v1_callback_states",
    "v1_progress_fields",
]
