#!/usr/bin/env bash
# Submit a sweep table as a SLURM job array: one task per line, at most P running at once (default 4).
#   bash shell/slurm/submit.sh sweep.tsv /scratch/results [P] [extra sbatch options, e.g. --partition=gpu]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[[ $# -ge 2 ]] || { sed -n '2,3p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
table="$(realpath "$1")" results="$(realpath -m "$2")" parallel="${3:-4}"
shift $(( $# >= 3 ? 3 : 2 ))
n="$(awk 'NF && $0 !~ /^#/' "$table" | wc -l)"
[[ "$n" -gt 0 ]] || { echo "submit.sh: $table has no tasks" >&2; exit 2; }
mkdir -p "$results"
sbatch --array="0-$((n - 1))%$parallel" --chdir="$results" \
  --export="ALL,TABLE=$table,RESULTS=$results,SWEEP_REPO=$REPO" "$@" "$REPO/shell/slurm/sweep.sbatch"
