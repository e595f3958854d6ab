#!/usr/bin/env bash
# The stability study (RESULTS.md, "The stability study at the small preset's budget"): I-JEPA's guards
# broken on purpose and the other mechanisms switched on, each run for the small preset's budget (3,900
# steps of 64 on cifar10-mini, ~17 min a run on one AVX-512 core), kNN every 390 steps, one run per row
# into runs/study/NAME/ (log.csv: loss, std, eff_rank, the SIGReg statistic, kNN) and its summary line
# into runs/study/NAME.summary.
#   bash study.sh [DATA] [NAME ...]     # no names: every row; named rows run in the order below
#   SEEDS="0 1 2" bash study.sh DATA NAME   # seeds: seed 0 into runs/study/NAME, seed S into runs/study/NAME-sS
# Each run is then scored by eval_knn.py (kNN and the linear probe) into runs/study/NAME.eval.
#   RESUME=1 bash study.sh DATA NAME       # a run cut short (machine gone, signal) continues from its latest.pt
#   REPLAY=390 bash study.sh DATA NAME     # re-run to step 390 into runs/replay/NAME and compare with the committed
#                                          # log (figures/logs/study/NAME): equal in every column but img_per_s
# OUT and LOGS move runs/study (runs/replay) and figures/logs/study. Every row runs in bfloat16, the precision
# its committed log was made in, and one thread a row (OMP_NUM_THREADS=1): both change the numbers.
# Two rows at a time with a thread each beat one row on both cores (~17 min a row; LeWorldModel's ~55):
#   OMP_NUM_THREADS=1 bash study.sh DATA A B & OMP_NUM_THREADS=1 bash study.sh DATA C D   # salt-1 before salt-2
# Two bases: "plain" is the paper's recipe (smooth L1 on the last layer's normalised target, no extra
# term) fitted to the budget; "small" is --preset small. Then `python figures.py --study runs/study`.
set -euo pipefail
cd "$(dirname "$0")"
data=${1:-../shared/data/cifar10-mini}; shift || true
common="--preset small --data $data --knn-every 390 --log-every 130 --dtype bfloat16 --probe"
plain="$common --vicreg 0 --invariance 0 --target-layers 1 --rgb-aux 0 --loss smooth_l1"
heavy="--context complement --num-targets 8 --target-scale 0.15 0.15"  # V-JEPA's masks: ~83% hidden on 8x8
rows=(  # in the order they run when no names are given: the rows that answer the most first
  "plain|$plain"
  "plain-target-shared|$plain --target shared"
  "plain-sigreg-shared|$plain --sigreg 0.05 --target shared"
  "small|$common"
  "plain-sigreg|$plain --sigreg 0.05"
  "plain-ema-0|$plain --ema 0 0"
  "plain-target-frozen|$plain --target frozen"
  "plain-vicreg-1|$plain --vicreg 1"
  "plain-vjepa|$plain --loss l1 $heavy"
  "plain-salt-1|$plain --latent-weight 0 --rgb-aux 1 --steps 1950"  # SALT: half the steps each
  "plain-salt-2|$plain --target frozen --teacher %o/plain-salt-1%s/latest.pt --steps 1950"  # %o: OUT, %s: seed's suffix
  "plain-target-norm-none|$plain --target-norm none"
  "plain-loss-l2|$plain --loss l2"
  "plain-loss-l1|$plain --loss l1"
  "plain-loss-cosine|$plain --loss cosine"
  "plain-ema-0.9|$plain --ema 0.9 0.9"
  "small-target-shared|$common --target shared"
  "small-sigreg-shared|$common --sigreg 0.05 --target shared"
  "small-vicreg-0|$common --vicreg 0"
  # SIGReg as its authors attach it: LeJEPA's projector (2 x 2048 with BatchNorm, then 16) between the pooled
  # context and SIGReg, weights as ours (pred + W * N * EP): LeJEPA's lambda 0.02-0.05 is W ~0.02-0.05, LeWM's 0.09
  "plain-sigreg-proj-0.02|$plain --sigreg 0.02 --projector 16"
  "plain-sigreg-proj-0.09|$plain --sigreg 0.09 --projector 16"
  "plain-sigreg-proj-0.5|$plain --sigreg 0.5 --projector 16"
  "plain-sigreg-proj-shared-0.09|$plain --sigreg 0.09 --projector 16 --target shared"  # LeWorldModel's arrangement
  "plain-sigreg-proj-shared-0.02|$plain --sigreg 0.02 --projector 16 --target shared"
  "plain-sigreg-proj-shared-0.5|$plain --sigreg 0.5 --projector 16 --target shared"
  "plain-sigreg-0.02|$plain --sigreg 0.02"  # unprojected, beside plain-sigreg (0.05)
  "plain-sigreg-0.5|$plain --sigreg 0.5"
  # the tricks the literature names that no row above tests (the default predictor is 3 deep x 96 wide)
  "plain-pred-shallow-wide|$plain --pred-depth 1 --pred-dim 384"  # paper Sec. 5: a simple predictor
  "plain-targets-small|$plain --target-scale 0.03 0.05"  # 2 x 2-patch targets instead of 15-20% of the image
  "plain-context-small|$plain --context-scale 0.5 0.6 --min-keep 4"  # ~6 context patches of 64, not ~20
  "plain-vicreg-0.02|$plain --vicreg 0.02"  # the weight practitioners recommend, beside plain-vicreg-1
  "plain-rgb-aux|$plain --rgb-aux 1"  # the pixel loss alone, outside the small preset's bundle
  "plain-ema-const|$plain --ema 0.996 0.996"  # a constant momentum, not the 0.996 -> 1.0 ramp
  # the seed's fourth rule, acting on the monitor; train.py's default thresholds, chosen on the logs of the rows
  # above (RESULTS.md, answer 7): lower the regulariser x0.1 when kNN falls 2 points while the loss is low, or stop
  "plain-vicreg-1-lower|$plain --vicreg 1 --lower-reg 0.1"
  "plain-sigreg-proj-0.02-lower|$plain --sigreg 0.02 --projector 16 --lower-reg 0.1"
  "small-lower|$common --lower-reg 0.1"
  "plain-early-stop|$plain --early-stop 5"
)
for want in "$@"; do  # a misspelt name is an error, not a row silently skipped
  printf '%s\n' "${rows[@]}" | grep -q "^$want|" || { echo "error: study.sh: no row named '$want'" >&2; exit 2; }
done
out=${OUT:-runs/$([[ -n ${REPLAY:-} ]] && echo replay || echo study)}; logs=${LOGS:-figures/logs/study}
teachers=$([[ -n ${REPLAY:-} ]] && echo runs/study || echo "$out")  # SALT's stage 1, finished: a replay's teacher too
mkdir -p "$out"
for row in "${rows[@]}"; do
  name=${row%%|*}; flags=${row#*|}
  [[ $# -eq 0 || " $* " == *" $name "* ]] || continue
  for seed in ${SEEDS:-0}; do
    suffix=$([[ $seed == 0 ]] || echo "-s$seed"); run=$name$suffix; flags=${flags//%o/$teachers}
    if [[ -n ${REPLAY:-} ]]; then  # the row's first REPLAY steps, then the check; exit 75 is --stop-at's
      rm -rf "${out:?}/$run"
      python train.py ${flags//%s/$suffix} --seed "$seed" --out "$out/$run" --stop-at "$REPLAY" > "$out/$run.out" || [[ $? == 75 ]]
      python figures.py --compare "$out/$run/log.csv" "$logs/$run/log.csv" --upto "$REPLAY"
      continue
    fi
    python train.py ${flags//%s/$suffix} --seed "$seed" --out "$out/$run" ${RESUME:+--auto-resume} | grep '^summary' > "$out/$run.summary"
    python eval_knn.py --ckpt "$out/$run/latest.pt" --data "$data" --which "$(
      [[ $flags == *"--target frozen"* ]] && echo context || echo target)" > "$out/$run.eval"
    echo "$run | $(cat "$out/$run.summary")"
  done
done
