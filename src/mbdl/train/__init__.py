"""Training: the loop (:func:`train`), checkpoints and the learning-rate schedule.

The loop is imported on first use (``mbdl.train.train``), so that the inference commands can use
:mod:`mbdl.train.checkpoint` without importing the training code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mbdl.errors import TrainingDiverged

if TYPE_CHECKING:
    from mbdl.train.trainer import Trainer, train


def __getattr__(name: str) -> Any:
    if name in ("Trainer", "train"):
        from mbdl.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Trainer", "TrainingDiverged", "train"]
