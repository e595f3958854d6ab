#!/usr/bin/env bash
# The stability study (RESULTS.md, "Why it does not collapse"): each of I-JEPA's guards broken on purpose,
# 200 steps on cifar10-mini, one run per configuration into runs/study/NAME/ (log.csv: std, eff_rank, kNN), and
# its summary line (final kNN, and that of a random-init encoder) into runs/study/NAME.summary.
#   bash study.sh [DATA] [LANE LANES]     # e.g. "bash study.sh DATA 0 2" and "... 1 2" on two cores at once
# Then `python figures.py --study runs/study` draws figures/study.png from the logs.
set -euo pipefail
cd "$(dirname "$0")"
data=${1:-../shared/data/cifar10-mini}; lane=${2:-0}; lanes=${3:-1}
base="--data $data --model vit_tiny --depth 6 --img-size 32 --patch-size 4 --batch-size 64 --pred-depth 3
      --pred-dim 96 --workers 1 --vicreg 0 --steps 200 --log-every 25 --knn-every 50"
configs=(
  "default|"
  "target-shared|--target shared"
  "ema-0|--ema 0 0"
  "ema-0.9|--ema 0.9 0.9"
  "target-frozen|--target frozen"
  "vicreg-0.1|--vicreg 0.1"
  "vicreg-1|--vicreg 1"
  "rgb-aux-0.1|--rgb-aux 0.1"
  "loss-l2|--loss l2"
  "loss-cosine|--loss cosine"
  "target-norm-none|--target-norm none"
  "small-targets|--target-scale 0.02 0.05"
  "small-context|--context-scale 0.3 0.4 --min-keep 4"  # on 8x8 a small context rarely keeps 10 patches
)
for i in "${!configs[@]}"; do
  (( i % lanes == lane )) || continue
  name=${configs[$i]%%|*}; flags=${configs[$i]#*|}
  python train.py $base $flags --out runs/study/$name | grep '^summary' > runs/study/$name.summary
  echo "$name | $(cat runs/study/$name.summary)"
done
