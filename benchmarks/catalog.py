"""Catalog benchmark: mbdl's catalog index against bare faiss on the same factory strings, and
``index build --images`` against the network alone, each pair measured in the same run.

Vectors: a synthetic catalog of N x 128 float32 embeddings (``--count``, default 100,000),
L2-normalised points around 2,000 random centres (clustered, as trained embeddings are), and
1,000 held-out queries from the same distribution. For Flat, HNSW32 and an IVF-PQ string:
build time (mbdl: ``build_catalog(embeddings=X.npy)``, which also writes the SQLite metadata
and the exact vectors and measures recall; bare faiss: ``index_factory`` + train on the same
sample size + add + ``write_index``), bytes per vector of the faiss file (and of everything
mbdl stores), queries/s (batches of 1,000; mbdl's re-ranks each hit by its exact stored vector)
and recall@10 against exact search, mbdl's and bare faiss's.

Images: ``build_catalog(images=DIR)`` on generated PNG files against the same model's forward
pass alone on the same images, already decoded and preprocessed in memory.

    python benchmarks/catalog.py [--count 100000] [--images 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.common import machine, write_results

DIM, QUERIES, K = 128, 1000, 10
ROOT = Path(__file__).resolve().parent.parent


def clustered(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, DIM)).astype(np.float32)
    points = centres[rng.integers(0, len(centres), count)]
    points += 0.35 * rng.standard_normal((count, DIM)).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points


def model_dir(folder: Path, backbone: str, dim: int, size: int, channels: int) -> Path:
    from mbdl.export import save_pretrained
    from mbdl.models import build_model
    from mbdl.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(backbone, dim, in_channels=channels)
    state = {
        "config": {},
        "model_args": dict(model.build_args),
        "data_args": {"image_size": size, "channels": channels},
        "model_state": model.state_dict(),
    }
    save_checkpoint(folder / f"{backbone}.pt", state)
    return save_pretrained(folder / f"{backbone}.pt", folder / backbone)


def bare_faiss(vectors: np.ndarray, factory: str, sample: int, out: Path) -> tuple[Any, float]:
    import faiss

    start = time.perf_counter()
    index = faiss.index_factory(DIM, factory, faiss.METRIC_L2)
    if not index.is_trained:
        rng = np.random.default_rng(0)
        index.train(vectors[np.sort(rng.choice(len(vectors), sample, replace=False))])
    index.add(vectors)
    faiss.write_index(index, str(out))
    return index, time.perf_counter() - start


def search_rates(first: Any, second: Any, queries: np.ndarray, repeats: int = 5) -> list[float]:
    """Queries/s of two search functions: the median of ``repeats`` interleaved runs each."""
    first(queries[:100])  # warm-up
    second(queries[:100])
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for slot, search in enumerate((first, second)):
            start = time.perf_counter()
            search(queries)
            times[slot].append(time.perf_counter() - start)
    return [len(queries) / statistics.median(t) for t in times]


def vector_rows(count: int, folder: Path, model: Path) -> list[dict[str, Any]]:
    import faiss

    from mbdl.catalog import build_catalog
    from mbdl.catalog.build import exact_knn
    from mbdl.catalog.factory import (
        check_factory,
        recall_at_k,
        set_search_defaults,
        training_sample,
    )

    vectors = clustered(count + QUERIES, 0)
    queries, vectors = vectors[:QUERIES].copy(), vectors[QUERIES:].copy()
    embeddings = folder / "synthetic.npy"
    np.save(embeddings, vectors)
    np.save(folder / "synthetic.labels.npy", np.full(count, -1, np.int64))
    (folder / "synthetic.paths.txt").write_text("".join(f"v/{i}.jpg\n" for i in range(count)))
    (folder / "synthetic.json").write_text(json.dumps({"count": count, "dim": DIM}))
    truth = exact_knn(vectors, np.arange(count), queries, K, "l2")
    lists = 1 << round(np.log2(4 * np.sqrt(count)))
    rows = []
    for factory in ("Flat", "HNSW32", f"IVF{lists},PQ32"):
        spec = check_factory(factory, DIM, count)
        bare_file = folder / "bare.faiss"
        index, bare_s = bare_faiss(vectors, factory, training_sample(count, spec), bare_file)
        set_search_defaults(index, spec)
        out = folder / f"{factory}.index"
        start = time.perf_counter()
        report = build_catalog(
            model, out, embeddings=embeddings, images=folder, factory=factory, progress=False
        )
        mbdl_s = time.perf_counter() - start
        catalog = report.catalog
        faiss_bytes = catalog.index_file().stat().st_size
        stored = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        bare_qps, mbdl_qps = search_rates(
            lambda q, index=index: index.search(q, K),
            lambda q, c=catalog: c.search_embeddings(q, K),
            queries,
        )
        _, bare_ids = index.search(queries, K)
        _, mbdl_ids = catalog.search_embeddings(queries, K)
        row = {
            "factory": factory,
            "count": count,
            "build_s_faiss": bare_s,
            "build_s_mbdl": mbdl_s,
            "build_ratio": mbdl_s / bare_s,
            "mbdl_steps_s": report.timings,
            "mbdl_faiss_step_ratio": report.timings["faiss_train_add"] / bare_s,
            "bytes_per_vector_faiss_file": faiss_bytes / count,
            "bytes_per_vector_bare": bare_file.stat().st_size / count,
            "bytes_per_vector_all_mbdl_files": stored / count,
            "qps_faiss": bare_qps,
            "qps_mbdl": mbdl_qps,
            "query_time_ratio": bare_qps / mbdl_qps,
            "recall@10_faiss": recall_at_k(bare_ids, truth),
            "recall@10_mbdl": recall_at_k(mbdl_ids, truth),
            "recall@10_measured_at_build": report.recall.get("recall"),
            "threads": faiss.omp_get_max_threads(),
        }
        print(row, flush=True)
        rows.append(row)
        catalog.close()
        shutil.rmtree(out)
    return rows


def image_rows(count: int, folder: Path) -> list[dict[str, Any]]:
    from PIL import Image

    from mbdl.catalog import build_catalog
    from mbdl.export import load_embedder

    images = folder / "images"
    rng = np.random.default_rng(0)
    for i in range(count):
        (images / f"c{i % 20}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(images / f"c{i % 20}" / f"{i:05d}.png")
    rows = []
    for backbone, size in (("resnet18", 64),):
        model = model_dir(folder, backbone, 128, size, 3)
        network, transform = load_embedder(model)
        from mbdl.data.files import read_image

        tensors = [transform(read_image(p)) for p in sorted(images.rglob("*.png"))]
        batches = [torch.stack(tensors[i : i + 256]) for i in range(0, len(tensors), 256)]
        with torch.inference_mode():
            network(batches[0][:8])
            start = time.perf_counter()
            for batch in batches:
                network(batch)
            network_s = time.perf_counter() - start
        for workers in (0, 1):
            start = time.perf_counter()
            report = build_catalog(
                model,
                folder / f"img{workers}.index",
                images=images,
                progress=False,
                workers=workers,
            )
            build_s = time.perf_counter() - start
            row = {
                "model": f"{backbone} {size}px, 128-d",
                "images": count,
                "workers": workers,
                "network_alone_images_per_s": count / network_s,
                "build_images_per_s": count / build_s,
                "ratio": network_s / build_s,
                "embed_phase_images_per_s": count / report.embed_seconds,
            }
            print(row, flush=True)
            rows.append(row)
    return rows


def markdown(payload: dict[str, Any]) -> str:
    vectors, images, info, count = (
        payload["vectors"],
        payload["images"],
        payload["machine"],
        payload["count"],
    )
    lines = [
        "## catalog: the catalog index against bare faiss, and index build against the network",
        "",
        f"`python benchmarks/catalog.py --count {count} --images {payload['image_count']}` "
        f"(100,000 vectors, not 1,000,000: the shared 2-core machine ran at a load average of "
        f"{info['load_average']:.1f}, and an HNSW32 build of 1M vectors would have taken most "
        f"of an hour, twice). Synthetic catalog of {count:,} x {DIM} float32 L2-normalised "
        f"vectors around 2,000 centres; {QUERIES} held-out queries in one batch, k = {K}; faiss "
        f"with {vectors[0]['threads']} thread(s), both sides of each ratio in the same process, "
        "the searches interleaved (median of 5). Bare faiss: index_factory, train on the same "
        "sample size, add, write_index. mbdl: `build_catalog(embeddings=X.npy)`, which also "
        "writes the SQLite metadata (one row per item) and the exact vectors and measures the "
        "recall on 1,000 held-out items; its search re-ranks faiss's hits by their exact stored "
        "vectors (its distances are exact, also for PQ).",
        "",
        "| factory | build s faiss | build s mbdl | ratio | of which faiss train+add | recall "
        "measurement s | bytes/vector (faiss file) | bytes/vector (all mbdl files) | queries/s "
        "faiss | queries/s mbdl | query time ratio | recall@10 faiss | recall@10 mbdl |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in vectors:
        steps = r["mbdl_steps_s"]
        lines.append(
            f"| {r['factory']} | {r['build_s_faiss']:.2f} | {r['build_s_mbdl']:.2f} | "
            f"{r['build_ratio']:.2f}x | {steps['faiss_train_add']:.2f} s "
            f"({r['mbdl_faiss_step_ratio']:.2f}x) | {steps['recall']:.2f} | "
            f"{r['bytes_per_vector_faiss_file']:.1f} | {r['bytes_per_vector_all_mbdl_files']:.1f}"
            f" | {r['qps_faiss']:.3g} | {r['qps_mbdl']:.3g} | {r['query_time_ratio']:.2f}x | "
            f"{r['recall@10_faiss']:.3f} | {r['recall@10_mbdl']:.3f} |"
        )
    lines += [
        "",
        "Reading it: the faiss step inside mbdl's build and mbdl's queries cost what bare faiss "
        "costs, within this machine's noise (the columns in parentheses and the query time "
        "ratio); the whole build meets the 1.1x target only where faiss's own work is large "
        "(IVF-PQ). The rest of a build is linear bookkeeping faiss does not do "
        "(a stat and SHA-256 per file, one SQLite row per item, the exact float32 vectors: "
        "about 600 bytes per item on top of the faiss file) plus the recall measurement. That "
        "bookkeeping dominates only where faiss itself does nearly nothing (Flat, a copy). "
        "On paper for 1,000,000 and 10,000,000 items, the faiss file is the bytes per vector "
        "above times N (Flat 520 B, HNSW32 ~790 B, IVF-PQ32 ~40 B plus the lists), and mbdl "
        "adds 512 B of exact vectors (memory-mapped, not loaded) and ~100 B of SQLite per item; "
        "opening reads neither.",
        "",
        "`index build --images` (generated 72 x 72 PNG files, batch 256) "
        "against the same network's forward pass alone on the same images decoded and "
        "preprocessed in memory (the build also decodes, hashes, stores and indexes):",
        "",
        "| model | images | loader workers | network alone img/s | build img/s | ratio | "
        "embedding phase img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in images:
        lines.append(
            f"| {r['model']} | {r['images']} | {r.get('workers', 0)} | "
            f"{r['network_alone_images_per_s']:.3g} | "
            f"{r['build_images_per_s']:.3g} | {r['ratio']:.2f}x | "
            f"{r['embed_phase_images_per_s']:.3g} |"
        )
    for r in payload.get("earlier_image_runs", []):
        lines.append(
            f"\nAn earlier run of the images part ({r['note']}) measured {r['ratio']:.2f}x "
            f"({r['build_images_per_s']:.3g} against {r['network_alone_images_per_s']:.3g} img/s, "
            f"{r['workers']} workers): on this shared machine the ratio moves by +-0.1 between "
            "runs, so the 0.85x target is met in one run and missed in the other."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument(
        "--from-json", action="store_true", help="rewrite the docs section from the results"
    )
    parser.add_argument(
        "--images-only", action="store_true", help="rerun only the images part, keep the rest"
    )
    args = parser.parse_args()
    if args.from_json or args.images_only:
        payload = json.loads((ROOT / "benchmarks" / "results" / "catalog.json").read_text())
        if args.images_only:
            with tempfile.TemporaryDirectory() as temp:
                payload["images"] = image_rows(args.images, Path(temp))
            payload["image_count"] = args.images
            payload["images_load_average"] = os.getloadavg()[0]
        write_results("catalog", payload, markdown(payload))
        return
    info = {**machine(), "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        model = model_dir(folder, "smallcnn", DIM, 32, 1)
        vectors = vector_rows(args.count, folder, model)
        images = image_rows(args.images, folder)
    payload = {
        "machine": info,
        "vectors": vectors,
        "images": images,
        "count": args.count,
        "image_count": args.images,
    }
    write_results("catalog", payload, markdown(payload))


if __name__ == "__main__":
    # one thread, and no OpenMP spinning: on a shared, oversubscribed machine faiss's spinning
    # threads slowed k-means a hundredfold; both sides of every ratio run under the same settings
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
