#!/usr/bin/env bash
# Segmentation trained on synthetic anomalies, tested on the real ones, for every MVTec AD class (docs/segmentation.md).
#   DATAPATH=/data/mvtec bash shell/run-segment-mvtec.sh                  # the Perlin baseline: synthesise, then segment
#   SOURCE=panda DATAPATH=/data/mvtec bash shell/run-segment-mvtec.sh     # segment on SYNTH/panda (panda-generate's output)
# SOURCE: a folder under SYNTH (default perlin: written first by synth-baseline). See shell/common.sh for SYNTH,
# SPLIT, STEPS, ENCODER, ARCH, COUNT, GPU, RESULTS, TEST. Extra arguments go to main.py before the subcommands.
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CLASSES=(carpet grid leather tile wood bottle cable capsule hazelnut metal_nut pill screw toothbrush transistor zipper)
if [[ "${SOURCE:-perlin}" == perlin ]]; then run_synth mvtec "${CLASSES[@]}"; fi
run_segment mvtec "${SOURCE:-perlin}" "${CLASSES[@]}"
