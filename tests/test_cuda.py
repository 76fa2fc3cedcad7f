"""The CUDA tier: the real GPU paths (device and host feature caches, the host cache under stress, TF32 and bf16
really in effect, autocast inside the loss, --test test, two workers, predict, ONNX with the CUDA provider in true
fp32, reproducible center initialisation, the CRAS vote's tie rule, the cache's free memory, the bf16 capability
check, a NaN score stopping a job without breaking the CUDA context). ``pytest -m cuda``; every test skips, with
its reason, where no GPU is available. ``python benchmarks/gpu_report.py`` runs this tier first."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import cras
import datasets
import engine
import inference
import main
import pbas
import runner
import utils
from common import Embedder
from conftest import TRAINED_CLASS, TRAINED_IMAGESIZE
from test_gpu_paths import POSITIONS, autocast_in_the_loss, normal_features, tiny_trainer

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


def image_scores(results: Path, method: str) -> dict[str, float]:
    """Every test image's score under the selected state, from the job folders' scores.csv."""
    out = {}
    for path in sorted(results.glob(f"models/{method}/*/seed0/{engine.SCORES_NAME}")):
        with open(path, newline="") as f:
            out.update({r["image_path"]: float(r["image_score"]) for r in csv.DictReader(f)})
    return out


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
    _, stages = runner.backbones.load_backbone("efficientnet_lite0")
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


SCORE_TOLERANCE = 0.05  # largest |image score - fp32's| after 3 epochs in reduced precision (scores lie in [0, 1])


@pytest.mark.parametrize("precision,tol", [("tf32", 0.003), ("bf16", 0.003)])
def test_reduced_precision_stays_within_0_3_points_of_fp32(mvtec_root: Path, tmp_path: Path, precision: str, tol: float):
    """AUROC on 7 test images moves in steps of 1/12, so it would pass if the precision never changed: the image
    scores must differ from fp32's (the reduced precision was in effect) and stay close to them."""
    if torch.cuda.get_device_capability(0) < utils.BF16_MIN_CAPABILITY:
        pytest.skip("TF32 and native bf16 need compute capability 8.0")
    fp32 = run(tmp_path / "fp32", mvtec_root, "--precision", "fp32", method="cras")
    other = run(tmp_path / precision, mvtec_root, "--precision", precision, method="cras")
    for key in ("image_auroc", "pixel_auroc", "last_image_auroc", "last_pixel_auroc"):
        assert abs(other["Mean"][key] - fp32["Mean"][key]) <= tol, key
    want, got = image_scores(tmp_path / "fp32", "cras"), image_scores(tmp_path / precision, "cras")
    assert want.keys() == got.keys() and len(want) == 14
    difference = max(abs(got[k] - want[k]) for k in want)
    assert 0 < difference <= SCORE_TOLERANCE, difference


@pytest.mark.parametrize("method", ["pbas", "cras"])
def test_bf16_autocast_inside_the_loss_on_the_gpu(method: str, monkeypatch):
    """With a projector (pre_proj=1): Linear layers in bf16, the center search in float32 without autocast."""
    seen = autocast_in_the_loss(method, torch.device("cuda", 0), monkeypatch)
    assert seen == {"linear": {torch.bfloat16}, "search autocast": {False}, "search dtype": {torch.float32},
                    "loss": {torch.float32}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_host_cache_under_stress(dtype: torch.dtype):
    """Many large batches through the two pinned staging buffers while the compute stream lags (a _sleep before
    each batch is used): every batch is kept (computed from on the compute stream, the yielded tensor dropped)
    and compared once after a final synchronize. A staging buffer refilled, or a device block reused, before
    its copy or use finished would show as a wrong batch."""
    gpu = torch.device("cuda", 0)
    n, batch, positions, dim = 96, 8, 1296, 128  # 5.3 MB per float32 batch, 12 batches: each buffer reused 6 times
    store = torch.randn(n, positions, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    source = engine.FeatureSource(None, list(range(n)), batch, 0, gpu, "host", (36, 36))
    source._features = store
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    kept = []
    for feats in source.batches(order):
        torch.cuda._sleep(5_000_000)  # a few ms of compute-stream delay before the batch is read
        kept.append(feats * 1.0)
    torch.cuda.synchronize(gpu)
    for i, got in enumerate(kept):
        want = store[order[i * batch: (i + 1) * batch]].reshape(-1, dim).float()
        assert torch.equal(got.cpu(), want), f"batch {i}"


def test_batch_vote_ties_go_to_the_same_class_as_on_the_cpu():
    gen = torch.Generator().manual_seed(0)
    cases = [torch.tensor([2, 0, 2, 0, 1]), torch.tensor([3, 1, 3, 1, 2, 2]), *(
        torch.randint(0, 4, (8,), generator=gen) for _ in range(200))]
    for votes in cases:
        assert int(cras.batch_vote(votes.cuda(), 4)) == int(cras.batch_vote(votes, 4)) == int(torch.mode(votes).values)


def test_cache_counts_the_allocators_cached_memory_as_free():
    gpu = torch.device("cuda", 0)
    block = torch.empty(2**30, dtype=torch.uint8, device=gpu)
    del block  # reserved by PyTorch's allocator, no longer allocated
    free, _ = torch.cuda.mem_get_info(gpu)
    assert engine.free_device_memory(gpu) >= free + 2**30
    torch.cuda.empty_cache()


def test_bf16_is_refused_below_compute_capability_8():
    gpu = torch.device("cuda", 0)
    try:
        if torch.cuda.get_device_capability(gpu) >= (8, 0):
            utils.configure_precision("bf16", gpu)
        else:
            with pytest.raises(utils.UserError, match="compute capability 8.0"):
                utils.configure_precision("bf16", gpu)
    finally:
        utils.configure_precision("fp32", gpu)


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
    providers = inference.ort_providers(torch.device("cuda", 0))  # use_tf32=0: the provider's fp32 is TF32 by default
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    assert session.get_providers()[0] == "CUDAExecutionProvider"  # really in use, not a silent CPU fallback
    images = torch.randn(4, 3, TRAINED_IMAGESIZE, TRAINED_IMAGESIZE)
    placed = inference.node_placement(path.read_bytes(), providers, images.numpy())
    assert not placed.get(inference.CPU_PROVIDER), placed  # no floating-point node fell back to the CPU provider
    model, _ = inference.load_model(str(trained_checkpoint), torch.device("cpu"), runner.METHODS)
    got = session.run(None, {inference.ONNX_INPUTS[0]: images.numpy()})
    with torch.no_grad():
        want = inference.ExportGraph(model.graph()).eval()(images)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=inference.ONNX_TOLERANCE, rtol=0)


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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_predict_on_the_second_gpu_makes_it_current(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path):
    folder = mvtec_root / TRAINED_CLASS / "test" / "good"
    try:
        assert main.cli(["--gpu", "1", "predict", "--checkpoint", str(trained_checkpoint), str(folder),
                         "--output", str(tmp_path)]) == 0
        assert torch.cuda.current_device() == 1
    finally:
        torch.cuda.set_device(0)


@pytest.mark.parametrize("method", ["pbas", "cras"])
def test_a_training_step_does_not_synchronise(method: str):
    """The NaN guard of the loss (common.finite_bce) costs no host synchronisation (sync debug mode 'error')."""
    gpu = torch.device("cuda", 0)
    trainer = tiny_trainer(method, normal_features().to(gpu))
    feats, labels = torch.randn(2 * POSITIONS, trainer.method.config.target_embed_dimension, device=gpu), \
        torch.zeros(2, dtype=torch.long, device=gpu)
    noise = torch.randn_like(feats) if method == "cras" else None  # the CPU draw's copy is not what is checked here
    trainer.method.train()
    torch.cuda.synchronize(gpu)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = trainer.method.loss(feats, labels, POSITIONS, noise)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# Last in the file: without the guard a NaN score is a device-side assert that breaks this process's CUDA context.
@pytest.mark.parametrize("method", ["pbas", "cras"])
def test_a_nan_score_on_the_gpu_stops_as_diverged_and_cuda_still_works(method: str):
    gpu = torch.device("cuda", 0)
    feats = normal_features()
    feats[5, 7] = math.nan
    trainer = tiny_trainer(method, feats.to(gpu))
    trainer.method.center = trainer.method.center.nan_to_num()
    with pytest.raises(engine.Diverged, match="loss = nan"):
        trainer.run()
    assert not runner.device_broken(gpu)
    assert float(torch.ones(4, device=gpu).sum()) == 4.0
