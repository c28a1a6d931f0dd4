"""Shared test settings: two torch threads (the CI machine is small and shared)."""

from __future__ import annotations

import torch

torch.set_num_threads(2)
