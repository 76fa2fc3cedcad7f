#!/usr/bin/env bash
# CRAS on the 6 MPDD classes, single-class setting (one model per class, 640 epochs, batch 8),
# release configuration (CRAS_SPEC 1.3).  DATAPATH=/data/mpdd bash shell/run-mpdd-single.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_cras mpdd single bracket_black bracket_brown bracket_white connector metal_plate tubes
