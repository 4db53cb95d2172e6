#!/usr/bin/env bash
# Issue 11: the converged, tuned comparison, end to end. Resumable: run it again
# after a kill and every finished trial / run is skipped, a killed one resumed.
#
#   1. `plr tune` each model on Beauty's VALIDATION split, 4 distinct trials per
#      model (the same budget for every model), early stopping on valid NDCG@10
#      with patience 5, at most 100 epochs; the test split is never read. The
#      finished trials recorded under $RECORDS/<model> count as trials.
#   2. `plr benchmark benchmarks/suites/converged.yaml`: each model's chosen
#      config (OUT/tune/<model>/best.yaml) trained once per dataset (Beauty,
#      Steam-100k, Video Games), test read once per run, paired t-tests. On
#      Beauty a run adopts the search's best trial (the same run) instead of
#      training it again.
#   3. `plr benchmark benchmarks/suites/converged-exclude.yaml` ("exclude" tasks):
#      the same configs with the history excluded from the candidates (valid and
#      test), on Beauty and Steam-100k, in OUT/exclude.
#   4. `plr benchmark benchmarks/suites/converged-seed<SEED>.yaml` ("seeds" tasks):
#      chosen configs trained again with another seed, in OUT/seeds/<SEED>.
#
# WORKERS processes (default 2, one thread each: the 2-core CPU of this project)
# take the tasks below in order of priority. A search runs in one worker at a time
# (an flock on OUT/queue/<task>.lock); a final task is shared (each worker trains
# the next of its runs that no other is training: `plr benchmark --skip-busy`), and
# starts only once the search that writes its config_file has finished. A finished task is marked
# OUT/queue/<task>.done; a failed one OUT/queue/<task>.failed (its log says why;
# delete the mark to retry). The report is written last, from every finished run.
#   OUT=runs/converged bash benchmarks/converged.sh
#   OUT=runs/converged setsid bash benchmarks/converged.sh &   # (setsid: --stop can reach every process)
#   OUT=runs/converged bash benchmarks/converged.sh --status   # each task's state, nothing started
#   OUT=runs/converged bash benchmarks/converged.sh --stop     # SIGTERM: each training saves its state, then ends
#   OUT=runs/converged bash benchmarks/converged.sh --save [--checkpoints]   # records to commit; with the
#                                            # unfinished runs' checkpoints a few times a session (not every hour)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/converged}
BEAUTY=${BEAUTY:-../shared/data/amazon2014-beauty_seqrecbench}
TRIALS=${TRIALS:-4}
WORKERS=${WORKERS:-2}
SUITE=benchmarks/suites/converged.yaml
SUITE_EXCLUDE=benchmarks/suites/converged-exclude.yaml
# Records of the search's finished trials (config.yaml, metrics.json, train.log; with
# --checkpoints the best.pt of each search's best one), committed during each
# session: `plr tune --add-trials` adds them to the study, so a search whose machine
# (and study.db) was lost goes on, not over.
RECORDS=${RECORDS:-benchmarks/results/converged-tuning}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT/tune" "$OUT/queue" "$OUT/ablation"  # ablation: reused by the suite (runs trained by hand; none on a new machine)
BASE=(--set model.hidden_size=64 --set model.inner_size=128 --set data.max_len=20
      --set train.batch_size=256 --set train.epochs=100 --set train.patience=5
      --set train.seed=2024 --set train.progress=false)
# "tune MODEL [--set ...]" or "final RUN ... (needs MODEL ...)": the search of
# each needed model must have written OUT/tune/<model>/best.yaml.
# PLR's search was restarted with readout rea (scoring z_rea, the vector L_NIP trains; the
# default since 2026-12-01), pinned here; its first search (Eq. 10) is kept as tune/plr-eq10.
# Order: the headline comparison (PLR against SASRec) first, then the other baselines the
# issue requires and the converged RCL ablation (plr-norcl; see below). sasrec-prefix (a control, finished) says
# whether LARES's lead is its per-prefix batches (5.4x more updates per epoch than the
# sequence-mode models). The "exclude" tasks (added 2026-12-04: the models put a history item
# first for most users, and excluding the history reorders them) run the chosen configs again
# with eval.exclude_history: true.
# Since 2026-12-07 LARES's search comes first of the open tasks: it is the critical path
# (one worker at a time, ~11 worker-hours, then LARES's Video Games final, ~8 hours), and every
# other open task fits beside it on the other worker. Then PLR without RCL (plr-norcl, both
# protocols: it led PLR with RCL and SASRec on Steam-100k's validation split with the history
# excluded, and PLR with RCL on Beauty's at M=1, T=4; it decides the headline), then the final
# runs the issue requires (ERL, PRL, LARES), then the supplement: PRL and LARES with the history
# excluded (~8 worker-hours; last since 2026-12-07, so that the required runs come first).
# The "seeds" tasks (added 2026-12-07, after plr-norcl): SASRec, ERL, PLR without and with RCL
# on Steam-100k with seeds 2025 and 2026 (~3 worker-hours): are PLR's leads there larger than a
# change of training seed?
# LARES's search pins kl_reference=eval, the rule its first trials ran with (RPT's KL to the SPT
# model in eval mode; the default since 2026-12-07 replays the rollouts' noise instead).
TASKS=(
  "tune sasrec"
  "tune plr --set model.readout=rea"
  "final sasrec (needs sasrec)"
  "final plr (needs plr)"
  "tune erl"
  "tune prl"
  "exclude sasrec plr (needs sasrec plr)"
  "tune lares --set model.kl_reference=eval"
  "exclude plr-norcl (needs plr)"
  "final plr-norcl (needs plr)"
  "seeds 2025 sasrec plr-norcl erl plr (needs sasrec erl plr)"
  "seeds 2026 sasrec plr-norcl erl plr (needs sasrec erl plr)"
  "final erl (needs erl)"
  "final prl (needs prl)"
  "final lares (needs lares)"
  "final sasrec-prefix (needs sasrec)"
  "exclude erl prl (needs erl prl)"
  "exclude lares (needs lares)"
)
key() { echo "$1" | sed 's/ (needs.*//; s/ --set .*//; s/ /-/g'; }
ready() {
  local needs=${1#*(needs }
  [[ $needs == "$1" ]] && return 0
  for m in ${needs%)}; do [[ -f $OUT/tune/$m/best.yaml ]] || return 1; done
}
run_task() {
  local task=${1% (needs*}
  echo "$(date -u +%FT%TZ) worker $2: $task"
  set -- $task
  local kind=$1 model=$2; shift
  if [[ $kind == tune ]]; then
    shift
    # The committed records of its finished trials count (a new machine has lost study.db).
    local records=()
    [[ -d $RECORDS/$model ]] && records=(--add-trials "$RECORDS/$model")
    plr tune --model "$model" --data "$BEAUTY" --space "benchmarks/spaces/$model.yaml" --trials "$TRIALS" \
      --out "$OUT/tune/$model" "${BASE[@]}" "$@" "${records[@]}"
  elif [[ $kind == exclude ]]; then
    plr benchmark "$SUITE_EXCLUDE" --out "$OUT/exclude" --only "$@" --skip-busy
  elif [[ $kind == seeds ]]; then
    local seed=$1; shift
    plr benchmark "benchmarks/suites/converged-seed$seed.yaml" --out "$OUT/seeds/$seed" --only "$@" --skip-busy
  else
    plr benchmark "$SUITE" --out "$OUT/final" --only "$@" --skip-busy
  fi
}
worker() {
  while :; do
    local left=0 did=0
    for task in "${TASKS[@]}"; do
      local k; k=$(key "$task")
      [[ -e $OUT/queue/$k.done || -e $OUT/queue/$k.failed ]] && continue
      left=1
      ready "$task" || continue
      if [[ $task == final* || $task == exclude* || $task == seeds* ]]; then
        # Shared: every worker takes the next run of it that no other is training (the run
        # directory's lock); exit 3 = the rest is being trained elsewhere: go on to the next task.
        run_task "$task" "$1" >> "$OUT/queue/$k.log" 2>&1
        case $? in
          0) touch "$OUT/queue/$k.done"; did=1 ;;
          3) continue ;;
          130) echo "$(date -u +%FT%TZ) worker $1: $task stopped (state saved)"; return ;;
          *) echo "$(date -u +%FT%TZ) worker $1: $task failed (see $OUT/queue/$k.log)"; touch "$OUT/queue/$k.failed"
             did=1 ;;
        esac
        break
      fi
      exec {fd}>"$OUT/queue/$k.lock"
      if flock -n "$fd"; then
        run_task "$task" "$1" >> "$OUT/queue/$k.log" 2>&1
        case $? in
          0) touch "$OUT/queue/$k.done" ;;
          130) echo "$(date -u +%FT%TZ) worker $1: $task stopped (state saved)"; exec {fd}>&-; return ;;
          *) echo "$(date -u +%FT%TZ) worker $1: $task failed (see $OUT/queue/$k.log)"; touch "$OUT/queue/$k.failed" ;;
        esac
        did=1
      fi
      exec {fd}>&-
      [[ $did == 1 ]] && break  # back to the top: the first ready task has priority
    done
    [[ $left == 0 ]] && return
    [[ $did == 0 ]] && sleep 60  # every open task runs elsewhere or waits for a search
  done
}
if [[ ${1:-} == --save ]]; then  # commit-ready records of OUT (benchmarks/converged_records.py)
  exec python benchmarks/converged_records.py save "$OUT" benchmarks/results "${@:2}"  # [--checkpoints]
fi
held() { [[ -e $1/.lock ]] && ! flock -n "$1/.lock" true; }  # a run directory being trained now
progress() {  # the last finished epoch of a run directory's train.log (LARES: of its latest phase, spt or rpt)
  local line log=$1/train.log phase=""
  for p in spt rpt; do [[ -f $1/$p/train.log ]] && log=$1/$p/train.log && phase=" $p"; done
  line=$(grep -E ' epoch [0-9]+: .*valid ' "$log" 2>/dev/null | tail -n 1)
  [[ -n $line ]] && sed -E "s/.* epoch ([0-9]+): .*valid ([^=]+)=([0-9.]+).*/:$phase epoch \\1 done, valid \\2 \\3/" <<< "$line"
}
busy_runs() {  # the runs of a final task being trained now (their directory's lock is held)
  busy=""
  local names=${1% (needs*} dir=final
  [[ $names == exclude* ]] && dir=exclude
  if [[ $names == seeds* ]]; then names=${names#* }; dir=seeds/${names%% *}; fi
  for r in ${names#* }; do
    for d in "$OUT"/$dir/*/"$r"; do
      held "$d" && busy+="${busy:+, }$r on $(basename "$(dirname "$d")")$(progress "$d")"
    done
  done
  [[ -n $busy ]]
}
if [[ ${1:-} == --stop ]]; then  # stop the driver started on OUT: every training saves its state first
  pid=$(cat "$OUT/driver.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null || { echo "no driver running on $OUT"; exit 0; }
  pgid=$(ps -o pgid= -p "$pid" | tr -d ' ')
  [[ $pgid == "$(ps -o pgid= -p $$ | tr -d ' ')" ]] && { echo "the driver shares this shell's process group: kill it by hand" >&2; exit 1; }
  kill -TERM -- "-$pgid"  # the bash workers end; each plr (stop_on_sigterm) saves last.pt and exits 130
  alive() { ps -eo pgid=,stat= | awk -v g="$pgid" '$1 == g && $2 !~ /^Z/ {n++} END {exit !n}'; }  # zombies: ended
  while alive; do sleep 1; done
  echo "$(date -u +%FT%TZ) stopped by --stop" >> "$OUT/driver.log"; exit 0
fi
if [[ ${1:-} == --status ]]; then
  for task in "${TASKS[@]}"; do
    k=$(key "$task")
    if [[ -e $OUT/queue/$k.done ]]; then state=done
    elif [[ -e $OUT/queue/$k.failed ]]; then state="failed (see $OUT/queue/$k.log)"
    elif [[ -e $OUT/queue/$k.lock ]] && ! flock -n "$OUT/queue/$k.lock" true; then
      state=running
      for d in "$OUT/tune/$(awk '{print $2}' <<< "$task")"/trials/*/; do
        held "${d%/}" && state+=" (trial $(basename "$d")$(progress "${d%/}"))"
      done
    elif [[ $task == final* || $task == exclude* || $task == seeds* ]] && busy_runs "$task"; then state="running ($busy)"
    elif ready "$task"; then state="queued (for a free worker)"
    else state="waiting for its search"; fi
    printf '%-36s %s\n' "${task% (needs*}" "$state"
  done
  exit 0
fi
echo $$ > "$OUT/driver.pid"  # for --stop (start the driver with setsid: its own process group)
# A new machine: the final runs recorded by an earlier one come back (finished: skipped; unfinished: resumed).
python benchmarks/converged_records.py restore benchmarks/results "$OUT" || exit 1
pids=()
for w in $(seq 1 "$WORKERS"); do worker "$w" & pids+=($!); done
wait "${pids[@]}"
plr benchmark "$SUITE" --out "$OUT/final" --report
plr benchmark "$SUITE_EXCLUDE" --out "$OUT/exclude" --report
