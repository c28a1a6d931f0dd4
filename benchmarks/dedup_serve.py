"""Dedup at scale and the search service's latency.

``dedup``: N synthetic L2-normalised vectors (default 1,000,000 x 128) with planted groups of
near-copies (sizes 2..10, copies at distance ~0.05-0.1 of their original; unrelated vectors are
~1.4 apart), grouped by :func:`mbdl.catalog.dedup.duplicate_components` (streamed range search +
union-find) on a faiss IVF index at threshold 0.3. Measured: time, peak memory of the process
(``VmHWM``), pairs examined, recall of the planted groups (a group counts when exactly its
members form one found group) and of the planted pairs. The N x N floor it avoids: the bytes of an
N x N float32 matrix (computed) and the time of the N x N GEMM, measured on a slice of rows times
all N columns and extrapolated to N rows (stated as extrapolated).

``serve``: a real small catalog (a randomly initialised smallcnn over 200 glyphs images) served by
``mbdl serve``'s app on uvicorn in a thread on 127.0.0.1; a bounded loop of single-image
``POST /search`` requests (multipart PNG, k=5), one at a time: requests/s, p50 and p99 latency,
next to the time of the same query through ``Searcher.search`` in-process (the HTTP overhead).

    python benchmarks/dedup_serve.py dedup [--n 1000000]
    python benchmarks/dedup_serve.py serve [--requests 300]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import machine, write_results


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def planted_vectors(n: int, dim: int, groups: int, seed: int = 0):
    """Unit vectors with ``groups`` planted groups of near-copies; returns (x, planted groups)."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        x[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    sizes = rng.integers(2, 11, size=groups)
    members = rng.permutation(n)[: int(sizes.sum())]
    planted = []
    offset = 0
    for size in sizes.tolist():
        group = np.sort(members[offset : offset + size])
        offset += size
        noise = rng.standard_normal((size - 1, dim), dtype=np.float32) * (0.05 / np.sqrt(dim))
        copies = x[group[0]] + noise
        x[group[1:]] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
        planted.append(group)
    return x, planted


def bench_dedup(n: int, dim: int, threshold: float, nlist: int, nprobe: int) -> dict[str, Any]:
    import faiss

    from mbdl.catalog.dedup import duplicate_components

    faiss.omp_set_num_threads(2)
    groups_planted = max(10, n // 100)
    x, planted = planted_vectors(n, dim, groups_planted)
    ids = np.arange(n, dtype=np.int64)
    started = time.perf_counter()
    quantizer = faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist)
    sample = x[np.random.default_rng(1).choice(n, size=min(n, 40 * nlist), replace=False)]
    index.train(sample)
    index.add(x)
    index.nprobe = nprobe
    build_s = time.perf_counter() - started

    def range_search(queries: np.ndarray, radius: float):
        lims, squared, found = index.range_search(queries, radius * radius)
        return lims, np.sqrt(np.maximum(squared, 0)), found

    rss_before = _peak_rss_mb()
    faiss.cvar.indexIVF_stats.reset()
    started = time.perf_counter()
    found, examined, within = duplicate_components(
        ids, lambda batch: x[batch], range_search, threshold, batch_size=8192
    )
    dedup_s = time.perf_counter() - started
    rss_after = _peak_rss_mb()
    distances_computed = int(faiss.cvar.indexIVF_stats.ndis)
    found_sets = {frozenset(g.tolist()) for g in found}
    exact_groups = sum(frozenset(g.tolist()) in found_sets for g in planted)
    label = np.full(n, -1, dtype=np.int64)
    for number, group in enumerate(found):
        label[group] = number
    planted_pairs = found_pairs = 0
    for group in planted:
        labels = label[group]
        planted_pairs += len(group) * (len(group) - 1) // 2
        _values, counts = np.unique(labels[labels >= 0], return_counts=True)
        found_pairs += int((counts * (counts - 1) // 2).sum())
    # the N x N floor: a slice of rows against all N columns, extrapolated to N rows
    rows = 2048
    started = time.perf_counter()
    for start in range(0, n, 65_536):
        block = x[start : start + 65_536]
        _ = x[:rows] @ block.T
    slice_s = time.perf_counter() - started
    return {
        "n": n,
        "dim": dim,
        "threshold": threshold,
        "index": f"IVF{nlist},Flat nprobe={nprobe}",
        "planted_groups": len(planted),
        "planted_items": int(sum(len(g) for g in planted)),
        "found_groups": len(found),
        "index_build_s": build_s,
        "dedup_s": dedup_s,
        "peak_rss_mb": rss_after,
        "peak_rss_before_dedup_mb": rss_before,
        "vectors_mb": x.nbytes / 2**20,
        "pairs_examined": examined,
        "pairs_within": within,
        "distances_computed_by_index": distances_computed,
        "all_pairs": n * (n - 1) // 2,
        "group_recall": exact_groups / len(planted),
        "pair_recall": found_pairs / planted_pairs,
        "nxn_float32_bytes": 4 * n * n,
        "gemm_slice_rows": rows,
        "gemm_slice_s": slice_s,
        "nxn_gemm_s_extrapolated": slice_s * n / rows,
    }


def _tiny_catalog(root: Path, images: int) -> Path:
    from mbdl.catalog import build_catalog
    from mbdl.config import load_config
    from mbdl.data import load_splits
    from mbdl.export import save_pretrained
    from mbdl.train import train

    config = load_config(
        None,
        [
            "data.max_classes=40",
            "model.embedding_dim=32",
            "train.epochs=1",
            "train.max_steps_per_epoch=1",
            "train.batch_classes=8",
            "train.progress=false",
            "train.device=cpu",
            "eval.report=false",
            f"out={root / 'run'}",
        ],
    )
    train(config)
    save_pretrained(root / "run", root / "model")
    test = load_splits("glyphs", None, image_size=32, max_classes=40).test
    folder = root / "images"
    for i in range(images):
        sub = folder / test.class_names[int(test.labels[i])]
        sub.mkdir(parents=True, exist_ok=True)
        test.load_image(i).save(sub / f"{i:05d}.png")
    build_catalog(root / "model", root / "index", images=folder, progress=False)
    return folder


class Server:
    """uvicorn serving ``app`` in a thread on a free 127.0.0.1 port."""

    def __init__(self, app: Any) -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def bench_serve(requests: int) -> dict[str, Any]:
    import httpx
    import torch
    from PIL import Image

    from mbdl.catalog import Searcher
    from mbdl.serve import create_app

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        folder = _tiny_catalog(root, 200)
        searcher = Searcher.open(root / "index")
        files = sorted(folder.rglob("*.png"))[:20]
        payloads = [f.read_bytes() for f in files]
        server = Server(create_app(searcher))
        latencies, direct = [], []
        try:
            with httpx.Client(base_url=server.url) as client:
                for i in range(10):  # warm-up
                    client.post("/search", files={"image": ("q.png", payloads[i % 20])})
                    searcher.search([Image.open(io.BytesIO(payloads[i % 20]))], k=5)
                http_s = 0.0
                for i in range(requests):  # HTTP and in-process calls interleaved
                    t = time.perf_counter()
                    response = client.post(
                        "/search", files={"image": ("q.png", payloads[i % 20])}, data={"k": "5"}
                    )
                    latencies.append(time.perf_counter() - t)
                    http_s += latencies[-1]
                    assert response.status_code == 200, response.text
                    t = time.perf_counter()
                    image = Image.open(io.BytesIO(payloads[i % 20])).convert("RGB")
                    searcher.search([image], k=5)
                    direct.append(time.perf_counter() - t)
        finally:
            server.stop()
        total_s = http_s
    ms = np.asarray(latencies) * 1000
    return {
        "catalog_items": 200,
        "model": "smallcnn 32x32 grey, 32-d (random init + 1 step)",
        "requests": requests,
        "requests_per_s": requests / total_s,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "in_process_p50_ms": float(np.percentile(np.asarray(direct) * 1000, 50)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["dedup", "serve"])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--nprobe", type=int, default=4)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    if args.part == "dedup":
        result = bench_dedup(args.n, args.dim, args.threshold, args.nlist, args.nprobe)
        r = result
        markdown = f"""## Dedup at scale (`benchmarks/dedup_serve.py dedup`)

{r["n"]:,} x {r["dim"]} synthetic unit vectors, {r["planted_groups"]:,} planted groups of
near-copies (sizes 2-10), grouped at distance <= {r["threshold"]} by streamed range search on
`{r["index"]}` + union-find (`mbdl.catalog.dedup.duplicate_components`), 2 threads, on a shared,
loaded machine.

| measure | value |
| --- | --- |
| dedup time (range search + union-find) | {r["dedup_s"]:.1f} s (index build {r["index_build_s"]:.1f} s) |
| peak memory of the process | {r["peak_rss_mb"]:,.0f} MB (vectors {r["vectors_mb"]:,.0f} MB; peak before dedup {r["peak_rss_before_dedup_mb"]:,.0f} MB) |
| pairs examined (returned by the range search, fed to union-find) | {r["pairs_examined"]:,} |
| distances the IVF index computed (faiss `indexIVF_stats.ndis`) | {r["distances_computed_by_index"]:,} of the {r["all_pairs"]:,} all pairs ({r["distances_computed_by_index"] / r["all_pairs"]:.2e}) |
| planted groups recovered exactly | {r["group_recall"]:.4f} |
| planted pairs recovered | {r["pair_recall"]:.4f} |
| N x N float32 matrix it avoids | {r["nxn_float32_bytes"] / 2**40:,.2f} TiB |
| N x N GEMM it avoids (extrapolated from {r["gemm_slice_rows"]} rows x N in {r["gemm_slice_s"]:.2f} s) | {r["nxn_gemm_s_extrapolated"]:,.0f} s ({r["nxn_gemm_s_extrapolated"] / r["dedup_s"]:.1f}x the dedup time) |
"""
        write_results("dedup", {"machine": machine(), **result}, markdown)
    else:
        result = bench_serve(args.requests)
        r = result
        markdown = f"""## Search service (`benchmarks/dedup_serve.py serve`)

`mbdl serve`'s app on uvicorn, 127.0.0.1, a catalog of {r["catalog_items"]} glyphs images
({r["model"]}), {r["requests"]} single-image `POST /search` requests (multipart PNG, k=5) one
after another from one client, CPU (torch 1 thread), on a shared, loaded machine; each request is
followed by the same query through `Searcher.search` in-process (interleaved), so the difference
is the HTTP, multipart and JSON overhead.

| requests/s | p50 latency | p99 latency | the same query in-process (p50) |
| --- | --- | --- | --- |
| {r["requests_per_s"]:.0f} | {r["p50_ms"]:.1f} ms | {r["p99_ms"]:.1f} ms | {r["in_process_p50_ms"]:.1f} ms |
"""
        write_results("serve", {"machine": machine(), **result}, markdown)
    print(result)


if __name__ == "__main__":
    main()
