#!/usr/bin/env bash
# CRAS on the 12 VisA classes (split_csv/1cls.csv or the MVTec-layout conversion), multi-class setting (one model for all classes, 100 epochs, batch 32),
# release configuration (CRAS_SPEC 1.3).  DATAPATH=/data/visa bash shell/run-visa-multi.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_cras visa multi candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum
