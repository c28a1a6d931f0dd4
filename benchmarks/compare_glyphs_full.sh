#!/usr/bin/env bash
# All 8 losses on glyphs at the default config's full budget (10 epochs of full passes, 350 steps
# of 32 x 4), 3 seeds, search budget 2 per loss at that budget (first seed): the targets of
# issue 6 at the default budget (benchmarks/compare_glyphs.sh cut the budget). MDL and the three
# best baselines of the reduced run first (triplet, the loss the convergence target names, first
# after MDL), in case the run has to be cut. One torch thread. Resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/compare-glyphs-full}
mbdl compare configs/glyphs_mdl.yaml --losses mdl,triplet,contrastive,multisimilarity,proxyanchor,margin,lifted,npair \
  --seeds 3 --search-budget 2 --out "$OUT" \
  train.num_threads=1 train.progress=false eval.report=false
cp "$OUT/summary.json" benchmarks/results/compare_glyphs_full.json
