#!/usr/bin/env bash
# The issue-6 comparison on Fashion-MNIST (class-disjoint: 3 training, 2 validation, 5 test
# classes; 600 images per class drawn with seed 0, see benchmarks/make_fashion_subset.py), small
# CNN, CPU, 8 epochs, 3 seeds, search budget 2 per loss at the full budget with the first seed.
# Losses in order of priority (the run was cut at the deadline where it did not finish).
# One torch thread (the machine is shared). Resumable: rerun to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
SUBSET=${SUBSET:-$HOME/.cache/mbdl/fashion-mnist-600}
OUT=${OUT:-runs/compare-fashion}
[ -f "$SUBSET/train-labels-idx1-ubyte.gz" ] ||
  python benchmarks/make_fashion_subset.py --per-class 600 --seed 0 --out "$SUBSET"
mbdl compare configs/fashion_mdl.yaml \
  --losses mdl,triplet,contrastive,multisimilarity,proxyanchor,margin,lifted,npair \
  --seeds 3 --search-budget 2 --out "$OUT" \
  data.root="$SUBSET" train.num_threads=1 train.progress=false eval.report=false
cp "$OUT/summary.json" benchmarks/results/compare_fashion.json
