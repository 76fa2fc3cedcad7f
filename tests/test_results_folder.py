"""The results folder is the unit of truth: results.csv and config.json hold every job run into it, whatever the
order, concurrency, classes, seeds and methods of the runs (CPU, tiny data)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import main
import runner
import utils

REPO = Path(__file__).resolve().parent.parent
HANG_LIMIT = 1800  # seconds; only guards against a hang (two trainings side by side on a loaded machine)
NET = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "32",
       "--target_embed_dimension", "32", "--meta_epochs", "1"]
DATA = ["dataset", "--batch_size", "4", "--resize", "64", "--imagesize", "64", "--num_workers", "0"]
PBAS_NET = [*NET, "--dsc_hidden", "16"]


def argv(results: Path, root: Path, *classes: str, method: str = "pbas", seed: int = 0, setting: str = "multi") -> list[str]:
    net, data = (PBAS_NET, DATA) if method == "pbas" else (NET, [*DATA, "--setting", setting])
    return ["--gpu", "-1", "--method", method, "--seed", str(seed), "--results_path", str(results), *net, *data,
            *[a for c in classes for a in ("-d", c)], "mvtec", str(root)]


def table(results: Path, name: str = "results.csv") -> list[dict[str, str]]:
    with open(results / name) as f:
        return list(csv.DictReader(f))


def test_sequential_runs_of_other_classes_keep_every_row(mvtec_root: Path, tmp_path: Path):
    assert main.cli(argv(tmp_path, mvtec_root, "texture")) == 0
    assert main.cli(argv(tmp_path, mvtec_root, "object")) == 0
    rows = table(tmp_path)
    # not official MVTec classes, from two runs given one class each: by name
    assert [r["Row Names"] for r in rows] == ["mvtec_object", "mvtec_texture", "Mean"]
    mean = float(rows[2]["image_auroc"])
    assert abs(mean - (float(rows[0]["image_auroc"]) + float(rows[1]["image_auroc"])) / 2) < 1e-12
    runs = json.loads((tmp_path / "config.json").read_text())["runs"]
    assert set(runs) == {os.path.join("models", "pbas", f"mvtec_{c}", "seed0") for c in ("texture", "object")}


def test_concurrent_runs_into_one_folder_keep_both_rows(mvtec_root: Path, tmp_path: Path):
    """Two processes at the same time (two GPUs by hand, a job array), different classes, one folder."""
    procs = [subprocess.Popen([sys.executable, str(REPO / "main.py"), *argv(tmp_path, mvtec_root, c)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in ("texture", "object")]
    for p in procs:
        _, err = p.communicate(timeout=HANG_LIMIT)
        assert p.returncode == 0, err.decode()[-2000:]
    assert [r["Row Names"] for r in table(tmp_path)] == ["mvtec_object", "mvtec_texture", "Mean"]
    runs = json.loads((tmp_path / "config.json").read_text())["runs"]
    assert len(runs) == 2


def test_methods_and_seeds_are_separate_groups(mvtec_root: Path, tmp_path: Path):
    assert main.cli(argv(tmp_path, mvtec_root, "texture")) == 0
    assert main.cli(argv(tmp_path, mvtec_root, "texture", seed=1)) == 0
    assert main.cli(argv(tmp_path, mvtec_root, "texture", "object", method="cras")) == 0
    rows = table(tmp_path, "results_seeds.csv")
    groups = [(r["Row Names"], r["method"], r["setting"], r["seed"]) for r in rows]
    assert groups == [("mvtec_texture", "pbas", "single", "0"), ("Mean", "pbas", "single", "0"),
                      ("mvtec_texture", "pbas", "single", "1"), ("Mean", "pbas", "single", "1"),
                      ("mvtec_texture", "cras", "multi", "0"), ("mvtec_object", "cras", "multi", "0"),
                      ("Mean", "cras", "multi", "0")]
    assert rows[1]["image_auroc"] == rows[0]["image_auroc"]  # a Mean averages its own group only
    for seed in (0, 1):
        ckpt = torch.load(tmp_path / "models" / "pbas" / "mvtec_texture" / f"seed{seed}" / "checkpoint.pt", weights_only=True)
        assert ckpt["config"]["seed"] == seed


def test_an_unreadable_metrics_file_is_skipped_with_a_warning(mvtec_root: Path, tmp_path: Path, caplog):
    assert main.cli(argv(tmp_path, mvtec_root, "texture")) == 0
    stray = tmp_path / "models" / "pbas" / "mvtec_object" / "seed0"
    stray.mkdir(parents=True)
    (stray / "metrics.json").write_text("{not json")
    runner.rebuild_results(str(tmp_path))
    assert [r["Row Names"] for r in table(tmp_path)] == ["mvtec_texture", "Mean"]
    assert "ignoring unreadable" in caplog.text


def test_results_csv_groups_rows_and_means():
    rows = [("mvtec_a", {"image_auroc": 0.5}, {"method": "pbas", "setting": "single", "seed": 0}),
            ("mvtec_b", {"image_auroc": 1.0}, {"method": "pbas", "setting": "single", "seed": 0}),
            ("mvtec_a", {"image_auroc": 0.25}, {"method": "cras", "setting": "multi", "seed": 0})]
    lines = list(csv.DictReader(utils.results_csv(rows).splitlines()))
    assert [(r["Row Names"], r["method"], r["image_auroc"]) for r in lines] == [
        ("mvtec_a", "pbas", "0.5"), ("mvtec_b", "pbas", "1.0"), ("Mean", "pbas", "0.75"),
        ("mvtec_a", "cras", "0.25"), ("Mean", "cras", "0.25")]
