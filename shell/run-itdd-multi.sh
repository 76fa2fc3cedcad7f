#!/usr/bin/env bash
# CRAS on the 4 ITDD classes (MVTec layout), multi-class setting (one model for all classes, 100 epochs, batch 32),
# release configuration (CRAS_SPEC 1.3).  DATAPATH=/data/itdd bash shell/run-itdd-multi.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_cras itdd multi cotton_fabric dyed_fabric hemp_fabric plaid_fabric
