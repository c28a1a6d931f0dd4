"""The run's position: everything about it that ``last.pt`` must restore to resume exactly."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from mbdl.config import Config

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


def progress_bar(total: int, initial: int, epoch: int, config: Config, enabled: bool) -> Any:
    """The epoch's progress bar (optimiser steps) on stderr."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=f"epoch {epoch + 1}/{config.train.epochs}",
        unit="step",
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
    )


def announce(out: Path, progress: Progress, epochs: int) -> None:
    """``training into OUT`` (and where a resumed run continues) on stderr."""
    if progress.epoch < epochs:
        p = progress
        where = f" from epoch {p.epoch + 1}, step {p.step_in_epoch}" if p.global_step else ""
        print(f"training into {out}{where}", file=sys.stderr, flush=True)


def print_epoch(record: dict[str, Any], config: Config, world_size: int, eta_s: float) -> None:
    """One line per epoch on stderr: loss, throughput, the validation metric, the ETA."""
    parts = [f"epoch {record['epoch']}/{config.train.epochs}", f"loss {record['train_loss']:.4f}"]
    if record.get("images_per_s"):
        world = f" ({world_size} processes)" if world_size > 1 else ""
        parts.append(f"{record['images_per_s']:.0f} img/s{world}")
    validation = record.get("validation")
    if validation:
        metric = config.train.select_metric
        parts.append(f"val {metric} {validation[metric]:.4f}")
    if "stopped_by" in record:
        parts.append(f"stopped by {record['stopped_by']}")
    if eta_s > 0:
        parts.append(f"ETA {timedelta(seconds=round(eta_s))}")
    print("  ".join(parts), file=sys.stderr, flush=True)


__all__ = ["V1_POLICY_FIELDS", "Progress", "announce", "print_epoch", "progress_bar"]
