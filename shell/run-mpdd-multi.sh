#!/usr/bin/env bash
# CRAS on the 6 MPDD classes, multi-class setting (one model for all classes, 100 epochs, batch 32),
# release configuration (CRAS_SPEC 1.3).  DATAPATH=/data/mpdd bash shell/run-mpdd-multi.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_cras mpdd multi bracket_black bracket_brown bracket_white connector metal_plate tubes
