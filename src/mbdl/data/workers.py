"""``data.num_workers=auto``: DataLoader worker processes sized to the machine and the data path.

Chosen by measurement (2 CPUs shared with other jobs, load average 11-15, so indicative only;
docs/benchmarks.md): ``benchmarks/train.py`` interleaves the step with the trainer's path with
and without one worker: step / network 0.94 against 0.88 (smallvgg, glyphs), 0.97 against 0.93
(smallcnn, glyphs), 0.92 both (smallcnn, 64-px folder); whole trainer epochs (smallcnn, glyphs)
ran at 2122, 3318 and 3490 images/s with 0, 1 and 2 workers. Hence:

- training from memory by whole batches (:mod:`mbdl.data.batched`, CPU): one persistent worker
  process draws, gathers and does the geometric augmentation of the next batch while the main
  process trains on this one (a second added nothing beyond the noise);
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
        return min(1, spare)
    if not training and isinstance(dataset, (ArrayImageDataset, DecodedEvaluationSplit)):
        return 0
    return max(0, min(spare, MAX_WORKERS))
