"""Run machinery shared by every pipeline (PBAS/CRAS engine, PANDA): stop requests from signals, the global
random streams of a resumable state, reading a resumable state that may be damaged, and process hygiene for
worker processes. Light to import (torch and NumPy load with the first random-state call): the command line
installs the stop handlers before it parses.

A stop is cooperative: a signal handler records it (``request_stop``), the training loop polls
``stop_requested`` at step boundaries, saves its state and raises ``Interrupted``; the CLI turns that into
exit code 128 + signal. A second signal (not the same one delivered twice) stops at once.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import signal
import time
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

from errors import UserError

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger("pbas")
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
DUPLICATE_SIGNAL_SECONDS = 3.0  # a second stop signal sooner than this is the same stop delivered twice
DISCARD_DAMAGED_OPTION = "--discard_damaged_state"  # the command line's flag: set a damaged training state aside
DAMAGED_SUFFIX = ".damaged"  # a damaged resumable state set aside on request: train_state.pt -> train_state.pt.damaged
State = TypeVar("State")


class Interrupted(Exception):
    """The run was asked to stop (SIGTERM / SIGINT); ``saved`` tells whether a training state was written."""

    def __init__(self, signum: int, saved: str | None = None):
        super().__init__(signum, saved)
        self.signum = signum
        self.saved = saved


_STOP = {"signum": 0}


def request_stop(signum: int) -> None:
    """Ask the running job to stop at the next step boundary, saving its training state (signal handlers)."""
    _STOP["signum"] = signum


def stop_requested() -> int:
    """The signal that asked the run to stop, or 0."""
    return _STOP["signum"]


def install_stop_handlers() -> None:
    """SIGTERM (SLURM before its time limit, timeout, kill) and SIGINT (Ctrl-C) ask the run to stop after the
    current training step, saving its state; a second signal stops at once."""
    first = {"at": 0.0}

    def handler(signum: int, _frame) -> None:
        if stop_requested():
            if time.monotonic() - first["at"] < DUPLICATE_SIGNAL_SECONDS:
                return  # the same stop delivered twice (to the process group and forwarded by a parent)
            raise KeyboardInterrupt
        first["at"] = time.monotonic()
        request_stop(signum)
        LOG.warning("%s received: stopping after the current step (the training state is saved); "
                    "send it again to stop at once", signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def stop_handlers() -> Iterator[None]:
    """Within: no stop requested yet and the stop handlers installed; the previous handlers are restored after."""
    request_stop(0)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    install_stop_handlers()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def die_with_parent() -> None:
    """Linux: have the kernel send this process SIGTERM when its parent dies (even by SIGKILL), so that a
    worker saves its state and stops instead of training on as an orphan."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's handler still forwards its signals
        pass


def rng_state(device: torch.device | None = None) -> dict:
    """Every global random stream: Python, NumPy, torch CPU and the job's CUDA device (tensors and plain data,
    so that it loads with weights_only). Only ``device``'s CUDA generator (None on the CPU): a requeued job may
    see fewer GPUs, and its own is the only one it draws from."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": _cuda_rng_state(device)}


def _cuda_rng_state(device: torch.device | None) -> torch.Tensor | None:
    import torch

    return torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` saved; its CUDA generator goes to ``device`` (whatever its index now). A state
    of an earlier version holds a list, one per GPU then visible: the entry of ``device``'s index, if any."""
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        index = 0 if device.index is None else device.index
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def load_resumable(path: str, load: Callable[[str], State], discard: bool, way_out: str) -> State | None:
    """The resumable state saved at ``path`` (``load`` raises a one-line UserError for an unusable file), or None
    when there is none.

    An unusable (damaged) state never makes a silent restart: without ``discard`` it stops the run with the
    loader's message naming the file, followed by ``way_out`` (what the user can do, e.g. the option that sets
    ``discard``); with ``discard`` it is renamed to ``path + DAMAGED_SUFFIX`` with a warning and None is
    returned, so that the caller trains from the start.
    """
    if not os.path.exists(path):
        return None
    try:
        return load(path)
    except UserError as exc:
        if not discard:
            raise UserError(f"{exc}; {way_out}") from exc
        os.replace(path, path + DAMAGED_SUFFIX)
        LOG.warning("%s; set aside as %s, training from the start", exc, path + DAMAGED_SUFFIX)
        return None
