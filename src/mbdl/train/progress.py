"""The run's position: everything about it that ``last.pt`` must restore to resume exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """Everything about the run's position that a checkpoint must restore."""

    epoch: int = 0  # the epoch being run (0-based); == epochs when training is over
    step_in_epoch: int = 0  # batches of ``epoch`` already done
    global_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_batches: int = 0
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    elapsed_s: float = 0.0
    best_value: float | None = None
    best_epoch: int | None = None
    best_validation: dict[str, float] = field(default_factory=dict)
    bad_validations: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(self).items()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(**state)


__all__ = ["Progress"]
