"""Forward+backward time and peak extra memory of every mbdl loss, next to its
pytorch-metric-learning (PML) counterpart and to the floor (the distance matrix alone).

    python benchmarks/losses.py                       # the full run (B = 128, 512, 1024, 2048)
    python benchmarks/losses.py --sizes 256 --losses lifted npair --no-memory --no-write

CPU, 2 torch threads, d = 512, fp32, labels P x K with K = 4 (``arange(B) // 4``).
Each (loss, B) is timed in rounds that interleave mbdl, PML and the floor (one call of each per
round, after one warm-up call each), so that machine load hits all three alike; the medians are
reported (the minima are kept in the JSON too). Peak extra memory: a fresh Python process per
(loss, B) (:func:`benchmarks.common.peak_rss_of`) runs one small warm-up forward+backward
(B = 16, for one-off lazy allocations), builds the inputs, resets its peak-RSS mark
(``/proc/self/clear_refs``), runs one forward+backward and reports ``VmHWM - VmRSS before``.
``--merge`` replaces only the measured (loss, B) rows of the stored results (for a loss whose
code changed); ``--memory-only`` re-measures the memory of the stored rows.
PML is skipped, with the reason recorded, where its estimated memory exceeds
``min(8 GB, half the available memory)`` or its predicted time (scaled from the previous size)
exceeds 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, machine, median_time, peak_rss_of, write_results

RESULTS_JSON = RESULTS / "losses.json"

DIM = 512
PER_CLASS = 4
SIZES = (128, 512, 1024, 2048)
PROXY_CLASSES = 1000
MAX_PML_SECONDS = 60.0
MAX_PML_BYTES = 8 * 2**30
REPEATS = {128: 21, 512: 11, 1024: 7, 2048: 5}

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One mbdl loss, its PML counterpart, how PML's cost grows with B, and its memory estimate."""

    name: str
    pml_name: str
    growth: int  # PML time ~ B**growth, to predict the next size
    pml_bytes: Callable[[int], float]  # PML's estimated peak bytes at batch size B


def _triplet_bytes(b: int) -> float:
    # PML's get_all_triplets_indices: a B x B x B uint8 mask, then int64 indices of every triplet
    triplets = b * (PER_CLASS - 1) * (b - PER_CLASS)
    return b**3 + 3 * 8 * triplets


def _lifted_bytes(b: int) -> float:
    # PML LiftedStructureLoss: |P| x |N| bool mask plus ~3 float32 matrices of that shape
    return (b * (PER_CLASS - 1)) * (b * (b - PER_CLASS)) * 14


def _small(b: int) -> float:
    return 16 * b * b * 4


CASES = {
    "mdl": Case("mdl", "MultiSimilarityLoss (no miner)", 2, _small),
    "contrastive": Case("contrastive", "ContrastiveLoss", 2, _small),
    "triplet_all": Case("triplet_all", "TripletMarginLoss (all triplets)", 3, _triplet_bytes),
    "triplet_batch_hard": Case(
        "triplet_batch_hard", "TripletMarginLoss + BatchHardMiner", 2, _small
    ),
    "lifted": Case("lifted", "LiftedStructureLoss", 3, _lifted_bytes),
    "npair": Case("npair", "NPairsLoss (dot product, LpRegularizer power 2)", 2, _small),
    "margin": Case("margin", "MarginLoss + DistanceWeightedMiner", 2, _small),
    "margin_all": Case("margin_all", "MarginLoss (all triplets)", 3, _triplet_bytes),
    "multisimilarity": Case(
        "multisimilarity", "MultiSimilarityLoss + MultiSimilarityMiner", 2, _small
    ),
    "proxyanchor": Case("proxyanchor", f"ProxyAnchorLoss ({PROXY_CLASSES} classes)", 2, _small),
}


def build_ours(name: str) -> Step:
    """The mbdl loss benchmarked as ``name``, as ``f(embeddings, labels) -> loss``."""
    from mbdl.losses import build_loss

    if name == "triplet_all":
        return build_loss("triplet", margin=0.2, mining="all")
    if name == "triplet_batch_hard":
        return build_loss("triplet", margin=0.2, mining="batch_hard")
    if name == "margin":
        return build_loss("margin", seed=0)
    if name == "margin_all":
        return build_loss("margin", sampling="all")
    if name == "proxyanchor":
        torch.manual_seed(0)
        return build_loss("proxyanchor", num_classes=PROXY_CLASSES, embedding_dim=DIM)
    return build_loss(name)


def build_pml(name: str, ours: Step) -> Step:
    """The PML counterpart of ``name``, as ``f(embeddings, labels) -> loss``."""
    from pytorch_metric_learning import distances, losses, miners, regularizers

    if name == "mdl":
        return losses.MultiSimilarityLoss()
    if name == "contrastive":
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)
    if name == "triplet_all":
        return losses.TripletMarginLoss(margin=0.2)
    if name == "lifted":
        return losses.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.0)
    if name == "npair":
        return losses.NPairsLoss(
            distance=distances.DotProductSimilarity(normalize_embeddings=False),
            embedding_regularizer=regularizers.LpRegularizer(power=2),
            embedding_reg_weight=0.02,
        )
    if name == "margin_all":
        return losses.MarginLoss(margin=0.2, beta=1.2, learn_beta=True)
    if name == "proxyanchor":
        pml = losses.ProxyAnchorLoss(PROXY_CLASSES, DIM, margin=0.1, alpha=32)
        pml.proxies.data = ours.proxies.data.clone()  # type: ignore[attr-defined]
        return pml
    pairs: dict[str, tuple[Any, Any]] = {
        "triplet_batch_hard": (losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner()),
        "margin": (
            losses.MarginLoss(margin=0.2, beta=1.2, learn_beta=True),
            miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4),
        ),
        "multisimilarity": (
            losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
            miners.MultiSimilarityMiner(epsilon=0.1),
        ),
    }
    loss, miner = pairs[name]
    return lambda x, y: loss(x, y, miner(x, y))


def floor_step(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The floor: the euclidean distance matrix of the L2-normalised batch, summed."""
    from mbdl.functional.distances import loss_distances

    return loss_distances(x, distance="euclidean", normalize=True).sum()


def inputs(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch_size)
    x = torch.randn(batch_size, DIM, generator=g).requires_grad_(True)
    return x, torch.arange(batch_size) // PER_CLASS


def fwd_bwd(fn: Step, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        fn(x, labels).backward()

    return run


def available_bytes() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    return float(MAX_PML_BYTES)


def pml_skip_reason(case: Case, b: int, previous: tuple[int, float] | None) -> str | None:
    limit = min(MAX_PML_BYTES, available_bytes() / 2)
    need = case.pml_bytes(b)
    if need > limit:
        return f"skipped (PML needs ~{need / 2**30:.1f} GB > {limit / 2**30:.1f} GB limit)"
    if previous is not None:
        prev_b, prev_s = previous
        predicted = prev_s * (b / prev_b) ** case.growth
        if predicted > MAX_PML_SECONDS:
            return f"skipped (PML predicted ~{predicted:.0f} s > {MAX_PML_SECONDS:.0f} s)"
    return None


def time_case(name: str, b: int, repeats: int, skip: str | None) -> dict[str, Any]:
    """Interleaved medians (seconds) of mbdl, PML (unless ``skip``) and the floor."""
    x, labels = inputs(b)
    ours = build_ours(name)
    runs: dict[str, Callable[[], None]] = {
        "mbdl": fwd_bwd(ours, x, labels),
        "floor": fwd_bwd(floor_step, x, labels),
    }
    if skip is None:
        runs["pml"] = fwd_bwd(build_pml(name, ours), x, labels)
    warm = {key: median_time(run, repeats=1, warmup=0) for key, run in runs.items()}
    slowest = max(warm.values())
    if slowest > 20.0:  # a very slow case: one timed round after the warm-up
        repeats = 1
    elif slowest > 5.0:  # a slow case: fewer rounds
        repeats = min(repeats, 3)
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            times[key].append(median_time(run, repeats=1, warmup=0))
    return {key: statistics.median(values) for key, values in times.items()} | {
        "min": {key: min(values) for key, values in times.items()},
        "raw": times,
        "repeats": repeats,
    }


def peak_extra_mb(name: str, b: int) -> dict[str, float]:
    """Peak RSS growth of one mbdl forward+backward in a fresh process (``name="floor"``: floor).

    The child resets its high-water mark (``/proc/self/clear_refs``), reads ``VmRSS``, runs one
    forward+backward and reads ``VmHWM``. (``ru_maxrss`` is not used: Linux carries the parent's
    peak over fork and exec, so a child of a big parent reports the parent's peak.)
    """
    root = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {root!r})\n"
        "import torch\n"
        "torch.set_num_threads(2)\n"
        "from benchmarks.losses import build_ours, floor_step, inputs, fwd_bwd, status_mb\n"
        f"fn = floor_step if {name!r} == 'floor' else build_ours({name!r})\n"
        "fwd_bwd(fn, *inputs(16))()  # lazy one-off allocations (BLAS buffers, autograd threads)\n"
        f"x, labels = inputs({b})\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset VmHWM to the current RSS\n"
        "before = status_mb('VmRSS')\n"
        "fwd_bwd(fn, x, labels)()\n"
        "RESULT = {'rss_before_mb': before, 'hwm_mb': status_mb('VmHWM')}\n"
    )
    out = peak_rss_of(code, timeout=600)
    return {
        "peak_extra_mb": max(0.0, out["hwm_mb"] - out["rss_before_mb"]),
        "peak_hwm_mb": out["hwm_mb"],
        "rss_before_mb": out["rss_before_mb"],
    }


def status_mb(field: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], targets: list[str], info: dict[str, Any]) -> str:
    lines = [
        "## Losses: forward+backward on CPU",
        "",
        f"`python benchmarks/losses.py` on {info['platform']}, torch {info['torch']}, "
        f"{info['torch_threads']} threads of {info['cpus']} CPUs, {info['date']} (1-minute load average "
        f"{os.getloadavg()[0]:.1f} when the table was written). fp32, d = 512, labels P x K with K = 4. Medians of "
        "interleaved rounds (mbdl, PML, floor); the floor is the euclidean distance matrix of the "
        "normalised batch alone, forward+backward. ratio = mbdl / PML. Peak MB: growth of the "
        "resident set (VmHWM - VmRSS before) during one mbdl forward+backward in a fresh process.",
        "",
        "| loss | PML counterpart | B | mbdl ms | PML ms | ratio | floor ms | ratio to floor | peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        pml = _fmt(row["pml_ms"]) if row["pml_ms"] is not None else row["pml_skipped"]
        mark = " *" if row.get("remeasured") else ""
        lines.append(
            f"| {row['loss']}{mark} | {row['pml_counterpart']} | {row['batch_size']} | "
            f"{_fmt(row['mbdl_ms'])} | {pml} | {_fmt(row['ratio'], 2)} | {_fmt(row['floor_ms'])} | "
            f"{_fmt(row['ratio_to_floor'], 2)} | {_fmt(row.get('peak_extra_mb'))} |"
        )
    if any(row.get("remeasured") for row in rows):
        lines += [
            "",
            "\\* re-measured with `--merge` after a change to that loss's code "
            f"({next(r['remeasured'] for r in rows if r.get('remeasured'))}); its PML and floor "
            "columns come from that same run.",
        ]
    lines += [
        "",
        "The machine is shared with other jobs (the load average above): a single call can be "
        "pre-empted, so cheap cases (a few ms) vary between runs, and only the ratios of one "
        "run's interleaved rounds compare like with like. The per-round minima and all raw "
        "times are in `benchmarks/results/losses.json`.",
    ]
    lines += ["", "Targets:", "", *[f"- {t}" for t in targets]]
    return "\n".join(lines)


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        if row["loss"] == "mdl" and row["batch_size"] == 1024:
            ok_floor = row["ratio_to_floor"] <= 1.5
            ok_pml = row["ratio"] is not None and row["ratio"] <= 1.0
            out.append(
                f"MDL at B=1024: {row['ratio_to_floor']:.2f}x the floor (target <= 1.5x: "
                f"{'met' if ok_floor else 'MISSED'}), {_fmt(row['ratio'], 2)}x PML "
                f"MultiSimilarityLoss (target <= 1.0x: {'met' if ok_pml else 'MISSED'})"
            )
    missed = [
        f"{r['loss']} at B={r['batch_size']} ({r['ratio']:.2f}x)"
        for r in rows
        if r["loss"] != "mdl" and r["ratio"] is not None and r["ratio"] > 1.0
    ]
    measured = sum(1 for r in rows if r["loss"] != "mdl" and r["ratio"] is not None)
    out.append(
        f"baselines <= 1.0x PML: {measured - len(missed)} of {measured} measured (loss, B) met"
        + (f"; missed: {', '.join(missed)}" if missed else "")
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--losses", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=None, help="rounds per (loss, B)")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the fresh-process memory runs"
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    parser.add_argument("--merge", action="store_true", help="replace only these rows")
    parser.add_argument("--memory-only", action="store_true", help="re-measure stored rows")
    args = parser.parse_args(argv)
    if args.memory_only:
        remeasure_memory()
        return
    torch.set_num_threads(2)
    info = machine()
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.losses:
        case = CASES[name]
        previous: tuple[int, float] | None = None
        for b in sorted(args.sizes):
            skip = pml_skip_reason(case, b, previous)
            result = time_case(name, b, args.repeats or REPEATS.get(b, 5), skip)
            pml_s = result.get("pml")
            if pml_s is not None:
                previous = (b, pml_s)
            row: dict[str, Any] = {
                "loss": name,
                "pml_counterpart": case.pml_name,
                "batch_size": b,
                "mbdl_ms": result["mbdl"] * 1e3,
                "pml_ms": None if pml_s is None else pml_s * 1e3,
                "pml_skipped": skip,
                "ratio": None if pml_s is None else result["mbdl"] / pml_s,
                "floor_ms": result["floor"] * 1e3,
                "ratio_to_floor": result["mbdl"] / result["floor"],
                "min_ms": {key: value * 1e3 for key, value in result["min"].items()},
                "repeats": result["repeats"],
                "raw_seconds": result["raw"],
            }
            rows.append(row)
            print(
                f"{name:20s} B={b:5d} mbdl {row['mbdl_ms']:9.1f} ms  PML "
                f"{_fmt(row['pml_ms']) if pml_s is not None else skip:>9s}  "
                f"ratio {_fmt(row['ratio'], 2):>5s}  floor {row['floor_ms']:8.1f} ms",
                flush=True,
            )
    timing_seconds = time.perf_counter() - start
    floor_memory: dict[int, dict[str, float]] = {}
    if not args.no_memory:
        for b in sorted(args.sizes):
            floor_memory[b] = peak_extra_mb("floor", b)
        for row in rows:
            row.update(peak_extra_mb(row["loss"], row["batch_size"]))
            print(f"{row['loss']:20s} B={row['batch_size']:5d} peak +{row['peak_extra_mb']:.1f} MB")
    if args.merge and RESULTS_JSON.exists():
        stored = json.loads(RESULTS_JSON.read_text())
        fresh = {(r["loss"], r["batch_size"]) for r in rows}
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        for r in rows:
            r["remeasured"] = when
        kept = [r for r in stored["rows"] if (r["loss"], r["batch_size"]) not in fresh]
        order = {name: i for i, name in enumerate(CASES)}
        rows = sorted(kept + rows, key=lambda r: (order[r["loss"]], r["batch_size"]))
    targets = check_targets(rows)
    print("\n".join(targets))
    payload = {
        "machine": info,
        "settings": {
            "dim": DIM,
            "per_class": PER_CLASS,
            "sizes": sorted(args.sizes),
            "dtype": "float32",
            "device": "cpu",
            "proxy_classes": PROXY_CLASSES,
            "pml_limits": {"seconds": MAX_PML_SECONDS, "bytes": MAX_PML_BYTES},
            "memory_method": "fresh process per (loss, B): ru_maxrss minus RSS before one fwd+bwd",
            "shared_machine": True,
        },
        "rows": rows,
        "floor_memory": {str(b): m for b, m in floor_memory.items()},
        "targets": targets,
        "total_seconds": time.perf_counter() - start,
        "timing_seconds": timing_seconds,
    }
    if not args.no_write:
        write_results("losses", payload, markdown(rows, targets, info))


def remeasure_memory() -> None:
    """Re-measure the peak memory of every stored row and of the floor; rewrite the results."""
    payload = json.loads(RESULTS_JSON.read_text())
    sizes = sorted({r["batch_size"] for r in payload["rows"]})
    payload["floor_memory"] = {str(b): peak_extra_mb("floor", b) for b in sizes}
    for row in payload["rows"]:
        for stale in ("peak_rss_mb", "peak_extra_mb", "rss_before_mb"):
            row.pop(stale, None)
        row.update(peak_extra_mb(row["loss"], row["batch_size"]))
        print(f"{row['loss']:20s} B={row['batch_size']:5d} peak +{row['peak_extra_mb']:.1f} MB")
    payload["settings"]["memory_method"] = (
        "fresh process per (loss, B): VmHWM minus VmRSS around one fwd+bwd, peak reset via "
        "/proc/self/clear_refs"
    )
    payload["memory_measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_results(
        "losses", payload, markdown(payload["rows"], payload["targets"], payload["machine"])
    )


if __name__ == "__main__":
    main()
