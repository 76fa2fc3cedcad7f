#!/usr/bin/env bash
# CRAS on the 15 MVTec AD classes, multi-class setting (one model for all classes, 100 epochs, batch 32),
# release configuration (CRAS_SPEC 1.3).  DATAPATH=/data/mvtec bash shell/run-mvtec-multi.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_cras mvtec multi carpet grid leather tile wood bottle cable capsule hazelnut metal_nut pill screw toothbrush transistor zipper
