#!/usr/bin/env bash
# The sweeps behind docs/results.md, "Adaptive attacks" (heart disease, inline engine).
# Usage: scripts/adaptive_sweeps.sh SEEDS [OUT] [PART...]
#   PART: null | adaptive | baseline (the 5-round, one-epoch regime of scenarios/heart_sweep.yaml)
#         fedsgd-null | fedsgd (one SGD step per round, 40 rounds); default: null adaptive baseline
#   e.g. scripts/adaptive_sweeps.sh 0-9 runs/adaptive-heart
#        scripts/adaptive_sweeps.sh 0-4 runs/adaptive-heart fedsgd-null fedsgd   # -> runs/adaptive-heart-fedsgd
# Then: python scripts/adaptive_table.py OUT [metric]
# Re-running resumes (completed cells are skipped); a wider SEEDS adds the missing seeds.
set -u
SEEDS=${1:-0-9}
OUT=${2:-runs/adaptive-heart}
shift 2 2>/dev/null || shift $#
PARTS=${*:-null adaptive baseline}
FEDSEC=${FEDSEC:-fedsec}
PAR=${PARALLEL:-2}
DEFENSES=fedavg,norm_bounding,median,trimmed_mean,flame
FEDSGD="federation.local.steps=1 federation.local.batch_size=32 federation.local.lr=0.1 federation.rounds=40"
sweep() { $FEDSEC sweep scenarios/heart_sweep.yaml "$@" --seeds "$SEEDS" --engine inline --parallel "$PAR"; }
for part in $PARTS; do
  case $part in
    # the null: hospital 3 runs the EHR trigger with poison_fraction 0 and boost 1, i.e. trains
    # honestly; the run still measures the clean model's ASR and the rules keep f = 1
    null) sweep attacks.0.poison_fraction=0 --grid strategy=$DEFENSES --out "$OUT/null" ;;
    adaptive) sweep --grid attacks=adaptive_alie,adaptive_ipm,adaptive_min_max,adaptive_min_sum,adaptive_fang,bounded_ehr_trigger,flame_evading_ehr_trigger \
                    --grid strategy=$DEFENSES --out "$OUT/adaptive" ;;
    # the non-adaptive counterparts (the EHR trigger boosted x n/m = 4 is the fixed-boost backdoor)
    baseline) sweep --grid "attacks=alie,ipm,min_max,[{preset: ehr_trigger, hospitals: [3], boost: auto}]" \
                    --grid strategy=$DEFENSES --out "$OUT/baseline" ;;
    # distributed-SGD regime (one mini-batch step per round): the coalitions vs median and FLAME
    fedsgd-null) sweep $FEDSGD attacks.0.poison_fraction=0 --grid strategy=median,flame \
                       --out "$OUT-fedsgd/null" ;;
    fedsgd) sweep $FEDSGD --grid attacks=adaptive_alie,adaptive_ipm \
                  --grid strategy=median,flame --out "$OUT-fedsgd/adaptive" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
