"""Several seeds per run: each a complete run in its own folder; results.csv holds the mean and the standard
deviation over the seeds (results_seeds.csv each seed's rows)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import main
import utils


def read(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def group(seed: int) -> dict:
    return {"method": "pbas", "setting": "single", "seed": seed}


def test_std_of_identical_seeds_is_zero_and_of_different_seeds_is_numpys():
    same = {c: 0.75 for c in utils.RESULT_COLUMNS}
    rows = [("mvtec_a", same, group(0)), ("mvtec_a", same, group(1))]
    values = [0.5, 0.9, 0.7]
    rows += [("mvtec_b", {**same, "image_auroc": v, "last_pixel_pro": 1 - v}, group(s)) for s, v in enumerate(values)]
    table = {r["Row Names"]: r for r in csv.DictReader(utils.seeds_csv(rows).splitlines())}
    assert list(table) == ["mvtec_a", "mvtec_b", "Mean"]
    assert float(table["mvtec_a"]["image_auroc_std"]) == 0.0 and float(table["mvtec_a"]["image_auroc"]) == 0.75
    b = table["mvtec_b"]
    assert float(b["image_auroc_mean"]) == pytest.approx(np.mean(values), abs=1e-15)
    assert float(b["image_auroc_std"]) == pytest.approx(np.std(values), abs=1e-15)
    assert float(b["last_pixel_pro_std"]) == pytest.approx(np.std([1 - v for v in values]), abs=1e-15)
    assert float(b["image_auroc"]) == pytest.approx(np.mean(values), abs=1e-15)  # the release column: the mean
    assert b["seed"] == "0 1 2" and table["mvtec_a"]["seed"] == "0 1"  # the seeds of the row
    # Mean row: each seed's mean over its classes, then mean and std over the seeds
    per_seed = [np.mean([0.75, values[0]]), np.mean([0.75, values[1]]), values[2]]
    assert float(table["Mean"]["image_auroc_mean"]) == pytest.approx(np.mean(per_seed), abs=1e-15)
    assert float(table["Mean"]["image_auroc_std"]) == pytest.approx(np.std(per_seed), abs=1e-15)


def test_repeated_seed_option_runs_each_seed(mvtec_root: Path, tmp_path: Path):
    args = ["--gpu", "-1", "--seed", "0", "--seed", "1", "--results_path", str(tmp_path),
            "net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "32",
            "--target_embed_dimension", "32", "--dsc_hidden", "16", "--meta_epochs", "1",
            "dataset", "--batch_size", "4", "--resize", "64", "--imagesize", "64", "--num_workers", "0",
            "-d", "texture", "-d", "object", "mvtec", str(mvtec_root)]
    assert main.cli(args) == 0
    for seed in (0, 1):
        assert (tmp_path / "models" / "pbas" / "mvtec_texture" / f"seed{seed}" / "checkpoint.pt").is_file()
    per_seed = read(tmp_path / "results_seeds.csv")
    assert [(r["Row Names"], r["seed"]) for r in per_seed] == [
        ("mvtec_texture", "0"), ("mvtec_object", "0"), ("Mean", "0"), ("mvtec_texture", "1"), ("mvtec_object", "1"), ("Mean", "1")]
    overall = {r["Row Names"]: r for r in read(tmp_path / "results.csv")}
    assert list(overall) == ["mvtec_texture", "mvtec_object", "Mean"]  # the order of -d
    for name in ("mvtec_texture", "mvtec_object", "Mean"):
        values = [float(r["pixel_auroc"]) for r in per_seed if r["Row Names"] == name]
        assert float(overall[name]["pixel_auroc_mean"]) == pytest.approx(np.mean(values), abs=1e-12)
        assert float(overall[name]["pixel_auroc_std"]) == pytest.approx(np.std(values), abs=1e-12)
        assert overall[name]["seed"] == "0 1"
    assert values[0] != values[1]  # the seeds really are different runs


def test_a_repeated_seed_value_is_an_error(mvtec_root: Path, tmp_path: Path, capfd):
    code = main.cli(["--seed", "1", "--seed", "1", "--results_path", str(tmp_path / "r"), "net", "dataset",
                     "-d", "object", "mvtec", str(mvtec_root)])
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and "--seed" in err[0] and not (tmp_path / "r").exists()
