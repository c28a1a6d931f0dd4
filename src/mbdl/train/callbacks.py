"""What the trainer tells the rest of a run, and what the rest may do: a callback interface.

The trainer calls every hook on rank 0 only (the process that writes files), in this order::

    on_train_start(trainer)                 once the trainer is built (also for a finished run
                                            that is only reloaded by resume=true)
    for each epoch:
        for each optimiser step:
            on_step_end(trainer, step, logs)     after the step (step: optimiser steps so far);
                                                 values added to ``logs`` reach log.jsonl
        with evaluation_weights(trainer):        the weights to evaluate and select (EMA's)
            on_validation(trainer, epoch, metrics)      validation epochs (epoch is 1-based)
            on_validation_end(trainer, epoch, metrics)  the policies act: best.pt, patience
            on_checkpoint(trainer, path)                after best.pt is written, when it improved
        on_epoch_end(trainer, record)            the epoch's log.jsonl record, once appended
        on_checkpoint(trainer, path)             after last.pt is written
    with evaluation_weights(trainer):
        on_fit_end(trainer)                      training is over: the final choice (best.pt
                                                 of a run without validation classes)
    on_test(trainer, result)                the chosen checkpoint was tested; a callback may add
                                            to result.metrics before metrics.json is written
    on_train_end(trainer, result)           after metrics.json is written (result: TestResult)
    on_close(trainer)                       always, when the trainer releases the run directory

(``on_checkpoint`` also follows the mid-epoch ``last.pt`` of ``train.checkpoint_every_steps`` and
the verification threshold added to ``best.pt`` by :class:`~mbdl.train.policies.VerificationThreshold`.)

A callback subclasses :class:`Callback` and overrides the hooks it needs; pass it as
``mbdl.train.train(config, callbacks=[...])`` or ``Trainer(config, callbacks=[...])``. It may
stop the run with ``trainer.should_stop = True`` (honoured after the step or the epoch: the
epoch ends, is validated, and the chosen checkpoint is tested as usual). A callback with state
returns it from :meth:`Callback.state_dict` (tensors and plain values); ``last.pt`` keeps it
under ``callbacks[<state_key>]`` and a resumed run gives it back through
:meth:`Callback.load_state_dict`. The built-in policies (:mod:`mbdl.train.policies`), the
exponential moving average (:mod:`mbdl.train.ema`), the report (:class:`ReportWriter`) and the
experiment trackers (:class:`TrackingSinks`) are callbacks too, called before the caller's.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mbdl.config import config_to_flat
from mbdl.errors import UserError
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
    nothing unless overridden. ``state_key`` names the callback's state in ``last.pt`` (default:
    its class name); keep it stable so that a resumed run finds the state."""

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (tensors and plain values); empty: nothing is saved."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, when a run resumes."""

    def on_train_start(self, trainer: Trainer) -> None:
        """The trainer is built: data, model, optimiser, and the state of a resumed run."""

    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None:
        """Optimiser step ``step`` (1-based, counted over the run) is done; ``logs`` holds its
        ``loss`` and ``lr``. Numbers added to ``logs`` are averaged over the epoch's steps into
        the epoch's log.jsonl record under the same name."""

    def evaluation_weights(self, trainer: Trainer) -> AbstractContextManager[Any]:
        """A context in which ``trainer.model`` holds the weights to validate and select (the
        default: the training weights, unchanged)."""
        return contextlib.nullcontext()

    def on_validation(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """The validation metrics after ``epoch`` (1-based)."""

    def on_validation_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """Every callback has seen the metrics: act on them (save best.pt, count patience)."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """``path`` (``checkpoints/last.pt`` or ``best.pt``) was written."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """The epoch's ``log.jsonl`` record, after it was appended to the file."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Training is over (finished or stopped), before the test."""

    def on_test(self, trainer: Trainer, result: TestResult) -> None:
        """The chosen checkpoint was tested; add to ``result.metrics`` what metrics.json holds."""

    def on_train_end(self, trainer: Trainer, result: TestResult) -> None:
        """The chosen checkpoint was tested and ``metrics.json`` written."""

    def on_close(self, trainer: Trainer) -> None:
        """The run is over (finished, stopped or failed): release what the callback holds."""


class CallbackList:
    """Several callbacks, called in order; their state keyed by ``state_key`` (a repeated key
    gets ``#2``, ``#3``, ... in order). Records which callback asked the run to stop."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)
        self.keys: list[str] = []
        for callback in self.callbacks:
            key, n = callback.state_key, 2
            while key in self.keys:
                key, n = f"{callback.state_key}#{n}", n + 1
            self.keys.append(key)
        self.stopped_by: str | None = None

    def _each(self, trainer: Trainer, hook: str, *args: Any) -> None:
        for key, callback in zip(self.keys, self.callbacks, strict=True):
            was_stopping = trainer.should_stop
            getattr(callback, hook)(trainer, *args)
            if trainer.should_stop and not was_stopping and self.stopped_by is None:
                self.stopped_by = key

    def state_dict(self) -> dict[str, dict[str, Any]]:
        states = {key: c.state_dict() for key, c in zip(self.keys, self.callbacks, strict=True)}
        return {key: state for key, state in states.items() if state}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        if not isinstance(states, dict):
            raise UserError("the checkpoint's callbacks state must be a dict")
        for key, callback in zip(self.keys, self.callbacks, strict=True):
            if key in states:
                callback.load_state_dict(states[key])

    def on_train_start(self, trainer: Trainer) -> None:
        self._each(trainer, "on_train_start")

    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None:
        self._each(trainer, "on_step_end", step, logs)

    @contextlib.contextmanager
    def evaluation_weights(self, trainer: Trainer) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for callback in self.callbacks:
                stack.enter_context(callback.evaluation_weights(trainer))
            yield

    def on_validation(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        self._each(trainer, "on_validation", epoch, metrics)

    def on_validation_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        self._each(trainer, "on_validation_end", epoch, metrics)

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        self._each(trainer, "on_checkpoint", path)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._each(trainer, "on_epoch_end", record)

    def on_fit_end(self, trainer: Trainer) -> None:
        self._each(trainer, "on_fit_end")

    def on_test(self, trainer: Trainer, result: TestResult) -> None:
        self._each(trainer, "on_test", result)

    def on_train_end(self, trainer: Trainer, result: TestResult) -> None:
        self._each(trainer, "on_train_end", result)

    def on_close(self, trainer: Trainer) -> None:
        self._each(trainer, "on_close")


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
