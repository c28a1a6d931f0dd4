"""Validation-only ablations of MDL on glyphs, under the budget of benchmarks/compare_glyphs.sh.

Each run changes one thing of the MDL setting that ``mbdl compare`` chose (its margin is read from
``runs/compare-glyphs/summary.json``), with seed 0 (the search seed, so the same validation
classes). Only validation metrics are reported (the trainer also tests the selected checkpoint;
those numbers are not used). ``loss.normalize`` is not ablated: the model always L2-normalises
its output, so the loss's own normalisation changes nothing.

    python benchmarks/ablate_mdl_glyphs.py   # -> benchmarks/results/compare_glyphs_mdl_ablation.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mbdl.compare import epochs_to_reach, read_history, validation_curve
from mbdl.config import load_config
from mbdl.train import train

ROOT = Path(__file__).resolve().parent.parent
SHARED = [
    "train.epochs=8",
    "train.max_steps_per_epoch=15",
    "train.num_threads=1",
    "train.progress=false",
    "eval.report=false",
    "seed=0",
    "resume=true",
]
ABLATIONS = {
    "chosen": [],
    "margin=0.05": ["loss.margin=0.05"],
    "margin=0.4": ["loss.margin=0.4"],
    "soft_boundary=0.05": ["loss.soft_boundary=0.05"],
    "soft_boundary=0.2": ["loss.soft_boundary=0.2"],
    "distance=squared_euclidean": ["loss.distance=squared_euclidean"],
    "distance=cosine": ["loss.distance=cosine"],
    "P16xK8": ["train.batch_classes=16", "train.batch_per_class=8"],
    "P64xK2": ["train.batch_classes=64", "train.batch_per_class=2"],
}


def main() -> None:
    summary = json.loads((ROOT / "runs/compare-glyphs/summary.json").read_text())
    margin = summary["losses"]["mdl"]["chosen"]["margin"]
    out_root = ROOT / "runs/ablate-glyphs-mdl"
    results = {}
    for name, changes in ABLATIONS.items():
        overrides = [*SHARED, "loss.name=mdl", f"loss.margin={margin}", *changes]
        out = out_root / name
        config = load_config(ROOT / "configs/glyphs_mdl.yaml", [*overrides, f"out={out}"])
        print(f"ablation {name}", file=sys.stderr, flush=True)
        validation = train(config)["validation"]
        history = read_history(out)
        reach = {m: epochs_to_reach(validation_curve(history, m)) for m in ("recall@1", "map@r")}
        results[name] = {
            "overrides": overrides,
            "validation": validation,
            "epochs_to_95": {m: None if r is None else r[0] for m, r in reach.items()},
        }
    payload = {"base_margin": margin, "runs": results}
    target = ROOT / "benchmarks/results/compare_glyphs_mdl_ablation.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(target)
    print("| setting | val R@1 | val MAP@R | val NMI | epochs to 95% R@1 | epochs to 95% MAP@R |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        v, e = r["validation"], r["epochs_to_95"]
        print(
            f"| {name} | {v['recall@1']:.3f} | {v['map@r']:.3f} | {v['nmi']:.3f} | "
            f"{e['recall@1']} | {e['map@r']} |"
        )


if __name__ == "__main__":
    main()
