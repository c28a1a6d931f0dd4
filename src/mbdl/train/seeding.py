"""Seeding: the global generators, and the batch order and augmentation of each training image
as a pure function of ``(seed, epoch, batch number, position)``, so that a resumed run (or one
with another number of DataLoader workers) draws exactly what an uninterrupted one does."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


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
            ) & np.uint64(2**63 - 1)
            yield list(zip(map(int, batch), seeds.tolist(), strict=True))


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


__all__ = ["SeededBatches", "SeededDataset", "seed_everything"]
