"""Supervised training of the segmenter: focal + Dice loss, AdamW with a cosine learning-rate decay, resumable.

The checkpoint (tensors and plain data only, read with weights_only) is self-describing: format, kind,
configuration, network state, and while training the optimizer state, the step, the global random streams and
the loss history. A stop request (SIGTERM / SIGINT, runstate) ends the run after the current step with the state
saved; the same command resumes it: the batches of step t depend only on (seed, t) (data.step_batch), so a
resumed run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable

import torch

import runstate
import utils
from segment import networks
from segment.config import SegmentConfig  # re-exported: segment.train.SegmentConfig
from segment.data import TrainImages, step_batch
from utils import UserError

LOG = logging.getLogger("pbas")
FORMAT = 1  # checkpoint format of the segmenter
KIND = "segment"
LOG_EVERY = 50  # a progress line (and a row of the loss log) every this many steps, at most (log_every)
WEIGHT_DECAY = 1e-4


def learning_rate(config: SegmentConfig, step: int) -> float:
    """Cosine decay from lr to 0 over the steps: lr (1 + cos(pi t / T)) / 2."""
    return config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))


def log_every(config: SegmentConfig) -> int:
    """Steps between two progress lines (rows of the loss log): LOG_EVERY, or a tenth of a shorter run."""
    return max(1, min(LOG_EVERY, config.steps // 10))


def read(path: str, config: dict | None = None) -> dict:
    """A segmenter checkpoint (weights_only); with ``config``, a one-line error when it was trained otherwise."""
    ckpt = utils.load_tensors(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path} is not a segmenter checkpoint (written by 'main.py segment')")
    if ckpt.get("format") != FORMAT:
        raise UserError(f"{path} has segmenter checkpoint format {ckpt.get('format')!r}, this version reads {FORMAT}")
    if config is not None:
        check_config(ckpt, path, config)
    return ckpt


def check_config(ckpt: dict, path: str, config: dict) -> None:
    """A one-line UserError when the checkpoint at ``path`` was trained with another job configuration."""
    if ckpt["config"] != config:
        diff = sorted(k for k in set(config) | set(ckpt["config"]) if config.get(k) != ckpt["config"].get(k))
        raise UserError(f"{path} was trained with another configuration ({', '.join(diff)}); use another "
                        "--results_path or remove it")


def read_state(path: str, config: dict, discard_damaged: bool) -> dict | None:
    """The job's checkpoint.pt (None when there is none). One that cannot be read stops the run naming the file
    and --discard_damaged_state, which sets it aside as checkpoint.pt.damaged (None: the job trains from the
    start; runstate.load_resumable); one of another configuration is never set aside."""
    ckpt = runstate.load_resumable(path, read, discard_damaged, f"pass {runstate.DISCARD_DAMAGED_OPTION} to set it "
                                   "aside and train this segmenter from the start")
    if ckpt is not None:
        check_config(ckpt, path, config)
    return ckpt


def network_from(ckpt: dict) -> torch.nn.Module:
    """The network of a checkpoint (eval mode, CPU)."""
    cfg = ckpt["config"]["net"]
    model = networks.build(cfg["arch"], cfg["encoder"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def _loader(data: TrainImages, config: SegmentConfig, seed: int, start: int, num_workers: int):
    batches = [step_batch(data, seed, t, config.batch_size, config.anomaly_share) for t in range(start, config.steps)]
    return torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=num_workers,
                                       worker_init_fn=_worker_init if num_workers else None)


def _worker_init(_: int) -> None:
    runstate.die_with_parent()


def fit(model: torch.nn.Module, data: TrainImages, config: SegmentConfig, job_config: dict, seed: int, state_path: str,
        device: torch.device, num_workers: int = 0, on_step: Callable[[int], None] | None = None) -> list[dict]:
    """Train ``model`` (already initialised for ``seed``) for config.steps steps, resuming from ``state_path`` when it
    holds an unfinished run of this configuration; returns the loss log. Saves the state every save_every steps and
    when a stop is requested (then raises runstate.Interrupted)."""
    model.to(device).train()
    loss_fn = networks.SegmentationLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=WEIGHT_DECAY)
    start, history = 0, []
    if os.path.exists(state_path):
        saved = read(state_path, job_config)
        if not saved.get("complete"):
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            runstate.set_rng_state(saved["rng"], device)
            start, history = int(saved["step"]), list(saved["history"])
            LOG.info("resuming %s at step %d of %d", state_path, start, config.steps)

    def save(step: int) -> None:
        utils.save_torch({"format": FORMAT, "kind": KIND, "complete": False, "config": job_config, "step": step,
                          "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "rng": runstate.rng_state(device), "history": history}, state_path)

    every = log_every(config)
    LOG.info("training %s: steps %d-%d of %d, %d images per step, %d px crops, on %s", job_config.get("class", "?"),
             start + 1, config.steps, config.steps, config.batch_size, config.imagesize, device)
    # on a terminal a bar moves from the first step (tqdm's rate is smoothed over the recent steps, not averaged since
    # the start); elsewhere a line every log_every steps with the s/step of the steps since the previous line
    bar = utils.progress(None, f"training {job_config.get('class', '')}", total=config.steps, initial=start)
    window, window_began = [], time.monotonic()
    try:
        for step, batch in enumerate(_loader(data, config, seed, start, num_workers), start=start):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            images, masks = batch["image"].to(device), batch["mask"].to(device)
            loss, parts = loss_fn(model(images), masks)
            if not torch.isfinite(loss):
                raise UserError(f"training diverged at step {step} (loss {float(loss)}); lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            window.append(float(loss.detach()))
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1]:.4f}", refresh=False)
            if done % every == 0 or done == config.steps:
                now = time.monotonic()
                history.append({"step": done, "loss": sum(window) / len(window), **parts})
                if bar.disable:  # no bar (not a terminal): a line instead
                    LOG.info("step %d/%d: loss %.4f (%.2f s/step over the last %d)", done, config.steps,
                             history[-1]["loss"], (now - window_began) / len(window), len(window))
                window, window_began = [], now
            if on_step is not None:
                on_step(done)
            if runstate.stop_requested() and done < config.steps:
                save(done)
                raise runstate.Interrupted(runstate.stop_requested(), state_path)
            if done % config.save_every == 0 and done < config.steps:
                save(done)
    finally:
        bar.close()
    model.eval()
    return history
