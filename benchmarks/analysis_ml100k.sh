#!/usr/bin/env bash
# The analyses of benchmarks/RESULTS.md, section "Analyses on MovieLens-100k (plr analyze)".
# Run from the repository root:  OMP_NUM_THREADS=1 bash benchmarks/analysis_ml100k.sh [train|analyze|all]
# Protocol (small, for a CPU): d=32, 2 layers, 2 heads, FFN 64, dropout 0.2, histories of the last 20
# items, 5 epochs of sequence-mode training (batch 512 sequences, Adam 1e-3, seed 2024), best
# validation NDCG@10 checkpoint, full-ranking test metrics; PLR M=2, T=2, lambda=0.1 (bounded KL), w_rcl=1.
set -euo pipefail
PLR=${PLR:-plr}
DATA=${DATA:-../shared/data/ml-100k_recbole}
OUT=${OUT:-runs/analysis-ml100k}
SET=(--set model.hidden_size=32 --set model.inner_size=64 --set model.dropout=0.2 --set data.max_len=20
     --set train.epochs=5 --set train.patience=5 --set train.batch_size=512 --set train.progress=false
     --set "eval.ks=[10,20,50]")
PLR_RUN=$OUT/ablation/runs/data/full
what=${1:-all}
if [[ $what == train || $what == all ]]; then
  $PLR analyze ablation --data "$DATA" "${SET[@]}" --out "$OUT/ablation"      # trains full, no-mors, no-rcl, no-kl
  $PLR analyze sensitivity --run "$PLR_RUN" --vary M=1,2,4 --vary T=1,2,3 --out "$OUT/sensitivity"  # retrains base
  for model in sasrec erl; do
    [[ -f $OUT/$model/metrics.json ]] || $PLR train --model $model --data "$DATA" "${SET[@]}" --out "$OUT/$model"
  done
fi
if [[ $what == analyze || $what == all ]]; then
  $PLR analyze robustness --checkpoint "$OUT/sasrec" "$OUT/erl" "$PLR_RUN" --labels SASRec ReaRec-ERL PLR \
      --rates 0.1 0.2 0.3 --seed 0 --out "$OUT/robustness"
  $PLR analyze ceiling --checkpoint "$OUT/erl" "$PLR_RUN" --labels ReaRec-ERL PLR --out "$OUT/ceiling"
  $PLR analyze attention --checkpoint "$PLR_RUN" --num-users 3 --out "$OUT/attention"
  $PLR analyze efficiency --like "$PLR_RUN/best.pt" --models sasrec erl plr --batch-size 256 --repeats 200 \
      --out "$OUT/efficiency"
fi
