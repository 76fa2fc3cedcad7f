#!/usr/bin/env bash
# PANDA on BTAD with the public code's settings: one model per class (its defect type ko), 80 000 steps each,
# then 2000 image + mask pairs per class into SYNTH/panda (default RESULTS/synthetic/panda).  Rerun it after a stop.
#   DATAPATH=/data/BTech_Dataset_transformed LDM=/models/ldm-text2im-large-256 bash shell/run-panda-btad.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_panda btad 01 02 03
