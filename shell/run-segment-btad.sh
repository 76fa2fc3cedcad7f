#!/usr/bin/env bash
# Segmentation trained on synthetic anomalies, tested on the real ones, for every BTAD class (docs/segmentation.md).
#   DATAPATH=/data/btad bash shell/run-segment-btad.sh                  # the Perlin baseline: synthesise, then segment
#   SOURCE=panda DATAPATH=/data/btad bash shell/run-segment-btad.sh     # segment on SYNTH/panda (panda-generate's output)
# SOURCE: a folder under SYNTH (default perlin: written first by synth-baseline). See shell/common.sh for SYNTH,
# SPLIT, STEPS, ENCODER, ARCH, COUNT, GPU, RESULTS, TEST. Extra arguments go to main.py before the subcommands.
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CLASSES=(01 02 03)
if [[ "${SOURCE:-perlin}" == perlin ]]; then run_synth btad "${CLASSES[@]}"; fi
run_segment btad "${SOURCE:-perlin}" "${CLASSES[@]}"
