"""The run's position: everything about it that ``last.pt`` must restore to resume exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: progress fields of checkpoint version 1 that the policies now hold (mbdl.train.policies)
V1_POLICY_FIELDS = ("best_value", "best_epoch", "best_validation", "bad_validations")


@dataclass
class Progress:
    """Everything about the run's position that a checkpoint must restore."""

    epoch: int = 0  # the epoch being run (0-based); == epochs when training is over
    step_in_epoch: int = 0  # optimiser steps of ``epoch`` already done
    global_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_batches: int = 0
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    elapsed_s: float = 0.0
    stopped_early: bool = False  # a callback set trainer.should_stop
    history: list[dict[str, Any]] = field(default_factory=list)
    # values callbacks added to a step's logs this epoch: name -> [sum, steps]
    step_logs: dict[str, list[float]] = field(default_factory=dict)

    def advance(self, loss: float, images: int, seconds: float) -> None:
        """One optimiser step of ``images`` (all processes') done in ``seconds``."""
        self.step_in_epoch += 1
        self.global_step += 1
        self.epoch_loss_sum += loss
        self.epoch_batches += 1
        self.epoch_images += images
        self.epoch_seconds += seconds
        self.elapsed_s += seconds

    def add_step_logs(self, logs: dict[str, float]) -> None:
        for name, value in logs.items():
            total = self.step_logs.setdefault(name, [0.0, 0])
            total[0] += float(value)
            total[1] += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum, self.epoch_batches, self.epoch_images, self.epoch_seconds = (
            0.0,
            0,
            0,
            0.0,
        )
        self.step_logs = {}

    def to_state(self, v1_fields: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's ``progress``, in the layout of version 1 (``v1_fields``: the
        policies' values, :func:`mbdl.train.policies.v1_progress_fields`); ``step_logs`` only
        when a callback logged per step."""
        state: dict[str, Any] = {
            k: (list(v) if isinstance(v, list) else v) for k, v in vars(self).items()
        }
        step_logs = state.pop("step_logs")
        stopped, history = state.pop("stopped_early"), state.pop("history")
        state.update({k: v1_fields[k] for k in V1_POLICY_FIELDS})
        state.update(stopped_early=stopped, history=history)
        if step_logs:
            state["step_logs"] = {k: list(v) for k, v in step_logs.items()}
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(**{k: v for k, v in state.items() if k not in V1_POLICY_FIELDS})


__all__ = ["V1_POLICY_FIELDS", "Progress"]
