#!/usr/bin/env bash
# CRAS on the 12 VisA classes (split_csv/1cls.csv or the MVTec-layout conversion), single-class setting (one model per class, 640 epochs, batch 8),
# release configuration (CRAS_SPEC 1.3).  DATAPATH=/data/visa bash shell/run-visa-single.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_cras visa single candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum
