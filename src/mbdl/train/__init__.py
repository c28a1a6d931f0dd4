"""Training: the loop (:func:`train`), checkpoints and the learning-rate schedule."""

from __future__ import annotations

from mbdl.train.trainer import Trainer, TrainingDiverged, train

__all__ = ["Trainer", "TrainingDiverged", "train"]
