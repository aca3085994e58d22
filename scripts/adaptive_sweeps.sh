#!/usr/bin/env bash
# The sweeps behind docs/results.md, "Adaptive attacks" (heart disease, inline engine).
# Usage: scripts/adaptive_sweeps.sh SEEDS [OUT]   e.g. scripts/adaptive_sweeps.sh 0-4 runs/adaptive-heart
# Then: python scripts/adaptive_table.py OUT
# Re-running resumes (completed cells are skipped).
set -u
SEEDS=${1:-0-4}
OUT=${2:-runs/adaptive-heart}
FEDSEC=${FEDSEC:-fedsec}
PAR=${PARALLEL:-2}
DEFENSES=fedavg,norm_bounding,median,trimmed_mean,flame
# the null: the same hospital 3 runs the EHR trigger with poison_fraction 0 and boost 1, i.e.
# trains honestly; the run still measures the clean model's ASR and the rules keep f = 1
$FEDSEC sweep scenarios/heart_sweep.yaml attacks.0.poison_fraction=0 --grid strategy=$DEFENSES \
    --seeds "$SEEDS" --engine inline --parallel "$PAR" --out "$OUT/null"
$FEDSEC sweep scenarios/heart_sweep.yaml \
    --grid attacks=adaptive_alie,adaptive_ipm,adaptive_min_max,adaptive_min_sum,adaptive_fang,bounded_ehr_trigger,flame_evading_ehr_trigger \
    --grid strategy=$DEFENSES --seeds "$SEEDS" --engine inline --parallel "$PAR" --out "$OUT/adaptive"
# the non-adaptive counterparts (the EHR trigger boosted x n/m = 4 is the fixed-boost backdoor)
$FEDSEC sweep scenarios/heart_sweep.yaml \
    --grid "attacks=alie,ipm,min_max,[{preset: ehr_trigger, hospitals: [3], boost: auto}]" \
    --grid strategy=$DEFENSES --seeds "$SEEDS" --engine inline --parallel "$PAR" --out "$OUT/baseline"
