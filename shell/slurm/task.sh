#!/usr/bin/env bash
# Run line SLURM_ARRAY_TASK_ID (0-based) of a sweep table (shell/slurm/make_table.sh) with the release's
# configuration of its method, into the shared results folder RESULTS (PANDA: train the line's (class, defect),
# then generate its pairs; LDM must name the LDM folder).
#   TABLE=sweep.tsv RESULTS=/scratch/results SLURM_ARRAY_TASK_ID=3 bash shell/slurm/task.sh
# Environment: TABLE (required), SLURM_ARRAY_TASK_ID (required), RESULTS (default results/ in the repository),
# GPU (default 0), TEST (ckpt), EPOCHS (default: the release's), LDM, PANDA_STEPS, PANDA_PAIRS (PANDA). SIGTERM/SIGINT are passed on to main.py, which
# saves the training state and exits with 143/130; under SLURM the task is then requeued (scontrol requeue), and
# the requeued task resumes where it stopped. Any other exit code is passed on.
set -euo pipefail
: "${TABLE:?set TABLE to a sweep table made by shell/slurm/make_table.sh}"
: "${SLURM_ARRAY_TASK_ID:?set SLURM_ARRAY_TASK_ID (0-based line of TABLE)}"
[[ -f "$TABLE" ]] || { echo "task.sh: no table at $TABLE" >&2; exit 2; }
line="$(awk -v n="$SLURM_ARRAY_TASK_ID" 'NF && $0 !~ /^#/ { if (i++ == n) { print; exit } }' "$TABLE")"
[[ -n "$line" ]] || { echo "task.sh: $TABLE has no line $SLURM_ARRAY_TASK_ID" >&2; exit 2; }
IFS=$'\t' read -r method setting dataset datapath seed classes extra <<< "$line"
DATAPATH="$datapath"
read -r -a EXTRA_ARGS <<< "--seed $seed ${extra:-}"
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
IFS=',' read -r -a class_list <<< "$classes"
echo "task $SLURM_ARRAY_TASK_ID: $method $setting $dataset seed $seed: $classes" >&2

forward() {  # forward SIGNAL: pass it on to the running child, or keep it for the next one
  if [[ -n "$child" ]]; then kill -"$1" "$child" 2>/dev/null || true; else pending="$1"; fi
}
child="" pending=""
trap 'forward TERM' TERM  # set before any child starts: a signal that comes while one starts is not lost
trap 'forward INT' INT
run_forwarding() {  # run CMD, passing SIGTERM/SIGINT on to it; sets rc to its exit code
  if [[ -n "$pending" ]]; then  # stopped before it started (e.g. between PANDA's train and generate)
    rc=$((128 + $(kill -l "$pending")))
    return
  fi
  "${CMD[@]}" &
  child=$!
  [[ -z "$pending" ]] || kill -"$pending" "$child" 2>/dev/null || true  # came between the start and child=$!
  rc=0
  while true; do  # wait returns early when a trapped signal arrives: wait again for the exit code
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  child=""
}

case "$method" in
  pbas) release_cmd "$dataset" "${class_list[@]}"; run_forwarding ;;
  cras) cras_cmd "$dataset" "$setting" "${class_list[@]}"; run_forwarding ;;
  synth) synth_cmd "$dataset" "${class_list[@]}"; run_forwarding ;;
  segment) segment_cmd "$dataset" "$setting" "${class_list[@]}"; run_forwarding ;;
  panda) panda_cmd train "$dataset" "${classes%%:*}" "${classes#*:}"; run_forwarding
         if [[ $rc -eq 0 ]]; then panda_cmd generate "$dataset" "${classes%%:*}" "${classes#*:}"; run_forwarding; fi ;;
  *) echo "task.sh: unknown method '$method' in line $SLURM_ARRAY_TASK_ID of $TABLE" >&2; exit 2 ;;
esac
if [[ $rc -eq 143 && -n "${SLURM_JOB_ID:-}" ]] && command -v scontrol >/dev/null; then
  echo "task $SLURM_ARRAY_TASK_ID: stopped with its training state saved; requeueing" >&2
  scontrol requeue "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID}" || true
fi
exit "$rc"
