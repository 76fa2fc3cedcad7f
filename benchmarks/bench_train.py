"""Training/evaluation speed of PBAS or CRAS, uncached vs feature-cached, on data shaped like MVTec AD carpet.

One run generates the data unless --data points to it: per class 280 train, 28 good + 89 defective test
images, 1024x1024 PNGs (``carpet``; CRAS --setting multi adds ``carpet2``, ``carpet3``, ... up to
--n_classes, each from its own seed). It builds one job as ``engine.run_job`` does (``engine.Encoder``
around ``common.Embedder``, ``engine.job_sources``: one ``TrainSet`` over the concatenated training sets
of the job's classes and one ``ClassTest`` per class) and, for each path (uncached: backbone every pass;
cached: every set embedded once), runs the engine's own ``engine.Trainer`` for --epochs epochs, timing its
phases through its ``FitHooks.timer`` (CUDA synchronised at both ends of each phase), and measures

    embedding of the sets         train + test features stored once (cached; 0 uncached: done in every pass)
    center init                   the Trainer's "center" phase: the method's centers from one pass with the untrained P
    train epoch                   the Trainer's "train" phase (mean of the measured epochs after the first, warm-up one)
    train step                    train epoch / steps per epoch
    eval / epoch                  the Trainer's "eval" phase: I-AUROC + P-AUROC of every class, as after each epoch
    loop overhead / epoch         the rest of Trainer.run per epoch (best-state snapshots, logs, stop checks)
    final eval                    ``engine.evaluate(full=True)``: AP, PRO, AUPRO, F1 threshold of every class
    normal stats                  ``engine.normal_score_statistics``: the training-image scores stored for thresholds
    peak GPU memory               from before the embedding to the end: the allocator's peak reservation
                                  (``max_memory_reserved``: its cache and fragmentation included) plus the memory
                                  outside it (CUDA context, library workspaces) measured at the end as device memory
                                  in use minus reserved, so it assumes no other process on the GPU

and projects the release protocol from the per-image rates: embedding + center init + E x (epoch + eval
+ overhead) + 2 final evaluations (run_job evaluates the best and the last state; one when they coincide) + normal stats
(not included: heatmap PNGs, scores.csv, TensorBoard events and the periodic training-state saves, which
engine.Trainer keeps under 2% of the training time). E is 640 for PBAS and CRAS --setting single (one job
per class), 100 for CRAS --setting multi (one job of every class); "protocol, this job" is the generated
job, "protocol, MVTec AD" all 15 classes (3629 train / 1725 test images: 15 jobs for PBAS / CRAS single,
one job for CRAS multi). It checks that both
paths give the same metrics after the measured epochs (same seed). Extra --precision values time the cached
path in that precision and report the metric differences from fp32. Method defaults are the method's
Config defaults (PBAS: batch 8, k 0.25, dsc_layers 2, dsc_hidden 1024; CRAS: batch 32 multi / 8 single,
k 0.3, noise 0.015, dsc_layers 3), each overridable below.

    python benchmarks/bench_train.py --random_weights                                 # PBAS, full size (GPU)
    python benchmarks/bench_train.py --random_weights --method cras --setting multi   # CRAS, 3 classes, one job
    python benchmarks/bench_train.py --random_weights --n_train 16 --n_test_good 4 --n_test_defect 8 \\
        --image_size 256 --imagesize 128 --resize 128 --epochs 2 --num_workers 0     # a quick CPU check
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backbones  # noqa: E402
import datasets  # noqa: E402
import engine  # noqa: E402
import methods  # noqa: E402
import runner  # noqa: E402
import utils  # noqa: E402
from choices import PRECISIONS  # noqa: E402
from common import Embedder, Method  # noqa: E402

MVTEC_TRAIN, MVTEC_TEST = 3629, 1725  # images in all of MVTec AD (15 classes)
PROTOCOL_EPOCHS = {("pbas", "single"): 640, ("cras", "multi"): 100, ("cras", "single"): 640}  # the releases' scripts
DEFAULT_N_CLASSES = 3  # CRAS --setting multi
DEFAULT_LAYERS = {"efficientnet_lite0": ("blocks.2", "blocks.4")}  # other backbones: the release's layer2, layer3
RELEASE_LAYERS = ("layer2", "layer3")
COMPARED = (*utils.METRIC_COLUMNS, "pixel_aupro")  # metrics that must agree between the cached and uncached path
SAME_TOLERANCE = 1e-4
PEAK_COLUMN = "peak GPU mem (reserved + context)"  # gpu_report.py reads this column
# method options: (argparse dest, type, choices, help); None means the method's Config default; options of the
# other method are rejected with methods.NOT_FOR's reason
METHOD_OPTIONS = (
    ("k", float, None, "synthesis scale (PBAS: offset fraction; CRAS: noise-scale spread)"),
    ("dsc_layers", int, None, "discriminator depth"),
    ("dsc_hidden", int, None, "PBAS: discriminator hidden width"),
    ("noise", float, None, "CRAS: std of the Gaussian residual noise"),
    ("noise_device", str, methods.NOISE_DEVICES, "CRAS: draw the noise on the CPU (release) or on the compute device"),
    ("class_vote", str, methods.CLASS_VOTES, "CRAS: test-time class bank: batch (release) or each image's own"),
    ("limit", int, None, "CRAS: end each epoch after the batch that takes the sample count above LIMIT (-1: whole epochs)"),
    ("lr", float, None, "projector learning rate (the discriminator uses 2*lr)"),
)


def class_names(n_classes: int) -> list[str]:
    """carpet, carpet2, carpet3, ..."""
    return ["carpet" if i == 0 else f"carpet{i + 1}" for i in range(n_classes)]


def make_carpet_like(root: str, n_train: int, n_good: int, n_defect: int, size: int, seed: int = 0,
                     name: str = "carpet") -> None:
    """A woven-looking texture class ROOT/NAME in MVTec layout; defects are dark blobs with masks. Fast (numpy + PIL)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size

    def texture() -> np.ndarray:
        fx, fy, phase = rng.uniform(40, 44), rng.uniform(40, 44), rng.uniform(0, 2 * np.pi, 2)
        weave = 0.5 + 0.25 * np.sin(2 * np.pi * fx * x + phase[0]) * np.sin(2 * np.pi * fy * y + phase[1])
        base = np.stack([weave * c for c in rng.uniform(0.5, 0.9, 3)], -1)
        return np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1)

    def save(img: np.ndarray, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray((img * 255).astype(np.uint8)).save(path, compress_level=1)

    for i in range(n_train):
        save(texture(), f"{root}/{name}/train/good/{i:03d}.png")
    for i in range(n_good):
        save(texture(), f"{root}/{name}/test/good/{i:03d}.png")
    for i in range(n_defect):
        img = texture()
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.04, 0.1)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        img[mask] *= 0.3
        save(img, f"{root}/{name}/test/hole/{i:03d}.png")
        save(np.repeat(mask[..., None], 3, -1).astype(np.float64), f"{root}/{name}/ground_truth/hole/{i:03d}_mask.png")


@dataclass
class PathTiming:
    name: str
    embed_s: float  # embedding train + test sets (cached) / 0 (uncached: done in every pass)
    center_s: float
    epoch_s: float
    step_s: float
    eval_s: float
    overhead_s: float  # per epoch: Trainer.run's time outside its train and eval phases
    final_eval_s: float
    normal_s: float
    peak_gib: float
    metrics: dict[str, dict]  # per class (DATASET_CLASS): the final evaluation after the measured epochs
    n_train: int
    n_test: int

    def first_epoch_s(self) -> float:
        return self.embed_s + self.center_s

    def protocol_s(self, n_train: int, n_test: int, epochs: int) -> float:
        """Release protocol scaled to n_train / n_test images from the measured per-image rates."""
        rt, re = n_train / self.n_train, n_test / self.n_test
        embed_train = self.embed_s * self.n_train / (self.n_train + self.n_test)
        embed_test = self.embed_s - embed_train
        return (embed_train * rt + embed_test * re + self.center_s * rt
                + epochs * (self.epoch_s * rt + self.eval_s * re + self.overhead_s)
                + 2 * self.final_eval_s * re + self.normal_s * rt)

    def mean(self, key: str) -> float:
        return engine.mean_over_classes(self.metrics, key)


@dataclass
class Bench:
    """What every measured path shares: the method, its configuration, the job and the backbone."""

    method: type[Method]
    config: object  # the method's Config
    job: engine.Job
    embedder: Embedder
    device: torch.device
    num_workers: int
    epochs: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def silent(iterable, **_):
    return iterable


class PhaseTimer:
    """``engine.FitHooks.timer``: the wall time of every phase of the Trainer, CUDA synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.seconds.setdefault(phase, []).append(time.perf_counter() - start)


def peak_gpu_bytes(device: torch.device) -> int:
    """The process's peak GPU memory since the last ``reset_peak_memory_stats``: the allocator's peak reservation
    plus what lies outside the allocator (CUDA context, cuBLAS/cuDNN workspaces and handles), taken now as device
    memory in use minus reserved (on an otherwise idle GPU)."""
    free, total = torch.cuda.mem_get_info(device)
    outside = max(0, total - free - torch.cuda.memory_reserved(device))
    return torch.cuda.max_memory_reserved(device) + outside


def measure(bench: Bench, cache: str, precision: str) -> PathTiming:
    """One path, built as engine.run_job builds a job (same seeding order), trained by engine.Trainer for
    ``bench.epochs`` epochs (an evaluation after each) with a PhaseTimer as its timer hook."""
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    device, seed, job = bench.device, bench.job.seed, bench.job
    cfg = dataclasses.replace(bench.config, meta_epochs=bench.epochs, eval_epochs=1)
    utils.configure_precision(precision, device)
    utils.set_seed(seed)  # before the modules are built: their initial weights come from it
    method = bench.method(cfg, len(job.classnames), precision).to(device)
    method.seed_streams(seed, device)
    encoder = engine.Encoder(bench.embedder.to(device), precision, cfg.train_backbone)
    settings = engine.RunSettings(bench.method, cfg, precision, cache, bench.num_workers)
    train, tests = engine.job_sources(job, encoder, settings, device, silent)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    embed_s, _ = timed(device, lambda: [s.prepare() for s in (train.source, *(t.source for t in tests))])
    timer = PhaseTimer(device)
    trainer = engine.Trainer(method, encoder, train, tests, engine.FitHooks(timer=timer), silent)
    trainer.start()
    run_s, fitted = timed(device, trainer.run)
    final_s, (final, _) = timed(device, lambda: engine.evaluate(method, tests, full=True))  # the last state
    normal_s, _ = timed(device, lambda: engine.normal_score_statistics(method, train, job.row_names))
    peak = peak_gpu_bytes(device) / 2**30 if device.type == "cuda" else math.nan
    epochs, evals = timer.seconds["train"], timer.seconds["eval"]
    overhead = (run_s - sum(epochs) - sum(evals)) / len(epochs)
    # the first epoch/evaluation include warm-up (cuDNN autotuning, allocator growth): drop it when we can
    steady = lambda ts: float(np.mean(ts[1:] if len(ts) > 1 else ts))
    steps = len(fitted.history[-1].steps)
    label = "uncached" if cache == "off" else f"cached ({cache})"
    return PathTiming(f"{label} {precision}", embed_s, timer.seconds["center"][0], steady(epochs), steady(epochs) / steps,
                      steady(evals), overhead, final_s, normal_s, peak, final, len(train.source),
                      sum(len(t.source) for t in tests))


def fmt_s(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def table(rows: list[PathTiming], epochs: int) -> str:
    head = ("| path | to first epoch (embed + center) | center init | train epoch | train step | eval / epoch "
            f"| loop overhead / epoch | final eval | normal stats | {PEAK_COLUMN} | protocol ({epochs} ep.), this job "
            f"| protocol ({epochs} ep.), MVTec AD | I-AUROC | P-AUROC |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        lines.append(f"| {r.name} | {fmt_s(r.first_epoch_s())} | {fmt_s(r.center_s)} | {fmt_s(r.epoch_s)} "
                     f"| {1000 * r.step_s:.1f} ms | {fmt_s(r.eval_s)} | {fmt_s(r.overhead_s)} "
                     f"| {fmt_s(r.final_eval_s)} | {fmt_s(r.normal_s)} | {'n/a' if math.isnan(r.peak_gib) else f'{r.peak_gib:.1f} GiB'} "
                     f"| {fmt_s(r.protocol_s(r.n_train, r.n_test, epochs))} | {fmt_s(r.protocol_s(MVTEC_TRAIN, MVTEC_TEST, epochs))} "
                     f"| {100 * r.mean('image_auroc'):.2f} | {100 * r.mean('pixel_auroc'):.2f} |")
    return "\n".join(lines)


def max_difference(a: dict[str, dict], b: dict[str, dict], keys) -> float:
    """Largest |a - b| over classes and keys (two NaNs agree; NaN against a number is infinitely far)."""
    worst = 0.0
    for name in a:
        for k in keys:
            x, y = a[name][k], b[name][k]
            if math.isnan(x) and math.isnan(y):
                continue
            worst = max(worst, math.inf if math.isnan(x) or math.isnan(y) else abs(x - y))
    return worst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=list(runner.METHODS), default="pbas", help="pbas (default) or cras")
    ap.add_argument("--setting", choices=list(methods.SETTINGS), default=None,
                    help="CRAS: multi (default) = one job of --n_classes classes; single = one job of one class")
    ap.add_argument("--n_classes", type=int, default=None,
                    help=f"CRAS multi: classes in the job: carpet, carpet2, ... (default {DEFAULT_N_CLASSES}); else 1")
    ap.add_argument("--classes", nargs="+", default=None,
                    help="class folder names under --data (or to generate) instead of carpet, carpet2, ...")
    ap.add_argument("--data", help="existing data root in MVTec layout with those classes (default: generate into --workdir)")
    ap.add_argument("--workdir", default="/tmp/pbas_bench", help="where generated data goes")
    ap.add_argument("--n_train", type=int, default=280, help="generated training images per class")
    ap.add_argument("--n_test_good", type=int, default=28, help="generated good test images per class")
    ap.add_argument("--n_test_defect", type=int, default=89, help="generated defective test images per class")
    ap.add_argument("--image_size", type=int, default=1024, help="side of the generated PNGs")
    ap.add_argument("--imagesize", type=int, default=288, help="center-crop size fed to the network")
    ap.add_argument("--resize", type=int, default=None,
                    help=f"shorter side before the crop (default: the release's, pbas {methods.RESIZE_DEFAULTS['pbas']}, "
                         f"cras {methods.RESIZE_DEFAULTS['cras']})")
    ap.add_argument("--batch_size", type=int, default=None,
                    help=f"default: the method's (pbas {runner.METHODS['pbas'].Config.batch_size}; cras "
                         f"{runner.METHODS['cras'].Config.batch_size} multi, {methods.CRAS_SINGLE_BATCH_SIZE} single)")
    for dest, kind, choices, text in METHOD_OPTIONS:
        ap.add_argument(f"--{dest}", type=kind, choices=choices, default=None, help=f"{text} (default: the method's)")
    ap.add_argument("--num_workers", type=int, default=8, help="data-loading worker processes")
    ap.add_argument("--epochs", type=int, default=3, help="epochs measured per path (the first is warm-up when > 1)")
    ap.add_argument("--protocol_epochs", type=int, default=None,
                    help="epochs of the projected protocol (default: pbas 640; cras 100 multi, 640 single)")
    ap.add_argument("--backbone", default="wideresnet50", choices=list(backbones.BACKBONES))
    ap.add_argument("--layers", nargs="+", default=None,
                    help="layers (default: blocks.2 blocks.4 for efficientnet_lite0, else layer2 layer3)")
    ap.add_argument("--random_weights", action="store_true", help="random-initialised backbone (timing only)")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=list(PRECISIONS),
                    help="precisions for the cached path (fp32 first: the others are compared with it)")
    ap.add_argument("--cache", choices=("device", "host"), default="device",
                    help="feature cache of the cached path: device memory, or host memory staged to the GPU")
    ap.add_argument("--skip_uncached", action="store_true")
    ap.add_argument("--gpu", type=int, default=0, help="GPU id; the CPU when CUDA is unavailable or the id is negative")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", help="also write the markdown table to this file")
    args = ap.parse_args(argv)

    if args.method == "pbas" and args.setting is not None:
        ap.error("--setting is CRAS's (PBAS trains one model per class)")
    args.setting = args.setting or ("multi" if args.method == "cras" else "single")
    for option, _, _, _ in METHOD_OPTIONS:
        if getattr(args, option) is not None and option in methods.NOT_FOR[args.method]:
            ap.error(f"--{option} is not used by {args.method.upper()}: {methods.NOT_FOR[args.method][option]}")
    if args.classes is not None:
        if args.n_classes is not None and args.n_classes != len(args.classes):
            ap.error(f"--n_classes {args.n_classes} but {len(args.classes)} --classes")
        args.n_classes = len(args.classes)
    multi = args.method == "cras" and args.setting == "multi"
    if args.n_classes is None:
        args.n_classes = DEFAULT_N_CLASSES if multi else 1
    if args.n_classes < 1 or (args.n_classes > 1 and not multi):
        ap.error("--n_classes / --classes: one class (a job of PBAS or CRAS --setting single is one class); "
                 "several only with --method cras --setting multi")
    args.classes = args.classes or class_names(args.n_classes)
    for name in ("n_train", "n_test_good", "n_test_defect", "image_size", "imagesize", "epochs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.num_workers < 0:
        ap.error("--num_workers must be non-negative")
    args.resize = args.resize or methods.RESIZE_DEFAULTS[args.method]
    args.protocol_epochs = args.protocol_epochs or PROTOCOL_EPOCHS[(args.method, args.setting)]
    return args


def method_config(args: argparse.Namespace, method: type[Method]):
    """The method's Config defaults (CRAS single: batch 8), with the options given on the command line."""
    defaults = method.Config()
    batch = args.batch_size or (methods.CRAS_SINGLE_BATCH_SIZE if args.method == "cras" and args.setting == "single"
                                else defaults.batch_size)
    values = {dest: getattr(args, dest) for dest, _, _, _ in METHOD_OPTIONS if getattr(args, dest) is not None}
    layers = tuple(args.layers or DEFAULT_LAYERS.get(args.backbone, RELEASE_LAYERS))
    return method.Config(backbone=args.backbone, layers=layers, imagesize=args.imagesize, batch_size=batch,
                         meta_epochs=args.protocol_epochs, **values)


def build_job(args: argparse.Namespace, method: type[Method], root: str) -> engine.Job:
    """The benchmark's job as runner.prepare_jobs builds it: mvtec_dataset (CRAS multi) or mvtec_CLASS."""
    trains, tests = [], []
    for classname in args.classes:
        train, test = datasets.build_datasets("mvtec", root, classname, args.resize, args.imagesize,
                                              class_resize_rule=method.class_resize_rule)
        trains.append(train)
        tests.append(test)
    name = "mvtec_dataset" if args.setting == "multi" else f"mvtec_{args.classes[0]}"
    folder = os.path.join(args.workdir, "unused", name)  # nothing is written: the benchmark calls no checkpointing
    return engine.Job(name=name, dataset="mvtec", classnames=list(args.classes), trains=trains, tests=tests,
                      seed=args.seed, config={}, folder=folder, log_path=os.path.join(folder, "log.csv"),
                      requested=list(args.classes))


def main_cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    method = runner.METHODS[args.method]
    config = method_config(args, method)
    device = utils.select_device(args.gpu)
    counts = f"{args.n_train}_{args.n_test_good}_{args.n_test_defect}_{args.image_size}"
    root = args.data or os.path.join(args.workdir, f"carpet_{counts}")
    if not args.data:
        for i, classname in enumerate(args.classes):
            if not os.path.isdir(os.path.join(root, classname)):
                t, _ = timed(device, lambda: make_carpet_like(root, args.n_train, args.n_test_good, args.n_test_defect,
                                                              args.image_size, seed=i, name=classname))
                print(f"generated {root}/{classname} in {t:.1f} s", file=sys.stderr)
    job = build_job(args, method, root)
    utils.set_seed(args.seed)  # the random backbone weights (--random_weights) are the same run to run
    _, stages = backbones.load_backbone(args.backbone, pretrained=not args.random_weights)
    backbones.check_layers(args.backbone, config.layers, stages)
    embedder = Embedder(stages, config.layers, config.patchsize, config.pretrain_embed_dimension,
                        config.target_embed_dimension)
    bench = Bench(method, config, job, embedder, device, args.num_workers, args.epochs)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    n_train, n_test = sum(len(d) for d in job.trains), sum(len(d) for d in job.tests)
    setting = f", setting {args.setting}" if args.method == "cras" else ""
    describe = (f"{args.method.upper()}{setting}, job {job.name} ({len(job.classnames)} class(es): {', '.join(job.classnames)}); "
                f"{n_train} train / {n_test} test images of {args.image_size} px -> resize {args.resize}, crop {args.imagesize}; "
                f"batch {config.batch_size}; backbone {args.backbone}{' (random weights)' if args.random_weights else ''}; "
                f"{args.epochs} epochs per path; protocol {args.protocol_epochs} epochs")
    print(f"device: {name}; {describe}", file=sys.stderr)

    rows = []
    if not args.skip_uncached:
        rows.append(measure(bench, "off", "fp32"))
    for precision in args.precision:
        rows.append(measure(bench, args.cache, precision))
    report = [f"device: {name}, torch {torch.__version__}", describe, "", table(rows, args.protocol_epochs), ""]
    cached = next((r for r in rows if r.name == f"cached ({args.cache}) fp32"), None)
    if cached is not None and not args.skip_uncached:
        uncached = rows[0]
        protocol = lambda r: r.protocol_s(r.n_train, r.n_test, args.protocol_epochs)
        report.append(f"cached/uncached: train epoch x{uncached.epoch_s / cached.epoch_s:.1f} faster, "
                      f"eval x{uncached.eval_s / cached.eval_s:.1f} faster, "
                      f"protocol x{protocol(uncached) / protocol(cached):.1f} faster")
        diff = max_difference(uncached.metrics, cached.metrics, COMPARED)
        report.append(f"same metrics (fp32, seed {args.seed}, {args.epochs} epochs, {len(job.classnames)} class(es), "
                      f"{', '.join(COMPARED)}): {'yes' if diff <= SAME_TOLERANCE else 'NO'}; max |difference| {diff:.2e}")
    if cached is not None:
        for r in rows:
            if r.name.startswith("cached") and r is not cached:
                d = max_difference(r.metrics, cached.metrics, ("image_auroc", "pixel_auroc"))
                report.append(f"{r.name}: max I-/P-AUROC difference from fp32 {100 * d:.2f} points")
    text = "\n".join(report)
    print(text)
    if args.output:
        utils.save_text(text + "\n", args.output)
    return 0


def cli() -> int:
    try:
        return main_cli()
    except (utils.UserError, datasets.DatasetError, backbones.BackboneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
