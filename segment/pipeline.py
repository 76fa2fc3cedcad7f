"""One ``main.py segment`` run: per class and seed, train a segmenter (or reuse its finished checkpoint), test it,
and write the job folder in the results-folder conventions of PBAS/CRAS:

    RESULTS/models/segment-SOURCE-SPLIT/DATASET_CLASS/seedN/checkpoint.pt   tensors only; while training also the
                                                                          resumable state (complete: False)
    .../metrics.json   the class's row (method "segment", setting "SOURCE:SPLIT"): read into results.csv
    .../scores.csv, heatmaps/DATASET_CLASS/*.png, loss.csv (training loss every train.log_every steps)
    RESULTS/config.json  the job's configuration and command (under the folder's lock)
The run machinery (runner.run_segment) then rebuilds results.csv / results_seeds.csv from every metrics.json and
writes report.html.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass

import torch

import runstate
import utils
from segment import data as segdata
from segment import evaluate, networks, train
from segment.train import SegmentConfig
from utils import UserError

LOG = logging.getLogger("pbas")
METHOD = "segment"
CHECKPOINT_NAME, LOSS_LOG_NAME = "checkpoint.pt", "loss.csv"
SOURCE_PATTERN = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class SegmentRun:
    """A validated ``segment`` invocation."""

    config: SegmentConfig
    dataset: str
    datapath: str
    synthetic: str
    classes: tuple[str, ...]
    source: str  # the synthesis' name in the tables (perlin, panda, ...)
    anomaly_split: str
    seeds: tuple[int, ...]
    test_only: bool
    gpu: int | None
    results_path: str
    num_workers: int
    discard_damaged: bool = False  # --discard_damaged_state: set an unreadable checkpoint.pt aside, train anew

    @property
    def setting(self) -> str:
        return f"{self.source}:{self.anomaly_split}"

    def folder(self, classname: str, seed: int) -> str:
        return os.path.join(self.results_path, "models", f"{METHOD}-{self.source}-{self.anomaly_split}",
                            f"{self.dataset}_{classname}", f"seed{seed}")

    def job_config(self, classname: str, seed: int) -> dict:
        return {"method": METHOD, "net": self.config.to_dict(), "dataset": self.dataset, "class": classname,
                "synthetic": self.synthetic, "source": self.source, "anomaly_split": self.anomaly_split, "seed": seed}


def check_source(source: str) -> str:
    if not SOURCE_PATTERN.match(source):
        raise UserError(f"--source '{source}' must be letters, digits, '_' or '.' (it names folders and table rows)")
    return source


def source_name(source: str | None, synthetic: str) -> str:
    """--source, checked; without it the synthetic folder's name, which must exist and be such a name."""
    if source is not None:
        return check_source(source)
    segdata.check_synthetic_folder(synthetic)
    name = os.path.basename(synthetic.rstrip(os.sep))
    if not SOURCE_PATTERN.match(name):
        raise UserError(f"the --synthetic folder's name '{name}' names the source in folders and table rows, but it "
                        "may only hold letters, digits, '_' or '.'; give --source NAME")
    return name


def _record(run: SegmentRun, folder: str, config: dict) -> None:
    path = os.path.join(run.results_path, "config.json")
    with utils.locked(run.results_path):
        runs = utils.read_json(path).get("runs", {})
        runs[os.path.relpath(folder, run.results_path)] = {
            "config": config, "command": sys.argv, "torch": torch.__version__, "gpu": run.gpu,
            "log": os.path.relpath(os.path.join(folder, LOSS_LOG_NAME), run.results_path)}
        utils.save_json({"runs": runs}, path)


def _loss_csv(history: list[dict]) -> str:
    """The loss log the report plots: per logged training step (every train.LOG_EVERY steps and the last) the
    mean loss since the previous row, with the focal and dice parts of that step. No test metrics: the segmenter
    is tested once, after training."""
    lines = ["step,loss,focal,dice"]
    lines += [f"{h['step']},{h['loss']},{h['focal']},{h['dice']}" for h in history]
    return "\n".join(lines) + "\n"


def _trained(run: SegmentRun, classdata: segdata.ClassData, seed: int, folder: str, config: dict,
             device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The trained network of a job: from its finished checkpoint, else trained (resumed) now."""
    path = os.path.join(folder, CHECKPOINT_NAME)
    saved = train.read_state(path, config, run.discard_damaged)
    if saved is not None and saved.get("complete"):
        LOG.info("%s: testing the finished checkpoint %s", config["class"], path)
        return train.network_from(saved).to(device), saved
    if run.test_only:
        raise UserError(f"--test test: no finished checkpoint at {path}; train it first with --test ckpt")
    utils.set_seed(seed)
    model = networks.create(run.config.arch, run.config.encoder, run.config.encoder_weights)
    images = segdata.TrainImages(classdata.normal, classdata.synthetic)
    began = time.monotonic()
    history = train.fit(model, images, run.config, config, seed, path, device, run.num_workers)
    ckpt = {"format": train.FORMAT, "kind": train.KIND, "complete": True, "config": config,
            "model": {k: v.cpu() for k, v in model.state_dict().items()}, "history": history,
            "train_seconds": time.monotonic() - began, "torch_version": str(torch.__version__),
            "synthesis_part": [s.image_path for s in classdata.synthesis_part]}
    utils.save_torch(ckpt, path)
    utils.save_text(_loss_csv(history), os.path.join(folder, LOSS_LOG_NAME))
    return model, ckpt


def run_job(run: SegmentRun, classname: str, classdata: segdata.ClassData, seed: int, device: torch.device) -> dict:
    """Train (or reuse) and test one class and seed; its metrics row."""
    folder, config = run.folder(classname, seed), run.job_config(classname, seed)
    name = f"{run.dataset}_{classname}"
    excluded = "also tested: --anomaly_split all" if run.anomaly_split == "all" else "not tested"
    LOG.info("=== SEGMENT %s seed %d (%s; %d normal + %d synthetic training images, %d test images; %d anomalies in the "
             "synthesis part, %s)", name, seed, device, len(classdata.normal), len(classdata.synthetic),
             len(classdata.test), len(classdata.synthesis_part), excluded)
    _record(run, folder, config)
    model, _ = _trained(run, classdata, seed, folder, config, device)
    graph = networks.ScoreGraph(model)
    scores, maps, labels, masks = evaluate.score(graph, classdata.test, run.config.batch_size, device, run.num_workers)
    row = evaluate.class_row(scores, maps, labels, masks, run.config.steps)
    evaluate.write_outputs(folder, name, classdata.test, scores, maps)
    utils.save_json({"method": METHOD, "setting": run.setting, "seed": seed, "requested": list(run.classes),
                     "rows": {name: row}}, os.path.join(folder, evaluate.METRICS_NAME))
    return row


def run_all(run: SegmentRun) -> dict[str, dict]:
    """Every class and seed; rows by 'DATASET_CLASS' (+ ' seed N' with several seeds). Data of every class is
    checked before anything trains."""
    utils.check_writable_folder(run.results_path, "--results_path")
    device = utils.select_device(run.gpu)
    classes = {c: segdata.load_class(run.dataset, run.datapath, run.synthetic, c, run.config.resize,
                                     run.config.imagesize, run.anomaly_split) for c in run.classes}
    for seed in run.seeds:  # checkpoints of another configuration, or missing for --test test: fail now
        for classname in classes:
            path = os.path.join(run.folder(classname, seed), CHECKPOINT_NAME)
            saved = train.read_state(path, run.job_config(classname, seed), run.discard_damaged) or {}
            if run.test_only and not saved.get("complete"):
                raise UserError(f"--test test: no finished checkpoint at {path}; train it first with --test ckpt")
    if not run.test_only and run.config.encoder_weights != networks.WEIGHTS_NONE:
        networks.encoder_state(run.config.encoder, run.config.encoder_weights)  # a missing file fails now
    rows = {}
    for seed in run.seeds:
        for classname, classdata in classes.items():
            label = f"{run.dataset}_{classname}" + (f" seed {seed}" if len(run.seeds) > 1 else "")
            try:
                rows[label] = run_job(run, classname, classdata, seed, device)
            except runstate.Interrupted as exc:
                exc.job = label
                raise
    return rows
