"""The training loop: class-balanced batches, warm-up + cosine schedule, AMP, checkpoints,
selection on validation classes, early stopping, and one test evaluation at the end.

Files written into ``config.out``:

- ``config.yaml``: the resolved configuration;
- ``log.jsonl``: one JSON record per epoch: ``epoch`` (1-based), ``step`` (optimiser steps so
  far), ``train_loss`` (mean over the epoch's batches), ``lr`` (backbone learning rate at the end
  of the epoch), ``images_per_s``, ``elapsed_s`` (training time so far), and ``validation`` (the
  metrics of :func:`mbdl.evaluate.evaluate`) on epochs that validate;
- ``checkpoints/last.pt`` after every epoch (and every ``train.checkpoint_every_steps`` steps),
  ``checkpoints/best.pt`` whenever the validation metric ``train.select_metric`` improves;
- ``metrics.json``: ``{"validation": <metrics of the chosen checkpoint>, "test": <its test
  metrics>, "meta": <each split's run metadata>}``, then ``report.html`` (:func:`mbdl.report.write_report`).

The report and the experiment trackers are callbacks (:mod:`mbdl.train.callbacks`), like any
that a caller passes to :func:`train`.

Exact resumption: the batch order is a pure function of ``(seed, epoch)`` (the sampler), the
augmentation of each image is seeded by ``(seed, epoch, batch, position)``, and the checkpoint
holds the model, optimiser, scheduler, GradScaler, loss parameters, the cross-batch memory, RNG
states, the position in the epoch, the best metric, the patience counter and the history; so on
CPU a resumed run reproduces an uninterrupted one exactly. In-memory training sets (and file
sources, once decoded by :mod:`mbdl.data.cache`) are loaded by whole batches and augmented as
tensors on the training device (:mod:`mbdl.data.batched`), their parameters drawn from the same
item seeds.

Several processes (``torchrun --nproc_per_node W -m mbdl train ...``, multi-node through
torchrun's rendezvous): the process group is initialised from torchrun's environment (gloo on
CPU, NCCL on CUDA with device ``cuda:LOCAL_RANK``), the model is wrapped in
DistributedDataParallel, the sampler gives each rank disjoint batches, and the loss sees every
rank's batch (:class:`mbdl.distributed.GatheredLoss`; with cross-batch memory the gathered batch
goes into the memory). A step then has the gradients of one process on the ``P x K x W`` images,
so ``train.lr`` is the learning rate of that global batch (not scaled with ``W``); the loss's own
parameters (proxies, beta) get their gradients averaged over ranks too, and the ranks' parameters
are checked to be identical after every epoch. Augmentation seeds use the global batch number,
so they differ between ranks. Rank 0 alone validates, tests and writes files (the run directory
need not be shared: a resume broadcasts rank 0's checkpoint), the others wait; ``log.jsonl``
records ``world_size`` and the global ``images_per_s``. A run resumes with the same number of
processes only.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mbdl.config import Config, config_to_dict, config_to_yaml
from mbdl.distributed import (
    DistributedInfo,
    GatheredLoss,
    average_gradients,
    broadcast_object,
    init_distributed,
    replicas_differ,
)
from mbdl.errors import TrainingDiverged, UserError
from mbdl.evaluate import metrics_document
from mbdl.fileio import atomic_write_text
from mbdl.functional.checks import NonFiniteError
from mbdl.recipe import resolve_auto
from mbdl.runconfig import evaluate_dataset, evaluate_test, format_metrics, resolve_device
from mbdl.tracking import Sinks, check_sinks
from mbdl.train.build import (
    build_loss_from_config,
    build_model_from_config,
    cross_batch_memory,
    memory_format_of,
    model_args,
)
from mbdl.train.callbacks import Callback, CallbackList, ReportWriter, TestResult, TrackingSinks
from mbdl.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mbdl.train.data import training_loader, training_sampler, training_splits
from mbdl.train.optim import build_optimizer, build_scheduler
from mbdl.train.policies import builtin_callbacks
from mbdl.train.precision import amp_dtype, amp_name
from mbdl.train.progress import Progress, announce, print_epoch, progress_bar
from mbdl.train.rundir import prepare_run_dir_on_ranks
from mbdl.train.runlock import release_run_lock
from mbdl.train.seeding import seed_everything
from mbdl.train.state import checkpoint_state, restore

# How long a rank waits in a collective while rank 0 validates, tests or writes checkpoints.
COLLECTIVE_TIMEOUT = timedelta(hours=2)

#: names of log.jsonl's epoch record that a callback's step logs may not take
RECORD_KEYS = frozenset(
    {"epoch", "step", "train_loss", "lr", "images_per_s", "elapsed_s", "world_size", "amp"}
    | {"validation", "stopped_by", "loss"}
)


class Trainer:
    """One training run of a validated :class:`Config` (see :func:`train`).

    ``model``, ``loss``, ``optimizer``, ``scheduler`` (stepped once per optimiser step) and
    ``data`` (a :class:`mbdl.data.Splits`: train, validation and test classes) are used when
    given, else built from the config. ``callbacks`` follow the built-in ones.
    """

    def __init__(
        self,
        config: Config,
        *,
        model: nn.Module | None = None,
        loss: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        data: Any = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.config = config
        check_sinks(config.train.loggers)  # a missing tracker package: before any file is written
        self.device = resolve_device(config.train.device)
        # model.backbone=auto: the recipe is chosen (in place) before the run directory is
        # checked, so a resumed run compares the resolved config; its splits are reused
        auto_splits = resolve_auto(config, data)
        if auto_splits is not None:
            data = auto_splits
        self.owns_process_group = not torch.distributed.is_initialized()
        self.dist: DistributedInfo = init_distributed(self.device.type, COLLECTIVE_TIMEOUT)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.out, resume_state = prepare_run_dir_on_ranks(config, self.dist)
        self.checkpoints = self.out / "checkpoints"
        self.amp = amp_dtype(config.train.amp, self.device)
        if config.train.num_threads is not None:
            torch.set_num_threads(config.train.num_threads)
        self.should_stop = False

        self.splits = training_splits(config, self.dist, data)
        self.sampler, self.steps_per_epoch = training_sampler(config, self.splits.train, self.dist)
        seed_everything(config.seed)  # model initialisation independent of data loading
        self.model_args = model_args(config, self.splits.channels)
        if model is None:
            model = build_model_from_config(config, self.model_args)
            from mbdl.models.backbones import check_input_side  # a side it cannot take: refused

            check_input_side(
                model, self.splits.image_size, self.splits.channels, config.model.backbone
            )
        self.model = model.to(self.device)
        self.memory_format = memory_format_of(config, self.model)
        self.model.to(memory_format=self.memory_format)
        if loss is None:
            loss = build_loss_from_config(config, self.splits.train.labels)
        self.loss = loss.to(self.device)
        self.memory = cross_batch_memory(config, self.loss)
        if self.memory is not None:
            self.memory.to(self.device)
        # gather every rank's batch first, then (optionally) the memory, then the loss
        self.criterion = GatheredLoss(self.memory if self.memory is not None else self.loss)
        if optimizer is None:
            optimizer = build_optimizer(config, self.model, self.loss)
        self.optimizer = optimizer
        if scheduler is None:
            scheduler = build_scheduler(optimizer, config, self.steps_per_epoch)
        self.scheduler = scheduler
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp == torch.float16 and self.device.type == "cuda"
        )
        self.network: nn.Module = self.model  # what the training step calls
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if self.dist.enabled:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            self.network = self.ddp
        if config.train.compile:
            self.network = torch.compile(self.network)  # type: ignore[assignment]
        self.loader_generator = torch.Generator()
        self.loader, self.batched = training_loader(
            config, self.splits.train, self.sampler, self.device, self.loader_generator
        )

        # only rank 0 writes files: the other ranks call no callback
        sinks = Sinks.open(config.train.loggers, self.out, enabled=self.dist.is_main)
        everyone = [*builtin_callbacks(config), ReportWriter(), TrackingSinks(sinks), *callbacks]
        self.callbacks = CallbackList(everyone if self.dist.is_main else [])
        self.progress = Progress()
        self.config_dict = config_to_dict(config)
        try:
            if resume_state is not None:
                restore(self, resume_state)
            elif self.dist.is_main:
                atomic_write_text(self.out / "config.yaml", config_to_yaml(config))
            self.callbacks.on_train_start(self)
        except BaseException:
            self.callbacks.on_close(self)  # train() releases the run directory
            raise

    def close(self) -> None:
        """Release the run directory; destroy the process group if this trainer created it."""
        try:
            self.callbacks.on_close(self)
        finally:
            if self.dist.is_main:
                release_run_lock(self.out)
        if self.dist.enabled and self.owns_process_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train until ``train.epochs`` or a stop (continuing a resumed position)."""
        p = self.progress
        if self.config.train.progress and self.dist.is_main:
            announce(self.out, p, self.config.train.epochs)
        wall: list[float] = []  # seconds per epoch run here, validation included (for the ETA)
        while p.epoch < self.config.train.epochs and not self.should_stop:
            start = time.perf_counter()
            self._run_epoch(p.epoch)  # optimiser steps; on_step_end after each
            with self.callbacks.evaluation_weights(self):  # e.g. the EMA weights
                validation = self._validate(p.epoch)  # None when this epoch does not validate
                if validation is not None:
                    self.callbacks.on_validation(self, p.epoch + 1, validation)
                    self.callbacks.on_validation_end(self, p.epoch + 1, validation)  # best.pt
            self._sync_stop()
            self._end_epoch(validation)  # log.jsonl, on_epoch_end, last.pt
            wall.append(time.perf_counter() - start)
            remaining = (self.config.train.epochs - p.epoch) * sum(wall) / len(wall)
            if self.config.train.progress and self.dist.is_main:
                eta = 0.0 if self.should_stop else remaining
                print_epoch(p.history[-1], self.config, self.dist.world_size, eta)
        with self.callbacks.evaluation_weights(self):
            self.callbacks.on_fit_end(self)  # the final choice when nothing validated

    def _run_epoch(self, epoch: int) -> None:
        p, accumulate = self.progress, self.config.train.accumulate
        every = self.config.train.checkpoint_every_steps
        self.sampler.set_epoch(epoch, p.step_in_epoch * accumulate)
        self.loader_generator.manual_seed(self.config.seed * 1_000_003 + epoch)
        self.model.train()
        self.criterion.train()
        shown = self.config.train.progress and sys.stderr.isatty() and self.dist.is_main
        bar = progress_bar(self.steps_per_epoch, p.step_in_epoch, epoch, self.config, shown)
        try:
            batches = iter(self.loader)
            while p.step_in_epoch < self.steps_per_epoch and not self.should_stop:
                start = time.perf_counter()
                micro = [self._augmented(next(batches)) for _ in range(accumulate)]
                images, labels = [m[0] for m in micro], [m[1] for m in micro]
                value = self._train_step(images, labels)
                seen = sum(int(part.shape[0]) for part in labels) * self.dist.world_size
                p.advance(value, seen, time.perf_counter() - start)
                self._step_end(value)
                rate = p.epoch_images / p.epoch_seconds if p.epoch_seconds > 0 else 0.0
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
                more = p.step_in_epoch < self.steps_per_epoch and not self.should_stop
                if every is not None and p.global_step % every == 0 and more:
                    self.save("last")
        finally:
            bar.close()

    def _train_step(self, images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> float:
        """One optimiser step on the gradients of the micro-batches ``images[i], labels[i]``
        (``train.accumulate`` of them, each loss divided by their number); returns the mean of
        their losses."""
        self.optimizer.zero_grad(set_to_none=True)
        total, count = 0.0, len(images)
        for number, (micro_images, micro_labels) in enumerate(zip(images, labels, strict=True)):
            last = number == count - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else None
            with sync or contextlib.nullcontext():
                loss = self._loss(micro_images, micro_labels)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDiverged(f"the loss is {value} {self._where()}. {self._advice()}")
                self.scaler.scale(loss / count).backward()
            total += value
        average_gradients(self.loss.parameters())  # DDP averages the model's only
        if self.config.train.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.train.grad_clip)
            if not self.scaler.is_enabled() and not math.isfinite(float(norm)):
                raise TrainingDiverged(
                    f"the gradient norm is {float(norm)} {self._where()}. {self._advice()}"
                )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return total / count

    def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        images = images.contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp)
            if self.amp is not None
            else contextlib.nullcontext()
        )
        with autocast:
            embeddings = self.network(images)
        return self.criterion(embeddings.float(), labels)

    def _step_end(self, loss: float) -> None:
        """``on_step_end``; the values callbacks added to the step's logs are kept for the epoch's
        record; a stop asked on rank 0 reaches every rank."""
        logs = {"loss": loss, "lr": float(self.optimizer.param_groups[0]["lr"])}
        self.callbacks.on_step_end(self, self.progress.global_step, logs)
        added = {k: v for k, v in logs.items() if k not in ("loss", "lr")}
        clash = sorted(set(added) & RECORD_KEYS)
        if clash:
            raise UserError(f"a callback logged {clash[0]!r}, a name log.jsonl already uses")
        self.progress.add_step_logs(added)
        self._sync_stop()

    def _sync_stop(self) -> None:
        if self.dist.enabled:
            self.should_stop = bool(broadcast_object(self.should_stop))

    def _validate(self, epoch: int) -> dict[str, float] | None:
        """Validation metrics after ``epoch`` (0-based) when it is a validation epoch (every
        ``train.val_every``, the last one, and the one a stop ends)."""
        config = self.config
        last_epoch = epoch + 1 == config.train.epochs or self.should_stop
        if len(self.splits.val) == 0:
            return None
        if (epoch + 1) % config.train.val_every != 0 and not last_epoch:
            return None
        metrics = None
        if self.dist.is_main:  # the other ranks wait for the result
            # evaluation draws from the global RNGs (DataLoader seeds): keep the training streams
            # as they were, so that every rank draws the same numbers in a loss that samples
            # (margin's negatives) and validating does not change the training
            saved = rng_state()
            try:
                with self._contiguous_model():
                    metrics, _, _ = evaluate_dataset(
                        self.model, self.splits.val, config, self.device
                    )
            finally:
                set_rng_state(saved)
            self.model.train()
        return broadcast_object(metrics)

    def _end_epoch(self, validation: dict[str, float] | None) -> None:
        """Append the epoch's record to log.jsonl, tell the callbacks, write last.pt."""
        p = self.progress
        record: dict[str, Any] = {
            "epoch": p.epoch + 1,
            "step": p.global_step,
            "train_loss": p.epoch_loss_sum / max(1, p.epoch_batches),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "images_per_s": p.epoch_images / p.epoch_seconds if p.epoch_seconds > 0 else None,
            "elapsed_s": p.elapsed_s,
            "world_size": self.dist.world_size,
            "amp": amp_name(self.amp),
        }
        record.update({k: total / max(1, n) for k, (total, n) in p.step_logs.items()})
        if validation is not None:
            record["validation"] = validation
        if self.should_stop:
            record["stopped_by"] = self.callbacks.stopped_by or "trainer.should_stop"
        p.history.append(record)
        self._check_replicas()
        if self.dist.is_main:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
            self.callbacks.on_epoch_end(self, record)
        p.next_epoch()
        p.stopped_early = self.should_stop
        self.save("last")

    def test(self) -> dict[str, Any]:
        """Evaluate the chosen checkpoint on the test classes once; write metrics.json and the
        report (on rank 0; the other ranks receive its metrics). Returns ``{"validation": ...,
        "test": ...}`` (and ``verification``, ``stopped`` when they apply, and ``meta``: each
        split's run metadata, :func:`mbdl.evaluate.metrics_document`)."""
        if not self.dist.is_main:
            return broadcast_object(None)
        best = load_checkpoint(self.checkpoints / "best.pt")
        self.model.load_state_dict(best["model_state"])
        self.model.eval()
        with self._contiguous_model():
            test_metrics, embeddings, labels = evaluate_test(
                self.model, self.splits, self.config, self.device
            )
            metrics = {"validation": dict(best.get("validation", {})), "test": test_metrics}
            result = TestResult(metrics, embeddings, labels)
            self.callbacks.on_test(self, result)  # the verification threshold
        stopped = [r for r in self.progress.history if "stopped_by" in r]
        if stopped:
            by, epoch = stopped[-1]["stopped_by"], stopped[-1]["epoch"]
            metrics["stopped"] = {"epoch": epoch, "step": stopped[-1]["step"], "by": by}
        metrics = metrics_document(metrics)  # metric tables apart from the run metadata
        result = TestResult(metrics, result.embeddings, result.labels)
        atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        self.callbacks.on_train_end(self, result)
        return broadcast_object(metrics)

    # -- checkpoints -----------------------------------------------------------------------

    def save(self, kind: Literal["last", "best"], **fields: Any) -> None:
        """Write ``checkpoints/<kind>.pt`` (rank 0), refusing non-finite weights."""
        for name, param in self.model.named_parameters():
            if not bool(torch.isfinite(param.detach()).all()):
                raise TrainingDiverged(
                    f"parameter {name} became NaN or Inf {self._where()}; not checkpointed. "
                    f"{self._advice()}"
                )
        if not self.dist.is_main:
            return
        path = self.checkpoints / f"{kind}.pt"
        save_checkpoint(path, checkpoint_state(self, kind, **fields))
        self.callbacks.on_checkpoint(self, path)

    # -- small parts ---------------------------------------------------------------------------

    def _where(self) -> str:
        p = self.progress
        return (
            f"at epoch {p.epoch + 1}, step {p.step_in_epoch + 1} (global step {p.global_step + 1})"
        )

    def _advice(self) -> str:
        last = self.checkpoints / "last.pt"
        kept = (
            f"The last good checkpoint is {last}."
            if last.is_file()
            else "No checkpoint was written yet."
        )
        return f"{kept} Lower train.lr or set train.grad_clip, and start a new run."

    @contextlib.contextmanager
    def _contiguous_model(self) -> Iterator[None]:
        """Evaluate in the default memory format, as ``mbdl eval`` does on a checkpoint, so that
        it reproduces the trainer's metrics exactly (channels-last convolutions round
        differently); training continues in :attr:`memory_format`."""
        self.model.to(memory_format=torch.contiguous_format)
        try:
            yield
        except NonFiniteError as error:  # finite weights, but the embeddings overflowed
            raise TrainingDiverged(
                f"evaluating: {error} {self._where()}. {self._advice()}"
            ) from None
        finally:
            self.model.to(memory_format=self.memory_format)

    def _augmented(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of a loader batch; a batched in-memory one is augmented here, on
        the training device (:mod:`mbdl.data.batched`)."""
        if self.batched is None:
            return batch[0], batch[1]
        images, labels, params = batch
        images = images.to(self.device, non_blocking=True)
        return self.batched.finish(images, params), labels

    def _check_replicas(self) -> None:
        """Under torchrun: every rank must hold the same parameters (and memory)."""
        if not self.dist.enabled:
            return
        tensors: dict[str, torch.Tensor] = dict(self.model.named_parameters(prefix="model"))
        tensors.update({f"loss.{n}": t for n, t in self.loss.named_parameters()})
        if self.memory is not None:
            tensors["xbm.memory"] = self.memory.memory
        differ = replicas_differ(tensors)
        if differ:
            raise RuntimeError(
                f"the ranks' copies diverged {self._where()}: {', '.join(differ[:3])} differ"
            )


def train(config: Config, callbacks: Sequence[Callback] = (), **given: Any) -> dict[str, Any]:
    """Train, select on validation classes, test the chosen checkpoint once, write the report.

    Returns ``{"validation": {...}, "test": {...}}`` (the keys of :func:`mbdl.evaluate.evaluate`).
    Raises :class:`~mbdl.config.ConfigError` for a bad configuration or run directory and
    :class:`TrainingDiverged` when the loss becomes NaN or Inf. ``callbacks``
    (:class:`mbdl.train.callbacks.Callback`) follow the run after the built-in ones; ``given``
    (``model=``, ``loss=``, ``optimizer=``, ``scheduler=``, ``data=``) go to :class:`Trainer`.
    """
    try:
        trainer = Trainer(config, callbacks=callbacks, **given)
    except BaseException:
        if config.out is not None:
            release_run_lock(Path(config.out))
        raise
    try:
        metrics_file = trainer.out / "metrics.json"
        progress = trainer.progress
        finished = progress.stopped_early or progress.epoch == config.train.epochs
        saved: dict[str, Any] | None = None
        if trainer.dist.is_main and config.resume and finished and metrics_file.is_file():
            saved = json.loads(metrics_file.read_text(encoding="utf-8"))
        saved = broadcast_object(saved)
        if saved is not None:  # nothing left to do
            return saved
        trainer.fit()
        return trainer.test()
    finally:
        trainer.close()


__all__ = ["Trainer", "TrainingDiverged", "format_metrics", "train"]
