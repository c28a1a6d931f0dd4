#!/usr/bin/env bash
# The four new losses (issue 13) next to MDL on the embedded glyphs data set, at one budget:
# the default glyphs recipe (configs/glyphs_mdl.yaml: small VGG, 64-d, P x K = 32 x 4, AdamW 1e-3)
# cut to 5 epochs, each loss at its defaults, ONE seed (0): a smoke-level comparison, not a
# protocol result (no search, no spread). The proxy losses are also run with their proxies at
# 100 x the network's learning rate (train.loss_lr=0.1; default null = train.lr). One torch
# thread (shared 2-core machine); amp auto (bf16 on this CPU).
# Needs the losses registered (mbdl.losses discovers them). Finished runs are skipped.
# Raw test/validation metrics -> benchmarks/results/newlosses_glyphs.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/newlosses-glyphs}
run() {  # run NAME OVERRIDES...
  local name=$1
  shift
  [ -f "$OUT/$name/metrics.json" ] && return 0
  mbdl train "$@" train.epochs=5 train.num_threads=1 out="$OUT/$name"
}
for loss in mdl normsoftmax cosface arcface supcon; do
  run "$loss" loss.name="$loss"
done
for loss in normsoftmax cosface arcface; do
  run "${loss}_loss_lr0.1" loss.name="$loss" train.loss_lr=0.1
done
OUT="$OUT" python - <<'PY'
import json, os
from pathlib import Path

from mbdl.fileio import atomic_write_text

out = Path(os.environ["OUT"])
runs = {}
for run in sorted(p.parent for p in out.glob("*/metrics.json")):
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    config = (run / "config.yaml").read_text(encoding="utf-8")
    runs[run.name] = {"test": metrics["test"], "validation": metrics["validation"], "config": config}
summary = {"budget": "glyphs default recipe, 5 epochs, seed 0, one seed", "runs": runs}
atomic_write_text(Path("benchmarks/results/newlosses_glyphs.json"), json.dumps(summary, indent=2) + "\n")
PY
