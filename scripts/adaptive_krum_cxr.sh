#!/usr/bin/env bash
# Krum against adaptive coalitions on chest X-rays (8 hospitals, 0 and 1 malicious: Krum needs
# n > 2f + 2, which the 4 heart hospitals cannot give). 6 rounds, inline engine.
# Usage: [PARALLEL=2] scripts/adaptive_krum_cxr.sh SEEDS [OUT]; then python scripts/adaptive_table.py OUT auroc krum
set -u
SEEDS=${1:-0-2}
OUT=${2:-runs/adaptive-cxr-krum}
FEDSEC=${FEDSEC:-fedsec}
BASE="strategy=krum federation.rounds=6"
# the null: hospitals 0 and 1 run the BadNets backdoor with poison_fraction 0 (honest training)
$FEDSEC sweep scenarios/integrity_cxr.yaml $BASE "attacks=[{preset: badnets, hospitals: [0, 1], poison_fraction: 0.0}]" \
    --seeds "$SEEDS" --engine inline --parallel "${PARALLEL:-2}" --out "$OUT/null"
$FEDSEC sweep scenarios/integrity_cxr.yaml $BASE \
    --grid "attacks=[{preset: adaptive_fang, hospitals: [0, 1]}],[{preset: fang_krum, hospitals: [0, 1]}],[{preset: adaptive_alie, hospitals: [0, 1]}]" \
    --seeds "$SEEDS" --engine inline --parallel "${PARALLEL:-2}" --out "$OUT/adaptive"
