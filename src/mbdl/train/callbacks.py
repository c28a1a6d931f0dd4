"""What the trainer tells the rest of a run: a small callback interface.

The trainer calls every hook on rank 0 only (the process that writes files), in this order::

    on_train_start(trainer)                 once the trainer is built (also for a finished run
                                            that is only reloaded by resume=true)
    for each epoch:
        on_validation(trainer, epoch, metrics)   validation epochs only (epoch is 1-based)
        on_checkpoint(trainer, path)             after best.pt is written, when it improved
        on_epoch_end(trainer, record)            the epoch's log.jsonl record, once appended
        on_checkpoint(trainer, path)             after last.pt is written
    on_train_end(trainer, result)           after metrics.json is written (result: TestResult)
    on_close(trainer)                       always, when the trainer releases the run directory

(``on_checkpoint`` also follows the mid-epoch ``last.pt`` of ``train.checkpoint_every_steps``, the
``best.pt`` of a run without validation classes at its end, and the verification threshold
added to ``best.pt`` before the test.) A callback subclasses :class:`Callback` and overrides the
hooks it needs; pass it as ``mbdl.train.train(config, callbacks=[...])``. The report
(:class:`ReportWriter`) and the experiment trackers (:class:`TrackingSinks`) are callbacks too.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mbdl.config import config_to_flat
from mbdl.tracking import Sinks

if TYPE_CHECKING:
    from mbdl.train.trainer import Trainer


@dataclass
class TestResult:
    """The test of the chosen checkpoint: ``metrics`` as in ``metrics.json`` and the test split's
    embeddings and labels (for plots)."""

    __test__ = False  # not a pytest test class

    metrics: dict[str, Any]
    embeddings: torch.Tensor
    labels: torch.Tensor


class Callback:
    """Hooks of a training run (see the module docstring for when each is called); each does
    nothing unless overridden."""

    def on_train_start(self, trainer: Trainer) -> None:
        """The trainer is built: data, model, optimiser, and the state of a resumed run."""

    def on_validation(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """The validation metrics after ``epoch`` (1-based)."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """``path`` (``checkpoints/last.pt`` or ``best.pt``) was written."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """The epoch's ``log.jsonl`` record, after it was appended to the file."""

    def on_train_end(self, trainer: Trainer, result: TestResult) -> None:
        """The chosen checkpoint was tested and ``metrics.json`` written."""

    def on_close(self, trainer: Trainer) -> None:
        """The run is over (finished, stopped or failed): release what the callback holds."""


class CallbackList(Callback):
    """Several callbacks, called in order."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_train_start(trainer)

    def on_validation(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_validation(trainer, epoch, metrics)

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(trainer, path)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(trainer, record)

    def on_train_end(self, trainer: Trainer, result: TestResult) -> None:
        for callback in self.callbacks:
            callback.on_train_end(trainer, result)

    def on_close(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_close(trainer)


class ReportWriter(Callback):
    """``report.html`` (:func:`mbdl.report.write_report`) after the test, when ``eval.report``;
    a failure is a warning (the metrics are safe on disk)."""

    def on_train_end(self, trainer: Trainer, result: TestResult) -> None:
        if not trainer.config.eval.report:
            return
        try:
            from mbdl.report import write_report

            write_report(
                trainer.out,
                config=trainer.config_dict,
                history=trainer.progress.history,
                metrics=result.metrics,
                test_embeddings=result.embeddings,
                test_labels=result.labels,
                test_dataset=trainer.splits.test,
            )
        except Exception as error:  # the metrics are safe on disk; a report failure is not fatal
            warnings.warn(f"could not write report.html: {error}", stacklevel=2)


class TrackingSinks(Callback):
    """The experiment trackers of ``train.loggers`` (:class:`mbdl.tracking.Sinks`): the config
    as parameters, each epoch's record, the test metrics and the report's figures."""

    def __init__(self, sinks: Sinks) -> None:
        self.sinks = sinks

    def on_train_start(self, trainer: Trainer) -> None:
        self.sinks.log_params(config_to_flat(trainer.config))

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.sinks.log_epoch(record)

    def on_train_end(self, trainer: Trainer, result: TestResult) -> None:
        self.sinks.log_test(result.metrics["test"], trainer.progress.epoch)
        if trainer.config.eval.report:
            self.sinks.log_report(trainer.out / "report.html", trainer.progress.epoch)

    def on_close(self, trainer: Trainer) -> None:
        self.sinks.close()


__all__ = ["Callback", "CallbackList", "ReportWriter", "TestResult", "TrackingSinks"]
