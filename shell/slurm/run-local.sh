#!/usr/bin/env bash
# Run a sweep table on this machine, task after task (the same task.sh as under SLURM). Rerun it after an
# interruption: finished tasks are only tested again, unfinished ones resume.
#   RESULTS=/data/results bash shell/slurm/run-local.sh sweep.tsv
# Stops at the first task that is interrupted (exit 130/143); a failed task (exit 1/2) is reported and the
# others still run; the exit code is the first non-zero one.
set -uo pipefail
[[ $# -eq 1 ]] || { sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
export TABLE="$(realpath "$1")"
n="$(awk 'NF && $0 !~ /^#/' "$TABLE" | wc -l)"
status=0
for ((i = 0; i < n; i++)); do
  SLURM_ARRAY_TASK_ID=$i bash "$(dirname "${BASH_SOURCE[0]}")/task.sh"
  rc=$?
  if [[ $rc -eq 130 || $rc -eq 143 ]]; then exit "$rc"; fi
  if [[ $rc -ne 0 ]]; then echo "run-local.sh: task $i exited with $rc" >&2; [[ $status -eq 0 ]] && status=$rc; fi
done
exit "$status"
