"""The GPU-path decisions that the CPU can check (issue 18), with torch.cuda mocked where the decision needs a GPU:
the CRAS batch vote's tie rule, a NaN score stopping a job as Diverged (not a kernel failure), a broken CUDA
context ending its process and its worker being replaced, the current device set, the cache's free-memory
count, the bf16 capability check, the random state of a resume on fewer GPUs, the Trainer's timing hook,
the benchmark's memory figure and the onnxruntime node placement. The same paths on a GPU: tests/test_cuda.py."""
from __future__ import annotations

import collections
import math
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import cras
import engine
import inference
import pbas
import runner
import runstate
import utils
from conftest import benchmark

D, GRID, IMAGESIZE = 16, (4, 4), 16
POSITIONS = GRID[0] * GRID[1]
GIB = 2**30


# ----------------------------------------------------------------------------------------------
# a tiny job on stored features: the engine's own Trainer, no backbone
# ----------------------------------------------------------------------------------------------


def stored_source(features: torch.Tensor, batch_size: int) -> engine.FeatureSource:
    """A cached FeatureSource whose features [N, H*W, D] are given (no images, no encoder), on their device."""
    source = engine.FeatureSource(None, list(range(len(features))), batch_size, 0, features.device, "device", GRID)
    source._features = features
    return source


def tiny_trainer(method: str, train_feats: torch.Tensor, hooks: engine.FitHooks | None = None,
                 epochs: int = 2) -> engine.Trainer:
    """engine.Trainer of a one-class PBAS or CRAS job on stored features (on their device), tested on 4 normal
    + 4 shifted images."""
    device = train_feats.device
    torch.manual_seed(0)
    if method == "pbas":
        model = pbas.PBAS(pbas.PBASConfig(pretrain_embed_dimension=D, target_embed_dimension=D, dsc_hidden=8,
                                          meta_epochs=epochs, imagesize=IMAGESIZE, batch_size=4))
    else:
        model = cras.CRAS(cras.CRASConfig(pretrain_embed_dimension=D, target_embed_dimension=D, meta_epochs=epochs,
                                          imagesize=IMAGESIZE, batch_size=4), 1)
    model.to(device).seed_streams(0, device)
    gen = torch.Generator().manual_seed(1)
    test_feats = torch.randn(8, POSITIONS, D, generator=gen)
    test_feats[4:, :2] += 3.0  # anomalous patches
    masks = torch.zeros(8, IMAGESIZE, IMAGESIZE)
    masks[4:, :4, :8] = 1.0
    train = engine.TrainSet(stored_source(train_feats, 4), torch.zeros(len(train_feats), dtype=torch.long, device=device),
                            [list(range(len(train_feats)))])
    test = engine.ClassTest("mvtec_tiny", stored_source(test_feats.to(device), 4),
                            torch.tensor([0] * 4 + [1] * 4, device=device), masks.to(device))
    encoder = types.SimpleNamespace(train_backbone=False)  # make_optimizers/trained_state read only this
    trainer = engine.Trainer(model, encoder, train, [test], hooks)
    trainer.start()
    return trainer


def normal_features(n: int = 8) -> torch.Tensor:
    return torch.randn(n, POSITIONS, D, generator=torch.Generator().manual_seed(2))


def autocast_in_the_loss(method: str, device: torch.device, monkeypatch) -> dict[str, set]:
    """One bf16 training loss of a model with a projector (pre_proj=1) on ``device``, observed from inside: the
    output dtypes of every Linear layer (projector and discriminator) and, in the center search, whether autocast
    was on and the dtype of what it compares."""
    seen: dict[str, set] = {"linear": set(), "search autocast": set(), "search dtype": set()}

    def watch(search):
        def watched(x, bank, *args, **kwargs):
            seen["search autocast"].add(torch.is_autocast_enabled(device.type))
            seen["search dtype"] |= {x.dtype, bank.dtype}
            return search(x, bank, *args, **kwargs)
        return watched

    if method == "pbas":
        model = pbas.PBAS(pbas.PBASConfig(pretrain_embed_dimension=D, target_embed_dimension=D, dsc_hidden=8, pre_proj=1),
                          precision="bf16")
        model.center = torch.randn(POSITIONS, D)
        monkeypatch.setattr(pbas, "nearest_center", watch(pbas.nearest_center))
    else:
        model = cras.CRAS(cras.CRASConfig(pretrain_embed_dimension=D, target_embed_dimension=D, pre_proj=1), 1,
                          precision="bf16")
        model.center = torch.randn(1, POSITIONS, D)
        monkeypatch.setattr(cras, "cosine_argmax", watch(cras.cosine_argmax))
    model.to(device).seed_streams(0, device)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: seen["linear"].add(out.dtype))
    model.train()
    loss, _ = model.loss(torch.randn(2 * POSITIONS, D, device=device), torch.zeros(2, dtype=torch.long, device=device),
                         POSITIONS)
    seen["loss"] = {loss.dtype}
    return seen


@pytest.mark.parametrize("method", ["pbas", "cras"])
def test_bf16_autocast_is_on_in_the_linear_layers_and_off_in_the_center_search(method, monkeypatch):
    seen = autocast_in_the_loss(method, torch.device("cpu"), monkeypatch)
    assert seen == {"linear": {torch.bfloat16}, "search autocast": {False}, "search dtype": {torch.float32},
                    "loss": {torch.float32}}


# ----------------------------------------------------------------------------------------------
# point 4: the CRAS batch vote
# ----------------------------------------------------------------------------------------------


def test_batch_vote_gives_a_tie_to_the_smallest_class_as_torch_mode_on_the_cpu():
    assert int(cras.batch_vote(torch.tensor([2, 0, 2, 0, 1]), 3)) == 0
    assert int(cras.batch_vote(torch.tensor([3, 1, 3, 1, 2, 2]), 4)) == 1  # three-way tie
    assert int(cras.batch_vote(torch.tensor([2, 2, 0]), 3)) == 2  # a majority wins whatever its index
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):  # the release's torch.mode on the CPU (the golden values): the same class, ties included
        votes = torch.randint(0, 4, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen)
        assert int(cras.batch_vote(votes, 4)) == int(torch.mode(votes).values)


def test_cras_scores_a_tied_batch_with_the_smallest_tied_class():
    model = cras.CRAS(cras.CRASConfig(pretrain_embed_dimension=D, target_embed_dimension=D, pre_proj=0), 3).eval()
    banks = F.normalize(torch.randn(3, POSITIONS, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    model.center = banks
    x = banks[[2, 0, 2, 0]] + 0.01  # two images nearest to bank 2, two to bank 0
    assert cras.cosine_argmax(x.flatten(1), banks.flatten(1)).tolist() == [2, 0, 2, 0]
    assert model.classify(x).tolist() == [0, 0, 0, 0]
    _, classes = model.patch_scores(x.reshape(-1, D), GRID)
    assert classes.tolist() == [0, 0, 0, 0]


# ----------------------------------------------------------------------------------------------
# point 2: a NaN score stops the job as Diverged; a broken CUDA context ends the process's jobs
# ----------------------------------------------------------------------------------------------


def test_finite_bce_equals_binary_cross_entropy_on_finite_scores():
    scores = torch.rand(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    for target in (torch.zeros_like(scores), torch.ones_like(scores)):
        a, b = scores.clone().requires_grad_(), scores.clone().requires_grad_()
        ours, ref = common.finite_bce(a, target), F.binary_cross_entropy(b, target)
        ours.backward()
        ref.backward()
        assert torch.equal(ours, ref) and torch.equal(a.grad, b.grad)  # bit for bit: the golden values stay


@pytest.mark.parametrize("method", ["pbas", "cras"])
def test_a_nan_score_is_a_nan_loss_not_a_kernel_error(method):
    """F.binary_cross_entropy refuses a NaN probability (a device-side assert on CUDA, a RuntimeError here)."""
    trainer = tiny_trainer(method, normal_features())
    feats = torch.randn(2 * POSITIONS, D)
    feats[3] = math.nan
    trainer.method.train()
    loss, stats = trainer.method.loss(feats, torch.zeros(2, dtype=torch.long), POSITIONS)
    loss.backward()
    assert math.isnan(float(loss.detach())) and math.isnan(float(stats["true_loss"]))


@pytest.mark.parametrize("method", ["pbas", "cras"])
def test_a_nan_score_stops_the_job_as_diverged(method):
    feats = normal_features()
    feats[5, 7] = math.nan  # one patch of one image of the second batch
    trainer = tiny_trainer(method, feats)
    trainer.method.center = trainer.method.center.nan_to_num()  # the centers were built from the NaN batch too
    with pytest.raises(engine.Diverged, match="epoch 0: loss = nan"):
        trainer.run()


def broken_run(jobs_failing: set[str], monkeypatch) -> None:
    """run_jobs' dependencies replaced: no backbone; run_job fails (a CUDA error) for ``jobs_failing`` and
    returns its pid otherwise; every failure leaves the device 'broken'."""
    def run_job(job, *_args, **_kwargs):
        if job.name in jobs_failing:
            raise RuntimeError(f"CUDA error: device-side assert triggered (pid {os.getpid()})")
        return {job.name: {"pid": os.getpid()}}

    monkeypatch.setattr(runner.backbones, "load_backbone", lambda name: (None, None))
    monkeypatch.setattr(runner, "Embedder", lambda *args: None)
    monkeypatch.setattr(runner.engine, "run_job", run_job)
    monkeypatch.setattr(runner, "device_broken", lambda device: True)


def fake_run(tmp_path: Path, gpus: tuple[int, ...], names: list[str]):
    opts = runner.RunOptions(method="pbas", config=pbas.PBASConfig(), dataset="mvtec", datapath=str(tmp_path), classes=names,
                             setting="single", resize=288, num_workers=0, seeds=(0,), test="ckpt", gpu=gpus,
                             results_path=str(tmp_path), log_dir=str(tmp_path), precision="fp32", cache="auto",
                             release_weights=None)
    jobs = [types.SimpleNamespace(name=n, seed=0) for n in names]
    reports: dict[int, tuple] = {}
    return opts, jobs, reports, lambda index, rows, error: reports.__setitem__(index, (rows, error))


def test_a_broken_cuda_context_stops_the_process_taking_more_jobs(tmp_path: Path, monkeypatch):
    broken_run({"a"}, monkeypatch)
    opts, jobs, reports, report = fake_run(tmp_path, (-1,), ["a", "b"])
    with pytest.raises(runner.BrokenDevice, match="device-side assert"):
        runner.run_jobs(opts, enumerate(jobs), -1, report)
    assert list(reports) == [0] and "device-side assert" in reports[0][1]  # b was not taken


def test_a_worker_with_a_broken_cuda_context_exits_and_is_replaced(tmp_path: Path, monkeypatch):
    """Real worker processes (forked here, so that the replaced functions apply; CUDA uses spawn)."""
    broken_run({"a"}, monkeypatch)
    monkeypatch.setattr(runner, "WORKER_START_METHOD", "fork")
    opts, jobs, reports, report = fake_run(tmp_path, (-1,), ["a", "b", "c"])
    runner.run_parallel(opts, jobs, report)
    assert sorted(reports) == [0, 1, 2]
    failed_pid = int(reports[0][1].split("pid ")[1].split(")")[0])
    assert reports[1][0]["b"]["pid"] != failed_pid and reports[2][0]["c"]["pid"] != failed_pid  # a new process


def test_device_broken_is_false_on_the_cpu():
    assert not runner.device_broken(torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# points 3, 5, 6: current device, free memory, bf16
# ----------------------------------------------------------------------------------------------


def fake_gpus(monkeypatch, count: int = 2) -> list:
    current: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


def test_select_device_makes_the_gpu_current(monkeypatch):
    current = fake_gpus(monkeypatch)
    assert utils.select_device(1) == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert utils.select_device(-1) == torch.device("cpu") and len(current) == 1


def test_run_jobs_and_predict_select_their_device(tmp_path: Path, monkeypatch):
    asked = []

    def select(gpu):
        asked.append(gpu)
        raise utils.UserError("selected")

    monkeypatch.setattr(utils, "select_device", select)
    opts, _, _, report = fake_run(tmp_path, (1,), [])
    with pytest.raises(utils.UserError, match="selected"):
        runner.run_jobs(opts, iter(()), 1, report)
    image = tmp_path / "x.png"
    utils.save_png(np.zeros((8, 8, 3), np.uint8), str(image))
    opts = inference.PredictOptions(checkpoint="none", inputs=[str(image)], output=str(tmp_path / "out"), threshold=None,
                                    pixel_threshold=None, batch_size=1, gpu=1, precision="fp32")
    with pytest.raises(utils.UserError, match="selected"):
        inference.predict(opts, runner.METHODS)
    assert asked == [1, 1]


def test_cache_counts_pytorch_reserved_but_unallocated_memory_as_free(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * GIB)
    monkeypatch.setattr(utils, "available_host_memory", lambda: 0)
    gpu = torch.device("cuda", 0)
    assert engine.free_device_memory(gpu) == 9 * GIB
    assert engine.choose_cache("auto", gpu, 5 * GIB) == "device"  # 5 < 0.6 x (1 free + 8 cached)
    assert engine.choose_cache("auto", gpu, 6 * GIB) == "off"


@pytest.mark.parametrize("capability,ok", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_needs_compute_capability_8(monkeypatch, capability, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # 2.14 on a V100
    try:
        if ok:
            utils.configure_precision("bf16", torch.device("cuda", 0))
        else:
            with pytest.raises(utils.UserError) as info:
                utils.configure_precision("bf16", torch.device("cuda", 0))
            message = str(info.value)
            assert "\n" not in message and "8.0" in message and f"{capability[0]}.{capability[1]}" in message
    finally:
        utils.configure_precision("fp32", torch.device("cpu"))
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default


# ----------------------------------------------------------------------------------------------
# point 7: the random state of a resume on fewer visible GPUs
# ----------------------------------------------------------------------------------------------


def fake_cuda_rng(monkeypatch, visible: int) -> list:
    restored: list = []

    def get(device):
        assert device.index < visible
        return torch.tensor([device.index], dtype=torch.uint8)

    def set_all(states):
        if len(states) > visible:
            raise IndexError("list index out of range")  # what torch does with more states than devices

    def set_one(state, device):
        assert device.index < visible
        restored.append((int(state[0]), device.index))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_one)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [get(torch.device("cuda", i)) for i in range(visible)])
    return restored


def test_resume_on_fewer_visible_gpus_restores_the_jobs_device_only(monkeypatch, tmp_path: Path):
    fake_cuda_rng(monkeypatch, visible=2)
    torch.manual_seed(5)
    state = runstate.rng_state(torch.device("cuda", 1))  # the job ran on the second of two GPUs
    expected = torch.rand(3)
    utils.save_torch(state, str(tmp_path / "state.pt"))
    restored = fake_cuda_rng(monkeypatch, visible=1)  # requeued where one GPU is visible
    runstate.set_rng_state(utils.load_tensors(str(tmp_path / "state.pt")), torch.device("cuda", 0))
    assert restored == [(1, 0)]  # the job's generator, now on cuda:0
    assert torch.equal(torch.rand(3), expected)  # the CPU streams as before


def test_a_state_of_every_visible_gpu_restores_the_entry_of_the_jobs_device(monkeypatch):
    restored = fake_cuda_rng(monkeypatch, visible=1)
    old = {**runstate.rng_state(), "cuda": [torch.tensor([7], dtype=torch.uint8), torch.tensor([8], dtype=torch.uint8)]}
    runstate.set_rng_state(old, torch.device("cuda", 0))
    assert restored == [(7, 0)]
    runstate.set_rng_state({**old, "cuda": old["cuda"][:1]}, torch.device("cuda", 1))  # no entry: nothing, no error
    runstate.set_rng_state(old, torch.device("cpu"))
    assert restored == [(7, 0)]


# ----------------------------------------------------------------------------------------------
# issue 17 point 3 and point 8: the benchmark times the Trainer; its memory figure
# ----------------------------------------------------------------------------------------------


def test_the_trainer_times_its_phases_through_its_hook():
    bench_train = benchmark("bench_train")

    timer = bench_train.PhaseTimer(torch.device("cpu"))
    trainer = tiny_trainer("pbas", normal_features(), engine.FitHooks(timer=timer), epochs=3)
    result = trainer.run()
    assert [len(timer.seconds[p]) for p in ("center", "train", "eval")] == [1, 3, 3]
    assert all(t > 0 for ts in timer.seconds.values() for t in ts) and result.best.epoch in (0, 1, 2)


def test_benchmark_memory_is_the_peak_reservation_plus_the_context(monkeypatch):
    bench_train = benchmark("bench_train")

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 15 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 18 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 12 * GIB)
    assert bench_train.peak_gpu_bytes(torch.device("cuda", 0)) == 23 * GIB  # 18 + (80 - 60 - 15)


def test_gpu_report_checks_the_memory_target_on_the_reserved_column():
    bench_train, gpu_report = benchmark("bench_train"), benchmark("gpu_report")

    def timing(name: str, peak: float, step: float) -> bench_train.PathTiming:
        per_class = {"mvtec_carpet": {"image_auroc": 0.9, "pixel_auroc": 0.8}}
        return bench_train.PathTiming(name, 1.0, 0.5, 2.0, step, 0.5, 0.01, 1.0, 0.5, peak, per_class, 280, 117)

    visa = gpu_report.Step("visa", [], 1, bench_train.table([timing("cached (device) fp32", 21.5, 0.01)], 640), 0)
    cpu = gpu_report.Step("cras", [], 1, bench_train.table([timing("cached (device) bf16", 9.0, 0.040)], 100), 0)
    dev = gpu_report.Step("cras", [], 1, bench_train.table([timing("cached (device) bf16", 9.0, 0.012)], 100), 0)
    failed = gpu_report.Step("x", [], 1, "", 1)
    steps = {"pbas": failed, "visa": visa, "infer": failed, "cras": cpu, "cras_noise_device": dev}
    verdicts = {t.split(":")[0]: (m, v) for t, m, v in gpu_report.check_targets(steps)}
    assert verdicts["largest VisA class, peak GPU memory (reserved + context)"] == ("21.5 GiB", "FAIL")
    assert gpu_report.noise_table(steps)[2] == "| cached (device) bf16 | 40.0 ms | 12.0 ms |"


# ----------------------------------------------------------------------------------------------
# point 9: onnxruntime in true fp32, nodes placed on the CPU provider found
# ----------------------------------------------------------------------------------------------


def test_cuda_provider_options_turn_tf32_off():
    providers = inference.ort_providers(torch.device("cuda", 1))
    assert providers[0] == (inference.CUDA_PROVIDER, {"device_id": "1", "use_tf32": "0"})
    assert providers[1] == inference.CPU_PROVIDER and inference.ort_providers(torch.device("cpu")) == [inference.CPU_PROVIDER]


def test_node_placement_counts_the_floating_point_nodes_of_each_provider():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Shape", ["images"], ["shape"]),  # integer shape arithmetic: not counted
         helper.make_node("Relu", ["images"], ["relu"]),
         helper.make_node("Reshape", ["relu", "shape"], ["out"])],
        "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 3, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    placed = inference.node_placement(model.SerializeToString(), [inference.CPU_PROVIDER],
                                      np.ones((2, 3, 4, 4), np.float32))
    assert placed == {inference.CPU_PROVIDER: collections.Counter({"Relu": 1, "Reshape": 1})}
