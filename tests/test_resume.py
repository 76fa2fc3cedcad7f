"""Stopping and resuming: a run stopped by SIGTERM/SIGINT (or killed) and run again ends exactly as an
uninterrupted run; stopped worker processes do not train on (CPU, tiny data)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine
import runstate
import main

REPO = Path(__file__).resolve().parent.parent
NET = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "32",
       "--target_embed_dimension", "32", "--meta_epochs", "3"]
DATA = ["dataset", "--batch_size", "4", "--resize", "64", "--imagesize", "64", "--num_workers", "0"]
CASES = {"pbas": ("mvtec_texture", [*NET, "--dsc_hidden", "16"], DATA + ["-d", "texture"]),
         "cras": ("mvtec_dataset", NET, DATA + ["--setting", "multi", "-d", "texture", "-d", "object"])}


def argv(method: str, results: Path, root: Path) -> list[str]:
    _, net, data = CASES[method]
    return ["--gpu", "-1", "--method", method, "--seed", "0", "--results_path", str(results), *net, *data, "mvtec", str(root)]


def stop_after(monkeypatch, steps: int, signum: int) -> None:
    """Deliver ``signum`` (as the handler would) after the given number of training steps."""
    taken = {"n": 0}
    train_epoch = engine.train_epoch

    def wrapped(method, optimizers, train, order, limit=-1, done=None, after_step=None):
        def hook(so_far):
            taken["n"] += 1
            if taken["n"] == steps:
                runstate.request_stop(signum)
            after_step(so_far)
        return train_epoch(method, optimizers, train, order, limit, done, hook)

    monkeypatch.setattr(engine, "train_epoch", wrapped)


def checkpoint(results: Path, method: str) -> dict:
    return torch.load(results / "models" / method / CASES[method][0] / "seed0" / "checkpoint.pt", weights_only=True)


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):  # optimizer param groups, random-stream states holding tensors
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN here


@pytest.mark.parametrize("method,stop_step,signum", [("pbas", 3, signal.SIGTERM), ("cras", 5, signal.SIGINT)])
def test_interrupted_then_resumed_equals_uninterrupted(mvtec_root: Path, tmp_path: Path, monkeypatch, capfd,
                                                       method, stop_step, signum):
    """Stopped in the middle of an epoch (PBAS: epoch 1 of 3, 2 steps per epoch; CRAS: epoch 1, 4 steps per epoch)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main.cli(argv(method, straight, mvtec_root)) == 0
    with monkeypatch.context() as m:
        stop_after(m, stop_step, signum)
        assert main.cli(argv(method, resumed, mvtec_root)) == 128 + signum
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("interrupted")]
    assert len(err) == 1 and signal.Signals(signum).name in err[0] and "resume" in err[0], err
    state_path = resumed / "models" / method / CASES[method][0] / "seed0" / engine.TRAIN_STATE_NAME
    state = torch.load(state_path, weights_only=True)
    assert (state["epoch"], len(state["steps"])) == divmod(stop_step, 2 if method == "pbas" else 4)
    assert not (resumed / "results.csv").exists()
    assert main.cli(argv(method, resumed, mvtec_root)) == 0
    assert not state_path.exists()  # superseded by the finished checkpoint
    assert (resumed / "results.csv").read_text() == (straight / "results.csv").read_text()
    a, b = checkpoint(straight, method), checkpoint(resumed, method)
    for key in ("center", "best", "last", "normal_scores"):
        assert_same_tensors(a[key], b[key], key)
    log = lambda r: (r / "logs" / "project" / "group" / "test" / f"{method}_{CASES[method][0]}_seed0.csv").read_text()
    assert log(resumed) == log(straight)


def test_a_training_state_of_another_configuration_is_refused(mvtec_root: Path, tmp_path: Path, monkeypatch, capfd):
    with monkeypatch.context() as m:
        stop_after(m, 1, signal.SIGTERM)
        assert main.cli(argv("pbas", tmp_path, mvtec_root)) == 143
    capfd.readouterr()
    other = argv("pbas", tmp_path, mvtec_root)
    other[other.index("--meta_epochs") + 1] = "4"
    assert main.cli(other) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "interrupted training" in err[0] and "meta_epochs" in err[0]


HANG_LIMIT = 900  # seconds; only guards against a hang: every wait below ends on an event, not on a clock

# main.py in a child process that pauses at a chosen training step and touches BLOCK_READY there: the test then
# acts on a process known to be at that step, however loaded the machine is. BLOCK_MODE 'stop': wait there for a
# stop request (the real SIGTERM handler sets it), then go on, so the run saves and exits; 'hold': wait for ever
# (until SIGKILL).
CHILD = """
import os, runpy, sys, time
import engine, runstate
block_after, mode, ready = int(os.environ["BLOCK_AFTER"]), os.environ["BLOCK_MODE"], os.environ["BLOCK_READY"]
taken = [0]
train_epoch = engine.train_epoch
def paused(method, optimizers, train, order, limit=-1, done=None, after_step=None):
    def hook(so_far):
        taken[0] += 1
        if taken[0] == block_after:
            open(ready, "w").close()
            while mode == "hold" or not runstate.stop_requested():
                time.sleep(0.01)
        after_step(so_far)
    return train_epoch(method, optimizers, train, order, limit, done, hook)
engine.train_epoch = paused
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


def wait_until(condition, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` ends first, or after HANG_LIMIT (a hang)."""
    deadline = time.monotonic() + HANG_LIMIT
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}: "
                                 f"{proc.communicate()[1].decode()[-2000:]}")
        assert time.monotonic() < deadline, f"{what}: nothing after {HANG_LIMIT} s (a hang)"
        time.sleep(0.05)


def long_argv(results: Path, root: Path, *extra: str, epochs: int = 25) -> list[str]:
    args = argv("pbas", results, root)
    args[args.index("--meta_epochs") + 1] = str(epochs)
    return [sys.executable, str(REPO / "main.py"), *extra, *args]


def paused_child(args: list[str], block_after: int, mode: str, ready: Path) -> subprocess.Popen:
    """long_argv's run in a CHILD that pauses after its ``block_after``-th training step (see CHILD)."""
    env = {**os.environ, "BLOCK_AFTER": str(block_after), "BLOCK_MODE": mode, "BLOCK_READY": str(ready)}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args[2:]], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_sigterm_saves_and_exits_143_then_kill_9_and_rerun_completes(mvtec_root: Path, tmp_path: Path):
    """8 images, batch 4: 2 steps per epoch, 4 epochs. SIGTERM at epoch 1 step 1; the resumed run finishes epoch 1,
    saves (the first epoch end of a run always saves), is killed -9 in epoch 2; a third run completes."""
    state = tmp_path / "models" / "pbas" / "mvtec_texture" / "seed0" / engine.TRAIN_STATE_NAME
    ready = tmp_path / "ready"
    proc = paused_child(long_argv(tmp_path, mvtec_root, epochs=4), 3, "stop", ready)
    wait_until(ready.exists, "training step 3", proc)
    proc.send_signal(signal.SIGTERM)  # a real signal to the real handler, while the run is inside step 3
    _, err = proc.communicate(timeout=HANG_LIMIT)
    assert proc.returncode == 143, err.decode()[-2000:]
    assert "interrupted by SIGTERM" in err.decode().strip().splitlines()[-1]
    saved = torch.load(state, weights_only=True)
    assert (saved["epoch"], len(saved["steps"])) == (1, 1)
    ready.unlink()
    proc = paused_child(long_argv(tmp_path, mvtec_root, epochs=4), 2, "hold", ready)  # step 2 of this run: epoch 2, step 1
    wait_until(ready.exists, "the resumed run's second step", proc)
    resumed = torch.load(state, weights_only=True)
    assert (resumed["epoch"], len(resumed["steps"])) == (2, 0)  # it resumed epoch 1 (not from the start) and saved
    proc.kill()
    proc.communicate(timeout=HANG_LIMIT)
    done = subprocess.run(long_argv(tmp_path, mvtec_root, epochs=4), cwd=REPO, capture_output=True, timeout=HANG_LIMIT)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert (tmp_path / "results.csv").is_file() and not state.exists()


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads worker processes from /proc (Linux)")
def test_killed_parent_leaves_no_worker_training(mvtec_root: Path, tmp_path: Path):
    """--gpu -1 --gpu -2 (two worker processes on the CPU): SIGKILL the parent, the workers stop too. 1000 epochs:
    no job can finish (and its worker leave) before the kill, however the two are scheduled."""
    args = long_argv(tmp_path, mvtec_root, "--gpu", "-1", "--gpu", "-2", epochs=1000)
    args[args.index("-d") + 1: args.index("-d") + 2] = ["texture", "-d", "object"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    states = [tmp_path / "models" / "pbas" / f"mvtec_{c}" / "seed0" / engine.TRAIN_STATE_NAME for c in ("texture", "object")]
    wait_until(lambda: all(s.exists() for s in states), "both workers training", proc)  # each saved an epoch
    workers = [c for c in _children(proc.pid) if _alive(c)]
    assert len(workers) >= 2
    proc.kill()
    proc.wait()
    wait_until(lambda: not any(_alive(w) for w in workers), "the workers stopping after their parent was killed")
