"""Mixed precision: which autocast dtype ``train.amp`` means on a device."""

from __future__ import annotations

import torch

from mbdl.config import ConfigError
from mbdl.runtime import cpu_has_bf16_matrix_units


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: full precision).

    ``auto``: bf16 on a CUDA device that supports it (fp16, with a GradScaler, on older GPUs);
    on CPU bf16 where :func:`cpu_has_bf16_matrix_units`, else full precision (bf16 emulated in
    AVX2/AVX512 is slower than fp32). Measured on glyphs: docs/benchmarks.md, "CPU bf16".
    """
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16_matrix_units():
            return torch.bfloat16
        return None
    if amp == "off":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 on CPU")
    return torch.float16 if amp == "fp16" else torch.bfloat16


def amp_name(dtype: torch.dtype | None) -> str:
    """``"bf16"``, ``"fp16"`` or ``"off"``: the precision a run trained in (``log.jsonl``)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off") if dtype else "off"


__all__ = ["amp_dtype", "amp_name", "cpu_has_bf16_matrix_units"]
