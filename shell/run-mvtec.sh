#!/usr/bin/env bash
# PBAS on the 15 MVTec AD classes, released configuration.  DATAPATH=/data/mvtec bash shell/run-mvtec.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_release mvtec carpet grid leather tile wood bottle cable capsule hazelnut metal_nut pill screw toothbrush transistor zipper
