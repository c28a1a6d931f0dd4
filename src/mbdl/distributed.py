"""Multi-process helpers for ``torchrun``: rank information and a loss over every rank's batch.

Each rank all-gathers the embeddings (with gradient) and labels of every rank and computes the
loss on the concatenated batch. The value is then the loss of one process training on the
concatenated batch, and so are the gradients once DistributedDataParallel has averaged them:
the backward of the gather sums the identical per-rank gradients (a factor ``W``), and DDP's
average divides by ``W``. This holds for every loss, including those that average over pairs,
triplets or valid anchors of the whole batch, with no change to any loss. The loss itself costs
``W^2`` times the per-rank pairwise work, which is small next to the backbone for the batch
sizes of metric learning.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands: ``rank`` of ``world_size``, and its device-local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def distributed_info() -> DistributedInfo:
    """The rank of this process: from the initialised process group, else torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return DistributedInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        )
    return DistributedInfo(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(device_type: str, timeout: timedelta | None = None) -> DistributedInfo:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE > 1``).

    Uses NCCL for CUDA and gloo otherwise; a no-op for a single process. ``timeout`` bounds how
    long a collective waits (the other ranks wait while rank 0 validates and writes).
    """
    info = distributed_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if timeout is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, timeout=timeout)
        info = distributed_info()
    return info


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every rank (picklable values between this job's own
    processes; the identity without a process group)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` that are outside DistributedDataParallel,
    e.g. a loss's proxies, so every rank applies the same update."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(world)


def replicas_differ(tensors: dict[str, Tensor]) -> list[str]:
    """Names of the ``tensors`` whose values differ between ranks (compared through a float64
    sum and sum of squares of each tensor, all-gathered); empty without a process group."""
    if not is_distributed() or not tensors:
        return []
    names = sorted(tensors)
    summary = torch.stack(
        [
            torch.stack(
                [tensors[n].detach().double().sum(), tensors[n].detach().double().square().sum()]
            )
            for n in names
        ]
    )
    gathered = [torch.zeros_like(summary) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, summary)
    return [
        name
        for i, name in enumerate(names)
        if any(not torch.equal(other[i], gathered[0][i]) for other in gathered[1:])
    ]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (equal row counts); the backward sums every rank's gradient of the
    gathered tensor with one all-reduce and returns this rank's rows. (torch's own
    ``torch.distributed.nn.functional.all_gather`` is deprecated and its all-to-all backward
    aborted processes intermittently under gloo here.)"""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate every rank's ``embeddings`` (gradient flows back to each rank) and ``labels``.

    Batches may differ in size between ranks: they are padded to the largest, gathered, trimmed.
    Returns the inputs unchanged when no process group is initialised.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embeddings, labels
    world = dist.get_world_size()
    size = torch.tensor([embeddings.shape[0]], device=embeddings.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    pad = longest - embeddings.shape[0]
    padded_emb = nn.functional.pad(embeddings, (0, 0, 0, pad))
    padded_labels = nn.functional.pad(labels, (0, pad))
    all_emb = _GatherWithGrad.apply(padded_emb).chunk(world)
    all_labels = [torch.zeros_like(padded_labels) for _ in range(world)]
    dist.all_gather(all_labels, padded_labels)
    return (
        torch.cat([e[:n] for e, n in zip(all_emb, counts, strict=True)]),
        torch.cat([lab[:n] for lab, n in zip(all_labels, counts, strict=True)]),
    )


class GatheredLoss(nn.Module):
    """Wrap a loss so that, under ``torch.distributed``, it sees the batches of every rank.

    ``GatheredLoss(loss)(embeddings, labels)`` equals ``loss(all_embeddings, all_labels)`` and,
    after DDP's gradient averaging, gives the gradients of one process training on the
    concatenated batch (see the module docstring). Without a process group it is ``loss`` itself.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        all_emb, all_labels = gather_with_grad(embeddings, labels)
        return self.loss(all_emb, all_labels)
