"""Without the feature cache, data-loading workers start once per job and serve every pass (centers, epochs,
each class's test set, final evaluations): same results as without workers (CLI, CPU, tiny data)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.utils.data.dataloader as dataloader

import main
from datasets.synthetic import make_dataset

ARGS = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "16",
        "--target_embed_dimension", "16", "--meta_epochs", "2",
        "dataset", "--setting", "multi", "--batch_size", "2", "--resize", "32", "--imagesize", "32",
        "-d", "texture", "-d", "object"]


def test_workers_persist_across_passes_and_test_sets(tmp_path: Path, monkeypatch):
    make_dataset(tmp_path / "data", classes=("texture", "object"), n_train=2, n_test_good=1, n_test_defect=1, size=32)
    started = []
    start = dataloader._MultiProcessingDataLoaderIter.__init__

    def counted(self, loader):
        started.append(loader.num_workers)
        start(self, loader)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", counted)
    run = lambda results, workers: main.cli(["--gpu", "-1", "--method", "cras", "--cache", "off", "--results_path",
                                             str(results), *ARGS, "--num_workers", workers, "mvtec", str(tmp_path / "data")])
    assert run(tmp_path / "workers", "2") == 0
    # passes: 2 center passes, 2 epochs, 2 x 2 test sets, final evaluation(s) of 2 test sets, 2 normal statistics
    assert started == [2]
    assert run(tmp_path / "none", "0") == 0
    assert (tmp_path / "workers" / "results.csv").read_text() == (tmp_path / "none" / "results.csv").read_text()
    ckpt = lambda r: torch.load(r / "models" / "cras" / "mvtec_dataset" / "seed0" / "checkpoint.pt", weights_only=True)
    a, b = ckpt(tmp_path / "workers"), ckpt(tmp_path / "none")
    assert torch.equal(a["center"], b["center"])
    for part in ("projector", "discriminator"):
        for name, tensor in a["last"]["state"][part].items():
            assert torch.equal(tensor, b["last"]["state"][part][name]), (part, name)


def test_job_workers_start_loader_workers_as_the_parent_does():
    """A spawned process defaults to spawn for its own children: every DataLoader of a --gpu a --gpu b job worker
    would then import torch again (seconds per pass). The workers take the parent's start method instead."""
    import multiprocessing

    import loader_probe
    import runner

    method = multiprocessing.get_start_method()
    if method != "fork":
        import pytest

        pytest.skip(f"the default start method here is {method}: nothing to inherit")
    ctx = multiprocessing.get_context(runner.WORKER_START_METHOD)
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=loader_probe.loader_worker_forked, args=(method, theirs))
    child.start()
    try:
        assert ours.poll(600), "no answer from the job worker"  # a hang guard only
        assert ours.recv() == 1
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
