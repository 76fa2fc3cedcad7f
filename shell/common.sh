# Shared by the run-*.sh scripts: resolve paths, then run main.py from the repository root
# with the release's configuration: run_release (PBAS, PBAS_SPEC section 8), run_cras (CRAS, CRAS_SPEC 1.3),
# run_panda (PANDA, public defaults: PANDA_SPEC sections 3-4).
#   DATAPATH   dataset root (required)
#   TEST       ckpt (train, then test; default) or test (evaluate saved checkpoints only)
#   GPU        GPU id (default 0; the CPU is used when CUDA is unavailable)
#   RESULTS    results folder (default: results/ in the repository)
#   EPOCHS     training epochs (default: PBAS 640; CRAS 100 multi, 640 single, as the releases)
#   LDM        PANDA only: the LDM folder (diffusers layout of CompVis/ldm-text2im-large-256; required)
#   PANDA_STEPS  PANDA: training steps per (class, defect) (default 80000); PANDA_PAIRS: pairs generated (2000);
#              the pairs go to SYNTH/panda (below), the anomaly split is SPLIT's (default third)
# Extra arguments to the script are passed to main.py before the subcommands (e.g. --precision bf16).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${DATAPATH:?set DATAPATH to the dataset root, e.g. DATAPATH=/data/mvtec bash shell/run-mvtec.sh}"
DATAPATH="$(realpath -m "$DATAPATH")"
RESULTS="$(realpath -m "${RESULTS:-$REPO/results}")"
cd "$REPO"

# The releases' scripts pass --seed 0; an explicit --seed in EXTRA_ARGS replaces it (main.py's --seed is
# repeatable: given both, it would run both seeds).
seed_args() {
  SEED_ARGS=(--seed 0)
  local arg
  for arg in "${EXTRA_ARGS[@]}"; do
    if [ "$arg" = --seed ]; then SEED_ARGS=(); fi
  done
}

# release_cmd / cras_cmd set CMD to the command line (an array); run_release / run_cras run it.
release_cmd() {  # release_cmd DATASET CLASS...   (PBAS release, PBAS_SPEC section 8)
  local dataset="$1"; shift
  local classes=()
  for c in "$@"; do classes+=(-d "$c"); done
  seed_args
  CMD=(python3 main.py --gpu "${GPU:-0}" "${SEED_ARGS[@]}" --test "${TEST:-ckpt}" --results_path "$RESULTS" "${EXTRA_ARGS[@]}"
    net -b wideresnet50 -le layer2 -le layer3 --pretrain_embed_dimension 1536
        --target_embed_dimension 1536 --patchsize 3 --meta_epochs "${EPOCHS:-640}" --eval_epochs 1
        --dsc_layers 2 --dsc_hidden 1024 --pre_proj 1 --k 0.25
    dataset --batch_size 8 --resize 288 --imagesize 288 "${classes[@]}" "$dataset" "$DATAPATH")
}

cras_cmd() {  # cras_cmd DATASET multi|single CLASS...   (CRAS release: multi bs 32 / 100 epochs, single bs 8 / 640)
  local dataset="$1" setting="$2"; shift 2
  local epochs batch
  case "$setting" in
    multi) epochs=100; batch=32 ;;
    single) epochs=640; batch=8 ;;
    *) echo "cras_cmd: setting must be multi or single, got '$setting'" >&2; return 2 ;;
  esac
  local classes=()
  for c in "$@"; do classes+=(-d "$c"); done
  seed_args
  CMD=(python3 main.py --method cras --gpu "${GPU:-0}" "${SEED_ARGS[@]}" --test "${TEST:-ckpt}" --results_path "$RESULTS"
      "${EXTRA_ARGS[@]}"
    net -b wideresnet50 -le layer2 -le layer3 --pretrain_embed_dimension 1536 --target_embed_dimension 1536
        --patchsize 3 --meta_epochs "${EPOCHS:-$epochs}" --eval_epochs 1 --dsc_layers 3 --pre_proj 1
        --noise 0.015 --k 0.3 --limit -1
    dataset --setting "$setting" --batch_size "$batch" --resize 329 --imagesize 288 "${classes[@]}"
        "$dataset" "$DATAPATH")
}

panda_cmd() {  # panda_cmd train|generate DATASET CLASS [DEFECT]   (PANDA: one model per (class, defect))
  local what="$1" dataset="$2" class="$3" defect="${4:-}"
  : "${LDM:?set LDM to the LDM folder (diffusers layout of CompVis/ldm-text2im-large-256)}"
  local options=()
  [[ -n "$defect" ]] && options+=(--defect "$defect")
  case "$what" in
    train) options+=(--anomaly_split "${SPLIT:-third}")
           [[ -n "${PANDA_STEPS:-}" ]] && options+=(--steps "$PANDA_STEPS") ;;
    generate) options+=(--output "$SYNTH/panda")
              [[ -n "${PANDA_PAIRS:-}" ]] && options+=(--pairs "$PANDA_PAIRS") ;;
    *) echo "panda_cmd: train or generate, got '$what'" >&2; return 2 ;;
  esac
  CMD=(python3 main.py --gpu "${GPU:-0}" --results_path "$RESULTS" "${EXTRA_ARGS[@]}"
    "panda-$what" --dataset "$dataset" --ldm "$(realpath -m "$LDM")" -d "$class" "${options[@]}" "$DATAPATH")
}

run_panda() {  # run_panda DATASET CLASS...: per class, train every defect type, then generate its pairs
  local dataset="$1"; shift
  for c in "$@"; do
    panda_cmd train "$dataset" "$c" && "${CMD[@]}"
    panda_cmd generate "$dataset" "$c" && "${CMD[@]}"
  done
}

run_release() { release_cmd "$@" && "${CMD[@]}"; }  # run_release DATASET CLASS...
run_cras() { cras_cmd "$@" && "${CMD[@]}"; }  # run_cras DATASET multi|single CLASS...

# Segmentation trained on synthetic anomalies (docs/segmentation.md): synth_cmd writes the Perlin baseline to
# SYNTH/perlin; segment_cmd trains and tests the segmenter on SYNTH/SOURCE (perlin, or panda as written by
# panda-generate). SYNTH defaults to RESULTS/synthetic; SPLIT (--anomaly_split, default third), STEPS (4000),
# ENCODER (resnet34: its torchvision file must be in $TORCH_HOME/hub/checkpoints), ARCH (unet), COUNT (500).
# Seed: main.py's default 0, or --seed N among the extra arguments (one --seed for synth-baseline).
SYNTH="$(realpath -m "${SYNTH:-$RESULTS/synthetic}")"
synth_cmd() {  # synth_cmd DATASET CLASS...
  local dataset="$1"; shift
  local classes=()
  for c in "$@"; do classes+=(-d "$c"); done
  CMD=(python3 main.py --gpu "${GPU:-0}" "${EXTRA_ARGS[@]}"
    synth-baseline "$dataset" "$DATAPATH" "${classes[@]}" --output "$SYNTH/perlin" --count "${COUNT:-500}")
}

segment_cmd() {  # segment_cmd DATASET SOURCE CLASS...
  local dataset="$1" source="$2"; shift 2
  local classes=()
  for c in "$@"; do classes+=(-d "$c"); done
  CMD=(python3 main.py --gpu "${GPU:-0}" --test "${TEST:-ckpt}" --results_path "$RESULTS" "${EXTRA_ARGS[@]}"
    segment "$dataset" "$DATAPATH" "${classes[@]}" --synthetic "$SYNTH/$source" --anomaly_split "${SPLIT:-third}"
      --arch "${ARCH:-unet}" --encoder "${ENCODER:-resnet34}" --steps "${STEPS:-4000}")
}

run_synth() { synth_cmd "$@" && "${CMD[@]}"; }  # run_synth DATASET CLASS...
run_segment() { segment_cmd "$@" && "${CMD[@]}"; }  # run_segment DATASET SOURCE CLASS...
