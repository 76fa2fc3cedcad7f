#!/usr/bin/env bash
# CRAS on the 15 MVTec AD classes, single-class setting (one model per class, 640 epochs, batch 8),
# release configuration (CRAS_SPEC 1.3).  DATAPATH=/data/mvtec bash shell/run-mvtec-single.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_cras mvtec single carpet grid leather tile wood bottle cable capsule hazelnut metal_nut pill screw toothbrush transistor zipper
