"""The run machinery behind the command line (``main.py`` parses, this module runs): a PBAS/CRAS run's options
resolved and checked, its jobs prepared and validated before anything is written, run in this process or by one
worker process per --gpu id, and the run folder (``--results_path``) they write; and the bodies of the PANDA,
segmentation and report commands. Imported only when a command runs: torch and the pipelines load here.

The run folder:

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

Reading order:
    METHODS, RunOptions                 the method registry; one invocation's options, resolved and checked
    job_groups, prepare_jobs            the jobs of a run, validated (data, checkpoints) before anything is written
    run_jobs, run_parallel              jobs one after the other on one device, or one worker process per --gpu id
    record_configs, rebuild_results     config.json and the tables of the run folder
    run                                 a whole PBAS / CRAS run
    run_segment, synth_baseline, ...    the PANDA, segmentation and report commands
"""
from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass

import torch

import backbones
import cras
import datasets
import engine
import pbas
import runstate
import utils
from common import Embedder, Method
import methods
from methods import CRAS_SINGLE_BATCH_SIZE, NOT_FOR, RESIZE_DEFAULTS
from utils import UserError

LOG = logging.getLogger("pbas")
PANDA_SEED = 3407  # the public code's seed: PANDA's default when the global --seed is not given
METHODS: dict[str, type[Method]] = methods.registry()  # --method NAME -> the method


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
    mask_binarize: str = "release"  # ground truth of the resized test masks (metrics.binarize_masks)

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
            discard_damaged_state=g["discard_damaged_state"], mask_binarize=data["mask_binarize"],
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
            "datapath": self.datapath,  # where the training images are (export's calibration); may move
            "classes": list(classnames),
            "resize": resize,
            "requested_resize": self.resize,
            "seed": seed,
            "precision": self.precision,
            "mask_binarize": self.mask_binarize,
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


def adopt_start_method(method: str) -> None:
    """In a job worker: start processes (the DataLoader's workers) the way the parent does. A spawned process
    defaults to spawn, which would import torch again in every data loader worker (seconds per loader)."""
    multiprocessing.set_start_method(method, force=True)


def _worker(opts: RunOptions, jobs: list[engine.Job], gpu: int, tasks, results, threads: int, parent: int,
            start_method: str) -> None:
    """A worker process: take job indices from ``tasks`` until its sentinel (None), report rows on ``results``."""
    adopt_start_method(start_method)
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
    start_method = multiprocessing.get_start_method()  # the DataLoader's, as in a single-process run
    make = lambda gpu: ctx.Process(target=_worker, args=(opts, jobs, gpu, tasks, results, threads, os.getpid(),
                                                         start_method))
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
            rows += [(table_order(name, group, requested), name, utils.upgrade_metrics_row(row), group)
                     for name, row in data["rows"].items()]
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
            LOG.info("%s: %s", name, ", ".join(f"{k} {row[k]:.4f}" for k in utils.METRIC_COLUMNS))

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
# the other commands: report, segmentation (segment/), PANDA (panda/)
# ----------------------------------------------------------------------------------------------


def tool_methods(method: str, method_given: bool) -> dict[str, type[Method]]:
    """The methods predict and export may load: the one of the checkpoint, or only --method's when it was given."""
    return {method: METHODS[method]} if method_given else METHODS


def write_report(results: str) -> int:
    """``report RESULTS``: RESULTS/report.html for an existing results folder."""
    import report  # matplotlib and scikit-learn: loaded only when a report is written

    if not os.path.isdir(results):
        raise UserError(f"RESULTS {results} is not a folder")
    LOG.info("wrote %s", report.write_report(results))
    return 0


def one_seed(g: dict, command: str) -> int:
    """The one non-negative global --seed of a command that takes one."""
    if len(g["seed"]) != 1:
        raise UserError(f"{command} takes one --seed, got {list(g['seed'])}")
    if g["seed"][0] < 0:
        raise UserError(f"--seed must be non-negative, got {g['seed'][0]}")
    return g["seed"][0]


def first_gpu(g: dict) -> int | None:
    """The first global --gpu id, the device of a command that runs on one."""
    return g["gpu"][0] if g["gpu"] else None


def run_segment(g: dict, name: str, data_path: str, synthetic: str, classes: tuple[str, ...], source: str | None,
                anomaly_split: str, num_workers: int, net: dict) -> int:
    """``segment``: train (or reuse) and test one segmenter per class and seed; the tables and the report."""
    from segment import pipeline
    from segment.config import SegmentConfig

    if num_workers < 0:
        raise UserError(f"--num_workers must be non-negative, got {num_workers}")
    if name not in datasets.DATASET_NAMES:
        raise UserError(f"unknown dataset '{name}'; valid datasets: {', '.join(datasets.DATASET_NAMES)}")
    if any(seed < 0 for seed in g["seed"]) or len(set(g["seed"])) != len(g["seed"]):
        raise UserError(f"--seed values must be distinct and non-negative, got {list(g['seed'])}")
    config = SegmentConfig(**net)
    config.check()
    synth = os.path.abspath(synthetic)
    run = pipeline.SegmentRun(
        config=config, dataset=name, datapath=os.path.abspath(data_path), synthetic=synth,
        classes=tuple(default_classes(name, classes)),
        source=pipeline.source_name(source, synth), anomaly_split=anomaly_split,
        seeds=tuple(g["seed"]), test_only=g["test"] == "test", gpu=first_gpu(g),
        results_path=os.path.abspath(g["results_path"]), num_workers=num_workers,
        discard_damaged=g["discard_damaged_state"])
    rows = pipeline.run_all(run)
    rebuild_results(run.results_path)
    print(utils.results_table(list(rows.items()), (*utils.METRIC_COLUMNS, "pixel_aupro", "pixel_f1", "pixel_iou")))
    import report

    LOG.info("report: %s", report.write_report(run.results_path))
    return 0


def synth_baseline(g: dict, name: str, data_path: str, output: str, classes: tuple[str, ...], count: int,
                   texture: str, defect: str) -> int:
    """``synth-baseline``: Perlin-noise anomalies from each class's normal training images."""
    from segment import synthesis

    seed = one_seed(g, "synth-baseline")
    if not defect or os.sep in defect or defect in (".", "..", "good"):
        raise UserError(f"--defect '{defect}' must be a plain folder name other than 'good'")
    utils.check_outside(output, data_path, "--output", "DATAPATH")
    requests = []
    for classname in default_classes(name, classes):
        train, _ = datasets.build_datasets(name, data_path, classname, 1, 1, class_resize_rule=False)
        requests.append(synthesis.SynthesisRequest([s.image_path for s in train.samples], os.path.abspath(output),
                                                   classname, count, seed, texture, defect))
    for request in requests:  # every class checked before any is written
        synthesis.check_request(request)
    for request in requests:
        LOG.info("wrote %s", synthesis.write_baseline(request))
    return 0


def panda_seed(g: dict, seed_given: bool) -> int:
    """The seed of a PANDA command: the one global --seed, PANDA_SEED when it was not given."""
    seeds = g["seed"] if seed_given else (PANDA_SEED,)
    if len(seeds) != 1:
        raise UserError(f"PANDA commands take one --seed, got {len(seeds)}")
    return seeds[0]


def panda_train(g: dict, seed_given: bool, data_path: str, dataset: str, classes: tuple[str, ...],
                defects: tuple[str, ...], ldm: str, options: dict) -> int:
    """``panda-train``: one PANDA model per (class, defect), resumable."""
    from panda import train

    seed, device = panda_seed(g, seed_given), utils.pick_device(first_gpu(g))
    jobs = train.plan(dataset, data_path, classes, defects, str(options["anomaly_split"]))
    configs = [train.TrainConfig(dataset, job.classname, job.defect,
                                 seed=seed, precision=g["precision"], **options) for job in jobs]
    for path in train.run_training(configs, jobs, ldm, g["results_path"], device, g["discard_damaged_state"]):
        LOG.info("trained: %s", path)
    return 0


def panda_generate(g: dict, seed_given: bool, data_path: str, dataset: str, classes: tuple[str, ...],
                   defects: tuple[str, ...], ldm: str, output: str | None, pairs: int, batch_size: int,
                   checkpoint: str | None, step: int | None, sampler_steps: int, empty_latent_masks: str = "redraw") -> int:
    """``panda-generate``: image + mask pairs per (class, defect) with trained PANDA models."""
    from panda import data, generate

    seed, device = panda_seed(g, seed_given), utils.pick_device(first_gpu(g))
    names = classes or data.default_classes(dataset)
    jobs = [(c, d) for c in names for d in (defects or data.defect_types(dataset, data_path, c))]
    out = output or os.path.join(g["results_path"], "synthetic", "panda")
    generate.run_generation(dataset, data_path, jobs, checkpoint, step, g["results_path"], out, pairs, batch_size,
                            seed, ldm, g["precision"], device, sampler_steps, empty_latent_masks)
    return 0
