"""``data.num_workers=auto``: DataLoader worker processes sized to the machine and the data path.

Measured with ``benchmarks/train.py`` (the step with and without a worker, interleaved in one
run) and trainer epochs (see docs/benchmarks.md):

- training from memory by whole batches (:mod:`mbdl.data.batched`, CPU): one worker process
  draws, gathers and augments the next batch while the main process trains on this one; a
  second adds nothing measurable;
- training image by image (PIL transforms, files decoded every epoch): the work is per image and
  parallel, so one worker per CPU but one (the training step's), at most :data:`MAX_WORKERS`;
- evaluation from memory (:class:`~mbdl.data.splits.ArrayImageDataset`, a decoded evaluation
  split of :mod:`mbdl.data.cache`): none; an item costs microseconds and starting the processes
  again for every evaluation costs more than it saves; from files: as training image by image.
"""

from __future__ import annotations

import os
from typing import Any

#: the most worker processes ``auto`` starts
MAX_WORKERS = 8


def cpu_count() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loader_workers(requested: int | str, dataset: Any, *, training: bool) -> int:
    """``requested`` itself, or for ``"auto"`` the worker processes for loading ``dataset``
    (the module docstring): ``training`` is the training loader, else an embedding pass."""
    if requested != "auto":
        return int(requested)
    from mbdl.data.batched import InMemoryBatches
    from mbdl.data.cache import DecodedEvaluationSplit
    from mbdl.data.splits import ArrayImageDataset

    spare = cpu_count() - 1
    if isinstance(dataset, InMemoryBatches):
        return min(1, spare)
    if not training and isinstance(dataset, (ArrayImageDataset, DecodedEvaluationSplit)):
        return 0
    return max(0, min(spare, MAX_WORKERS))
