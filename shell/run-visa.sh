#!/usr/bin/env bash
# PBAS on the 12 VisA classes (needs DATAPATH/split_csv/1cls.csv).  DATAPATH=/data/visa bash shell/run-visa.sh
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_release visa candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum
