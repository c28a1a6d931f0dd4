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
import inspect
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mbdl.config import (
    Config,
    ConfigError,
    config_differences,
    config_to_dict,
    config_to_flat,
    config_to_yaml,
    load_config,
)
from mbdl.data.batched import batched_training_data
from mbdl.data.cache import decoded_training_split
from mbdl.distributed import (
    DistributedInfo,
    GatheredLoss,
    average_gradients,
    barrier,
    broadcast_object,
    init_distributed,
    replicas_differ,
)
from mbdl.errors import UserError, terminal_safe
from mbdl.fileio import atomic_write_text
from mbdl.losses.xbm import CrossBatchMemory
from mbdl.metrics import improves
from mbdl.tracking import Sinks, check_sinks
from mbdl.train.checkpoint import (
    check_state_matches,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mbdl.train.preflight import describe_data, validate_before_training
from mbdl.train.runlock import RUN_LOCK, acquire_run_lock, release_run_lock, remove_debris
from mbdl.train.schedule import warmup_cosine_schedule


class TrainingDiverged(RuntimeError):
    """The loss (or the gradients, or the weights) became NaN or Inf; the run stopped."""


# How long a rank waits in a collective while rank 0 validates, tests or writes checkpoints.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


# ---------------------------------------------------------------------------------------------
# seeding and data


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global generator, for user code)
    torch.manual_seed(seed)


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """Wraps a class-balanced batch sampler: yields ``(index, item_seed)`` pairs, the seed a pure
    function of ``(seed, epoch, batch number, position)``, so augmentation does not depend on
    where a run was resumed or on the number of DataLoader workers."""

    def __init__(self, batch_sampler: Any, seed: int) -> None:
        self.batch_sampler = batch_sampler
        self.seed = seed

    def __len__(self) -> int:
        return len(self.batch_sampler) - int(self.batch_sampler.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = int(self.batch_sampler.epoch)
        start = int(self.batch_sampler.start_batch)
        replicas = int(getattr(self.batch_sampler, "num_replicas", 1))
        rank = int(getattr(self.batch_sampler, "rank", 0))
        for local_number, batch in enumerate(self.batch_sampler, start=start):
            number = local_number * replicas + rank  # the batch's number in the whole epoch
            seeds = np.random.SeedSequence([self.seed, epoch, number]).generate_state(
                len(batch), dtype=np.uint64
            )
            yield [(int(i), int(s) & (2**63 - 1)) for i, s in zip(batch, seeds, strict=True)]


class SeededDataset(Dataset[tuple[torch.Tensor, int]]):
    """``dataset[index]`` computed with torch's generator seeded by the item's seed (in the main
    process the global generator is forked, so the training RNG stream is left untouched)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        generator = torch.default_generator  # CPU; its manual_seed is far cheaper than torch's
        if torch.utils.data.get_worker_info() is not None:
            generator.manual_seed(seed)
            return self.dataset[index]
        saved = generator.get_state()
        try:
            generator.manual_seed(seed)
            return self.dataset[index]
        finally:
            generator.set_state(saved)


def _source_options(config: Config) -> dict[str, Any]:
    """Keyword options for the source's ``load_splits``, checked against what it accepts."""
    import importlib

    module = importlib.import_module(f"mbdl.data.{config.data.source}")
    accepted = inspect.signature(module.load_splits).parameters
    wanted: dict[str, tuple[Any, bool]] = {  # option -> (value, whether the user asked for it)
        "augment": (config.data.augment, config.data.augment != "auto"),
        "skip_corrupt": (config.data.skip_corrupt, config.data.skip_corrupt),
        "bbox": (config.data.bbox, config.data.bbox),
        "max_classes": (config.data.max_classes, config.data.max_classes is not None),
        "allow_outside_root": (config.data.allow_outside_root, config.data.allow_outside_root),
    }
    if config.model.pretrained is not None:
        wanted["imagenet_norm"] = (True, False)
    options = {}
    for name, (value, asked) in wanted.items():
        if name in accepted:
            options[name] = value
        elif asked:
            raise ConfigError(f"data.{name} does not apply to data.source={config.data.source}")
    return options


def load_data(config: Config) -> Any:
    """The :class:`mbdl.data.Splits` of ``config.data``."""
    from mbdl.data import load_splits

    return load_splits(
        config.data.source,
        config.data.root,
        image_size=config.data.image_size,
        val_fraction=config.data.val_fraction,
        seed=config.seed,
        backbone=config.model.backbone,
        **_source_options(config),
    )


# ---------------------------------------------------------------------------------------------
# run directory


def _default_out(config: Config) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{config.data.source}-{config.loss.name}-{stamp}")


def prepare_run_dir(config: Config) -> tuple[Path, dict[str, Any] | None]:
    """Create or check ``config.out``; returns it and the ``last.pt`` state to resume (or None).

    A fresh run needs an empty or missing directory; ``resume=true`` needs the same config as
    the one saved there (keys in ``RESUME_FREE_KEYS`` may differ) and starts fresh when no
    checkpoint was written yet.
    """
    if config.out is None:
        if config.resume:
            raise ConfigError("resume=true needs out=RUN_DIR (the run to continue)")
        config.out = _default_out(config)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={config.out} exists and is not a directory")
    has_content = out.is_dir() and any(path.name != RUN_LOCK for path in out.iterdir())
    if not config.resume:
        if has_content:
            raise ConfigError(
                f"out={config.out} already exists and is not empty; continue it with resume=true "
                "or choose another out="
            )
        acquire_run_lock(out)
        return out, None
    acquire_run_lock(out)
    remove_debris(out)  # the temporary files of a writer killed mid-save
    saved = out / "config.yaml"
    if saved.is_file():
        previous = load_config(saved)
        differences = config_differences(config_to_flat(previous), config_to_flat(config))
        if differences:
            old, new = config_to_flat(previous), config_to_flat(config)
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differences[:4])
            raise ConfigError(
                f"cannot resume {config.out} with a different config ({shown}); "
                "start a new run with another out="
            )
    elif has_content:
        raise ConfigError(f"out={config.out} is not an mbdl run directory (no config.yaml)")
    last = out / "checkpoints" / "last.pt"
    state = load_checkpoint(last) if last.is_file() else None
    return out, state


# ---------------------------------------------------------------------------------------------
# model, loss, optimiser


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX tiles), where
    autocast to bf16 makes convolutions and matrix products faster than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: full precision).

    ``auto``: bf16 on a CUDA device that supports it (fp16, with a GradScaler, on older GPUs);
    on CPU bf16 where :func:`cpu_has_bf16_matrix_units`, else full precision (bf16 emulated in
    AVX2/AVX512 is slower than fp32). Measured on glyphs: docs/benchmarks.md, "CPU bf16".
    """
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16_matrix_units():
            return torch.bfloat16
        return None
    if amp == "off":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 on CPU")
    return torch.float16 if amp == "fp16" else torch.bfloat16


def amp_name(dtype: torch.dtype | None) -> str:
    """``"bf16"``, ``"fp16"`` or ``"off"``: the precision a run trained in (``log.jsonl``)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off") if dtype else "off"


def build_optimizer(config: Config, model: nn.Module, loss: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD with parameter groups: backbone (``lr``), head (``lr * head_lr_mult``), each
    with and without weight decay (biases and 1-D parameters get none), loss parameters
    (``loss_lr``, no weight decay)."""
    train = config.train
    groups: list[dict[str, Any]] = []

    def add(name: str, params: list[nn.Parameter], lr: float, decay: float) -> None:
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "weight_decay": decay, "name": name})

    head = getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    body = [p for p in model.parameters() if id(p) not in head_ids]
    head_params = [p for p in model.parameters() if id(p) in head_ids]
    head_lr = train.lr * train.head_lr_mult
    add("backbone", [p for p in body if p.ndim > 1], train.lr, train.weight_decay)
    add("backbone_no_decay", [p for p in body if p.ndim <= 1], train.lr, 0.0)
    add("head", [p for p in head_params if p.ndim > 1], head_lr, train.weight_decay)
    add("head_no_decay", [p for p in head_params if p.ndim <= 1], head_lr, 0.0)
    add(
        "loss",
        list(loss.parameters()),
        train.loss_lr if train.loss_lr is not None else train.lr,
        0.0,
    )
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    return torch.optim.AdamW(groups, lr=train.lr)


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
# evaluation


def embed_with_config(
    model: nn.Module, dataset: Any, config: Config, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mbdl.evaluate.embed_dataset` with the config's batch size and loader workers."""
    from mbdl.evaluate import embed_dataset

    return embed_dataset(
        model,
        dataset,
        batch_size=config.eval.batch_size,
        device=str(device),
        num_workers=config.data.num_workers,
    )


def evaluate_dataset(
    model: nn.Module, dataset: Any, config: Config, device: torch.device
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Embed ``dataset`` and compute :func:`mbdl.evaluate.evaluate` (each item queries the rest)."""
    from mbdl.evaluate import evaluate

    embeddings, labels = embed_with_config(model, dataset, config, device)
    metrics = evaluate(
        embeddings,
        labels,
        ks=tuple(config.eval.ks),
        distance=config.eval.distance,
        seed=config.seed,
        **evaluation_options(config),
    )
    return metrics, embeddings, labels


def evaluation_options(config: Config) -> dict[str, Any]:
    """The :func:`mbdl.evaluate.evaluate` options the ``eval.*`` keys set beyond ks and distance."""
    from mbdl.functional.verification import DEFAULT_FARS

    return {
        "kmeans_restarts": config.eval.kmeans_restarts,
        "verify_fars": tuple(sorted({*DEFAULT_FARS, config.eval.verify_far}, reverse=True)),
        "verify_max_pairs": config.eval.verify_max_pairs,
    }


def evaluate_test(
    model: nn.Module, splits: Any, config: Config, device: torch.device
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Test metrics: query vs gallery where the source defines them (In-Shop), else every test
    image against the others. Returns the metrics and the test split's embeddings and labels."""
    from mbdl.evaluate import evaluate

    if splits.query is not None and splits.gallery is not None:
        query, query_labels = embed_with_config(model, splits.query, config, device)
        gallery, gallery_labels = embed_with_config(model, splits.gallery, config, device)
        metrics = evaluate(
            gallery,
            gallery_labels,
            query_embeddings=query,
            query_labels=query_labels,
            ks=tuple(config.eval.ks),
            distance=config.eval.distance,
            seed=config.seed,
            **evaluation_options(config),
        )
        test, test_labels = embed_with_config(model, splits.test, config, device)
        return metrics, test, test_labels
    return evaluate_dataset(model, splits.test, config, device)


def choose_verification_threshold(
    model: nn.Module, splits: Any, config: Config, device: torch.device
) -> dict[str, Any] | None:
    """The distance threshold at FAR ``eval.verify_far`` on the validation classes' pairs (never
    the test classes'), with the validation TAR and FAR it reaches; None without validation
    classes."""
    from mbdl.functional.verification import rates_at_threshold, threshold_at_far

    if len(splits.val) == 0:
        return None
    embeddings, labels = embed_with_config(model, splits.val, config, device)
    if torch.unique(labels).numel() < 2:
        return None
    genuine, impostor = _verification_pairs(embeddings, labels, config)
    threshold = threshold_at_far(genuine, impostor, config.eval.verify_far)
    tar, far = rates_at_threshold(genuine, impostor, threshold)
    return {
        "threshold": threshold,
        "far": config.eval.verify_far,
        "distance": config.eval.distance,
        "chosen_on": "validation",
        "validation_tar": tar,
        "validation_far": far,
        "validation_pairs": [int(genuine.numel()), int(impostor.numel())],
    }


def verification_at_threshold(
    embeddings: torch.Tensor, labels: torch.Tensor, config: Config, threshold: float
) -> dict[str, float]:
    """TAR and FAR of the pairs of ``embeddings`` at a threshold chosen elsewhere."""
    from mbdl.functional.verification import rates_at_threshold

    tar, far = rates_at_threshold(*_verification_pairs(embeddings, labels, config), threshold)
    return {"tar@threshold": tar, "far@threshold": far}


def _verification_pairs(
    embeddings: torch.Tensor, labels: torch.Tensor, config: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """Genuine and impostor pair distances of a split, as ``eval.*`` and the seed say."""
    from mbdl.functional.verification import pair_distances

    genuine, impostor, _ = pair_distances(
        embeddings,
        labels,
        distance=config.eval.distance,
        max_pairs=config.eval.verify_max_pairs,
        seed=config.seed,
    )
    return genuine, impostor


# ---------------------------------------------------------------------------------------------
# the loop


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


class Trainer:
    """One training run of a validated :class:`Config` (see :func:`train`)."""

    def __init__(self, config: Config) -> None:
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

        from mbdl.data import ClassBalancedBatchSampler
        from mbdl.losses import build_loss, loss_class
        from mbdl.models import build_model

        seed_everything(config.seed)
        if not self.dist.is_main:
            barrier()  # rank 0 builds caches or downloads first
        self.splits = load_data(config)
        self.splits.train = decoded_training_split(
            self.splits.train,
            self.splits.image_size,
            self.splits.channels,
            mode=config.data.cache,
        )
        if self.dist.is_main:
            barrier()
        train_set = self.splits.train
        num_classes = len(np.unique(train_set.labels))
        validate_before_training(config, self.splits)  # every check the data allows, up front
        if config.train.progress and self.dist.is_main:
            print(terminal_safe(describe_data(self.splits)), file=sys.stderr, flush=True)
        self.sampler = ClassBalancedBatchSampler(
            train_set.labels,
            config.train.batch_classes,
            config.train.batch_per_class,
            seed=config.seed,
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
        )
        self.steps_per_epoch = len(self.sampler)
        if config.train.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, config.train.max_steps_per_epoch)
        self.total_steps = self.steps_per_epoch * config.train.epochs
        warmup_steps = min(
            self.total_steps, round(config.train.warmup_epochs * self.steps_per_epoch)
        )

        seed_everything(config.seed)  # model initialisation independent of data loading
        self.model_args = _model_args(config, self.splits.channels)
        args = dict(self.model_args)
        self.model = build_model(
            args.pop("backbone"),
            args.pop("embedding_dim"),
            pretrained=config.model.pretrained,
            **args,
        ).to(self.device)
        self.memory_format = (
            torch.channels_last
            if config.train.channels_last and _is_convolutional(self.model)
            else torch.contiguous_format
        )
        self.model.to(memory_format=self.memory_format)
        extra: dict[str, Any] = {}
        needs = getattr(loss_class(config.loss.name), "needs", ())
        if "num_classes" in needs:
            extra["num_classes"] = num_classes
        if "embedding_dim" in needs:
            extra["embedding_dim"] = config.model.embedding_dim
        self.loss = build_loss(config.loss.name, **config.loss.params, **extra).to(self.device)
        self.memory: CrossBatchMemory | None = None
        if config.train.xbm_size > 0:
            self.memory = CrossBatchMemory(
                self.loss,
                config.train.xbm_size,
                config.model.embedding_dim,
                config.train.xbm_warmup_steps,
            ).to(self.device)
        # gather every rank's batch first, then (optionally) the memory, then the loss
        self.criterion = GatheredLoss(self.memory if self.memory is not None else self.loss)
        self.optimizer = build_optimizer(config, self.model, self.loss)
        self.scheduler = warmup_cosine_schedule(self.optimizer, warmup_steps, self.total_steps)
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
        self.batched = batched_training_data(train_set)
        self.loader: DataLoader[Any]
        if self.batched is not None:  # in memory: whole batches, augmented on self.device
            self.loader = DataLoader(
                self.batched,
                sampler=SeededBatches(self.sampler, config.seed),
                batch_size=None,
                num_workers=config.data.num_workers,
                pin_memory=self.device.type == "cuda",
                generator=self.loader_generator,
            )
        else:
            self.loader = DataLoader(
                SeededDataset(train_set),
                batch_sampler=SeededBatches(self.sampler, config.seed),
                num_workers=config.data.num_workers,
                pin_memory=self.device.type == "cuda",
                generator=self.loader_generator,
            )
        self.sinks = Sinks.open(config.train.loggers, self.out, enabled=self.dist.is_main)
        self.sinks.log_params(config_to_flat(config))

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
        self.sinks.close()
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
        }

    def _check_finite_weights(self) -> None:
        for name, param in self.model.named_parameters():
            if not bool(torch.isfinite(param.detach()).all()):
                raise TrainingDiverged(
                    f"parameter {name} became NaN or Inf {self._where()}; not checkpointed. "
                    f"{self._advice()}"
                )

    def _save_last(self) -> None:
        self._check_finite_weights()
        if not self.dist.is_main:
            return
        extra: dict[str, Any] = {}
        if self.memory is not None:
            extra["xbm_state"] = self.memory.state_dict()
        save_checkpoint(
            self.checkpoints / "last.pt",
            {
                "kind": "last",
                "config": self.config_dict,
                "model_args": self.model_args,
                "data_args": self._data_args(),
                "model_state": self.model.state_dict(),
                "loss_state": self.loss.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "progress": self.progress.to_state(),
                "world_size": self.dist.world_size,
                **extra,
            },
        )

    def _save_best(self, epoch: int, validation: dict[str, float]) -> None:
        self._check_finite_weights()
        if not self.dist.is_main:
            return
        save_checkpoint(
            self.checkpoints / "best.pt",
            {
                "kind": "best",
                "config": self.config_dict,
                "model_args": self.model_args,
                "data_args": self._data_args(),
                "model_state": self.model.state_dict(),
                "loss_state": self.loss.state_dict(),
                "epoch": epoch,
                "validation": dict(validation),
            },
        )

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
        return self.batched.augment(images, params), labels

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
            self.sinks.log_epoch(record)
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
        self.sinks.log_test(test_metrics, self.progress.epoch)
        if self.config.eval.report:
            self._write_report(metrics, embeddings, labels)
            self.sinks.log_report(self.out / "report.html", self.progress.epoch)
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
        test = verification_at_threshold(embeddings, labels, self.config, chosen["threshold"])
        return {**chosen, "test": test}

    def _write_report(
        self, metrics: dict[str, Any], embeddings: torch.Tensor, labels: torch.Tensor
    ) -> None:
        try:
            from mbdl.report import write_report

            write_report(
                self.out,
                config=self.config_dict,
                history=self.progress.history,
                metrics=metrics,
                test_embeddings=embeddings,
                test_labels=labels,
                test_dataset=self.splits.test,
            )
        except Exception as error:  # the metrics are safe on disk; a report failure is not fatal
            warnings.warn(f"could not write report.html: {error}", stacklevel=2)


def train(config: Config) -> dict[str, Any]:
    """Train, select on validation classes, test the chosen checkpoint once, write the report.

    Returns ``{"validation": {...}, "test": {...}}`` (the keys of :func:`mbdl.evaluate.evaluate`).
    Raises :class:`~mbdl.config.ConfigError` for a bad configuration or run directory and
    :class:`TrainingDiverged` when the loss becomes NaN or Inf.
    """
    try:
        trainer = Trainer(config)
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


def format_metrics(metrics: dict[str, float]) -> str:
    """``name value`` lines, in the order of :func:`mbdl.evaluate.evaluate`."""
    width = max((len(k) for k in metrics), default=0)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in metrics.items())


__all__ = ["Trainer", "TrainingDiverged", "format_metrics", "train"]
