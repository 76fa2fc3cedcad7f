#!/usr/bin/env bash
# PBAS on the 6 MPDD classes.  DATAPATH=/data/mpdd bash shell/run-mpdd.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_release mpdd bracket_black bracket_brown bracket_white connector metal_plate tubes
