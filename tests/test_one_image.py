"""One training image (one-shot inspection): its centers are its own projected features, so x - c is exactly zero on
the first step. PBAS's direction and CRAS's noise scale get defined values there (and only there), and both
methods train (CLI, CPU, tiny data)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import cras
import main
import pbas
from datasets.synthetic import make_dataset


def test_pbas_direction_is_zero_on_the_center_and_the_plain_quotient_elsewhere():
    offset = torch.randn(6, 5)
    offset[2] = 0
    dist = offset.norm(dim=1, keepdim=True)
    direction = pbas.center_direction(offset, dist)
    assert torch.equal(direction[2], torch.zeros(5))
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(direction[keep], offset[keep] / dist[keep])  # bit for bit the release's expression


def test_cras_noise_scale_is_one_on_the_center_and_the_release_expression_elsewhere():
    gen = torch.Generator().manual_seed(0)
    dist, noise_norm, k = torch.rand(40, generator=gen) + 0.1, torch.rand(40, generator=gen) + 0.5, 0.3
    release = (noise_norm / dist / (noise_norm / dist).mean() - 1) * k + 1
    assert torch.equal(cras.residual_scale(dist, noise_norm, k), release)
    dist[[3, 7]] = 0
    alpha = cras.residual_scale(dist, noise_norm, k)
    off = torch.ones(40, dtype=torch.bool)
    off[[3, 7]] = False
    r = noise_norm[off] / dist[off]
    assert torch.equal(alpha[[3, 7]], torch.ones(2))
    assert torch.allclose(alpha[off], (r / r.mean() - 1) * k + 1)  # the mean over the patches off their centers
    assert torch.equal(cras.residual_scale(torch.zeros(4), noise_norm[:4], k), torch.ones(4))


@pytest.fixture(scope="module")
def one_image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("one_image")
    make_dataset(root, classes=("texture", "object"), n_train=1, n_test_good=2, n_test_defect=2, size=32, seed=0)
    return root


NET = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "16",
       "--target_embed_dimension", "16", "--meta_epochs", "2"]
DATA = ["dataset", "--batch_size", "4", "--resize", "32", "--imagesize", "32", "--num_workers", "0"]


@pytest.mark.parametrize("method,net,data", [
    ("pbas", ["--dsc_hidden", "16"], ["-d", "texture"]),
    ("cras", [], ["--setting", "multi", "-d", "texture", "-d", "object"]),  # one image per class
    ("cras", [], ["--setting", "single", "-d", "texture"]),
])
def test_each_method_trains_on_one_image(one_image_root: Path, tmp_path: Path, method: str, net: list, data: list):
    args = ["--gpu", "-1", "--method", method, "--results_path", str(tmp_path), *NET, *net, *DATA, *data,
            "mvtec", str(one_image_root)]
    assert main.cli(args) == 0
    with open(next((tmp_path / "logs").rglob("*.csv"))) as f:
        epochs = list(csv.DictReader(f))
    assert len(epochs) == 2 and all(math.isfinite(float(row["loss"])) for row in epochs)
    with open(tmp_path / "results.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["Row Names"] != "Mean"]
    assert rows and all(math.isfinite(float(row["image_auroc"])) for row in rows)
