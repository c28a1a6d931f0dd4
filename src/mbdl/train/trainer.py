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
  metrics>}``, then ``report.html`` (:func:`mbdl.report.write_report`).

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
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mbdl.config import Config, ConfigError, config_to_dict, config_to_yaml
from mbdl.data.batched import batch_loader, batched_training_data
from mbdl.data.cache import decode_splits
from mbdl.data.workers import loader_workers
from mbdl.distributed import (
    DistributedInfo,
    GatheredLoss,
    average_gradients,
    barrier,
    broadcast_object,
    init_distributed,
    replicas_differ,
)
from mbdl.errors import TrainingDiverged, UserError, terminal_safe
from mbdl.fileio import atomic_write_text
from mbdl.inference import (
    choose_verification_threshold,
    evaluate_dataset,
    evaluate_test,
    format_metrics,
    load_data,
    resolve_device,
    verification_at_threshold,
)
from mbdl.losses.xbm import CrossBatchMemory
from mbdl.metrics import improves
from mbdl.model.preprocessing import config_preprocessing
from mbdl.models.depth import freeze_blocks
from mbdl.models.warmstart import warm_start
from mbdl.tracking import Sinks, check_sinks
from mbdl.train.callbacks import (
    Callback,
    CallbackList,
    ReportWriter,
    TestResult,
    TrackingSinks,
)
from mbdl.train.checkpoint import (
    check_state_matches,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mbdl.train.optim import build_optimizer, build_scheduler
from mbdl.train.precision import amp_dtype, amp_name
from mbdl.train.preflight import describe_data, validate_before_training
from mbdl.train.progress import Progress
from mbdl.train.rundir import prepare_run_dir
from mbdl.train.runlock import release_run_lock
from mbdl.train.seeding import SeededBatches, SeededDataset, seed_everything

# How long a rank waits in a collective while rank 0 validates, tests or writes checkpoints.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def _is_convolutional(model: nn.Module) -> bool:
    """Whether ``model`` has 2-D convolutions (which the channels-last format speeds up)."""
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


def _model_args(config: Config, channels: int) -> dict[str, Any]:
    return {
        "backbone": config.model.backbone,
        "embedding_dim": config.model.embedding_dim,
        "in_channels": channels,
        "freeze_bn": config.model.freeze_bn,
        "head_bn": config.model.head_bn,
        "normalize": True,
    }


# ---------------------------------------------------------------------------------------------
# the loop


class Trainer:
    """One training run of a validated :class:`Config` (see :func:`train`)."""

    def __init__(self, config: Config, callbacks: Sequence[Callback] = ()) -> None:
        """Prepare the run: processes and device, the run directory (and the state to resume),
        the data, the model, the loss, the optimiser and schedule, the training batches, and
        the callbacks (the report, the trackers of ``train.loggers``, then ``callbacks``)."""
        self.config = config
        check_sinks(config.train.loggers)  # a missing tracker package: before any file is written
        self.device = resolve_device(config.train.device)
        self.owns_process_group = not torch.distributed.is_initialized()
        self.dist: DistributedInfo = init_distributed(self.device.type, COLLECTIVE_TIMEOUT)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.out, resume_state = self._prepare_run_dir()
        self.amp = amp_dtype(config.train.amp, self.device)
        if config.train.num_threads is not None:
            torch.set_num_threads(config.train.num_threads)
        self.checkpoints = self.out / "checkpoints"

        self.splits = self._load_splits()
        self.sampler, self.steps_per_epoch = self._build_sampler()

        seed_everything(config.seed)  # model initialisation independent of data loading
        self.model_args = _model_args(config, self.splits.channels)
        self.model = self._build_model()
        self.memory_format = (
            torch.channels_last
            if config.train.channels_last and _is_convolutional(self.model)
            else torch.contiguous_format
        )
        self.model.to(memory_format=self.memory_format)
        self.loss, self.memory = self._build_loss()
        # gather every rank's batch first, then (optionally) the memory, then the loss
        self.criterion = GatheredLoss(self.memory if self.memory is not None else self.loss)
        self.optimizer = build_optimizer(config, self.model, self.loss)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp == torch.float16 and self.device.type == "cuda"
        )

        self.progress = Progress()
        self.config_dict = config_to_dict(config)
        if resume_state is not None:
            self._restore(resume_state)
        elif self.dist.is_main:
            atomic_write_text(self.out / "config.yaml", config_to_yaml(config))
        self.network: nn.Module = self.model  # what the training step calls
        if self.dist.enabled:
            self.network = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self.loader_generator = torch.Generator()
        self.batched = batched_training_data(self.splits.train)
        if self.batched is not None:  # on a CPU, loader workers overlap the augmentation
            self.batched.augment_in_loader = self.device.type == "cpu"
        self.loader = self._build_loader()

        sinks = Sinks.open(config.train.loggers, self.out, enabled=self.dist.is_main)
        # only rank 0 writes files: the other ranks call no callback
        everyone = [ReportWriter(), TrackingSinks(sinks), *callbacks]
        self.callbacks = CallbackList(everyone if self.dist.is_main else [])
        try:
            self.callbacks.on_train_start(self)
        except BaseException:
            self.callbacks.on_close(self)  # train() releases the run directory
            raise

    # -- building ----------------------------------------------------------------------------

    def _load_splits(self) -> Any:
        """The config's splits (rank 0 first: it may build caches or download), the training
        and evaluation splits decoded once (:mod:`mbdl.data.cache`), checked against the config up front."""
        config = self.config
        seed_everything(config.seed)
        if not self.dist.is_main:
            barrier()  # rank 0 builds caches or downloads first
        splits = load_data(config)
        decode_splits(splits, config.data.cache)  # training and evaluation splits, once
        if self.dist.is_main:
            barrier()
        validate_before_training(config, splits)  # every check the data allows, up front
        if config.train.progress and self.dist.is_main:
            print(terminal_safe(describe_data(splits)), file=sys.stderr, flush=True)
        return splits

    def _build_sampler(self) -> tuple[Any, int]:
        """The class-balanced batch sampler of this rank and the steps of an epoch."""
        from mbdl.data import ClassBalancedBatchSampler

        config = self.config
        sampler = ClassBalancedBatchSampler(
            self.splits.train.labels,
            config.train.batch_classes,
            config.train.batch_per_class,
            seed=config.seed,
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
        )
        steps_per_epoch = len(sampler)
        if config.train.max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, config.train.max_steps_per_epoch)
        return sampler, steps_per_epoch

    def _build_model(self) -> nn.Module:
        from mbdl.models import build_model

        args = dict(self.model_args)
        model = build_model(
            args.pop("backbone"),
            args.pop("embedding_dim"),
            pretrained=self.config.model.pretrained,
            **args,
        )
        if self.config.model.init is not None:
            warm_start(model, self.config.model.init)
        freeze_blocks(model.backbone, self.config.model.freeze_blocks)
        return model.to(self.device)

    def _build_loss(self) -> tuple[nn.Module, CrossBatchMemory | None]:
        """The loss (given what it ``needs``) and the cross-batch memory around it, if any."""
        from mbdl.losses import build_loss, loss_class

        config = self.config
        num_classes = len(np.unique(self.splits.train.labels))
        extra: dict[str, Any] = {}
        needs = getattr(loss_class(config.loss.name), "needs", ())
        if "num_classes" in needs:
            extra["num_classes"] = num_classes
        if "embedding_dim" in needs:
            extra["embedding_dim"] = config.model.embedding_dim
        loss = build_loss(config.loss.name, **config.loss.params, **extra).to(self.device)
        memory: CrossBatchMemory | None = None
        if config.train.xbm_size > 0:
            memory = CrossBatchMemory(
                loss,
                config.train.xbm_size,
                config.model.embedding_dim,
                config.train.xbm_warmup_steps,
            ).to(self.device)
        return loss, memory

    def _build_loader(self) -> Iterable[Any]:
        """The training batches, seeded per item (:mod:`mbdl.train.seeding`)."""
        config = self.config
        loaded = self.batched if self.batched is not None else SeededDataset(self.splits.train)
        workers = loader_workers(config.data.num_workers, loaded, training=True)
        if self.batched is not None:  # in memory: whole batches, augmented on self.device
            return batch_loader(
                self.batched,
                SeededBatches(self.sampler, config.seed),
                workers=workers,
                pin_memory=self.device.type == "cuda",
                generator=self.loader_generator,
            )
        return DataLoader(
            loaded,
            batch_sampler=SeededBatches(self.sampler, config.seed),
            num_workers=workers,
            persistent_workers=workers > 0,  # not started again every epoch
            pin_memory=self.device.type == "cuda",
            generator=self.loader_generator,
        )

    def _prepare_run_dir(self) -> tuple[Path, dict[str, Any] | None]:
        """:func:`prepare_run_dir` on rank 0; the other ranks get its directory and state."""
        if not self.dist.enabled:
            return prepare_run_dir(self.config)
        outcome: tuple[str, Any, Any]
        if self.dist.is_main:
            try:
                out, state = prepare_run_dir(self.config)
                outcome = ("ok", str(out), state)
            except ConfigError as error:
                outcome = ("error", str(error), None)
        else:
            outcome = ("", None, None)
        kind, value, state = broadcast_object(outcome)
        if kind == "error":
            raise ConfigError(value)
        self.config.out = value
        return Path(value), state

    def close(self) -> None:
        """Release the run directory; destroy the process group if this trainer created it."""
        try:
            self.callbacks.on_close(self)
        finally:
            if self.dist.is_main:
                release_run_lock(self.out)
        if self.dist.enabled and self.owns_process_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # -- checkpoints -----------------------------------------------------------------------

    def _data_args(self) -> dict[str, Any]:
        return {
            "source": self.config.data.source,
            "root": self.config.data.root,
            "image_size": int(self.splits.image_size),
            "channels": int(self.splits.channels),
            "preprocessing": config_preprocessing(self.config, self.splits),
        }

    def _check_finite_weights(self) -> None:
        for name, param in self.model.named_parameters():
            if not bool(torch.isfinite(param.detach()).all()):
                raise TrainingDiverged(
                    f"parameter {name} became NaN or Inf {self._where()}; not checkpointed. "
                    f"{self._advice()}"
                )

    def checkpoint_state(self, kind: Literal["last", "best"], **fields: Any) -> dict[str, Any]:
        """The one checkpoint layout (:mod:`mbdl.train.checkpoint`): what rebuilds the model
        (config, model and data arguments, weights, loss parameters); for ``last`` also what
        resumes the run exactly (optimiser, scheduler, GradScaler, RNG states, progress, number
        of processes, cross-batch memory); then ``fields`` (``best``: epoch and validation)."""
        state: dict[str, Any] = {
            "kind": kind,
            "config": self.config_dict,
            "model_args": self.model_args,
            "data_args": self._data_args(),
            "model_state": self.model.state_dict(),
            "loss_state": self.loss.state_dict(),
        }
        if kind == "last":
            state.update(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
                rng=rng_state(),
                progress=self.progress.to_state(),
                world_size=self.dist.world_size,
            )
            if self.memory is not None:
                state["xbm_state"] = self.memory.state_dict()
        return {**state, **fields}

    def _save(self, kind: Literal["last", "best"], **fields: Any) -> None:
        """Write ``checkpoints/<kind>.pt`` (rank 0), refusing non-finite weights."""
        self._check_finite_weights()
        if not self.dist.is_main:
            return
        path = self.checkpoints / f"{kind}.pt"
        save_checkpoint(path, self.checkpoint_state(kind, **fields))
        self.callbacks.on_checkpoint(self, path)

    def _save_last(self) -> None:
        self._save("last")

    def _save_best(self, epoch: int, validation: dict[str, float]) -> None:
        self._save("best", epoch=epoch, validation=dict(validation))

    def _restore(self, state: dict[str, Any]) -> None:
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise ConfigError(
                f"{self.checkpoints / 'last.pt'} was written by {saved_world} process(es); resume "
                f"it with the same number (torchrun --nproc_per_node ...), not "
                f"{self.dist.world_size}"
            )
        if (self.memory is not None) != ("xbm_state" in state):
            raise ConfigError(f"{self.checkpoints / 'last.pt'} does not match train.xbm_size")
        last = self.checkpoints / "last.pt"
        try:  # every field checked against this run before anything is restored
            check_state_matches(self.model.state_dict(), state["model_state"], f"{last} model")
            check_state_matches(self.loss.state_dict(), state["loss_state"], f"{last} loss")
            if self.memory is not None:
                check_state_matches(self.memory.state_dict(), state["xbm_state"], f"{last} xbm")
            self.model.load_state_dict(state["model_state"])
            self.loss.load_state_dict(state["loss_state"])
            if self.memory is not None:
                self.memory.load_state_dict(state["xbm_state"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.progress = Progress.from_state(state["progress"])
            set_rng_state(state["rng"])
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
            raise ConfigError(
                f"{last} does not match this run ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); it is damaged or from "
                "another version: start a new run with another out="
            ) from None
        if self.dist.is_main:
            # log.jsonl may hold records written after this checkpoint: rewrite it from the history
            lines = "".join(json.dumps(r) + "\n" for r in self.progress.history)
            atomic_write_text(self.out / "log.jsonl", lines)

    # -- training ----------------------------------------------------------------------------

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

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        images = images.contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp)
            if self.amp is not None
            else contextlib.nullcontext()
        )
        with autocast:
            embeddings = self.network(images)
        loss = self.criterion(embeddings.float(), labels)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"the loss is {value} {self._where()}. {self._advice()}")
        self.scaler.scale(loss).backward()
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
        return value

    def _progress_bar(self, epoch: int) -> Any:
        from tqdm.auto import tqdm

        enabled = self.config.train.progress and sys.stderr.isatty() and self.dist.is_main
        return tqdm(
            total=self.steps_per_epoch,
            initial=self.progress.step_in_epoch,
            desc=f"epoch {epoch + 1}/{self.config.train.epochs}",
            unit="batch",
            disable=not enabled,
            leave=False,
            dynamic_ncols=True,
        )

    def _run_epoch(self, epoch: int) -> None:
        p = self.progress
        every = self.config.train.checkpoint_every_steps
        self.sampler.set_epoch(epoch, p.step_in_epoch)
        self.loader_generator.manual_seed(self.config.seed * 1_000_003 + epoch)
        self.model.train()
        self.criterion.train()
        bar = self._progress_bar(epoch)
        try:
            batches = iter(self.loader)
            while p.step_in_epoch < self.steps_per_epoch:
                start = time.perf_counter()
                images, labels = self._augmented(next(batches))
                value = self._train_step(images, labels)
                seconds = time.perf_counter() - start
                p.step_in_epoch += 1
                p.global_step += 1
                p.epoch_loss_sum += value
                p.epoch_batches += 1
                p.epoch_images += int(labels.shape[0]) * self.dist.world_size  # global
                p.epoch_seconds += seconds
                p.elapsed_s += seconds
                rate = p.epoch_images / p.epoch_seconds if p.epoch_seconds > 0 else 0.0
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
                if every is not None and p.global_step % every == 0:
                    if p.step_in_epoch < self.steps_per_epoch:
                        self._save_last()
        finally:
            bar.close()

    def _validate(self, epoch: int) -> dict[str, float] | None:
        """Validation metrics after ``epoch`` (0-based) when it is a validation epoch."""
        config = self.config
        last_epoch = epoch + 1 == config.train.epochs
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

    def _end_epoch(self, epoch: int, validation: dict[str, float] | None) -> bool:
        """Log the epoch, update the best checkpoint and patience; True to stop early."""
        p = self.progress
        config = self.config
        stop = False
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": p.global_step,
            "train_loss": p.epoch_loss_sum / max(1, p.epoch_batches),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "images_per_s": p.epoch_images / p.epoch_seconds if p.epoch_seconds > 0 else None,
            "elapsed_s": p.elapsed_s,
            "world_size": self.dist.world_size,
            "amp": amp_name(self.amp),
        }
        if validation is not None:
            record["validation"] = validation
            value = float(validation[config.train.select_metric])
            if improves(config.train.select_metric, value, p.best_value):
                p.best_value, p.best_epoch = value, epoch + 1
                p.best_validation = dict(validation)
                p.bad_validations = 0
                self._save_best(epoch + 1, validation)
            else:
                p.bad_validations += 1
                if config.train.patience is not None and p.bad_validations >= config.train.patience:
                    stop = True
        p.history.append(record)
        self._check_replicas()
        if self.dist.is_main:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
            self.callbacks.on_epoch_end(self, record)
        p.epoch += 1
        p.step_in_epoch = 0
        p.epoch_loss_sum, p.epoch_batches, p.epoch_images, p.epoch_seconds = 0.0, 0, 0, 0.0
        p.stopped_early = stop
        if stop or p.epoch == config.train.epochs:
            if p.best_value is None:  # no validation classes: the final model is the choice
                self._save_best(p.epoch, {})
        self._save_last()
        return stop

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

    def fit(self) -> None:
        """Train until ``train.epochs`` or early stopping (continuing a resumed position)."""
        p = self.progress
        shown = self.config.train.progress and self.dist.is_main
        if shown and p.epoch < self.config.train.epochs:
            where = f" from epoch {p.epoch + 1}, step {p.step_in_epoch}" if p.global_step else ""
            print(f"training into {self.out}{where}", file=sys.stderr, flush=True)
        wall: list[float] = []  # seconds per epoch run here, validation included (for the ETA)
        while p.epoch < self.config.train.epochs and not p.stopped_early:
            epoch = p.epoch
            start = time.perf_counter()
            self._run_epoch(epoch)
            validation = self._validate(epoch)
            if validation is not None:
                self.callbacks.on_validation(self, epoch + 1, validation)
            self._end_epoch(epoch, validation)
            wall.append(time.perf_counter() - start)
            remaining = (self.config.train.epochs - p.epoch) * sum(wall) / len(wall)
            self._print_epoch(p.history[-1], remaining if not p.stopped_early else 0.0)

    def _print_epoch(self, record: dict[str, Any], eta_s: float) -> None:
        if not self.config.train.progress or not self.dist.is_main:
            return
        parts = [
            f"epoch {record['epoch']}/{self.config.train.epochs}",
            f"loss {record['train_loss']:.4f}",
        ]
        if record.get("images_per_s"):
            world = f" ({self.dist.world_size} processes)" if self.dist.enabled else ""
            parts.append(f"{record['images_per_s']:.0f} img/s{world}")
        validation = record.get("validation")
        if validation:
            metric = self.config.train.select_metric
            parts.append(f"val {metric} {validation[metric]:.4f}")
        if eta_s > 0:
            parts.append(f"ETA {timedelta(seconds=round(eta_s))}")
        print("  ".join(parts), file=sys.stderr, flush=True)

    def test(self) -> dict[str, Any]:
        """Evaluate the chosen checkpoint on the test classes once; write metrics.json and the
        report (on rank 0; the other ranks receive its metrics). Returns ``{"validation": ...,
        "test": ...}``."""
        if not self.dist.is_main:
            return broadcast_object(None)
        best = load_checkpoint(self.checkpoints / "best.pt")
        self.model.load_state_dict(best["model_state"])
        self.model.eval()
        with self._contiguous_model():
            test_metrics, embeddings, labels = evaluate_test(
                self.model, self.splits, self.config, self.device
            )
            metrics: dict[str, Any] = {
                "validation": dict(best.get("validation", {})),
                "test": test_metrics,
            }
            verification = self._verification(best, embeddings, labels)
        if verification is not None:
            metrics["test"].update(verification.pop("test"))
            metrics["verification"] = verification
        atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        self.callbacks.on_train_end(self, TestResult(metrics, embeddings, labels))
        return broadcast_object(metrics)

    def _verification(
        self, best: dict[str, Any], embeddings: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, Any] | None:
        """Choose the verification threshold on the validation classes with the chosen model,
        store it in best.pt, and measure the test classes' TAR and FAR at it."""
        chosen = choose_verification_threshold(self.model, self.splits, self.config, self.device)
        if chosen is None or torch.unique(labels).numel() < 2:
            return None
        save_checkpoint(self.checkpoints / "best.pt", {**best, "verification": dict(chosen)})
        self.callbacks.on_checkpoint(self, self.checkpoints / "best.pt")
        test = verification_at_threshold(embeddings, labels, self.config, chosen["threshold"])
        return {**chosen, "test": test}


def train(config: Config, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train, select on validation classes, test the chosen checkpoint once, write the report.

    Returns ``{"validation": {...}, "test": {...}}`` (the keys of :func:`mbdl.evaluate.evaluate`).
    Raises :class:`~mbdl.config.ConfigError` for a bad configuration or run directory and
    :class:`TrainingDiverged` when the loss becomes NaN or Inf. ``callbacks``
    (:class:`mbdl.train.callbacks.Callback`) follow the run after the report and the trackers.
    """
    try:
        trainer = Trainer(config, callbacks)
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
