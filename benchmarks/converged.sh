#!/usr/bin/env bash
# Issue 11: the converged, tuned comparison, end to end. Resumable: run it again
# after a kill and every finished trial / run is skipped, a killed one resumed.
#
#   1. `plr tune` each model on Beauty's VALIDATION split, 4 distinct trials per
#      model (the same budget for every model), early stopping on valid NDCG@10
#      with patience 5, at most 100 epochs; the test split is never read.
#   2. `plr benchmark benchmarks/suites/converged.yaml`: each model's chosen
#      config (OUT/tune/<model>/best.yaml) trained once per dataset (Beauty,
#      Steam-100k, Video Games), test read once per run, paired t-tests.
#
# Two lanes run side by side, one thread each (the 2-core CPU of this project):
# SASRec, ERL, PRL, LARES in one, PLR (the costliest search) in the other.
#   OUT=runs/converged bash benchmarks/converged.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/converged}
BEAUTY=${BEAUTY:-../shared/data/amazon2014-beauty_seqrecbench}
TRIALS=${TRIALS:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT/tune"
BASE=(--set model.hidden_size=64 --set model.inner_size=128 --set data.max_len=20
      --set train.batch_size=256 --set train.epochs=100 --set train.patience=5
      --set train.seed=2024 --set train.progress=false)
tune() {
  echo "$(date -u +%FT%TZ) tune $1"
  plr tune --model "$1" --data "$BEAUTY" --space "benchmarks/spaces/$1.yaml" --trials "$TRIALS" \
    --out "$OUT/tune/$1" "${BASE[@]}"
}
lane_a() { tune sasrec && tune erl && tune prl && tune lares; }
lane_b() { tune plr; }
lane_a >> "$OUT/lane-a.log" 2>&1 &
a=$!
lane_b >> "$OUT/lane-b.log" 2>&1 &
b=$!
wait "$a" && wait "$b"
plr benchmark benchmarks/suites/converged.yaml --out "$OUT/final"
