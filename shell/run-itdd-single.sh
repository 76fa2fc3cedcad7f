#!/usr/bin/env bash
# CRAS on the 4 ITDD classes (MVTec layout), single-class setting (one model per class, 640 epochs, batch 8),
# release configuration (CRAS_SPEC 1.3).  DATAPATH=/data/itdd bash shell/run-itdd-single.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_cras itdd single cotton_fabric dyed_fabric hemp_fabric plaid_fabric
