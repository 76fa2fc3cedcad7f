"""PBAS command line: ``main.py [global options] net [options] dataset [options] NAME DATAPATH``.

The command line of the authors' release is accepted as it is (see README). This module owns the
run folder (``--results_path``):

    results.csv                          per class + Mean: the release's columns, then last-epoch and AUPRO
    config.json                          the resolved configuration of the run
    models/DATASET_CLASS/checkpoint.pt   self-describing checkpoint (config, center, best and last states, metrics)
    models/DATASET_CLASS/metrics.json    the class's row of results.csv
    heatmaps/DATASET_CLASS/*.png         [image | ground truth | scores] of the final evaluation
    logs/PROJECT/GROUP/RUN/DATASET_CLASS.csv   per-epoch losses and test metrics
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import multiprocessing
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass

import click
import torch

import backbones
import datasets
import pbas
import utils
from utils import UserError

LOG = logging.getLogger("pbas")
CHECKPOINT_NAME = "checkpoint.pt"
CACHE_MODES = ("auto", "device", "host", "off")
PROGRESS_LINES = 20  # per class, when stderr is not a terminal (no progress bar)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


@click.group(chain=True, context_settings=CONTEXT)
@click.option("--gpu", type=int, multiple=True, default=(0,), help="GPU id; repeat it (--gpu 0 --gpu 1) to run classes in parallel, one process per GPU. "
                   "The CPU is used when CUDA is unavailable.")
@click.option("--seed", type=int, default=0, help="Seed for Python, NumPy and torch, set before each class.")
@click.option("--test", type=click.Choice(["ckpt", "test"]), default="ckpt",
              help="ckpt: train (or reuse a finished checkpoint) then test; test: only evaluate saved checkpoints.")
@click.option("--results_path", type=str, default="results", help="Run folder for results, checkpoints and heatmaps.")
@click.option("--log_project", type=str, default="project", help="Per-epoch logs go to RESULTS/logs/PROJECT/GROUP/RUN/.")
@click.option("--log_group", type=str, default="group", help="See --log_project.")
@click.option("--run_name", type=str, default="test", help="See --log_project.")
@click.option("--precision", type=click.Choice(pbas.PRECISIONS), default="fp32",
              help="fp32: faithful; tf32: TF32 matmuls/convolutions on Ampere+ GPUs; bf16: bfloat16 autocast.")
@click.option("--cache", type=click.Choice(CACHE_MODES), default="auto",
              help="Feature cache: embed each set once and train/evaluate from it (device memory or pinned host "
                   "memory); off re-runs the backbone every pass. auto: device if it fits, else host; off with --train_backbone.")
def main(**_: object) -> None:
    """PBAS: Progressive Boundary guided Anomaly Synthesis (Chen et al., IEEE TCSVT 2025).

    Example (the release's configuration for MVTec AD):

    \b
      python main.py --gpu 0 --seed 0 --test ckpt \\
        net -b wideresnet50 -le layer2 -le layer3 --pretrain_embed_dimension 1536 \\
            --target_embed_dimension 1536 --patchsize 3 --meta_epochs 640 --eval_epochs 1 \\
            --dsc_layers 2 --dsc_hidden 1024 --pre_proj 1 --k 0.25 \\
        dataset --batch_size 8 --resize 288 --imagesize 288 -d carpet mvtec /data/mvtec
    """


@main.command("net", context_settings=CONTEXT)
@click.option("-b", "--backbone_names", "backbone_names", multiple=True, default=("wideresnet50",),
              help=f"Backbone (one): {', '.join(backbones.BACKBONES)}.")
@click.option("-le", "--layers_to_extract_from", "layers", multiple=True, default=("layer2", "layer3"),
              help="Backbone layers whose features are used (repeat the option); the first sets the patch grid.")
@click.option("--pretrain_embed_dimension", type=int, default=1536, help="Per-layer feature size after pooling.")
@click.option("--target_embed_dimension", type=int, default=1536, help="Patch feature size D.")
@click.option("--patchsize", type=int, default=3, help="Neighbourhood aggregated around each location (odd).")
@click.option("--meta_epochs", type=int, default=640, help="Training epochs (the paper: 400).")
@click.option("--eval_epochs", type=int, default=1, help="Evaluate on the test set every N epochs (and at the last).")
@click.option("--dsc_layers", type=int, default=2, help="Discriminator depth: dsc_layers-1 hidden blocks + output layer.")
@click.option("--dsc_hidden", type=int, default=1024, help="Discriminator hidden width.")
@click.option("--dsc_margin", type=float, default=0.5, help="Score threshold used only for the p_true/p_fake progress figures.")
@click.option("--pre_proj", type=int, default=1, help="Projector depth (Linear layers); 0 disables the projector.")
@click.option("--k", type=float, default=0.25, help="Anomaly synthesis scale (the paper's alpha = 0.3).")
@click.option("--lr", type=float, default=1e-4, help="Projector learning rate; the discriminator uses 2*lr.")
@click.option("--train_backbone", is_flag=True, help="Fine-tune the backbone too (AdamW, lr); disables the feature cache.")
@click.option("--center_metric", type=click.Choice(pbas.CENTER_METRICS), default="cosine",
              help="Nearest-center search: cosine (release) or euclidean (paper, Algorithm 1).")
@click.option("--dsc_optimizer", type=click.Choice(pbas.DSC_OPTIMIZERS), default="adamw",
              help="Discriminator optimizer: adamw with decoupled weight decay 0.01 (release) or adam with L2 0.01 (paper).")
def net_command(**options: object) -> tuple[str, dict]:
    """Network and training options."""
    return "net", options


@main.command("dataset", context_settings=CONTEXT)
@click.argument("name", type=str)
@click.argument("data_path", type=str)
@click.option("-d", "--subdatasets", "classes", multiple=True,
              help="Class to run (repeat the option); default: every official class of NAME.")
@click.option("--batch_size", type=int, default=8, help="Images per batch for training and evaluation.")
@click.option("--resize", type=int, default=288, help="Shorter image side before the center crop (MVTec toothbrush/wood: imagesize*8/7).")
@click.option("--imagesize", type=int, default=288, help="Center-crop size fed to the network.")
@click.option("--num_workers", type=int, default=4, help="Data-loading worker processes.")
def dataset_command(**options: object) -> tuple[str, dict]:
    """Dataset NAME (mvtec, visa, mpdd) at DATAPATH and its loading options."""
    return "dataset", options


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
    failures = run(RunOptions.from_cli(global_options, parts["net"], parts["dataset"]))
    if failures:
        raise SystemExit(1)


# ----------------------------------------------------------------------------------------------
# resolved options
# ----------------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """Everything one invocation needs, validated."""

    config: pbas.PBASConfig
    dataset: str
    datapath: str
    classes: list[str]
    resize: int
    num_workers: int
    seed: int
    test: str
    gpu: tuple[int, ...]
    results_path: str
    log_dir: str
    precision: str
    cache: str

    @classmethod
    def from_cli(cls, g: dict, net: dict, data: dict) -> "RunOptions":
        if len(net["backbone_names"]) != 1:
            raise UserError(f"give exactly one backbone with -b; got {list(net['backbone_names'])}")
        name = data["name"]
        if name not in datasets.DATASET_NAMES:
            raise UserError(f"unknown dataset '{name}'; valid datasets: {', '.join(datasets.DATASET_NAMES)}")
        for key, value in (("batch_size", data["batch_size"]), ("imagesize", data["imagesize"]), ("resize", data["resize"]),
                           ("meta_epochs", net["meta_epochs"]), ("eval_epochs", net["eval_epochs"]),
                           ("dsc_layers", net["dsc_layers"]), ("dsc_hidden", net["dsc_hidden"]),
                           ("pretrain_embed_dimension", net["pretrain_embed_dimension"]),
                           ("target_embed_dimension", net["target_embed_dimension"])):
            if value < 1:
                raise UserError(f"--{key} must be at least 1, got {value}")
        if net["patchsize"] < 1 or net["patchsize"] % 2 == 0:
            raise UserError(f"--patchsize must be a positive odd number, got {net['patchsize']}")
        if net["pre_proj"] < 0 or data["num_workers"] < 0:
            raise UserError("--pre_proj and --num_workers must be non-negative")
        config = pbas.PBASConfig(
            backbone=net["backbone_names"][0], layers=tuple(net["layers"]),
            pretrain_embed_dimension=net["pretrain_embed_dimension"], target_embed_dimension=net["target_embed_dimension"],
            patchsize=net["patchsize"], meta_epochs=net["meta_epochs"], eval_epochs=net["eval_epochs"],
            dsc_layers=net["dsc_layers"], dsc_hidden=net["dsc_hidden"], dsc_margin=net["dsc_margin"],
            pre_proj=net["pre_proj"], k=net["k"], lr=net["lr"], train_backbone=net["train_backbone"],
            center_metric=net["center_metric"], dsc_optimizer=net["dsc_optimizer"],
            imagesize=data["imagesize"], batch_size=data["batch_size"],
        )
        cache = g["cache"]
        if config.train_backbone and cache not in ("auto", "off"):
            raise UserError("--train_backbone changes the features every step; use --cache off (or auto)")
        results_path = os.path.abspath(g["results_path"])
        return cls(
            config=config, dataset=name, datapath=os.path.abspath(data["data_path"]),
            classes=list(data["classes"]) or list(datasets.CLASSES[name]), resize=data["resize"],
            num_workers=data["num_workers"], seed=g["seed"], test=g["test"], gpu=tuple(g["gpu"]),
            results_path=results_path,
            log_dir=os.path.join(results_path, "logs", g["log_project"], g["log_group"], g["run_name"]),
            precision=g["precision"], cache="off" if config.train_backbone else cache,
        )

    def class_config(self, classname: str, resize: int) -> dict:
        """The resolved configuration of one class: what its checkpoint records and must match."""
        return {
            "net": self.config.to_dict(),
            "dataset": self.dataset,
            "classname": classname,
            "resize": resize,
            "requested_resize": self.resize,
            "seed": self.seed,
            "precision": self.precision,
        }


# ----------------------------------------------------------------------------------------------
# running classes
# ----------------------------------------------------------------------------------------------


def class_dir(opts: RunOptions, name: str) -> str:
    return os.path.join(opts.results_path, "models", name)


def config_difference(saved: dict, wanted: dict) -> str | None:
    """The first setting of the class configurations (``RunOptions.class_config``) that differs, or None.

    Device settings (gpu, num_workers, cache, paths) are not part of that configuration: they may change."""
    flat_saved = {**saved, **saved.get("net", {})}
    flat_wanted = {**wanted, **wanted.get("net", {})}
    for key in sorted(set(flat_saved) | set(flat_wanted)):
        if key == "net":
            continue
        if flat_saved.get(key) != flat_wanted.get(key):
            return f"{key}={flat_saved.get(key)!r} in the checkpoint, {flat_wanted.get(key)!r} now"
    return None


@dataclass
class ClassJob:
    name: str  # DATASET_CLASS
    classname: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    config: dict
    finished: bool  # a finished checkpoint exists: test it instead of training


def prepare_jobs(opts: RunOptions) -> list[ClassJob]:
    """Validate every class before anything is written: data, and checkpoints for --test test."""
    if not os.path.isdir(opts.datapath):
        raise UserError(f"DATAPATH {opts.datapath} does not exist or is not a folder")
    jobs = []
    for classname in opts.classes:
        train, test = datasets.build_datasets(opts.dataset, opts.datapath, classname, opts.resize, opts.config.imagesize)
        name = f"{opts.dataset}_{classname}"
        if train.resize != opts.resize:
            LOG.info("%s: resize %d instead of %d (release rule for MVTec toothbrush and wood)", name, train.resize, opts.resize)
        config = opts.class_config(classname, train.resize)
        path = os.path.join(class_dir(opts, name), CHECKPOINT_NAME)
        finished = False
        if opts.test == "test" or os.path.exists(path):
            if opts.test == "test" and not os.path.exists(path):
                raise UserError(f"--test test: no checkpoint for {name} at {path}; train it first with --test ckpt")
            saved = utils.load_checkpoint(path)
            diff = config_difference(saved["config"], config)
            if diff is not None:
                raise UserError(f"{path} was trained with another configuration ({diff}); use another --results_path or remove it")
            if saved.get("complete"):
                finished = True
            elif opts.test == "test":
                raise UserError(f"{path} is from an unfinished training run; run --test ckpt to train {name} again")
            else:
                LOG.info("%s: unfinished checkpoint found, training again", name)
        jobs.append(ClassJob(name, classname, train, test, config, finished))
    return jobs


def choose_cache(opts: RunOptions, device: torch.device, n_images: int, positions: int) -> str:
    """Resolve --cache auto: the device when the features of both sets fit comfortably, else pinned host memory."""
    if opts.cache != "auto":
        return opts.cache
    if device.type != "cuda":
        return "device"  # the CPU's memory is the host memory
    need = n_images * positions * opts.config.target_embed_dimension * 4
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if need < 0.6 * free else "host"


def grid_positions(model: pbas.PBAS, imagesize: int, device: torch.device) -> int:
    """H*W of the patch grid for this image size (one tiny forward pass)."""
    with torch.no_grad():
        _, grid = model.embed(torch.zeros(1, 3, imagesize, imagesize, device=device))
    return grid[0] * grid[1]


def load_test_set(dataset: datasets.AnomalyDataset, device: torch.device) -> pbas.TestSet:
    """Labels and masks of the test set (masks only: the images are decoded once, by the feature source)."""
    labels = torch.tensor([s.is_anomaly for s in dataset.samples])
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        masks = torch.stack([m[0] for m in pool.map(dataset.mask, range(len(dataset)))])  # [N, S, S]
    return pbas.TestSet(labels=labels.to(device), masks=masks.to(device))


def write_heatmaps(opts: RunOptions, job: ClassJob, maps: torch.Tensor) -> None:
    folder = os.path.join(opts.results_path, "heatmaps", job.name)
    for i in range(len(job.test)):
        item = job.test[i]
        stem = os.path.splitext(os.path.basename(item["image_path"]))[0]
        utils.save_png(utils.heatmap_panel(item["image"], item["mask"], maps[i]), os.path.join(folder, f"{item['defect']}_{stem}.png"))


def final_metrics(model: pbas.PBAS, source: pbas.FeatureSource, test_set: pbas.TestSet, state: dict) -> tuple[dict, torch.Tensor]:
    model.load_trained_state(state)
    result, _, maps = pbas.evaluate(model, source, test_set, full=True)
    return result, maps


def run_class(opts: RunOptions, job: ClassJob, stages: backbones.Stages, device: torch.device) -> dict:
    """Train (or reuse) and test one class; return its results.csv row."""
    utils.set_seed(opts.seed)
    model = pbas.PBAS(opts.config, stages, opts.precision).to(device)
    folder = class_dir(opts, job.name)
    ckpt_path = os.path.join(folder, CHECKPOINT_NAME)
    positions = grid_positions(model, opts.config.imagesize, device)
    cache = choose_cache(opts, device, len(job.train) + len(job.test), positions)
    make_source = lambda ds: pbas.FeatureSource(model, ds, opts.config.batch_size, opts.num_workers, device, cache, utils.progress)
    train_source, test_source = make_source(job.train), make_source(job.test)
    test_set = load_test_set(job.test, device)
    LOG.info("%s: %d train / %d test images, feature cache: %s", job.name, len(job.train), len(job.test), cache)

    if not job.finished:
        started = time.time()
        epoch_log = os.path.join(opts.log_dir, f"{job.name}.csv")
        log_lines = ["epoch,loss,svdd_loss,true_loss,fake_loss,p_true,p_fake,image_auroc,pixel_auroc"]
        progress_every = max(1, opts.config.meta_epochs // PROGRESS_LINES)

        def on_epoch(log: pbas.EpochLog) -> None:
            s = log.stats
            log_lines.append(",".join(str(v) for v in (log.epoch, s["loss"], s["svdd_loss"], s["true_loss"], s["fake_loss"],
                                                      s["p_true"], s["p_fake"], log.image_auroc, log.pixel_auroc)))
            if log.epoch % 10 == 9 or log.epoch == opts.config.meta_epochs - 1:
                utils.save_text("\n".join(log_lines) + "\n", epoch_log)
            if not sys.stderr.isatty() and (log.epoch + 1) % progress_every == 0:  # no progress bar: a line now and then
                LOG.info("%s: epoch %d/%d, loss %.4f, p_true %.2f, p_fake %.2f, I-AUROC %.2f, P-AUROC %.2f",
                         job.name, log.epoch + 1, opts.config.meta_epochs, s["loss"], s["p_true"], s["p_fake"],
                         100 * log.image_auroc, 100 * log.pixel_auroc)

        def on_best(epoch: int, state: dict, metrics: dict) -> None:
            utils.save_torch({"format": utils.CHECKPOINT_FORMAT, "complete": False, "config": job.config,
                              "center": model.center.cpu(), "best": {"epoch": epoch, "state": state, "metrics": metrics}},
                             ckpt_path)

        fit = pbas.fit(model, train_source, test_source, test_set, opts.seed, on_epoch, on_best, utils.progress)
        center = model.center.cpu()
        best = {"epoch": fit.best_epoch, "state": fit.best_state}
        last = {"epoch": fit.last_epoch, "state": fit.last_state}
        train_seconds = time.time() - started
    else:
        ckpt = utils.load_checkpoint(ckpt_path)
        LOG.info("%s: testing the finished checkpoint %s", job.name, ckpt_path)
        center = ckpt["center"]
        model.center = center.to(device)
        best, last = ckpt["best"], ckpt["last"]
        train_seconds = ckpt.get("train_seconds", math.nan)

    last_metrics, _ = final_metrics(model, test_source, test_set, last["state"])
    best_metrics, maps = final_metrics(model, test_source, test_set, best["state"])  # leaves the best state loaded
    write_heatmaps(opts, job, maps)
    row = {**best_metrics, "best_epoch": best["epoch"], "last_epoch": last["epoch"],
           **{f"last_{k}": last_metrics[k] for k in (*utils.METRIC_COLUMNS, "pixel_aupro")}}
    if not job.finished:
        utils.save_torch({
            "format": utils.CHECKPOINT_FORMAT, "complete": True, "config": job.config, "center": center,
            "best": {**best, "metrics": best_metrics}, "last": {**last, "metrics": last_metrics},
            "normal_scores": pbas.normal_score_statistics(model, train_source),  # under the best state, for thresholds
            "train_seconds": train_seconds, "torch_version": str(torch.__version__),
        }, ckpt_path)
    utils.save_json(row, os.path.join(folder, "metrics.json"))
    return row


def run_jobs(opts: RunOptions, jobs: list[ClassJob], gpu: int | None, report) -> None:
    """Run ``jobs`` one after the other on one device; ``report(name, row_or_None, error_or_None)`` after each."""
    device = utils.pick_device(gpu)
    if device.type == "cpu" and gpu is not None and gpu >= 0:
        LOG.info("CUDA is not available: running on the CPU")
    utils.configure_precision(opts.precision)
    stages = None
    for job in jobs:
        LOG.info("=== %s (%s)", job.name, device)
        try:
            if stages is None or opts.config.train_backbone:  # a fine-tuned backbone must not leak into the next class
                _, stages = backbones.load_backbone(opts.config.backbone)
            row = run_class(opts, job, stages, device)
        except (UserError, datasets.DatasetError, backbones.BackboneError) as exc:
            report(job.name, None, str(exc))
            continue
        except (RuntimeError, OSError) as exc:  # e.g. out of memory: keep going with the other classes
            LOG.debug("%s", traceback.format_exc())
            report(job.name, None, f"{type(exc).__name__}: {exc}")
            continue
        report(job.name, row, None)


def _worker(opts: RunOptions, jobs: list[ClassJob], gpu: int, tasks, results, threads: int) -> None:
    """A worker process: take class indices from ``tasks`` until it is empty, report rows on ``results``."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [gpu {gpu}] %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(threads)

    def next_jobs():
        while True:
            try:
                index = tasks.get_nowait()
            except queue.Empty:
                return
            results.put(("start", index, None, None))
            yield jobs[index]

    def report(name: str, row: dict | None, error: str | None) -> None:
        index = next(i for i, job in enumerate(jobs) if job.name == name)
        results.put(("done", index, row, error))

    run_jobs(opts, next_jobs(), gpu, report)


def run_parallel(opts: RunOptions, jobs: list[ClassJob], report) -> None:
    """One worker process per --gpu id; classes are handed out one at a time to whichever worker is free."""
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    tasks, results = ctx.Queue(), ctx.Queue()
    for index in range(len(jobs)):
        tasks.put(index)
    threads = max(1, (os.cpu_count() or 1) // len(opts.gpu))
    # not daemonic: a worker starts DataLoader processes of its own, which daemonic processes may not
    workers = [ctx.Process(target=_worker, args=(opts, jobs, gpu, tasks, results, threads)) for gpu in opts.gpu]
    started: set[int] = set()
    finished: set[int] = set()
    try:
        for w in workers:
            w.start()
        while len(finished) < len(jobs):
            try:
                kind, index, row, error = results.get(timeout=1.0)
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    break
                continue
            if kind == "start":
                started.add(index)
            else:
                finished.add(index)
                report(jobs[index].name, row, error)
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():  # interrupted, or stuck: do not leave it running
                w.terminate()
    for index in range(len(jobs)):  # classes lost with a crashed worker, or never started
        if index not in finished:
            report(jobs[index].name, None, "its worker process ended without a result" if index in started else "not run")


def run(opts: RunOptions) -> list[str]:
    """Run every class (in this process, or one process per --gpu id); return the names of the classes that failed."""
    jobs = prepare_jobs(opts)
    _, stages = backbones.load_backbone(opts.config.backbone)  # fails early on a missing weights file
    backbones.check_layers(opts.config.backbone, opts.config.layers, stages)
    del stages

    os.makedirs(opts.results_path, exist_ok=True)
    utils.save_json({"command": sys.argv, "torch": torch.__version__, "gpu": list(opts.gpu), "precision": opts.precision,
                     "classes": {job.name: job.config for job in jobs}, "cache": opts.cache,
                     "num_workers": opts.num_workers, "log_dir": opts.log_dir},
                    os.path.join(opts.results_path, "config.json"))
    order = [job.name for job in jobs]
    rows: dict[str, dict] = {}
    failures: list[str] = []

    def report(name: str, row: dict | None, error: str | None) -> None:
        if row is None:
            LOG.error("%s failed: %s", name, error)
            failures.append(name)
            return
        rows[name] = row
        done = [(n, rows[n]) for n in order if n in rows]  # class order, whatever finished first
        utils.save_text(utils.results_csv(done), os.path.join(opts.results_path, "results.csv"))
        LOG.info("%s: %s", name, ", ".join(f"{k} {100 * row[k]:.2f}" for k in utils.METRIC_COLUMNS))

    if len(opts.gpu) > 1:
        run_parallel(opts, jobs, report)
    else:
        run_jobs(opts, jobs, opts.gpu[0] if opts.gpu else None, report)
    if rows:
        print(utils.results_table([(n, rows[n]) for n in order if n in rows]))
    if failures:
        LOG.error("failed classes: %s", ", ".join(sorted(failures, key=order.index)))
    return failures


# ----------------------------------------------------------------------------------------------
# tool subcommands: predict, export (inference.py)
# ----------------------------------------------------------------------------------------------


THRESHOLD_HELP = ("'auto': the largest score of the normal training images (stored in the checkpoint; each of "
                  "them scores at or below it); or a number. Images scoring above it are 'anomalous'.")
PIXEL_THRESHOLD_HELP = ("'auto': the 0.999 quantile of all anomaly-map pixel scores of the normal training images "
                        "(stored in the checkpoint); or a number. Mask pixels scoring above it are 255.")


class InterspersedCommand(click.Command):
    """A chained subcommand whose options may follow its arguments (``predict IMAGES... --output DIR``).

    Chained groups parse subcommands with interspersed options off; a tool subcommand takes every
    remaining argument, since it cannot be combined with other subcommands anyway.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.allow_interspersed_args = True
        return super().parse_args(ctx, args)


@main.command("predict", cls=InterspersedCommand, context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=str)
@click.option("--checkpoint", required=True, type=str, help="checkpoint.pt written by training (RESULTS/models/DATASET_CLASS/).")
@click.option("--output", required=True, type=str, help="Output folder: predictions.csv, *_overlay.png, *_mask.png.")
@click.option("--threshold", type=str, default="auto", help=f"Image threshold. {THRESHOLD_HELP}")
@click.option("--pixel_threshold", type=str, default="auto", help=f"Pixel threshold of the masks. {PIXEL_THRESHOLD_HELP}")
@click.option("--batch_size", type=int, default=8, help="Images per forward pass.")
def predict_command(images: tuple[str, ...], checkpoint: str, output: str, threshold: str, pixel_threshold: str,
                    batch_size: int) -> tuple[str, object]:
    """Score IMAGES (files, or folders searched recursively for png/jpg/jpeg/bmp/tif/tiff) with a trained checkpoint.

    Each image (grayscale, RGB or RGBA; any size) is resized and center-cropped as in training. Writes
    OUTPUT/predictions.csv (path, image_score, decision, the thresholds used, output file names) and, per
    image at its original size, NAME_overlay.png (anomaly map in jet colours over the image) and NAME_mask.png
    (0/255). NAME is the path relative to the given folder with '/' -> '__' and '.ext' -> '_ext'. Pixels
    outside the center crop are not seen by the network: score 0, mask 0, no colour. Uses the global --gpu
    (first id) and --precision. Exit code 0: all scored; 1: unreadable files were skipped (reported on stderr),
    the rest written; 2: bad arguments or checkpoint.

    \b
    Default thresholds (auto), from the normal training images, no labelled defects needed:
      image: max normal training image score; pixel: 0.999 quantile of their anomaly-map pixels.
    """
    import inference

    def run_tool(g: dict) -> int:
        opts = inference.PredictOptions(
            checkpoint=checkpoint, inputs=list(images), output=output,
            threshold=inference.parse_threshold(threshold, "--threshold"),
            pixel_threshold=inference.parse_threshold(pixel_threshold, "--pixel_threshold"),
            batch_size=batch_size, gpu=g["gpu"][0] if g["gpu"] else None, precision=g["precision"])
        return inference.predict(opts)

    return "predict", run_tool


@main.command("export", context_settings=CONTEXT)
@click.option("--checkpoint", required=True, type=str, help="checkpoint.pt written by training.")
@click.option("--output", required=True, type=str, help="ONNX file to write (atomically).")
@click.option("--opset", type=int, default=None, show_default="the exporter's native opset",
              help="ONNX opset version.")
def export_command(checkpoint: str, output: str, opset: int | None) -> tuple[str, object]:
    """Export the whole inference graph of a checkpoint to ONNX (fp32, CPU).

    Input 'images': normalised images [B, 3, S, S] float32 (resize + center crop + ImageNet normalisation as
    in training; S = the checkpoint's imagesize), dynamic batch B. Outputs 'image_scores' [B] and
    'anomaly_maps' [B, S, S]. The graph is always fp32 (the global --precision does not apply). Before
    writing, its outputs on random images are compared with PyTorch's (onnxruntime, CPU): above 1e-4 it is
    not written and the exit code is 1.
    """
    import inference

    return "export", lambda g: inference.export_onnx(checkpoint, output, opset)


# (end of tool subcommands)


def cli(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors for bad input, exit code 2; 1 when a class failed."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main.main(args=argv, prog_name="main.py", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        return 2
    except (UserError, datasets.DatasetError, backbones.BackboneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("interrupted: finished classes and the best checkpoint so far are kept", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
