"""The CUDA tier: the real GPU paths (device and host feature caches, TF32 and bf16, --test test, two workers,
predict, ONNX with the CUDA provider, reproducible center initialisation). ``pytest -m cuda``; every test skips,
with its reason, where no GPU is available. ``python benchmarks/gpu_report.py`` runs this tier first."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import engine
import inference
import main
import pbas
import utils
from common import Embedder
from conftest import TRAINED_CLASS, TRAINED_IMAGESIZE

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA tier needs a GPU")]

NET = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "64",
       "--target_embed_dimension", "64", "--meta_epochs", "3"]
DATA = ["dataset", "--batch_size", "4", "--resize", "64", "--imagesize", "64", "--num_workers", "0"]


def run(results: Path, root: Path, *glob: str, method: str = "pbas", test: str = "ckpt", classes=("texture", "object")):
    net = [*NET, "--dsc_hidden", "32"] if method == "pbas" else NET
    data = DATA if method == "pbas" else [*DATA, "--setting", "multi"]
    code = main.cli(["--gpu", "0", "--method", method, "--seed", "0", "--test", test, "--results_path", str(results),
                     *glob, *net, *data, *[a for c in classes for a in ("-d", c)], "mvtec", str(root)])
    assert code == 0
    with open(results / "results.csv") as f:
        return {r["Row Names"]: {k: float(v) for k, v in r.items() if k not in ("Row Names", *utils.GROUP_COLUMNS, *utils.SEED_GROUP_COLUMNS)}
                for r in csv.DictReader(f)}


def close(a: dict, b: dict, tol: float) -> None:
    for name in a:
        for key in a[name]:
            assert abs(a[name][key] - b[name][key]) <= tol or (np.isnan(a[name][key]) and np.isnan(b[name][key])), (name, key)


@pytest.mark.parametrize("method", ["pbas", "cras"])
def test_device_and_host_caches_give_the_same_metrics(mvtec_root: Path, tmp_path: Path, method: str):
    device = run(tmp_path / "device", mvtec_root, "--cache", "device", method=method)
    host = run(tmp_path / "host", mvtec_root, "--cache", "host", method=method)
    off = run(tmp_path / "off", mvtec_root, "--cache", "off", method=method)
    close(device, host, 0.0)  # the same stored features, only another way to the GPU
    close(device, off, 1e-4)


def test_host_cache_lives_in_ordinary_memory_and_streams_through_pinned_buffers(mvtec_root: Path):
    gpu = torch.device("cuda", 0)
    _, stages = main.backbones.load_backbone("efficientnet_lite0")
    encoder = engine.Encoder(Embedder(stages, ("blocks.2", "blocks.4"), 3, 64, 64).to(gpu).eval(), "fp32")
    train, _ = datasets.build_datasets("mvtec", str(mvtec_root), "texture", 64, 64)
    grid = encoder.grid(64, gpu)
    host = engine.FeatureSource(encoder, train, 3, 0, gpu, "host", grid)
    device = engine.FeatureSource(encoder, train, 3, 0, gpu, "device", grid)
    host.prepare()
    assert host._features.device.type == "cpu" and not host._features.is_pinned()
    order = list(reversed(range(len(train))))
    for a, b in zip(host.batches(order), device.batches(order), strict=True):
        assert a.device == gpu and torch.equal(a, b)


@pytest.mark.parametrize("precision,tol", [("tf32", 0.003), ("bf16", 0.003)])
def test_reduced_precision_stays_within_0_3_points_of_fp32(mvtec_root: Path, tmp_path: Path, precision: str, tol: float):
    fp32 = run(tmp_path / "fp32", mvtec_root, "--precision", "fp32", method="cras")
    other = run(tmp_path / precision, mvtec_root, "--precision", precision, method="cras")
    for key in ("image_auroc", "pixel_auroc", "last_image_auroc", "last_pixel_auroc"):
        assert abs(other["Mean"][key] - fp32["Mean"][key]) <= tol, key


@pytest.mark.parametrize("method", ["pbas", "cras"])
def test_test_mode_round_trip_on_the_gpu(mvtec_root: Path, tmp_path: Path, method: str):
    trained = run(tmp_path, mvtec_root, method=method)
    (tmp_path / "results.csv").unlink()
    close(trained, run(tmp_path, mvtec_root, method=method, test="test"), 1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_workers_on_two_gpus(mvtec_root: Path, tmp_path: Path):
    single = run(tmp_path / "one", mvtec_root)
    parallel = run(tmp_path / "two", mvtec_root, "--gpu", "1")  # --gpu 0 (from run) and --gpu 1
    close(single, parallel, 1e-4)


def test_predict_on_the_gpu_gives_the_cpu_scores(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path):
    folder = mvtec_root / TRAINED_CLASS / "test"
    scores = {}
    for gpu in ("0", "-1"):
        out = tmp_path / gpu
        assert main.cli(["--gpu", gpu, "predict", "--checkpoint", str(trained_checkpoint), str(folder), "--output", str(out)]) == 0
        with open(out / inference.PREDICTIONS_NAME, newline="") as f:
            scores[gpu] = {r["path"]: float(r["image_score"]) for r in csv.DictReader(f)}
    assert scores["0"].keys() == scores["-1"].keys()
    for path in scores["0"]:
        assert abs(scores["0"][path] - scores["-1"][path]) <= 1e-3, path


def test_onnx_runs_on_the_cuda_provider(trained_checkpoint: Path, tmp_path: Path):
    onnxruntime = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider: pip uninstall onnxruntime && pip install -r requirements-gpu.txt")
    path = tmp_path / "model.onnx"
    assert main.cli(["export", "--checkpoint", str(trained_checkpoint), "--output", str(path)]) == 0
    session = onnxruntime.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers()[0] == "CUDAExecutionProvider"  # really in use, not a silent CPU fallback
    model, _ = inference.load_model(str(trained_checkpoint), torch.device("cpu"), main.METHODS)
    images = torch.randn(4, 3, TRAINED_IMAGESIZE, TRAINED_IMAGESIZE)
    got = session.run(None, {inference.ONNX_INPUTS[0]: images.numpy()})
    with torch.no_grad():
        want = inference.ExportGraph(model.graph()).eval()(images)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-3, rtol=0)


def test_center_initialisation_is_reproducible_on_the_gpu():
    gen = torch.Generator().manual_seed(0)
    center, a = torch.randn(1296, 64, generator=gen), torch.randn(1296, 64, generator=gen)
    idx = torch.randint(0, 40, (1296,), generator=gen)  # many hits on few rows
    runs = [pbas.update_center(center.cuda(), a.cuda(), idx.cuda()) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    torch.testing.assert_close(runs[0].cpu(), pbas.update_center(center, a, idx), atol=1e-5, rtol=0)


def test_bf16_center_search_returns_the_fp32_indices_on_the_gpu():
    from test_numerics import near_ties

    rows, centers, expected = near_ties()
    model = pbas.PBAS(pbas.PBASConfig(pretrain_embed_dimension=64, target_embed_dimension=64, pre_proj=0, dsc_hidden=8),
                      precision="bf16").cuda()
    model.center = centers.cuda()
    _, _, idx = model.synthesize(model.project(rows.cuda()))
    assert torch.equal(idx.cpu(), expected)
