#!/usr/bin/env bash
# PANDA on MVTec AD with the public code's settings: one model per (class, defect), all 73 defect types (pill's
# seven included; the public script has 67), 80 000 steps each, then 2000 image + mask pairs per defect type
# into SYNTH/panda (default RESULTS/synthetic/panda).  Rerun it after a stop: finished models are skipped, a stopped
# one resumes, generation continues where it stopped.
#   DATAPATH=/data/mvtec LDM=/models/ldm-text2im-large-256 bash shell/run-panda-mvtec.sh [--precision bf16]
EXTRA_ARGS=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_panda mvtec bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper
