"""``data.num_workers=auto``: DataLoader worker processes sized to the machine and the data path.

Chosen by measurement (``benchmarks/train.py``: the step with the trainer's path interleaved with
and without one worker, medians, docs/benchmarks.md). On a quiet 2-CPU machine (load 1.3), where
the training step's 2 torch threads use both CPUs, the worker takes CPU from the network: step /
network 0.91 against 0.94 (smallvgg, glyphs), 0.77 against 0.88 (smallcnn, glyphs), 0.84 against
0.89 (smallcnn, 64-px folder). Under load from other jobs (load average 11-15) it helped (0.94
against 0.88, smallvgg; whole smallcnn epochs at 3318 against 2122 images/s), because the
machine's other jobs left the step's threads idle in turns. Hence:

- training from memory by whole batches (:mod:`mbdl.data.batched`, CPU): one persistent worker
  process, which draws, gathers and does the geometric augmentation of the next batch while the
  main process trains on this one, only where a CPU is left over by the step's torch threads
  (``cpu_count() > torch.get_num_threads()``); else none;
- training image by image (PIL transforms, files decoded every epoch; ``data.cache=off`` or a
  custom transform): the work is per image and parallel, so one worker per CPU but one (the
  training step's), at most :data:`MAX_WORKERS` (by reasoning; not measured here);
- evaluation from memory (:class:`~mbdl.data.splits.ArrayImageDataset`, a decoded evaluation
  split of :mod:`mbdl.data.cache`): none (by reasoning, not measured: an item is a copy and a
  ``ToTensor``, while worker processes would start again at every evaluation); from files: as
  training image by image.
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
        import torch

        return 1 if cpu_count() > torch.get_num_threads() else 0
    if not training and isinstance(dataset, (ArrayImageDataset, DecodedEvaluationSplit)):
        return 0
    return max(0, min(spare, MAX_WORKERS))
