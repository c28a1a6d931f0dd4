"""Exact k-nearest-neighbour search, chunked over queries under a memory budget.

The distance matrix is never materialised whole: queries are processed in chunks whose
``chunk x gallery`` score buffer fits in ``memory_budget_bytes``, and only the ``Q x k`` top-k
result is kept. Scores come from one matrix multiply per chunk:

- euclidean: rank by ``|g_j|^2 - 2 q.g_j`` (the squared distance minus the per-row constant
  ``|q|^2``); the returned distances are ``sqrt(max(score + |q|^2, 0))``.
- squared_euclidean: the same ranking as euclidean; the returned distances are not square-rooted.
- cosine: rank by ``cos(q, g_j)`` (largest first); the returned distances are ``1 - cos``.

With ``exclude_self=True`` (leave-one-out: ``gallery`` is ``query``) the query's own row is
excluded *by index* (its score is set to +inf before the top-k), so exact duplicates of the query
stay in the result: "drop the first neighbour" would be wrong on ties. Among items at exactly
the same distance the order is unspecified, as for any top-k.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch
from torch import Tensor

KNN_DISTANCES: tuple[str, ...] = ("euclidean", "squared_euclidean", "cosine")
KNN_BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss")


def faiss_available() -> bool:
    """Whether the optional ``faiss`` package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def check_knn_options(distance: str, backend: str) -> None:
    """Raise ``ValueError`` for an unknown distance or backend name."""
    if distance not in KNN_DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(KNN_DISTANCES)}; got {distance!r}")
    if backend not in KNN_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(KNN_BACKENDS)}; got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu)")


SAFE_MAGNITUDE = 2.0**40


def safe_scale(x: Tensor) -> float:
    """A power of two ``s`` that brings ``max |x|`` into ``[1, 2)`` when it lies outside
    ``[2^-40, 2^40]`` (else 1.0): squared norms of ``s * x`` then neither overflow nor underflow
    float32, and the scaling is exact, so nearest neighbours and clusterings are unchanged."""
    if x.numel() == 0:
        return 1.0
    largest = float(x.detach().abs().max())
    if largest == 0.0 or 1.0 / SAFE_MAGNITUDE <= largest <= SAFE_MAGNITUDE:
        return 1.0
    return math.ldexp(1.0, -math.frexp(largest)[1] + 1)


def query_chunk_size(num_gallery: int, memory_budget_bytes: int, bytes_per_score: int = 4) -> int:
    """Queries per chunk so that the chunk's score buffer (and the top-k's working copy) fit.

    Two ``chunk x num_gallery`` buffers are budgeted: the scores and torch.topk's workspace.
    """
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be positive; got {memory_budget_bytes}")
    return max(1, memory_budget_bytes // (2 * bytes_per_score * max(num_gallery, 1)))


def knn(
    query: Tensor,
    gallery: Tensor | None,
    k: int,
    *,
    distance: str = "euclidean",
    exclude_self: bool = False,
    memory_budget_bytes: int = 2**30,
    backend: str = "auto",
    query_offset: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest gallery rows of each query row: ``(distances[Q, k], indices[Q, k])``.

    Rows are sorted by increasing distance. ``gallery=None`` means ``gallery = query``.
    ``exclude_self=True`` requires ``gallery`` to be ``query`` (or ``None``) and excludes index
    ``i`` from the neighbours of query ``i``; with ``query_offset=o`` the queries are instead
    the gallery rows ``o, o+1, ...`` (a block of a leave-one-out search) and gallery row
    ``o + i`` is excluded for query ``i``. ``backend`` is ``"torch"`` (exact, CPU or GPU,
    chunked), ``"faiss"`` (IndexFlatL2 / IndexFlatIP, CPU) or ``"auto"`` (= torch).
    """
    check_knn_options(distance, backend)
    if gallery is None:
        gallery = query
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery must be 2-D with the same width; got {tuple(query.shape)} "
            f"and {tuple(gallery.shape)}"
        )
    offset = 0 if query_offset is None else query_offset
    if query_offset is not None and not (
        exclude_self and 0 <= offset and offset + query.shape[0] <= gallery.shape[0]
    ):
        raise ValueError("query_offset needs exclude_self=True and queries within the gallery")
    if exclude_self and query_offset is None and query.shape[0] != gallery.shape[0]:
        raise ValueError("exclude_self=True needs the gallery to be the query set (same rows)")
    available = gallery.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(
            f"k={k} must be between 1 and the {available} gallery items available"
            + (" (the query itself excluded)" if exclude_self else "")
        )
    scale = safe_scale(torch.stack([query.detach().abs().max(), gallery.detach().abs().max()]))
    if scale != 1.0:  # huge or tiny magnitudes: search exactly scaled copies, report true distances
        query, gallery = query * scale, gallery * scale
    if backend == "faiss":
        distances, indices = _faiss_knn(
            query, gallery, k, distance=distance, exclude_self=exclude_self, offset=offset
        )
    else:
        distances, indices = _torch_knn(
            query,
            gallery,
            k,
            distance=distance,
            exclude_self=exclude_self,
            budget=memory_budget_bytes,
            offset=offset,
        )
    if scale != 1.0 and distance != "cosine":
        power = 2 if distance == "squared_euclidean" else 1
        distances = (distances.double() / scale**power).to(distances.dtype)
    return distances, indices


TOPK_BLOCK = 64


def blockwise_topk_smallest(
    scores: Tensor, k: int, block: int = TOPK_BLOCK
) -> tuple[Tensor, Tensor]:
    """``torch.topk(scores, k, largest=False)`` along rows, via block minima when ``k`` is small.

    ``scores.shape[1]`` must be a multiple of ``block``. The k smallest entries of a row lie in
    the k blocks with the smallest minima (each block holding one of them has its minimum among
    the row's k smallest values), so a fast min-reduction over blocks, a top-k over the block
    minima and a top-k over the ``k * block`` gathered entries give the exact result.
    """
    rows, width = scores.shape
    num_blocks = width // block
    if width % block or 4 * k * block > width:
        return torch.topk(scores, k, dim=1, largest=False, sorted=True)
    blocks = scores.view(rows, num_blocks, block)
    _, best_blocks = torch.topk(blocks.amin(dim=2), k, dim=1, largest=False, sorted=False)
    candidates = blocks.gather(1, best_blocks.unsqueeze(2).expand(rows, k, block))
    values, local = torch.topk(candidates.view(rows, k * block), k, dim=1, largest=False)
    block_of = best_blocks.gather(1, torch.div(local, block, rounding_mode="floor"))
    return values, block_of * block + local % block


def _torch_knn(
    query: Tensor,
    gallery: Tensor,
    k: int,
    *,
    distance: str,
    exclude_self: bool,
    budget: int,
    offset: int = 0,
) -> tuple[Tensor, Tensor]:
    query = query.float() if query.dtype in (torch.float16, torch.bfloat16) else query
    gallery = gallery.to(device=query.device, dtype=query.dtype)
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    if distance == "cosine":
        query = torch.nn.functional.normalize(query, dim=1)
        gallery = torch.nn.functional.normalize(gallery, dim=1)
        bias, alpha = torch.zeros(num_gallery, dtype=query.dtype, device=query.device), -1.0
    else:
        bias, alpha = gallery.pow(2).sum(dim=1), -2.0
    # Pad the gallery to a multiple of TOPK_BLOCK with zero rows whose score is +inf.
    padded = -(-num_gallery // TOPK_BLOCK) * TOPK_BLOCK
    pad = padded - num_gallery
    gallery_t = torch.cat([gallery, gallery.new_zeros(pad, gallery.shape[1])]).T.contiguous()
    bias = torch.cat([bias, bias.new_full((pad,), float("inf"))])
    out_dist = torch.empty(num_query, k, dtype=query.dtype, device=query.device)
    out_index = torch.empty(num_query, k, dtype=torch.long, device=query.device)
    chunk = query_chunk_size(padded, budget, query.element_size())
    for start in range(0, num_query, chunk):
        stop = min(start + chunk, num_query)
        rows = query[start:stop]
        # euclidean: |g|^2 - 2 q.g (squared distance minus |q|^2); cosine: -cos(q, g).
        scores = torch.addmm(bias, rows, gallery_t, alpha=alpha)
        if exclude_self:
            local = torch.arange(stop - start, device=scores.device)
            scores[local, local + start + offset] = float("inf")
        top_scores, top_index = blockwise_topk_smallest(scores, k)
        del scores
        if distance == "cosine":
            top_dist = 1.0 + top_scores
        else:
            top_dist = (top_scores + rows.pow(2).sum(dim=1, keepdim=True)).clamp_min_(0)
            if distance == "euclidean":
                top_dist = top_dist.sqrt_()
        out_dist[start:stop] = top_dist
        out_index[start:stop] = top_index
    return out_dist, out_index


def _faiss_knn(
    query: Tensor, gallery: Tensor, k: int, *, distance: str, exclude_self: bool, offset: int = 0
) -> tuple[Tensor, Tensor]:
    import faiss  # optional dependency
    import numpy as np

    device = query.device
    query_np = np.ascontiguousarray(query.detach().float().cpu().numpy())
    gallery_np = np.ascontiguousarray(gallery.detach().float().cpu().numpy())
    if distance == "cosine":
        faiss.normalize_L2(query_np)
        faiss.normalize_L2(gallery_np)
        index: Any = faiss.IndexFlatIP(gallery_np.shape[1])
    else:
        index = faiss.IndexFlatL2(gallery_np.shape[1])
    index.add(gallery_np)
    search_k = k + int(exclude_self)
    scores_np, index_np = index.search(query_np, search_k)
    scores = torch.from_numpy(scores_np)
    indices = torch.from_numpy(index_np).long()
    if exclude_self:
        # Remove the query's own index from its row; if ties pushed it out of the top k+1,
        # remove the last column instead (every remaining item is then a true neighbour).
        is_self = indices == (torch.arange(indices.shape[0]) + offset).unsqueeze(1)
        is_self[~is_self.any(dim=1), -1] = True
        keep = ~is_self
        scores = scores[keep].view(-1, k)
        indices = indices[keep].view(-1, k)
    if distance == "cosine":
        distances = 1.0 - scores
    else:
        distances = scores.clamp_min(0)
        distances = distances.sqrt() if distance == "euclidean" else distances
    return distances.to(device), indices.to(device)
