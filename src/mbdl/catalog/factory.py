"""faiss index kinds by faiss's own vocabulary: ``index_factory`` strings, checked before faiss.

faiss aborts the interpreter on some bad parameters (``HNSW0``) and allocates without bound on
others (``HNSW-1``), so a factory string is parsed and range-checked here first
(:func:`check_factory`); what faiss still refuses is turned into a one-line
:class:`~mbdl.errors.UserError`. :func:`default_factory` picks a kind from the catalog's size
and dimension, after faiss's guidelines: exact search below :data:`EXACT_BELOW` items, a graph
(HNSW) up to :data:`GRAPH_BELOW`, inverted lists with product quantisation above.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mbdl.errors import UserError

#: catalogs smaller than this are searched exactly by default
EXACT_BELOW = 200_000
#: catalogs smaller than this (and at least EXACT_BELOW) get an HNSW graph by default
GRAPH_BELOW = 2_000_000
#: the most inverted lists / graph neighbours / sub-quantisers accepted
MAX_LISTS, MAX_HNSW_M, MAX_PQ_BITS = 1 << 22, 256, 16

_SQ_TYPES = ("SQ4", "SQ6", "SQ8", "SQfp16", "SQbf16")
_TRANSFORM = re.compile(r"^(OPQ(?P<opq>\d+)(_(?P<opq_dim>\d+))?|PCAR?(?P<pca>\d+)|L2norm)$")
_COARSE = re.compile(r"^(IVF(?P<ivf>\d+)(_HNSW(?P<ivf_hnsw>\d+))?|HNSW(?P<hnsw>\d+))$")
_CODE = re.compile(r"^(Flat|PQ(?P<pq>\d+)(x(?P<bits>\d+))?(?P<fs>fs)?|SQ(4|6|8|fp16|bf16))$")


@dataclass(frozen=True)
class FactorySpec:
    """A checked factory string: its canonical text and what it needs."""

    text: str
    lists: int  # IVF lists (0: none)
    hnsw_m: int  # HNSW neighbours (0: none)
    trained: bool  # needs training on a sample (IVF, PQ, SQ, OPQ, PCA)

    @property
    def exact(self) -> bool:
        return self.text == "Flat"


def _bad(text: str, why: str) -> UserError:
    return UserError(
        f"--factory {text!r}: {why} (a faiss index_factory string such as Flat, HNSW32, "
        "IVF1024,Flat, IVF1024,PQ32, IVF1024,SQ8 or OPQ32,IVF1024,PQ32)"
    )


def check_factory(text: str, dim: int, count: int | None = None) -> FactorySpec:
    """Parse and range-check a faiss ``index_factory`` string for vectors of ``dim`` dimensions
    (and, when known, ``count`` training vectors); raises :class:`UserError` naming the problem."""
    if not isinstance(text, str) or not text.strip() or len(text) > 200:
        raise _bad(str(text)[:80], "empty or too long")
    parts = [p.strip() for p in text.strip().split(",")]
    if parts and parts[0] == "IDMap":
        parts = parts[1:]  # mbdl keeps its own ids
    if not parts or any(not p for p in parts):
        raise _bad(text, "an empty component")
    width = dim
    trained = False
    lists = hnsw_m = 0
    position = 0
    while position < len(parts) and (match := _TRANSFORM.match(parts[position])):
        if match["opq"]:
            m = int(match["opq"])
            out = int(match["opq_dim"]) if match["opq_dim"] else width
            if not 1 <= out <= width or m < 1 or out % m:
                raise _bad(text, f"OPQ{m} needs sub-vectors dividing {out} (<= dimension {width})")
            width, trained = out, True
        elif match["pca"]:
            out = int(match["pca"])
            if not 1 <= out <= width:
                raise _bad(text, f"PCA to {out} dimensions must be within 1..{width}")
            width, trained = out, True
        position += 1
    rest = parts[position:]
    if not rest:
        raise _bad(text, "no index after the transforms")
    coarse = _COARSE.match(rest[0])
    if coarse:
        if coarse["ivf"]:
            lists = int(coarse["ivf"])
            if not 1 <= lists <= MAX_LISTS:
                raise _bad(text, f"IVF lists must be within 1..{MAX_LISTS}; got {lists}")
            if count is not None and lists > count:
                raise _bad(text, f"IVF{lists} has more lists than the {count} vectors to train on")
            trained = True
            if coarse["ivf_hnsw"] and not 2 <= int(coarse["ivf_hnsw"]) <= MAX_HNSW_M:
                raise _bad(text, f"HNSW neighbours must be within 2..{MAX_HNSW_M}")
        else:
            hnsw_m = int(coarse["hnsw"])
            if not 2 <= hnsw_m <= MAX_HNSW_M:
                raise _bad(text, f"HNSW neighbours must be within 2..{MAX_HNSW_M}; got {hnsw_m}")
        rest = rest[1:]
    if len(rest) > 1:
        raise _bad(text, f"unexpected component {rest[1]!r}")
    code = rest[0] if rest else "Flat"
    code_match = _CODE.match(code)
    if code_match is None:
        raise _bad(text, f"unknown component {code!r}")
    if code_match["pq"]:
        m = int(code_match["pq"])
        bits = int(code_match["bits"] or 8)
        if m < 1 or width % m:
            raise _bad(text, f"PQ{m} needs a number of sub-quantisers dividing {width}")
        if not 1 <= bits <= MAX_PQ_BITS or (code_match["fs"] and bits != 4):
            raise _bad(text, f"PQ bits must be within 1..{MAX_PQ_BITS} (4 with fs)")
        if hnsw_m and code_match["fs"]:
            raise _bad(text, "HNSW cannot store fast-scan PQ codes")
        trained = True
        if count is not None and count < (1 << bits):
            raise _bad(text, f"PQ with {bits} bits needs at least {1 << bits} training vectors")
    elif code in _SQ_TYPES:
        trained = True
    canonical = ",".join(parts)
    return FactorySpec(canonical, lists, hnsw_m, trained)


def default_factory(count: int, dim: int) -> tuple[str, str]:
    """``(factory string, reason)`` for a catalog of ``count`` vectors of ``dim`` dimensions."""
    if count < EXACT_BELOW:
        return "Flat", f"exact search: {count} items is below {EXACT_BELOW}"
    if count < GRAPH_BELOW:
        return "HNSW32", (
            f"an HNSW graph: {count} items is at least {EXACT_BELOW} and below {GRAPH_BELOW} "
            "(fast, about 4 x dim + 256 bytes per vector)"
        )
    lists = 1 << round(math.log2(4 * math.sqrt(count)))
    m = max(d for d in range(1, min(dim, 64) + 1) if dim % d == 0 and d <= max(1, dim // 2))
    return f"IVF{lists},PQ{m}", (
        f"compressed: {count} items is at least {GRAPH_BELOW}; IVF with ~4 sqrt(N) lists and "
        f"PQ{m} codes ({m} bytes per vector)"
    )


def make_index(spec: FactorySpec, dim: int, metric: str) -> Any:
    """A fresh faiss index of ``spec`` that takes external ids (``add_with_ids``)."""
    import faiss

    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    try:
        index = faiss.index_factory(dim, spec.text, faiss_metric)
    except RuntimeError as error:
        raise _bad(spec.text, f"faiss refused it: {faiss_reason(error)}") from None
    if faiss.try_extract_index_ivf(index) is None:
        index = faiss.IndexIDMap2(index)
    return index


def training_sample(count: int, spec: FactorySpec, exclude: int = 0) -> int:
    """How many vectors to train ``spec`` on: enough for its lists and codebooks, at most all."""
    wanted = max(40 * max(spec.lists, 256), 10_000)
    return min(count - exclude, min(wanted, 1_000_000)) if count > exclude else count


def set_search_defaults(index: Any, spec: FactorySpec) -> None:
    """Search parameters that give a useful recall: IVF lists probed, HNSW beam width."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = max(1, min(ivf.nlist, max(16, ivf.nlist // 32)))
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = max(64, int(inner.hnsw.efSearch))


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """The fraction of the exact k nearest neighbours that the approximate search found."""
    k = exact_ids.shape[1]
    hits = sum(
        len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist()))
        for a, e in zip(approx_ids, exact_ids, strict=True)
    )
    return hits / max(1, int((exact_ids >= 0).sum())) if k else 1.0


def faiss_reason(error: BaseException) -> str:
    """The reason in a faiss ``RuntimeError`` (``Error in ... at file:line: Error: 'x' failed:
    reason``), without the C++ location."""
    text = " ".join(str(error).split())
    for marker in ("failed: ", "Error: "):
        if marker in text:
            text = text.rsplit(marker, 1)[-1]
            break
    return text[:160] or type(error).__name__
