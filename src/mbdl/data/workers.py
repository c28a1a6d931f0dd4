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
- with a CUDA device the step does not use the CPUs: batches from memory get
  :data:`GPU_BATCH_WORKERS` workers (gathering a batch of 256-px squares and pinning it overlap
  the step), images decoded one by one every CPU but one, at most :data:`MAX_GPU_WORKERS` (by
  reasoning; ``benchmarks/gpu_check.sh`` measures both);
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

#: with a CUDA device: the most worker processes for images decoded one by one
MAX_GPU_WORKERS = 32

#: with a CUDA device: worker processes for whole batches from memory
GPU_BATCH_WORKERS = 2


def cpu_count() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loader_workers(requested: int | str, dataset: Any, *, training: bool) -> int:
    """``requested`` itself, or for ``"auto"`` the worker processes for loading ``dataset``
    (the module docstring): ``training`` is the training loader, else an embedding pass."""
    return loader_workers_reason(requested, dataset, training=training)[0]


def loader_workers_reason(
    requested: int | str, dataset: Any, *, training: bool, gpu: bool | None = None
) -> tuple[int, str]:
    """:func:`loader_workers` and why (a few words for the data line); ``gpu``: whether a CUDA
    device trains (default: whether one is available)."""
    if requested != "auto":
        return int(requested), "data.num_workers"
    import torch

    from mbdl.data.batched import InMemoryBatches
    from mbdl.data.cache import DecodedEvaluationSplit
    from mbdl.data.splits import ArrayImageDataset

    cpus = cpu_count()
    gpu = torch.cuda.is_available() if gpu is None else gpu
    spare = cpus - 1
    if isinstance(dataset, InMemoryBatches):
        if gpu:
            count = min(GPU_BATCH_WORKERS, max(0, spare))
            return count, f"auto: whole batches from memory, {cpus} CPUs, augmented on the GPU"
        threads = torch.get_num_threads()
        if cpus > threads:
            return 1, f"auto: whole batches from memory, a CPU left by {threads} training threads"
        return 0, f"auto: whole batches from memory, no CPU left by {threads} training threads"
    if not training and isinstance(dataset, (ArrayImageDataset, DecodedEvaluationSplit)):
        return 0, "auto: evaluation from memory"
    cap = MAX_GPU_WORKERS if gpu else MAX_WORKERS
    count = max(0, min(spare, cap))
    return count, f"auto: images decoded one by one, {cpus} CPUs but one (at most {cap})"
