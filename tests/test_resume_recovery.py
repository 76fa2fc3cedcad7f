"""Recovering from a training that ended badly: a damaged training state stops the run with a message naming the
file and --discard_damaged_state (which then trains from the start, keeping the damaged file aside); after a
kill -9 and a resume, TensorBoard holds each step once (CPU, tiny data)."""
from __future__ import annotations

import csv
import inspect
import itertools
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import engine
import main
import runstate

JOB = Path("models") / "pbas" / "mvtec_texture" / "seed0"
ARGS = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "16",
        "--target_embed_dimension", "16", "--dsc_hidden", "16", "--meta_epochs", "3",
        "dataset", "--batch_size", "4", "--resize", "32", "--imagesize", "32", "--num_workers", "0", "-d", "texture"]


def argv(results: Path, root: Path, *extra: str) -> list[str]:
    return ["--gpu", "-1", "--results_path", str(results), *extra, *ARGS, "mvtec", str(root)]


def error_lines(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]


def test_a_damaged_training_state_names_the_file_and_the_way_out(mvtec_root: Path, tmp_path: Path, capfd, caplog):
    state = tmp_path / JOB / engine.TRAIN_STATE_NAME
    state.parent.mkdir(parents=True)
    state.write_bytes(b"PK\x03\x04 a training state cut short by a disk fault")
    assert main.cli(argv(tmp_path, mvtec_root)) == 2
    err = error_lines(capfd)
    assert len(err) == 1 and str(state) in err[0] and "--discard_damaged_state" in err[0], err
    assert state.exists() and not (tmp_path / JOB / engine.CHECKPOINT_NAME).exists()  # nothing restarted silently

    with pytest.MonkeyPatch.context() as m:
        stop_after(m, 1)  # the first step of a training from the start, then its own state
        assert main.cli(argv(tmp_path, mvtec_root, "--discard_damaged_state")) == 143
    warned = caplog.text
    assert "set aside" in warned and str(state) + runstate.DAMAGED_SUFFIX in warned
    assert (tmp_path / JOB / (engine.TRAIN_STATE_NAME + runstate.DAMAGED_SUFFIX)).read_bytes().startswith(b"PK\x03\x04 a")
    fresh = torch.load(state, weights_only=True)
    assert (fresh["epoch"], len(fresh["steps"])) == (0, 1)


def stop_after(monkeypatch, steps: int) -> None:
    """Ask the run to stop (SIGTERM, as the signal handler does) after ``steps`` training steps of this run."""
    taken = {"n": 0}
    train_epoch = engine.train_epoch

    def wrapped(*args, **kwargs):
        bound = inspect.signature(train_epoch).bind(*args, **kwargs)
        after_step = bound.arguments["after_step"]

        def hook(so_far):
            taken["n"] += 1
            if taken["n"] == steps:
                runstate.request_stop(15)
            after_step(so_far)

        bound.arguments["after_step"] = hook
        return train_epoch(*bound.args, **bound.kwargs)

    monkeypatch.setattr(engine, "train_epoch", wrapped)


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


class _PaddedCounter:
    """TensorBoard's per-process event file counter, zero padded: names that differ only in it sort in creation order."""

    def __init__(self, start: int):
        self.next = itertools.count(start)

    def get(self) -> str:
        return f"{next(self.next):09d}"


@pytest.fixture
def event_files_in_creation_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard reads a folder's event files in name order; it names them by the second they are opened, then the
    host, the pid and a per-process counter that is not zero padded (``.9`` sorts after ``.10``). The runs of one
    test share the pid and may open theirs within one second: with the counter padded their names sort in the
    order they were opened, whatever the clock says."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", _PaddedCounter(event_file_writer._global_uid.get()))


def test_tensorboard_after_a_kill_and_a_resume_holds_every_step_once(mvtec_root: Path, tmp_path: Path,
                                                                     event_files_in_creation_order):
    """8 images, batch 4: 2 steps per epoch. The state saved at epoch 1 step 1 is put back after the run went on
    to write epoch 1's events (a kill -9 before the next save); the resumed run must not show them twice."""
    state = tmp_path / JOB / engine.TRAIN_STATE_NAME
    with pytest.MonkeyPatch.context() as m:
        stop_after(m, 3)
        assert main.cli(argv(tmp_path, mvtec_root)) == 143
    shutil.copy(state, tmp_path / "older_state.pt")
    with pytest.MonkeyPatch.context() as m:
        stop_after(m, 2)  # ends epoch 1 (its events are written), stops in epoch 2
        assert main.cli(argv(tmp_path, mvtec_root)) == 143
    shutil.copy(tmp_path / "older_state.pt", state)
    assert main.cli(argv(tmp_path, mvtec_root)) == 0

    with open(tmp_path / "logs" / "project" / "group" / "test" / "pbas_mvtec_texture_seed0.csv") as f:
        log = list(csv.DictReader(f))
    tb = tmp_path / JOB / "tb"
    losses = scalars(tb, "train/loss")
    assert [step for step, _ in losses] == list(range(6))
    for epoch, row in enumerate(log):
        assert (losses[2 * epoch][1] + losses[2 * epoch + 1][1]) / 2 == pytest.approx(float(row["loss"]), abs=1e-6)
    evaluations = scalars(tb / engine.TENSORBOARD_EVAL, "eval/mean/image_auroc")
    assert evaluations == [(i, pytest.approx(float(row["image_auroc"]), abs=1e-6)) for i, row in enumerate(log)]
