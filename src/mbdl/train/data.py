"""The training data of a run: the splits (loaded rank 0 first, decoded once, checked against the
config), the class-balanced sampler of this rank, and the loader of seeded batches."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

from mbdl.config import Config, ConfigError
from mbdl.data.batched import batch_loader, batched_training_data
from mbdl.data.cache import decode_splits
from mbdl.data.workers import loader_workers
from mbdl.distributed import DistributedInfo, barrier
from mbdl.errors import terminal_safe
from mbdl.runconfig import load_data
from mbdl.train.preflight import describe_data, validate_before_training
from mbdl.train.seeding import SeededBatches, SeededDataset, seed_everything


def training_splits(config: Config, dist: DistributedInfo, given: Any = None) -> Any:
    """``given`` (a :class:`mbdl.data.Splits`) or the config's splits (rank 0 first: it may build
    caches or download), decoded once (:mod:`mbdl.data.cache`), checked up front."""
    seed_everything(config.seed)
    if not dist.is_main:
        barrier()  # rank 0 builds caches or downloads first
    splits = load_data(config) if given is None else given
    decode_splits(splits, config.data.cache, config.data.num_workers)  # decoded once
    if dist.is_main:
        barrier()
    validate_before_training(config, splits)  # every check the data allows, up front
    if config.train.progress and dist.is_main:
        print(terminal_safe(describe_data(splits)), file=sys.stderr, flush=True)
    return splits


def training_sampler(config: Config, train: Any, dist: DistributedInfo) -> tuple[Any, int]:
    """The class-balanced batches of this rank and the optimiser steps of an epoch (each
    ``train.accumulate`` batches, at most ``train.max_steps_per_epoch``). ``train`` is the
    training split (or its labels): a map-style split gets a
    :class:`~mbdl.data.sampler.ClassBalancedBatchSampler`, a stream
    (:class:`~mbdl.data.stream_batches.TrainingStream`, e.g. WebDataset shards)
    :class:`~mbdl.data.stream_batches.StreamBatches` (P x K batches over the stream)."""
    from mbdl.data import ClassBalancedBatchSampler
    from mbdl.data.stream_batches import StreamBatches, TrainingStream

    sampler: Any
    if isinstance(train, TrainingStream):
        sampler = StreamBatches(
            train,
            config.train.batch_classes,
            config.train.batch_per_class,
            seed=config.seed,
            num_replicas=dist.world_size,
            rank=dist.rank,
        )
    else:
        sampler = ClassBalancedBatchSampler(
            getattr(train, "labels", train),
            config.train.batch_classes,
            config.train.batch_per_class,
            seed=config.seed,
            num_replicas=dist.world_size,
            rank=dist.rank,
        )
    steps = len(sampler) // config.train.accumulate
    if steps == 0:
        raise ConfigError(
            f"train.accumulate={config.train.accumulate} needs that many batches per epoch; the "
            f"training split gives {len(sampler)}: lower train.accumulate or the batch size"
        )
    if config.train.max_steps_per_epoch is not None:
        steps = min(steps, config.train.max_steps_per_epoch)
    return sampler, steps


def training_loader(
    config: Config, dataset: Any, sampler: Any, device: torch.device, generator: torch.Generator
) -> tuple[Iterable[Any], Any]:
    """The training batches, seeded per item (:mod:`mbdl.train.seeding`), and the in-memory
    batches (:mod:`mbdl.data.batched`, augmented on ``device``) behind them, if any. A stream's
    batches (:class:`~mbdl.data.stream_batches.StreamBatches`) come whole from the workers."""
    from mbdl.data.stream_batches import StreamBatches

    if isinstance(sampler, StreamBatches):  # workers restart each epoch: they read its number
        workers = loader_workers(config.data.num_workers, dataset, training=True)
        stream_loader = DataLoader(
            sampler,
            batch_size=None,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            generator=generator,
        )
        return stream_loader, None
    batched = batched_training_data(dataset)
    if batched is not None:  # on a CPU, loader workers overlap the augmentation
        batched.augment_in_loader = device.type == "cpu"
    loaded = batched if batched is not None else SeededDataset(dataset)
    workers = loader_workers(config.data.num_workers, loaded, training=True)
    if batched is not None:  # in memory: whole batches
        loader = batch_loader(
            batched,
            SeededBatches(sampler, config.seed),
            workers=workers,
            pin_memory=device.type == "cuda",
            generator=generator,
        )
        return loader, batched
    return DataLoader(
        loaded,
        batch_sampler=SeededBatches(sampler, config.seed),
        num_workers=workers,
        persistent_workers=workers > 0,  # not started again every epoch
        pin_memory=device.type == "cuda",
        generator=generator,
    ), None


__all__ = ["training_loader", "training_sampler", "training_splits"]
