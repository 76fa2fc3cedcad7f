#!/usr/bin/env bash
# The whole pipeline for one class in one command: train PANDA per defect type -> generate its pairs into
# SYNTH/panda -> train the segmenter on them -> test it on the real test images left by the anomaly split; then
# the same segmenter protocol on the Perlin baseline (SYNTH/perlin) for comparison (BASELINE=0 skips it).
#   DATAPATH=/data/mvtec LDM=/models/ldm-text2im-large-256 bash shell/run-panda-segment.sh mvtec carpet [--precision bf16]
#   DATAPATH=/data/BTech_Dataset_transformed LDM=... bash shell/run-panda-segment.sh btad 01
# Results: RESULTS/results.csv and report.html (rows: method segment, settings panda:SPLIT and perlin:SPLIT).
# Environment as in shell/common.sh (RESULTS, SYNTH, SPLIT, GPU, LDM, PANDA_STEPS, PANDA_PAIRS, STEPS, ENCODER,
# ARCH, COUNT, TEST). Extra arguments go to every main.py call before its subcommand. Rerun it after a stop:
# every stage resumes or skips what is finished.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
DATASET="$1" CLASS="$2"
EXTRA_ARGS=("${@:3}")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_panda "$DATASET" "$CLASS"
run_segment "$DATASET" panda "$CLASS"
if [[ "${BASELINE:-1}" != 0 ]]; then
  run_synth "$DATASET" "$CLASS"
  run_segment "$DATASET" perlin "$CLASS"
fi
echo "results: $RESULTS/results.csv, report: $RESULTS/report.html" >&2
