#!/usr/bin/env bash
# Print a sweep table for shell/slurm/task.sh: one line per array task, tab-separated:
#   METHOD  SETTING  DATASET  DATAPATH  SEED  CLASSES (comma-separated)  [extra main.py options, space-separated]
# PBAS and CRAS single: one line per class and seed; CRAS multi: one line per seed (all classes, one model);
# PANDA (panda single): one line per class, defect type and seed, CLASSES = CLASS:DEFECT (MVTec AD's 15 classes:
# their 73 defect types; BTAD: ko; any other class: the anomalous folders of DATAPATH/CLASS/test/, as
# panda-train -d CLASS reads them); it writes SYNTH/panda.
# Segmentation stages (README "Segmentation"), one line per class and seed: synth perlin (the baseline synthesis
# into SYNTH/perlin), segment SOURCE (train + test on SYNTH/SOURCE, e.g. perlin or panda).
#   bash shell/slurm/make_table.sh synth perlin mvtec /data/mvtec 0 > synth.tsv   (one seed: it writes one folder)
#   bash shell/slurm/make_table.sh pbas single mvtec /data/mvtec "0 1 2" > sweep.tsv
#   bash shell/slurm/make_table.sh panda single mvtec /data/mvtec 3407 > panda.tsv
#   bash shell/slurm/make_table.sh cras multi mvtec /data/mvtec "0 1 2" >> sweep.tsv
#   bash shell/slurm/make_table.sh cras single visa /data/visa 0 "candle pcb1" "--precision bf16" >> sweep.tsv
# Arguments: METHOD SETTING DATASET DATAPATH SEEDS [CLASSES (default: the dataset's official classes)] [EXTRA]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $# -lt 5 || $# -gt 7 ]]; then
  sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
method="$1" setting="$2" dataset="$3" datapath="$4" seeds="$5" classes="${6:-}" extra="${7:-}"
case "$method/$setting" in
  pbas/single|cras/single|cras/multi|synth/perlin|panda/single) ;;
  segment/*) [[ "$setting" =~ ^[A-Za-z0-9_.]+$ ]] || { echo "make_table.sh: segment's SETTING is a synthetic folder name under SYNTH (perlin, panda), got '$setting'" >&2; exit 2; } ;;
  *) echo "make_table.sh: METHOD/SETTING must be pbas/single, cras/single, cras/multi, synth/perlin, panda/single or segment/SOURCE, got $method/$setting" >&2; exit 2 ;;
esac
if [[ -z "$classes" ]]; then
  # the official class lists of datasets/base.py, read without importing the package (no torch start-up)
  classes="$(python3 - "$REPO/datasets/base.py" "$dataset" <<'PY'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
node = next(n.value for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
            and getattr(n.targets[0] if isinstance(n, ast.Assign) else n.target, "id", "") == "CLASSES")
print(" ".join(ast.literal_eval(node).get(sys.argv[2], ())))
PY
)" && [[ -n "$classes" ]] || { echo "make_table.sh: unknown dataset '$dataset' or no class list; give its classes as the 6th argument" >&2; exit 2; }
fi
datapath="$(realpath -m "$datapath")"
on_disk_defects() {  # on_disk_defects CLASS NORMAL_REGEX: the visible folders of DATAPATH/CLASS/test/ but the normal ones
  { find "$datapath/$1/test" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%f\n' 2>/dev/null || true; } \
    | { grep -viE "^($2)\$" || true; } | LC_ALL=C sort | tr '\n' ' '
}
panda_defects() {  # panda_defects CLASS: its defect types as panda-train -d CLASS reads them (panda/data.py
  # defect_types): MVTec AD's table for its 15 classes, BTAD ko, else the anomalous folders of DATAPATH/CLASS/test/
  case "$dataset" in
    mvtec) local official
      official="$(python3 - "$REPO/panda/data.py" "$1" <<'PY'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
node = next(n.value for n in tree.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "MVTEC_DEFECTS")
print(" ".join(ast.literal_eval(node).get(sys.argv[2], ())))
PY
)"
      if [[ -n "$official" ]]; then echo "$official"; else on_disk_defects "$1" good; fi ;;
    btad) echo ko ;;
    *) on_disk_defects "$1" "good|normal|ok" ;;
  esac
}
if [[ "$method" == panda ]]; then
  for seed in $seeds; do
    for c in $classes; do
      defects="$(panda_defects "$c")"
      if [[ -z "${defects// /}" ]]; then
        [[ "$dataset" == mvtec ]] && what="class '$c' is not one of MVTec AD's 15 classes, and " || what=""
        echo "make_table.sh: ${what}$datapath/$c/test/ has no defect folder (DEFECT/ beside good/) to read the defect types of class '$c' from" >&2
        exit 2
      fi
      for d in $defects; do
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$method" "$setting" "$dataset" "$datapath" "$seed" "$c:$d" "$extra"
      done
    done
  done
  exit 0
fi
for seed in $seeds; do
  if [[ "$setting" == multi ]]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$method" "$setting" "$dataset" "$datapath" "$seed" "$(tr ' ' ',' <<< "$classes")" "$extra"
  else
    for c in $classes; do
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$method" "$setting" "$dataset" "$datapath" "$seed" "$c" "$extra"
    done
  fi
done
