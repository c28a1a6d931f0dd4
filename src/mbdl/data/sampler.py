"""A class-balanced batch sampler: batches of P classes x K images, in real epochs.

How one epoch is built (deterministic under ``(seed, epoch)``):

1. Per class, a seeded permutation of its images is cut into groups of K. The last, partial group
   is completed with other images of the same class drawn without replacement, so every image is
   in at least one group and at most K - 1 images per class appear twice. A class with fewer than
   K images gives one group: all its images plus K - n draws with replacement
   (``replacement_for_small_classes=True``, the default); with ``False`` such classes are left out.
2. The number of batches is the largest ``b`` with ``sum_c min(groups_c, b) >= b * P``, which
   depends only on the class sizes, so ``len()`` is the same every epoch. A class with more than
   ``b`` groups keeps ``b`` of them (a different random subset each epoch) and fewer than P other
   groups are dropped at random to make exactly ``b * P``: with no dominant class, at most P - 1
   groups (``< P * K`` images) are left out of an epoch.
3. The classes are shuffled, their groups laid out class after class, and group ``t`` goes to
   batch ``t mod b``: each batch gets P groups of P distinct classes. The batch order is shuffled.

With ``num_replicas > 1``, rank ``r`` takes batches ``r, r + R, r + 2R, ...`` of the epoch,
``b // R`` of them, so ranks get disjoint batches and the same number of batches; up to ``R - 1``
batches are left out. ``set_epoch(epoch, start_batch)`` selects the epoch and skips this rank's
first ``start_batch`` batches (for a resumed run), until the next ``set_epoch``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch import Tensor
from torch.utils.data import Sampler


def max_full_batches(groups_per_class: np.ndarray, classes_per_batch: int) -> int:
    """Largest ``b`` such that ``b`` batches of ``classes_per_batch`` groups of distinct classes
    can be filled: ``sum_c min(groups_c, b) >= b * classes_per_batch``."""
    counts = np.asarray(groups_per_class, dtype=np.int64)
    low, high = 0, int(counts.sum()) // classes_per_batch
    while low < high:  # the predicate is monotone in b: binary search
        mid = (low + high + 1) // 2
        if int(np.minimum(counts, mid).sum()) >= mid * classes_per_batch:
            low = mid
        else:
            high = mid - 1
    return low


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yields lists of ``classes_per_batch * samples_per_class`` dataset indices (P classes x K
    images, grouped by class) for ``DataLoader(batch_sampler=...)``; see the module docstring."""

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | Tensor,
        classes_per_batch: int,
        samples_per_class: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        replacement_for_small_classes: bool = True,
    ) -> None:
        label_array = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
        if label_array.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {label_array.shape}")
        if label_array.size and not np.issubdtype(label_array.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {label_array.dtype}")
        if classes_per_batch < 2:
            raise ValueError(f"classes_per_batch (P) must be at least 2, got {classes_per_batch}")
        if samples_per_class < 2:
            raise ValueError(f"samples_per_class (K) must be at least 2, got {samples_per_class}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.classes_per_batch = int(classes_per_batch)
        self.samples_per_class = int(samples_per_class)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.replacement_for_small_classes = replacement_for_small_classes

        order = np.argsort(label_array, kind="stable")
        classes, starts, sizes = np.unique(
            label_array[order], return_index=True, return_counts=True
        )
        members = [order[s : s + n] for s, n in zip(starts, sizes, strict=True)]
        if not replacement_for_small_classes:
            kept = sizes >= samples_per_class
            classes, sizes = classes[kept], sizes[kept]
            members = [m for m, k in zip(members, kept, strict=True) if k]
        self.classes: np.ndarray = classes
        self._members: list[np.ndarray] = members
        self._groups_per_class = np.maximum(1, -(-sizes // samples_per_class))
        if len(classes) < classes_per_batch:
            which = "" if replacement_for_small_classes else f" with >= {samples_per_class} images"
            raise ValueError(
                f"need at least classes_per_batch={classes_per_batch} classes{which}, "
                f"got {len(classes)}"
            )
        self.total_batches = max_full_batches(self._groups_per_class, classes_per_batch)
        if self.total_batches < num_replicas:
            raise ValueError(
                f"an epoch has {self.total_batches} batches, fewer than num_replicas={num_replicas}"
            )
        self.epoch = 0
        self.start_batch = 0

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.samples_per_class

    def __len__(self) -> int:
        """Batches per epoch for this rank (``start_batch`` not subtracted)."""
        return self.total_batches // self.num_replicas

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate; skip this rank's first ``start_batch`` batches of it."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in 0..{len(self)}, got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def _class_groups(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Per class, an array ``[groups_c, K]`` of dataset indices (step 1)."""
        k = self.samples_per_class
        out = []
        for members in self._members:
            n = len(members)
            perm = members[rng.permutation(n)]
            if n < k:
                group = np.concatenate([perm, perm[rng.integers(0, n, size=k - n)]])
                out.append(group.reshape(1, k))
                continue
            remainder = n % k
            if remainder:
                # complete the last group with other images of the class, without replacement
                fill = perm[: n - remainder][rng.permutation(n - remainder)[: k - remainder]]
                perm = np.concatenate([perm, fill])
            out.append(perm.reshape(-1, k))
        return out

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """All batches of ``epoch`` (every rank's), as an ``int64`` array ``[b, P * K]``."""
        rng = np.random.default_rng([self.seed, epoch])
        groups = self._class_groups(rng)
        p, b = self.classes_per_batch, self.total_batches
        counts = np.minimum(self._groups_per_class, b)
        excess = int(counts.sum()) - b * p  # < p by the choice of b
        if excess:
            counts[rng.choice(np.flatnonzero(counts), size=excess, replace=False)] -= 1
        class_order = rng.permutation(len(groups))
        laid_out = np.concatenate(
            [groups[c][rng.permutation(len(groups[c]))[: counts[c]]] for c in class_order]
        )  # [b * p, K]: the groups of each class are consecutive, at most b of them
        slots = laid_out.reshape(p, b, self.samples_per_class)  # group t -> batch t mod b
        batches = slots.transpose(1, 0, 2).reshape(b, p * self.samples_per_class)
        return batches[rng.permutation(b)].astype(np.int64)

    def rank_batches(self, epoch: int) -> np.ndarray:
        """This rank's batches of ``epoch`` (``len(self)`` rows)."""
        batches = self.epoch_batches(epoch)
        return batches[self.rank :: self.num_replicas][: len(self)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.rank_batches(self.epoch)[self.start_batch :]:
            yield batch.tolist()
