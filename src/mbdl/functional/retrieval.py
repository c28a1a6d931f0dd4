"""Retrieval metrics from the labels of each query's ranked neighbours.

Every function takes ``matches[Q, k]`` (``True`` where the i-th nearest gallery item has the
query's class, nearest first) and returns one score per query; averaging is left to the caller.
``num_relevant[Q]`` is R, the number of *other* gallery items of the query's class. Definitions:

- Recall@K: 1 if at least one of the K nearest items has the query's class, else 0.
- P@1 (= Recall@1): 1 if the nearest item has the query's class.
- R-Precision: ``|{i <= R : match_i}| / R`` (Musgrave et al., "A Metric Learning Reality
  Check", ECCV 2020).
- MAP@R: ``(1/R) sum_{i <= R} P(i) match_i`` with ``P(i) = |{j <= i : match_j}| / i``
  (Musgrave et al. 2020).

R-Precision and MAP@R need ``k >= max(R)``; queries with ``R = 0`` have no correct answer and
must be excluded by the caller (their scores here are 0).
"""

from __future__ import annotations

import torch
from torch import Tensor


def neighbour_matches(neighbour_labels: Tensor, query_labels: Tensor) -> Tensor:
    """``matches[q, i] = neighbour_labels[q, i] == query_labels[q]``."""
    return neighbour_labels == query_labels.unsqueeze(1)


def recall_at_k(matches: Tensor, k: int) -> Tensor:
    """Per-query Recall@K: whether any of the ``k`` nearest items matches (float 0/1)."""
    if not 1 <= k <= matches.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the {matches.shape[1]} neighbours given")
    return matches[:, :k].any(dim=1).double()


def precision_at_1(matches: Tensor) -> Tensor:
    """Per-query P@1: whether the nearest item matches (float 0/1)."""
    return recall_at_k(matches, 1)


def _check_r(matches: Tensor, num_relevant: Tensor) -> None:
    if num_relevant.shape != matches.shape[:1]:
        raise ValueError(
            f"num_relevant has shape {tuple(num_relevant.shape)}; expected ({matches.shape[0]},)"
        )
    if num_relevant.numel() and int(num_relevant.max()) > matches.shape[1]:
        raise ValueError(
            f"R-Precision and MAP@R need k >= max R = {int(num_relevant.max())}; "
            f"got {matches.shape[1]} neighbours"
        )


def _within_r(matches: Tensor, num_relevant: Tensor) -> Tensor:
    ranks = torch.arange(matches.shape[1], device=matches.device)
    return ranks.unsqueeze(0) < num_relevant.to(matches.device).unsqueeze(1)


def r_precision(matches: Tensor, num_relevant: Tensor) -> Tensor:
    """Per-query R-Precision ``|{i <= R : match_i}| / R`` (0 where ``R = 0``)."""
    _check_r(matches, num_relevant)
    hits = (matches & _within_r(matches, num_relevant)).sum(dim=1).double()
    r = num_relevant.to(hits.device).double()
    return torch.where(r > 0, hits / r.clamp_min(1), torch.zeros_like(hits))


def map_at_r(matches: Tensor, num_relevant: Tensor) -> Tensor:
    """Per-query MAP@R ``(1/R) sum_{i<=R} P(i) match_i`` (0 where ``R = 0``)."""
    _check_r(matches, num_relevant)
    relevant = matches & _within_r(matches, num_relevant)
    ranks = torch.arange(1, matches.shape[1] + 1, device=matches.device, dtype=torch.float64)
    precision_at_i = matches.cumsum(dim=1, dtype=torch.float64) / ranks
    summed = (precision_at_i * relevant).sum(dim=1)
    r = num_relevant.to(summed.device).double()
    return torch.where(r > 0, summed / r.clamp_min(1), torch.zeros_like(summed))
