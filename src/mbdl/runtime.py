"""torch's process-wide settings, changed only where a caller allows it, and always restored.

Kernels in :mod:`mbdl.functional` never change torch's global state on their own: inside
:func:`torch_tuning` (entered by the caller, e.g. :func:`mbdl.evaluate.evaluate` around k-means)
they may run an operation on a chosen number of threads (:func:`torch_threads`) or let a float32
matrix product round its inputs to bf16 on a CPU with bf16 matrix units
(:func:`reduced_precision_products`), each setting restored as the operation ends. Outside it
both are no-ops, so a kernel called directly runs with whatever the process has set.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_TUNING: contextvars.ContextVar[bool] = contextvars.ContextVar("mbdl_torch_tuning", default=False)


@contextmanager
def torch_tuning() -> Iterator[None]:
    """Allow the kernels run inside to tune torch's thread count and matrix-product precision
    per operation (each change restored when the operation ends)."""
    token = _TUNING.set(True)
    try:
        yield
    finally:
        _TUNING.reset(token)


def tuning_allowed() -> bool:
    """Whether the caller entered :func:`torch_tuning`."""
    return _TUNING.get()


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX tiles), where
    autocast to bf16 makes convolutions and matrix products faster than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch's CPU operations on ``count`` threads, then restore the previous count (only
    inside :func:`torch_tuning`; a no-op elsewhere).

    Loops of many small operations run on one: each multi-threaded operation waits for all its
    threads to be scheduled, which on a loaded machine costs a time slice per operation."""
    if not tuning_allowed():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def reduced_precision_switch(device: torch.device) -> tuple[Any, str] | None:
    """The switch that lets float32 matrix products on ``device`` round their inputs to bf16
    (still accumulating and returning float32) and that setting: oneDNN's ``"bf16"`` on a CPU
    with bf16 matrix units, inside :func:`torch_tuning`; ``None`` elsewhere: outside it, other
    CPUs (emulated bf16 is slower), a torch without the per-backend ``fp32_precision`` switch,
    and GPUs (CUDA's tf32 not taken: not measured here, and float32 keeps a GPU's seeds those
    of the CPU)."""
    if device.type != "cpu" or not tuning_allowed():
        return None
    switch = getattr(torch.backends.mkldnn, "matmul", None)
    if not cpu_has_bf16_matrix_units() or switch is None or not hasattr(switch, "fp32_precision"):
        return None
    return switch, "bf16"


@contextmanager
def reduced_precision_products(device: torch.device) -> Iterator[None]:
    """Float32 matrix products on ``device`` may round their inputs to bf16 inside
    (:func:`reduced_precision_switch`; nothing changes where it is ``None``); the previous
    setting is restored on exit."""
    found = reduced_precision_switch(device)
    if found is None:
        yield
        return
    switch, precision = found
    previous = switch.fp32_precision
    switch.fp32_precision = precision
    try:
        yield
    finally:
        switch.fp32_precision = previous


__all__ = [
    "cpu_has_bf16_matrix_units",
    "reduced_precision_products",
    "reduced_precision_switch",
    "torch_threads",
    "torch_tuning",
    "tuning_allowed",
]
