"""P x K batches over a stream: per-class buffers filled from the stream, a batch of P classes x
K items emitted as soon as P classes hold K items each, with a bound on what is held.

What it does to the distribution (against :class:`mbdl.data.sampler.ClassBalancedBatchSampler`,
which sees every index up front):

- Each batch has exactly P distinct classes and K items of each, only from the classes the stream
  carries. Among the classes ready when a batch is due, P are drawn uniformly at random; within a
  class, items leave in arrival order (the oldest K first).
- A class appears in batches about in proportion to how often it occurs in the stream (as with
  the map-style sampler's groups of K), but only when K of its items arrive within one memory
  window: when ``capacity`` items are held, the oldest held item is dropped (counted in
  :attr:`StreamingPKBatcher.dropped`). A class whose items are spread thinner than that (rare
  classes in a well-shuffled stream of many classes) is under-represented or never batched;
  nothing is drawn twice (no replacement for small classes). With ``C`` classes evenly mixed in
  the stream, a capacity of a few times ``C * K`` keeps drops rare.
- What is held at the end of the stream (fewer than P ready classes) is not emitted.

Memory: at most ``capacity`` items are held at any time (``add`` returns before exceeding it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from itertools import count
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mbdl.errors import UserError

Item = TypeVar("Item")


class StreamingPKBatcher(Generic[Item]):
    """Collects ``(item, label)`` pairs and returns batches of ``P * K`` items: P classes, K items
    each, grouped by class (see the module docstring for the distribution and the memory bound).

    Args:
        classes_per_batch: P (at least 2).
        samples_per_class: K (at least 2).
        capacity: the most items held at once (at least ``P * K``).
        rng: the generator choosing which ready classes make a batch.
    """

    def __init__(
        self,
        classes_per_batch: int,
        samples_per_class: int,
        capacity: int,
        rng: np.random.Generator,
    ) -> None:
        if classes_per_batch < 2:
            raise ValueError(f"classes_per_batch (P) must be at least 2, got {classes_per_batch}")
        if samples_per_class < 2:
            raise ValueError(f"samples_per_class (K) must be at least 2, got {samples_per_class}")
        if capacity < classes_per_batch * samples_per_class:
            raise ValueError(
                f"capacity must be at least P * K = {classes_per_batch * samples_per_class}, "
                f"got {capacity}"
            )
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.capacity = capacity
        self.rng = rng
        self._by_class: dict[Hashable, deque[tuple[int, Item]]] = {}
        self._arrivals: deque[tuple[int, Hashable]] = deque()  # (sequence, label), oldest first
        self._sequence = 0
        self._held = 0
        self._ready: list[Hashable] = []  # classes holding at least K items (insertion order)
        self.dropped = 0
        self.peak = 0

    @property
    def held(self) -> int:
        """Items held now."""
        return self._held

    def add(self, item: Item, label: Hashable) -> list[list[tuple[Item, Hashable]]]:
        """Hold ``item``; return the batches (lists of ``(item, label)``, class after class) it
        completes: none or one."""
        if self._held >= self.capacity:
            self._drop_oldest()
        queue = self._by_class.setdefault(label, deque())
        queue.append((self._sequence, item))
        self._arrivals.append((self._sequence, label))
        self._sequence += 1
        self._held += 1
        self.peak = max(self.peak, self._held)
        if len(queue) == self.samples_per_class:
            self._ready.append(label)
        if len(self._ready) < self.classes_per_batch:
            return []
        return [self._emit()]

    def _emit(self) -> list[tuple[Item, Hashable]]:
        chosen = self.rng.choice(len(self._ready), size=self.classes_per_batch, replace=False)
        labels = [self._ready[int(i)] for i in sorted(chosen)]
        batch: list[tuple[Item, Hashable]] = []
        for label in labels:
            queue = self._by_class[label]
            batch.extend((queue.popleft()[1], label) for _ in range(self.samples_per_class))
            self._held -= self.samples_per_class
            if not queue:
                del self._by_class[label]
        taken = set(labels)
        self._ready = [
            c
            for c in self._ready
            if c not in taken or len(self._by_class.get(c, ())) >= self.samples_per_class
        ]
        return batch

    def _drop_oldest(self) -> None:
        """Drop the oldest held item: the front of its class's queue (queues are in arrival
        order, and emitted items leave from the front)."""
        while self._arrivals:
            sequence, label = self._arrivals.popleft()
            queue = self._by_class.get(label)
            if queue and queue[0][0] == sequence:
                queue.popleft()
                self._held -= 1
                self.dropped += 1
                if len(queue) == self.samples_per_class - 1:
                    self._ready.remove(label)
                if not queue:
                    del self._by_class[label]
                return
            # an arrival already emitted: its record is stale


def pk_batches(
    stream: Iterable[tuple[Item, Hashable]],
    classes_per_batch: int,
    samples_per_class: int,
    capacity: int,
    rng: np.random.Generator,
) -> Iterator[list[tuple[Item, Hashable]]]:
    """The P x K batches of ``stream`` (pairs ``(item, label)``), by :class:`StreamingPKBatcher`."""
    batcher: StreamingPKBatcher[Item] = StreamingPKBatcher(
        classes_per_batch, samples_per_class, capacity, rng
    )
    for item, label in stream:
        yield from batcher.add(item, label)


class StreamError(UserError):
    """A training stream that cannot give P x K batches."""


@runtime_checkable
class TrainingStream(Protocol):
    """What :class:`StreamBatches` reads (e.g. :class:`mbdl.data.webdataset.ShardStream`)."""

    def __len__(self) -> int: ...

    def raw_samples(self, pass_number: int, part: int, parts: int) -> Iterator[Any]:
        """One pass of part ``part`` of ``parts``: ``(undecoded item, label, where)`` triples;
        the parts of one pass together hold every item once."""
        ...

    def load(self, data: Any, where: str) -> Any:
        """The transformed image of one undecoded item."""
        ...


#: the memory window of a stream's P x K batcher: ``STREAM_WINDOW * P * K`` items
STREAM_WINDOW = 64


class StreamBatches(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """The training batches of a stream, for ``DataLoader(batches, batch_size=None)``: each loader
    worker of each rank runs a :class:`StreamingPKBatcher` over its share of the stream
    (``raw_samples``), pass after pass without end (pass ``epoch * 1_000_000 + repeat``), and
    decodes and transforms only the items of the batches it emits. The trainer takes ``len()``
    batches an epoch: about one pass, ``len(stream) // (num_replicas * P * K)``.

    Item ``i`` of a worker's batch ``n`` is transformed with torch's generator seeded by
    ``SeedSequence([seed, epoch, part, n])``, so a run does not depend on process timing;
    ``set_epoch(epoch, start_batch)`` skips this rank's first ``start_batch`` batches without
    decoding them. The DataLoader takes batch ``n * workers + w`` from worker ``w`` and starts at
    worker 0, so with the same number of loader workers this is exact when ``start_batch`` is a
    multiple of it (always with 0 or 1 worker); otherwise the epoch resumes at the multiple
    below (fewer than ``workers`` batches seen again).
    """

    def __init__(
        self,
        stream: TrainingStream,
        classes_per_batch: int,
        samples_per_class: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        capacity: int | None = None,
    ) -> None:
        self.stream = stream
        self.classes_per_batch = int(classes_per_batch)
        self.samples_per_class = int(samples_per_class)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.capacity = int(capacity or STREAM_WINDOW * self.batch_size)
        StreamingPKBatcher(  # the arguments checked here, in the main process
            classes_per_batch, samples_per_class, self.capacity, np.random.default_rng(0)
        )
        self.batches_per_epoch = max(1, len(stream) // (self.num_replicas * self.batch_size))
        self.epoch = 0
        self.start_batch = 0

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.samples_per_class

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; skip this rank's first ``start_batch`` batches of it."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in 0..{len(self)}, got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def raw_batches(self, worker: int, workers: int) -> Iterator[list[tuple[Any, Any]]]:
        """Worker ``worker`` of ``workers`` (on this rank): its undecoded batches, without end;
        each is a list of ``((item, where), label)``."""
        part = self.rank * workers + worker
        parts = self.num_replicas * workers
        batcher: StreamingPKBatcher[Any] = StreamingPKBatcher(
            self.classes_per_batch,
            self.samples_per_class,
            self.capacity,
            np.random.default_rng([self.seed, self.epoch, part]),
        )
        for repeat in count():
            emitted = False
            pass_number = self.epoch * 1_000_000 + repeat
            for data, label, where in self.stream.raw_samples(pass_number, part, parts):
                for batch in batcher.add((data, where), label):
                    emitted = True
                    yield batch
            if not emitted:
                raise StreamError(
                    f"training stream part {part + 1} of {parts} gave no batch of "
                    f"{self.classes_per_batch} classes x {self.samples_per_class} images in a "
                    "whole pass; lower train.batch_classes or train.batch_per_class, or use "
                    "fewer loader workers or more shards"
                )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the DataLoader takes batch n * workers + w from worker w, starting again at worker 0
        skip = self.start_batch // workers
        part = self.rank * workers + worker
        for number, batch in enumerate(self.raw_batches(worker, workers)):
            if number < skip:
                continue
            seeds = np.random.SeedSequence([self.seed, self.epoch, part, number]).generate_state(
                len(batch), dtype=np.uint64
            ) & np.uint64(2**63 - 1)
            images = [
                self._seeded(int(s), data, where)
                for s, ((data, where), _) in zip(seeds.tolist(), batch, strict=True)
            ]
            labels = torch.as_tensor([int(label) for _, label in batch], dtype=torch.int64)
            yield torch.stack(images), labels

    def _seeded(self, seed: int, data: Any, where: str) -> torch.Tensor:
        generator = torch.default_generator
        if get_worker_info() is not None:
            generator.manual_seed(seed)
            return self.stream.load(data, where)
        saved = generator.get_state()  # in the main process: leave the training RNG untouched
        try:
            generator.manual_seed(seed)
            return self.stream.load(data, where)
        finally:
            generator.set_state(saved)


__all__ = ["StreamBatches", "StreamError", "StreamingPKBatcher", "TrainingStream", "pk_batches"]
