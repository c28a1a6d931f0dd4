"""What validating a loss's inputs once per call (not twice: module, then kernel) saves.

    python benchmarks/loss_validation.py              # B = 128, d = 128, every built-in loss
    python benchmarks/loss_validation.py --sizes 256 --rounds 21 --no-write

CPU, 1 torch thread, fp32, labels P x K with K = 4. For each built-in loss, rounds interleave
three calls, so that machine load hits them alike: the module call as it is now (the inputs
checked once), the same call after one explicit ``check_loss_inputs`` (the cost of the second
check the kernel used to run: the reference) and that check alone; medians are reported. On a
GPU each check also synchronises with the host (``bool(isfinite(sum))``), which this CPU
measurement does not show. ``validations`` counts the ``check_embeddings`` calls of one module
call (the test suite asserts it is 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write_results

DIM = 128
PER_CLASS = 4
SIZES = (128,)
PROXY_CLASSES = 100


def _loss(name: str) -> torch.nn.Module:
    from mbdl.losses import build_loss, loss_class

    sizes = {"num_classes": PROXY_CLASSES, "embedding_dim": DIM}
    extra = {key: sizes[key] for key in loss_class(name).needs}
    return build_loss(name, **extra)


def _validations(loss: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> int:
    """How many times one module call checks its embeddings."""
    import mbdl.functional.checks as checks

    original = checks.check_embeddings
    calls = []

    def counting(embeddings: torch.Tensor, name: str = "embeddings") -> None:
        calls.append(name)
        original(embeddings, name)

    checks.check_embeddings = counting  # type: ignore[assignment]
    try:
        loss(x, labels)
    finally:
        checks.check_embeddings = original
    return calls.count("embeddings")


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, batch_size: int, rounds: int) -> dict[str, Any]:
    from mbdl.functional.checks import check_loss_inputs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, DIM, generator=g)
    labels = (torch.arange(batch_size) // PER_CLASS) % PROXY_CLASSES
    loss = _loss(name)

    def once() -> None:
        with torch.no_grad():
            loss(x, labels)

    def twice() -> None:
        with torch.no_grad():
            check_loss_inputs(x, labels)
            loss(x, labels)

    def check() -> None:
        check_loss_inputs(x, labels)

    for fn in (once, twice, check):
        fn()  # warm-up
    times: dict[str, list[float]] = {"once": [], "twice": [], "check": []}
    for _ in range(rounds):
        times["once"].append(_timed(once))
        times["twice"].append(_timed(twice))
        times["check"].append(_timed(check))
    median = {key: statistics.median(values) for key, values in times.items()}
    return {
        "loss": name,
        "batch_size": batch_size,
        "validations": _validations(loss, x, labels),
        "forward_once_ms": median["once"] * 1e3,
        "forward_twice_ms": median["twice"] * 1e3,
        "check_us": median["check"] * 1e6,
        "ratio_once_to_twice": median["once"] / median["twice"],
    }


def markdown(payload: dict[str, Any]) -> str:
    checks = [row["check_us"] for row in payload["rows"]]
    shares = [row["check_us"] / (1e3 * row["forward_once_ms"]) for row in payload["rows"]]
    low, high, low_share, high_share = min(checks), max(checks), min(shares), max(shares)
    lines = [
        "## Validating loss inputs once per call",
        "",
        f"`python benchmarks/loss_validation.py` ({payload['machine']['date']}, CPU, "
        f"torch threads: {payload['machine']['torch_threads']}, d = {DIM}, fp32, forward only, "
        f"medians of {payload['rounds']} interleaved rounds). A module call used to check its "
        "inputs twice (module, then kernel); it now checks them once. *twice* is the same call "
        "after one explicit `check_loss_inputs` (the old cost), *ratio* = once / twice. On a GPU "
        "each check is also a host synchronisation, not measured here.",
        "",
        f"How to read it: the saving is one check, the *one check* column ({low:.0f}-{high:.0f} "
        f"µs, {100 * low_share:.0f}-{100 * high_share:.0f}% of the forward pass in this run). "
        "Differences between the two forward columns beyond that, either way, are the noise of a "
        "shared, loaded machine, not an effect of the change.",
        "",
        "| loss | B | checks per call | one check (µs) | forward, once (ms) | forward, twice (ms) "
        "| ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in payload["rows"]:
        lines.append(
            f"| {row['loss']} | {row['batch_size']} | {row['validations']} | "
            f"{row['check_us']:.0f} | {row['forward_once_ms']:.3f} | "
            f"{row['forward_twice_ms']:.3f} | {row['ratio_once_to_twice']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from mbdl.losses import builtin_losses

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--losses", nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=51)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a shared machine: 2 threads contend with its load
    rows = []
    for name in args.losses or list(builtin_losses()):
        for size in args.sizes:
            row = measure(name, size, args.rounds)
            print(
                f"{name:16s} B={size:5d} checks={row['validations']} "
                f"check={row['check_us']:.0f}us once={row['forward_once_ms']:.3f}ms "
                f"twice={row['forward_twice_ms']:.3f}ms ratio={row['ratio_once_to_twice']:.3f}",
                flush=True,
            )
            rows.append(row)
    payload = {"machine": machine(), "rounds": args.rounds, "dim": DIM, "rows": rows}
    if not args.no_write:
        write_results("loss_validation", payload, markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
