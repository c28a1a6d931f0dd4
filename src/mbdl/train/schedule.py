"""Learning-rate schedule: linear warm-up, then cosine decay to zero, applied per step."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate before optimiser step ``step`` (0-based).

    ``(step + 1) / warmup_steps`` during the warm-up, then
    ``0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps)))``
    (Loshchilov & Hutter, SGDR, ICLR 2017, without restarts; Goyal et al. 2017 for the warm-up).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in 0..{total_steps}, got {warmup_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """The factor as a callable for :class:`~torch.optim.lr_scheduler.LambdaLR` (its state, two ints,
    goes into the scheduler's ``state_dict``)."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        warmup_cosine_factor(0, warmup_steps, total_steps)  # validates the arguments
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """A per-step :class:`LambdaLR` over every parameter group of ``optimizer``."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps))
