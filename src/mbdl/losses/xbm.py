"""Cross-batch memory (Wang, Zhang, Huang, Scott, "Cross-Batch Memory for Embedding Learning", CVPR 2020).

A queue keeps the embeddings and labels of the last ``memory_size`` training items. After
``warmup_steps`` updates (while the embedding still drifts fast, old entries would mislead),
each batch's anchors take their positives and negatives from the batch itself *and* the queue:

    L = loss(x, y, ref_emb = [x ; memory], ref_labels = [y ; memory_labels], anchor_offset = 0)

The batch part of the reference set keeps its gradient; the queue is detached. The batch is then
enqueued, replacing the oldest entries. The queue lives in buffers, so it is saved and restored
with the module's ``state_dict`` (a resumed run continues with the same memory).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CrossBatchMemory(nn.Module):
    """Wrap a pair-based ``loss`` (a :class:`MetricLoss` or a plugin module with ``accepts_ref``)
    with a memory of the last ``memory_size`` embeddings."""

    memory: Tensor
    memory_labels: Tensor
    filled: Tensor
    position: Tensor
    steps: Tensor

    def __init__(
        self, loss: nn.Module, memory_size: int, embedding_dim: int, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        if not getattr(loss, "accepts_ref", True):
            raise ValueError(
                f"{type(loss).__name__} takes no reference set, so it cannot use cross-batch memory"
            )
        if memory_size < 1:
            raise ValueError(f"memory_size must be at least 1; got {memory_size}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
        self.loss = loss
        self.memory_size = memory_size
        self.warmup_steps = warmup_steps
        self.register_buffer("memory", torch.zeros(memory_size, embedding_dim))
        self.register_buffer("memory_labels", torch.zeros(memory_size, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def reference_set(self) -> tuple[Tensor, Tensor]:
        """The entries in the queue so far (in ring-buffer order)."""
        filled = int(self.filled)
        return self.memory[:filled], self.memory_labels[:filled]

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        memory, memory_labels = self.reference_set()
        if self.training and int(self.steps) >= self.warmup_steps and memory.shape[0] > 0:
            ref_emb = torch.cat([embeddings, memory.to(embeddings.dtype)])
            ref_labels = torch.cat([labels, memory_labels.to(labels.dtype)])
            loss = self.loss(embeddings, labels, ref_emb, ref_labels, anchor_offset=0)
        else:
            loss = self.loss(embeddings, labels)
        if self.training:
            self.enqueue(embeddings.detach(), labels)
            self.steps += 1
        return loss

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Write a batch into the ring buffer, overwriting the oldest entries."""
        embeddings, labels = embeddings[-self.memory_size :], labels[-self.memory_size :]
        count = embeddings.shape[0]
        slots = (
            int(self.position) + torch.arange(count, device=self.memory.device)
        ) % self.memory_size
        self.memory[slots] = embeddings.to(self.memory.dtype)
        self.memory_labels[slots] = labels.to(self.memory_labels.dtype)
        self.position.fill_((int(self.position) + count) % self.memory_size)
        self.filled.fill_(min(int(self.filled) + count, self.memory_size))
