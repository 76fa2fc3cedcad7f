"""Failures are contained and explained: a diverged or out-of-memory job stops with a one-line reason, the other
jobs go on, the exit code is 1 and the traceback is in RESULTS/logs/errors.log (CPU, tiny data)."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

import main
import pbas
import runner

ARGS = ["--gpu", "-1", "--seed", "0", "net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4",
        "--pretrain_embed_dimension", "32", "--target_embed_dimension", "32", "--dsc_hidden", "16", "--meta_epochs", "2",
        "dataset", "--batch_size", "4", "--resize", "64", "--imagesize", "64", "--num_workers", "0",
        "-d", "texture", "-d", "object", "mvtec"]


def rows(results: Path) -> list[str]:
    with open(results / "results.csv") as f:
        return [r["Row Names"] for r in csv.DictReader(f)]


def test_nan_loss_stops_that_class_only(mvtec_root: Path, tmp_path: Path, monkeypatch, caplog):
    loss = pbas.PBAS.loss
    calls = {"n": 0}

    def diverging(self, feats, labels, positions, noise=None):
        value, stats = loss(self, feats, labels, positions, noise)
        calls["n"] += 1
        if calls["n"] == 3:  # texture, epoch 1 (2 steps per epoch)
            stats = {**stats, "loss": torch.tensor(float("nan"))}
        return value, stats

    monkeypatch.setattr(pbas.PBAS, "loss", diverging)
    assert main.cli(["--results_path", str(tmp_path), *ARGS, str(mvtec_root)]) == 1
    assert rows(tmp_path) == ["mvtec_object", "Mean"]
    failed = [r.message for r in caplog.records if "mvtec_texture failed" in r.getMessage()]
    assert failed and "diverged: epoch 1: loss = nan" in caplog.text
    assert "Diverged" in (tmp_path / "logs" / "errors.log").read_text()


def test_out_of_memory_names_the_options_to_lower(mvtec_root: Path, tmp_path: Path, monkeypatch, caplog):
    run_job = runner.engine.run_job

    def oom_for_texture(job, *args, **kwargs):
        if job.name == "mvtec_texture":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return run_job(job, *args, **kwargs)

    monkeypatch.setattr(runner.engine, "run_job", oom_for_texture)
    assert main.cli(["--results_path", str(tmp_path), *ARGS, str(mvtec_root)]) == 1
    assert rows(tmp_path) == ["mvtec_object", "Mean"]
    message = next(r.getMessage() for r in caplog.records if "mvtec_texture failed" in r.getMessage())
    assert "out of memory" in message and "--batch_size" in message and "--cache" in message
    assert "\n" not in message
    assert "OutOfMemoryError" in (tmp_path / "logs" / "errors.log").read_text()
