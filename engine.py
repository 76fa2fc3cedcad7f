"""The shared pipeline of both methods: features and their cache, batches, the fit loop, evaluation,
model selection, normal-score statistics, checkpoints and one job's run.

Reading order:
    Encoder, FeatureSource     images -> patch features [b*H*W, D], embedded once (cached) or per pass
    SharedLoader               the uncached path's one data loader per job, whose workers persist across passes
    batches_of, data_pass      the batches of every pass: the releases' random stream, drawn explicitly
    TrainSet, ClassTest        a job's training features with class labels; each class's test set
    initialize, train_epoch    centers (the method's rule), one epoch of the method's loss
    evaluate, Trainer          per-class test metrics; the resumable fit loop, best epoch on mean I-AUROC + mean P-AUROC
    checkpoints                the self-describing format: method, config, centers, best and last states
    release_files, load_release  the authors' ``center.pth`` + ``ckpt_best_N.pth`` folders
    run_job, train_and_test    train (or load) one job, final evaluation, checkpoint, heatmaps, metrics

A *job* is what one model is trained for: one class (PBAS; CRAS --setting single) or every requested
class together (CRAS --setting multi). A method (``common.Method``) supplies only its equations: center
initialisation, the loss of one batch, patch scores. The engine knows no method by name: the run
machinery (``runner.py``) hands it the method's class.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import csv
import glob
import io
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

import datasets
import metrics
import utils
from runstate import DISCARD_DAMAGED_OPTION, Interrupted, load_resumable, rng_state, set_rng_state, stop_requested
from common import Embedder, Method, MethodConfig, StepStats, autocast, release_statistics
from utils import UserError

LOG = logging.getLogger("pbas")
DEVICE_CACHE_SHARE = 0.6  # --cache auto: the device cache may take this share of the free GPU memory
HOST_CACHE_SHARE = 0.5  # ... and the host cache this share of the available host memory
PIXEL_QUANTILES = 1001  # stored quantiles (0, 0.001, ..., 1) of the normal training pixel scores
PROGRESS_LINES = 20  # per job, when stderr is not a terminal (no progress bar)
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
SCORES_NAME = "scores.csv"
TRAIN_STATE_NAME = "train_state.pt"
RELEASE_CENTER = "center.pth"
TENSORBOARD_EVAL = "eval"  # sub-folder (TensorBoard run) of the evaluation scalars, whose step is the epoch
RELEASE_BEST = re.compile(r"ckpt_best_(\d+)\.pth$")


# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------


class Encoder:
    """E_phi with the run's numerics: images [B, 3, S, S] -> (float32 features [B*H*W, D], (H, W)).

    Gradients flow only when training with ``train_backbone`` (the extractor is then in train mode).
    """

    def __init__(self, embedder: Embedder, precision: str, train_backbone: bool = False):
        self.embedder = embedder
        self.precision = precision
        self.train_backbone = train_backbone
        if not train_backbone:
            embedder.requires_grad_(False)

    def __call__(self, images: torch.Tensor, train: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
        grad = train and self.train_backbone
        self.embedder.train(grad)
        with torch.set_grad_enabled(grad), autocast(self.precision, images.device.type):
            feats, grid = self.embedder(images)
        return feats.float(), grid

    def grid(self, imagesize: int, device: torch.device) -> tuple[int, int]:
        """(H, W) of the patch grid at this image size (one tiny forward pass)."""
        with torch.no_grad():
            return self(torch.zeros(1, 3, imagesize, imagesize, device=device))[1]


def cache_dtype(precision: str) -> torch.dtype:
    """bf16 runs keep bf16 features (what the bf16 backbone produces, half the memory); else float32."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def batches_of(order: Sequence, batch_size: int) -> list[list]:
    """Consecutive chunks of ``order`` (the last one may be smaller, as a DataLoader without drop_last)."""
    order = list(order)
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def draw_int64() -> int:
    """R64: one int64 from the global CPU generator, as a DataLoader iterator draws its base seed and a
    RandomSampler its seed."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


def data_pass(n: int, shuffle: bool) -> list[int]:
    """The releases' draws for one DataLoader pass over n items (RNG_REPLAY_SPEC 4) and the pass's order.

    The loader's base seed is one R64 (drawn, then unused: our loaders seed their workers from a generator of
    their own, and the datasets draw nothing in them); a shuffled pass then draws a second R64 s and its order
    is ``randperm(n)`` from a private generator seeded with s (else the dataset order). Drawn here, explicitly,
    so the stream does not depend on the feature cache, on loader workers or on how the loader is built.
    """
    draw_int64()  # the base seed
    if not shuffle:
        return list(range(n))
    seed = draw_int64()
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def planned_batches(order_length: int, batch_size: int, limit: int, done_steps: int = 0) -> list[int]:
    """Lengths of the batches an epoch still takes after ``done_steps`` steps: consecutive batches of
    ``batch_size`` (the last may be smaller), ending after the batch that takes the sample count above
    ``limit`` unless it is -1."""
    lengths, samples = [], done_steps * batch_size
    for start in range(done_steps * batch_size, order_length, batch_size):
        if limit != -1 and samples > limit:
            break
        lengths.append(min(batch_size, order_length - start))
        samples += lengths[-1]
    return lengths


class ImagesOnly(torch.utils.data.Dataset):
    """The images (and indices) of a dataset's items, without decoding masks: what the feature source needs."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset.image_item(index)


class PassBatches:
    """The batch sampler of a reused loader: the batches of the current pass, replaced before each pass."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PartImages(torch.utils.data.Dataset):
    """The images of several datasets, addressed by (dataset number, index): {"image", "index"} without masks."""

    def __init__(self, parts: Sequence[torch.utils.data.Dataset]):
        self.parts = list(parts)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        part, index = key
        return self.parts[part].image_item(index)


class SharedLoader:
    """One DataLoader for every pass over the images of a job's datasets (the training set and each class's test
    set), whose worker processes start once and persist (``persistent_workers``) instead of starting again for
    every pass and every test set. One pass at a time: a pass started while another is unfinished ends that one.

    The loader draws its workers' base seeds from a generator of its own, so that data loading consumes nothing
    from the global random streams (the datasets draw no random numbers in the workers).
    """

    def __init__(self, parts: Sequence[torch.utils.data.Dataset], num_workers: int, pin_memory: bool):
        self.sampler = PassBatches()
        self.loader = torch.utils.data.DataLoader(PartImages(parts), batch_sampler=self.sampler, num_workers=num_workers,
                                                  pin_memory=pin_memory, persistent_workers=num_workers > 0,
                                                  generator=torch.Generator())
        self.passes = 0

    def batches(self, part: int, batches: list[list[int]]) -> Iterator[dict]:
        """The {"image" [b, 3, S, S], "index" [b]} batches of dataset ``part`` for the given index batches."""
        self.passes += 1
        this_pass = self.passes
        self.sampler.batches = [[(part, i) for i in batch] for batch in batches]
        for batch in self.loader:
            if self.passes != this_pass:
                raise RuntimeError("a pass of the shared data loader was continued after another pass had started")
            yield batch

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage collected)."""
        iterator, self.loader._iterator = self.loader._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


class FeatureSource:
    """Patch features of a dataset's images for given batches of indices.

    ``cache='off'``: every request runs the data loader and the backbone (needed with --train_backbone); the
    loader is ``shared`` (dataset number ``part`` of a SharedLoader, whose workers persist) when given.
    ``cache='device'``: all images are embedded once, on first use, and kept on the compute device.
    ``cache='host'``: the same in ordinary host memory; each batch is gathered into one of two pinned
    staging buffers and copied to the GPU on a copy stream, overlapping the previous batch's compute.
    Either way the same indices give the same batches, so training sees identical data.
    """

    def __init__(self, encoder: Encoder, dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int,
                 device: torch.device, cache: str, grid: tuple[int, int], progress: Callable | None = None,
                 shared: SharedLoader | None = None, part: int = 0):
        self.encoder = encoder
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.cache = cache
        self.grid = grid
        self.progress = progress or (lambda it, **_: it)
        self.shared, self.part = shared, part
        self._features: torch.Tensor | None = None  # [N, H*W, D]

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def positions(self) -> int:
        return self.grid[0] * self.grid[1]

    def _loader(self, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        """The loader of one pass; its workers' seeds come from a generator of its own, so that building it
        draws nothing from the global generator (the releases' draws are data_pass's)."""
        return torch.utils.data.DataLoader(ImagesOnly(self.dataset), batch_sampler=batches, num_workers=self.num_workers,
                                           pin_memory=self.device.type == "cuda",
                                           generator=torch.Generator())

    def _embed_all(self) -> torch.Tensor:
        batches = batches_of(range(len(self.dataset)), self.batch_size)
        store = None
        dtype = cache_dtype(self.encoder.precision)
        on_host = self.cache == "host" and self.device.type == "cuda"
        for batch in self.progress(self._loader(batches), desc="embedding", total=len(batches)):
            if stop_requested():
                raise Interrupted(stop_requested())  # nothing trained yet: nothing to save
            feats, _ = self.encoder(batch["image"].to(self.device, non_blocking=True))
            feats = feats.reshape(len(batch["image"]), -1, feats.shape[-1]).to(dtype)  # [b, H*W, D]
            if store is None:
                store = torch.empty((len(self.dataset), *feats.shape[1:]), dtype=dtype,
                                    device="cpu" if on_host else self.device)
            store[batch["index"]] = feats.to(store.device)
        return store

    def prepare(self) -> None:
        """Embed and store every image now (cached modes); otherwise this happens on first use."""
        if self.cache != "off" and self._features is None:
            self._features = self._embed_all()

    def batches(self, order: Sequence[int], train: bool = False) -> Iterator[torch.Tensor]:
        """Float32 features [b*H*W, D] of each consecutive batch of ``order``."""
        if self.cache == "off":
            batches = batches_of(order, self.batch_size)
            loader = self._loader(batches) if self.shared is None else self.shared.batches(self.part, batches)
            for batch in loader:
                feats, _ = self.encoder(batch["image"].to(self.device, non_blocking=True), train=train)
                yield feats
            return
        self.prepare()
        store = self._features
        if store.device.type == "cpu" and self.device.type == "cuda":
            yield from self._staged(order)
            return
        index = torch.as_tensor(list(order), dtype=torch.long).to(store.device)  # one upload per pass
        for start in range(0, len(index), self.batch_size):
            feats = store[index[start: start + self.batch_size]]
            yield feats.reshape(-1, feats.shape[-1]).float()

    def _staged(self, order: Sequence[int]) -> Iterator[torch.Tensor]:
        """Host cache -> GPU through two pinned buffers and a copy stream (events guard buffer reuse)."""
        store = self._features
        copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        staging = [torch.empty((self.batch_size, *store.shape[1:]), dtype=store.dtype, pin_memory=True) for _ in range(2)]
        done: list[torch.cuda.Event | None] = [None, None]  # copy of buffer i finished
        index = torch.as_tensor(list(order), dtype=torch.long)
        for i, start in enumerate(range(0, len(index), self.batch_size)):
            chunk = index[start: start + self.batch_size]
            slot = i % 2
            if done[slot] is not None:
                done[slot].synchronize()  # the copy that used this buffer two batches ago has finished
            buf = staging[slot][: len(chunk)]
            torch.index_select(store, 0, chunk, out=buf)
            with torch.cuda.stream(copy_stream):
                feats = buf.to(self.device, non_blocking=True)
                done[slot] = torch.cuda.Event()
                done[slot].record(copy_stream)
            compute.wait_event(done[slot])
            feats.record_stream(compute)
            yield feats.reshape(-1, feats.shape[-1]).float()


def feature_bytes(n_images: int, positions: int, dim: int, precision: str) -> int:
    return n_images * positions * dim * torch.tensor([], dtype=cache_dtype(precision)).element_size()


def free_device_memory(device: torch.device) -> int:
    """Bytes a new tensor can get on a GPU: what the driver has free plus what PyTorch's allocator holds reserved
    but unallocated (its cache of earlier jobs of this process, released to a large allocation on demand)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def choose_cache(requested: str, device: torch.device, need: int) -> str:
    """Resolve --cache auto by the memory actually free: the device if the features fit in 60% of its free
    memory (``free_device_memory``), else host memory if they fit in half of what the host has available, else no cache."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and need < DEVICE_CACHE_SHARE * free_device_memory(device):
        return "device"
    if need < HOST_CACHE_SHARE * utils.available_host_memory():
        return "host" if device.type == "cuda" else "device"  # on the CPU, device memory is host memory
    return "off"


# ----------------------------------------------------------------------------------------------
# a job's data
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainSet:
    """The training images of every class of a job, concatenated, with the class index of each image."""

    source: FeatureSource
    labels: torch.Tensor  # [N] int64 on the device
    class_indices: list[list[int]]  # indices of each class's images in ``source``

    def batches(self, order: Sequence[int], train: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features [b*H*W, D], class labels [b]) of each consecutive batch of ``order``."""
        index = torch.as_tensor(list(order), dtype=torch.long).to(self.labels.device)
        for i, feats in enumerate(self.source.batches(order, train=train)):
            yield feats, self.labels[index[i * self.source.batch_size: (i + 1) * self.source.batch_size]]

    def class_pass(self, c: int) -> list[int]:
        """The order of a shuffled pass over class c's own images (the releases' per-class loader)."""
        members = self.class_indices[c]
        return [members[i] for i in data_pass(len(members), shuffle=True)]


@dataclass
class ClassTest:
    """One class's test set: features, image labels [N] and pixel masks [N, S, S] on the device."""

    name: str  # DATASET_CLASS
    source: FeatureSource
    labels: torch.Tensor
    masks: torch.Tensor


def load_masks(dataset, device: torch.device, rule: str = "release") -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [N] and masks [N, S, S] of a test set (masks only: the images are decoded by the feature source),
    the masks binarised by ``rule`` (--mask_binarize, metrics.binarize_masks; 'release' leaves them as resized)."""
    labels = torch.tensor([s.is_anomaly for s in dataset.samples])
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        masks = torch.stack([m[0] for m in pool.map(dataset.mask, range(len(dataset)))])
    return labels.to(device), metrics.binarize_masks(masks, rule).to(device)


# ----------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(method: Method, source: FeatureSource, order: Sequence[int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image scores [N], anomaly maps [N, S, S] and class per image [N] of ``order`` (default: dataset order),
    in consecutive batches of the source's batch size."""
    order = range(len(source)) if order is None else order
    scores, maps, classes = [], [], []
    for feats in source.batches(order):
        s, m, c = method.score(feats, source.grid)
        scores.append(s)
        maps.append(m)
        classes.append(c)
    return torch.cat(scores), torch.cat(maps), torch.cat(classes)


def _auroc_or_nan(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC, or NaN when the labels hold a single class (e.g. a test set without defect pixels)."""
    try:
        return metrics.auroc(scores, labels)
    except metrics.UndefinedMetricError:
        return math.nan


def class_metrics(scores: torch.Tensor, maps: torch.Tensor, test: ClassTest, full: bool) -> dict:
    """I-AUROC and P-AUROC (per epoch); with ``full`` also AP, PRO, AUPRO, and, under names ending ``_oracle``,
    the F1-optimal image threshold of the test set and its F1 and the defect class's pixel F1 and IoU at the
    F1-optimal pixel threshold (scores and maps have no threshold fixed before testing: image_f1, pixel_f1 and
    pixel_iou stay empty)."""
    if not full:
        return {"image_auroc": _auroc_or_nan(scores, test.labels),
                "pixel_auroc": _auroc_or_nan(maps.flatten(), metrics.pixel_ground_truth(test.masks).flatten())}
    result = {**metrics.image_metrics(scores, test.labels), **metrics.pixel_metrics(maps, test.masks, with_pro=True),
              **metrics.pixel_f1_iou(maps, test.masks)}
    try:
        result["image_f1_threshold_oracle"], result["image_f1_oracle"] = metrics.f1_optimal_threshold(scores, test.labels)
    except metrics.UndefinedMetricError:
        result["image_f1_threshold_oracle"], result["image_f1_oracle"] = math.nan, math.nan
    return result


def evaluate(method: Method, tests: Sequence[ClassTest], full: bool, scores_out: dict | None = None, draw: bool = True
             ) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Per-class metrics {DATASET_CLASS: {...}} and anomaly maps {DATASET_CLASS: [N, S, S]}; ``scores_out``
    (when given) receives the image scores {DATASET_CLASS: [N]}. One test pass per class, in order, each
    drawing its base seed as the releases' test loaders do (``draw`` False: a pass the releases do not make)."""
    results, maps = {}, {}
    for test in tests:
        if draw:
            data_pass(len(test.source), shuffle=False)  # the base seed of the release's test loader
        scores, class_maps, _ = predict(method, test.source)
        if not bool(torch.isfinite(scores).all()):
            raise Diverged(f"{int((~torch.isfinite(scores)).sum())} non-finite image scores of {test.name}")
        results[test.name] = class_metrics(scores, class_maps, test, full)
        maps[test.name] = class_maps
        if scores_out is not None:
            scores_out[test.name] = scores.cpu()
    return results, maps


def mean_over_classes(per_class: dict[str, dict], key: str) -> float:
    return sum(m[key] for m in per_class.values()) / len(per_class)


def selection_key(per_class: dict[str, dict]) -> float:
    """Mean over classes of I-AUROC + mean of P-AUROC (a NaN counts as 0): the releases' criterion."""
    zero = lambda v: 0.0 if math.isnan(v) else v
    return sum(zero(m["image_auroc"]) + zero(m["pixel_auroc"]) for m in per_class.values()) / len(per_class)


def sorted_quantiles(values: torch.Tensor, count: int = PIXEL_QUANTILES) -> torch.Tensor:
    """``count`` evenly spaced quantiles (linear interpolation, as torch.quantile) of any number of values."""
    v = values.flatten().double().sort().values
    pos = torch.linspace(0, len(v) - 1, count, dtype=torch.float64, device=v.device)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return (v[lo] + (v[hi] - v[lo]) * (pos - lo)).float()


def normal_score_statistics(method: Method, train: TrainSet, names: Sequence[str]) -> dict[str, dict]:
    """Per class, the score distributions of its normal training images under the method's current state
    (for thresholds): every image score [N_c] and PIXEL_QUANTILES quantiles of all pixel scores."""
    out = {}
    for c, name in enumerate(names):
        scores, maps, _ = predict(method, train.source, train.class_indices[c])
        out[name] = {"image_scores": scores.cpu(), "pixel_quantiles": sorted_quantiles(maps).cpu(),
                     "quantile_levels": torch.linspace(0, 1, PIXEL_QUANTILES)}
    return out


@dataclass
class EpochLog:
    epoch: int  # 0-based, as the releases count
    stats: dict[str, float]  # mean over the epoch's steps
    steps: list[dict[str, float]] = field(default_factory=list)  # every step's statistics
    image_auroc: float = math.nan  # mean over the job's classes (epochs with an evaluation)
    pixel_auroc: float = math.nan
    per_class: dict[str, dict] = field(default_factory=dict)  # {DATASET_CLASS: {image_auroc, pixel_auroc}}


@dataclass
class Snapshot:
    """A state of the trainable modules after an epoch, with its per-class metrics."""

    epoch: int
    state: dict
    metrics: dict[str, dict]


@dataclass
class FitResult:
    best: Snapshot
    last: Snapshot
    history: list[EpochLog] = field(default_factory=list)


def class_batches(train: TrainSet, c: int) -> Iterator[torch.Tensor]:
    """Class c's training features [b*H*W, D], batch by batch, in the order of its own shuffled pass (drawn
    when called)."""
    return (f for f, _ in train.batches(train.class_pass(c)))


def initialize(method: Method, train: TrainSet) -> None:
    """The method's centers from one shuffled pass per class, in class order, with the untrained projector."""
    method.initialize(lambda c: class_batches(train, c), train.source.positions)


def train_epoch(method: Method, optimizers: Sequence[torch.optim.Optimizer], train: TrainSet, order: Sequence[int],
                limit: int = -1, steps: list[StepStats] | None = None,
                after_step: Callable[[list[StepStats]], None] | None = None) -> dict[str, float]:
    """One epoch of steps over ``order`` (stopping after the batch that takes the sample count above
    ``limit`` unless it is -1); the mean of each step statistic, with one synchronisation.

    ``steps`` holds the statistics of the epoch's steps already taken (a resumed epoch continues after
    them); ``after_step(steps)`` runs after every step (it may save the state and stop the run). The method
    learns the epoch's batch lengths first (its per-step draws).
    """
    method.train()
    steps = [] if steps is None else steps
    size = train.source.batch_size
    lengths = planned_batches(len(order), size, limit, len(steps))
    rest = order[len(steps) * size: len(steps) * size + sum(lengths)]
    with method.epoch_draws(lengths, train.source.positions, train.labels.device):
        for feats, labels in train.batches(rest, train=True):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss, stats = method.loss(feats, labels, train.source.positions)
            loss.backward()
            for opt in optimizers:
                opt.step()
            steps.append(stats)
            if after_step is not None:
                after_step(steps)
    means = torch.stack([torch.stack(list(s.values())) for s in steps]).mean(0).tolist()
    return dict(zip(steps[0], means))


def step_table(steps: list[StepStats]) -> list[dict[str, float]]:
    """Every step's statistics as floats (one synchronisation)."""
    if not steps:
        return []
    values = torch.stack([torch.stack(list(s.values())) for s in steps]).tolist()
    return [dict(zip(steps[0], row)) for row in values]


def make_optimizers(method: Method, encoder: Encoder) -> list[torch.optim.Optimizer]:
    """The method's optimizers, plus AdamW(lr) on the backbone with --train_backbone."""
    opts = method.make_optimizers()
    if encoder.train_backbone:
        opts.append(torch.optim.AdamW(encoder.embedder.extractor.parameters(), method.config.lr))
    return opts


def trained_state(method: Method, encoder: Encoder) -> dict:
    state = method.trained_state()
    if encoder.train_backbone:
        state["backbone"] = {n: t.detach().cpu().clone() for n, t in encoder.embedder.extractor.state_dict().items()}
    return state


def load_trained_state(method: Method, encoder: Encoder, state: dict) -> None:
    method.load_trained_state(state)
    if encoder.train_backbone:
        encoder.embedder.extractor.load_state_dict(state["backbone"])


class Diverged(RuntimeError):
    """Training produced a NaN or infinite loss or score; the message names the epoch and what diverged."""


@dataclass
class FitHooks:
    """What ``fit`` reports and asks while it runs (all optional)."""

    on_epoch: Callable[[EpochLog], None] | None = None
    on_best: Callable[[Snapshot], None] | None = None
    save_state: Callable[[dict], None] | None = None  # persist a training state (see Trainer.state)
    stop_signal: Callable[[], int] = stop_requested  # non-zero: the signal asking the run to stop
    save_share: float = 0.02  # periodic saves take at most this share of the training time
    timer: Callable[[str], contextlib.AbstractContextManager] = lambda phase: contextlib.nullcontext()
    # ``with timer(phase)`` wraps each phase of the loop: "center" (initialisation), "train" (one epoch's steps
    # and their statistics), "eval" (one evaluation); benchmarks/bench_train.py times the Trainer through it


class Trainer:
    """The fit loop, resumable at any step: centers, then ``meta_epochs`` epochs with test evaluation every
    ``eval_epochs`` (and at the last); the best epoch (strictly larger selection key; ties keep the earlier
    one) is selected on the test sets as in the releases, and the last epoch is kept too.

    ``state()`` is everything needed to continue exactly (bit for bit on the same device): the trainable
    state, the optimizers, every random stream, the epoch and step, the selection state and the history.
    It is saved at epoch ends, as often as keeps saving under ``save_share`` of the time, and whenever a
    stop is requested (after the current step).
    """

    def __init__(self, method: Method, encoder: Encoder, train: TrainSet, tests: Sequence[ClassTest],
                 hooks: FitHooks | None = None, progress: Callable | None = None):
        self.method, self.encoder, self.train, self.tests = method, encoder, train, tests
        self.hooks = hooks or FitHooks()
        self.progress = progress or (lambda it, **_: it)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.epoch = 0  # the epoch being trained (or the next one)
        self.steps: list[StepStats] = []  # statistics of the current epoch's steps taken so far
        self.order: list[int] | None = None  # the current epoch's shuffled order, once drawn
        self.best_key, self.best, self.last_metrics = -math.inf, None, {}
        self.history: list[EpochLog] = []
        self._saved_at, self._save_seconds = time.monotonic(), 0.0

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "epoch": self.epoch, "steps": [{k: v.detach().cpu() for k, v in s.items()} for s in self.steps],
            "order": self.order,
            "center": self.method.center.cpu(), "modules": trained_state(self.method, self.encoder),
            "optimizers": [opt.state_dict() for opt in self.optimizers], "rng": rng_state(self.method.center.device),
            "method_rng": self.method.stream_state(), "best_key": self.best_key,
            "best": None if self.best is None else self.best.__dict__, "last_metrics": self.last_metrics,
            "history": [log.__dict__ for log in self.history],
        }

    def start(self) -> None:
        with self.hooks.timer("center"):
            initialize(self.method, self.train)
        self.optimizers = make_optimizers(self.method, self.encoder)

    def resume(self, state: dict) -> None:
        device = self.method.center.device
        self.method.center = state["center"].to(device)
        load_trained_state(self.method, self.encoder, state["modules"])
        self.optimizers = make_optimizers(self.method, self.encoder)
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        set_rng_state(state["rng"], device)
        self.method.set_stream_state(state["method_rng"])
        self.epoch = state["epoch"]
        self.steps = [{k: v.to(device) for k, v in s.items()} for s in state["steps"]]
        self.order = state["order"]
        self.best_key, self.last_metrics = state["best_key"], state["last_metrics"]
        self.best = None if state["best"] is None else Snapshot(**state["best"])
        self.history = [EpochLog(**log) for log in state["history"]]

    def _save(self) -> None:
        if self.hooks.save_state is None:
            return
        started = time.monotonic()
        self.hooks.save_state(self.state())
        self._saved_at = time.monotonic()
        self._save_seconds = self._saved_at - started

    def _where(self) -> str | None:
        return f"epoch {self.epoch}, step {len(self.steps)}" if self.hooks.save_state is not None else None

    def _check_stop(self, steps: list[StepStats]) -> None:
        """After every step: on a stop request, save the state (mid-epoch) and stop."""
        signum = self.hooks.stop_signal()
        if signum:
            self._save()
            raise Interrupted(signum, self._where())

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> FitResult:
        cfg: MethodConfig = self.method.config
        bar = self.progress(range(self.epoch, cfg.meta_epochs), desc="epochs", total=cfg.meta_epochs, initial=self.epoch)
        for epoch in bar:
            self.epoch = epoch
            if self.order is None:  # not drawn yet (a resumed epoch continues in its saved order)
                self.order = data_pass(len(self.train.source), shuffle=True)
            with self.hooks.timer("train"):
                log = EpochLog(epoch, train_epoch(self.method, self.optimizers, self.train, self.order, cfg.limit,
                                                  self.steps, self._check_stop),
                               step_table(self.steps))
            bad = [k for k, v in log.stats.items() if not math.isfinite(v)]
            if bad:
                raise Diverged(f"epoch {epoch}: {', '.join(f'{k} = {log.stats[k]}' for k in bad)}")
            if (epoch + 1) % cfg.eval_epochs == 0 or epoch == cfg.meta_epochs - 1:
                try:
                    with self.hooks.timer("eval"):
                        self.last_metrics, _ = evaluate(self.method, self.tests, full=False)
                except Diverged as exc:
                    raise Diverged(f"epoch {epoch}: {exc}") from exc
                log.image_auroc = mean_over_classes(self.last_metrics, "image_auroc")
                log.pixel_auroc = mean_over_classes(self.last_metrics, "pixel_auroc")
                log.per_class = self.last_metrics
                key = selection_key(self.last_metrics)
                if key > self.best_key:
                    self.best_key = key
                    self.best = Snapshot(epoch, trained_state(self.method, self.encoder), self.last_metrics)
                    if self.hooks.on_best is not None:
                        self.hooks.on_best(self.best)
            self.history.append(log)
            self.epoch, self.steps, self.order = epoch + 1, [], None
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{log.stats['loss']:.4f}", p_true=f"{log.stats['p_true']:.2f}",
                                p_fake=f"{log.stats['p_fake']:.2f}", i_auroc=f"{log.image_auroc:.4f}",
                                p_auroc=f"{log.pixel_auroc:.4f}")
            if self.hooks.on_epoch is not None:
                self.hooks.on_epoch(log)
            signum = self.hooks.stop_signal()
            if signum or time.monotonic() - self._saved_at >= self._save_seconds / self.hooks.save_share:
                self._save()
            if signum:
                raise Interrupted(signum, self._where())
        assert self.best is not None  # the last epoch is always evaluated
        return FitResult(self.best, Snapshot(cfg.meta_epochs - 1, trained_state(self.method, self.encoder),
                                             self.last_metrics), self.history)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


MOVABLE_CONFIG_KEYS = ("datapath",)  # recorded in a job's configuration, but the data may move: not compared
# Settings added to the job configuration later: a checkpoint that does not record one was made with this value.
CONFIG_DEFAULTS = {"mask_binarize": "release"}


def config_difference(saved: dict, wanted: dict) -> str | None:
    """The first setting of two job configurations that differs, or None.

    Device settings (gpu, num_workers, cache, paths) are not part of a job's configuration: they may change."""
    flat_saved = {**CONFIG_DEFAULTS, **saved, **saved.get("net", {})}
    flat_wanted = {**CONFIG_DEFAULTS, **wanted, **wanted.get("net", {})}
    for key in sorted(set(flat_saved) | set(flat_wanted)):
        if key in ("net", *MOVABLE_CONFIG_KEYS):
            continue
        if flat_saved.get(key) != flat_wanted.get(key):
            return f"{key}={flat_saved.get(key)!r} in the checkpoint, {flat_wanted.get(key)!r} now"
    return None


def read_checkpoint(path: str, method_name: str | None = None) -> dict:
    """A checkpoint written by this program, of ``method_name`` when given; a one-line UserError otherwise."""
    ckpt = utils.load_checkpoint(path)
    method = ckpt.get("method")
    if not isinstance(method, str) or not isinstance(ckpt["config"].get("net"), dict):
        raise UserError(f"{path} is not a checkpoint of this program: it names no method or network configuration")
    if method_name is not None and method != method_name:
        raise UserError(f"{path} is a {method.upper()} checkpoint, not {method_name.upper()}; "
                        f"use --method {method} or another --results_path")
    return ckpt


@dataclass
class Job:
    """One model to train (or load) and test: one class, or every requested class together."""

    name: str  # DATASET_CLASS, or DATASET_dataset for a multi-class job
    dataset: str
    classnames: list[str]
    trains: list  # per class: its training set
    tests: list  # per class: its test set
    seed: int
    config: dict  # what its checkpoint records and must match
    folder: str  # RESULTS/models/METHOD/NAME/seedN
    log_path: str  # per-epoch CSV log
    requested: list[str] = field(default_factory=list)  # every class of the run, in the order given (row order)
    finished: bool = False  # a finished checkpoint exists: test it instead of training
    release: str | None = None  # a folder of the authors' weights to evaluate instead of training

    @property
    def row_names(self) -> list[str]:
        """results.csv row of each class: DATASET_CLASS."""
        return [f"{self.dataset}_{c}" for c in self.classnames]

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.folder, CHECKPOINT_NAME)

    @property
    def tensorboard(self) -> str:
        """TensorBoard event files (tensorboard --logdir RESULTS)."""
        return os.path.join(self.folder, "tb")

    @property
    def train_state(self) -> str:
        """The resumable training state of an unfinished job (removed when the job finishes)."""
        return os.path.join(self.folder, TRAIN_STATE_NAME)


def read_train_state(job: Job, discard_damaged: bool = False) -> dict | None:
    """The saved training state of the job's interrupted training, or None when there is none. A damaged one
    stops with a one-line error naming the file and --discard_damaged_state, which sets it aside (None)."""
    return load_resumable(job.train_state, utils.load_checkpoint, discard_damaged,
                          f"the interrupted training of {job.name} cannot resume from it: run again with "
                          f"{DISCARD_DAMAGED_OPTION} to set it aside and train {job.name} from the start")


@dataclass
class RunSettings:
    """What every job of a run shares: the method, its configuration and the device options."""

    method: type[Method]
    config: MethodConfig
    precision: str
    cache: str
    num_workers: int


def release_files(folder: str, needs_center: bool) -> tuple[str, int]:
    """The single ``ckpt_best_N.pth`` of a release folder and its epoch N; a one-line UserError otherwise
    (also when ``needs_center`` and ``center.pth`` is missing)."""
    if not os.path.isdir(folder):
        raise UserError(f"no released weights at {folder}: expected a folder with ckpt_best_N.pth "
                        f"(and {RELEASE_CENTER} for CRAS) as the authors' code writes it")
    found = sorted(p for p in glob.glob(os.path.join(folder, "ckpt_best_*.pth")) if RELEASE_BEST.search(p))
    if len(found) != 1:
        raise UserError(f"{folder} must hold exactly one ckpt_best_N.pth, found {len(found)}")
    if needs_center and not os.path.isfile(os.path.join(folder, RELEASE_CENTER)):
        raise UserError(f"{os.path.join(folder, RELEASE_CENTER)} is missing: this method scores with its centers")
    return found[0], int(RELEASE_BEST.search(found[0]).group(1))


def load_release(folder: str, method: Method) -> tuple[dict, int, torch.Tensor | None]:
    """The authors' weights: ({projector, discriminator} state, best epoch, center bank or None).

    ``ckpt_best_N.pth`` holds {"discriminator", "pre_projection"} state dicts (our key names);
    ``center.pth`` the centers (required when the method scores with them).
    """
    path, epoch = release_files(folder, method.needs_center_to_score)
    raw = utils.load_tensors(path)
    if not isinstance(raw, dict) or "discriminator" not in raw:
        raise UserError(f"{path} is not a released checkpoint: it lacks the 'discriminator' state")
    state = {"discriminator": raw["discriminator"], "projector": raw.get("pre_projection", {})}
    center_path = os.path.join(folder, RELEASE_CENTER)
    center = None
    if os.path.exists(center_path):
        center = utils.load_tensors(center_path)
        if not isinstance(center, torch.Tensor):
            raise UserError(f"{center_path} does not hold a center tensor")
    return state, epoch, center


def restore(method: Method, encoder: Encoder, state: dict, center: torch.Tensor | None, source: str) -> None:
    """Load a stored state and centers into the method; a one-line UserError when they do not fit it."""
    try:
        if center is not None:
            expected = tuple(method.center.shape)
            if center.dim() != len(expected) or (len(expected) == 3 and center.shape[0] != expected[0]) \
                    or center.shape[-1] != expected[-1]:
                raise ValueError(f"centers {tuple(center.shape)} do not fit {method.name.upper()} with "
                                 f"{method.num_classes} class(es) and D = {expected[-1]}")
            method.center = center.float().to(method.center.device)
        load_trained_state(method, encoder, state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise UserError(f"{source} does not match the configuration ({reason})") from exc


# ----------------------------------------------------------------------------------------------
# one job
# ----------------------------------------------------------------------------------------------


def job_sources(job: Job, encoder: Encoder, settings: RunSettings, device: torch.device, progress: Callable
                ) -> tuple[TrainSet, list[ClassTest]]:
    """The job's training set (classes concatenated, with labels) and each class's test set, with one
    cache decision for all of them."""
    cfg = settings.config
    grid = encoder.grid(cfg.imagesize, device)
    n_images = sum(len(d) for d in job.trains) + sum(len(d) for d in job.tests)
    need = feature_bytes(n_images, grid[0] * grid[1], cfg.target_embed_dimension, settings.precision)
    cache = "off" if encoder.train_backbone else choose_cache(settings.cache, device, need)
    LOG.info("%s: %d train / %d test images, features %.2f GB, cache: %s", job.name, sum(len(d) for d in job.trains),
             sum(len(d) for d in job.tests), need / 1e9, cache)
    concat = IndexedConcat(job.trains)
    shared = None
    if cache == "off" and settings.num_workers > 0:  # many passes: one set of loader workers for all of them
        shared = SharedLoader([concat, *job.tests], settings.num_workers, pin_memory=device.type == "cuda")
    make = lambda ds, part: FeatureSource(encoder, ds, cfg.batch_size, settings.num_workers, device, cache, grid, progress,
                                          shared, part)
    labels = torch.cat([torch.full((len(d),), c, dtype=torch.long) for c, d in enumerate(job.trains)]).to(device)
    train = TrainSet(make(concat, 0), labels, concat.class_indices())
    tests = []
    for part, (name, ds) in enumerate(zip(job.row_names, job.tests), start=1):
        labels_c, masks = load_masks(ds, device, job.config.get("mask_binarize", CONFIG_DEFAULTS["mask_binarize"]))
        tests.append(ClassTest(name, make(ds, part), labels_c, masks))
    return train, tests


class IndexedConcat(torch.utils.data.ConcatDataset):
    """ConcatDataset whose items carry their index in the concatenation (the feature cache's key)."""

    def __getitem__(self, index: int) -> dict:
        item = dict(super().__getitem__(index))
        item["index"] = index if index >= 0 else len(self) + index
        return item

    def image_item(self, index: int) -> dict:
        """{"image", "index"} of item ``index`` of the concatenation (no mask decoded)."""
        part = bisect.bisect_right(self.cumulative_sizes, index)
        start = self.cumulative_sizes[part - 1] if part else 0
        return {"image": self.datasets[part].image_item(index - start)["image"], "index": index}

    def class_indices(self) -> list[list[int]]:
        starts = [0, *self.cumulative_sizes[:-1]]
        return [list(range(s, e)) for s, e in zip(starts, self.cumulative_sizes)]


def write_heatmaps(folder: str, dataset, maps: torch.Tensor) -> None:
    """One [image | ground truth | scores] PNG per test image (final evaluation only)."""
    for i, name in enumerate(datasets.heatmap_names(dataset)):
        item = dataset[i]
        utils.save_png(utils.heatmap_panel(item["image"], item["mask"], maps[i]), os.path.join(folder, name))


SCORE_COLUMNS = ("class", "image_path", "defect", "label", "image_score", "heatmap")


def scores_csv(job: Job, scores: dict[str, torch.Tensor]) -> str:
    """Every test image of the job under the selected state: class, path, defect, label, score, heatmap file
    (relative to the job folder); for the run report."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SCORE_COLUMNS)
    for name, ds in zip(job.row_names, job.tests):
        for sample, score, heatmap in zip(ds.samples, scores[name].tolist(), datasets.heatmap_names(ds), strict=True):
            writer.writerow([name, sample.image_path, sample.defect, sample.is_anomaly, repr(score),
                             os.path.join("heatmaps", name, heatmap)])
    return out.getvalue()


def epoch_label(epoch: int, meta_epochs: int) -> str:
    """An epoch as the log names it: its index as in the CSV log, results.csv and the plots (from 0), and its
    count, e.g. 'epoch 59 (60 of 60)'."""
    return f"epoch {epoch} ({epoch + 1} of {meta_epochs})"


def epoch_logger(job: Job, meta_epochs: int, history: Sequence[EpochLog] = ()) -> Callable[[EpochLog], None]:
    """Per-epoch CSV log (written every 10 epochs and at the end) and, without a progress bar, a line now and
    then; ``history``: the epochs before a resume. The CSV has the mean I-AUROC and P-AUROC over the job's
    classes and, for a multi-class job, each class's."""
    lines: list[str] = []
    every = max(1, meta_epochs // PROGRESS_LINES)
    per_class = job.row_names if len(job.row_names) > 1 else []

    def add(log: EpochLog) -> None:
        if not lines:
            lines.append(",".join(["epoch", *log.stats, "image_auroc", "pixel_auroc",
                                   *(f"{n}_{m}" for n in per_class for m in ("image_auroc", "pixel_auroc"))]))
        values = [log.per_class.get(n, {}).get(m, math.nan) for n in per_class for m in ("image_auroc", "pixel_auroc")]
        lines.append(",".join(str(v) for v in (log.epoch, *log.stats.values(), log.image_auroc, log.pixel_auroc, *values)))

    for past in history:
        add(past)

    def on_epoch(log: EpochLog) -> None:
        add(log)
        if log.epoch % 10 == 9 or log.epoch == meta_epochs - 1:
            utils.save_text("\n".join(lines) + "\n", job.log_path)
        if not sys.stderr.isatty() and (log.epoch + 1) % every == 0:
            s = log.stats
            LOG.info("%s: %s, loss %.4f, p_true %.2f, p_fake %.2f, I-AUROC %.4f, P-AUROC %.4f", job.name,
                     epoch_label(log.epoch, meta_epochs), s["loss"], s["p_true"], s["p_fake"], log.image_auroc,
                     log.pixel_auroc)

    return on_epoch


def checkpoint_dict(settings: RunSettings, job: Job, method: Method, complete: bool, **parts) -> dict:
    """The self-describing checkpoint: method, configuration, classes, centers, then ``parts``."""
    return {"format": utils.CHECKPOINT_FORMAT, "method": settings.method.name, "complete": complete,
            "config": job.config, "classes": job.row_names, "center": method.center.cpu(), **parts}


def train_job(job: Job, settings: RunSettings, method: Method, encoder: Encoder, train: TrainSet,
              tests: list[ClassTest], progress: Callable) -> tuple[FitResult, float]:
    """Train a job, resuming from its saved training state when there is one; (result, training seconds)."""
    previous = 0.0

    def save_state(state: dict) -> None:
        utils.save_torch({"format": utils.CHECKPOINT_FORMAT, "config": job.config, "train_seconds":
                          previous + time.time() - started, **state}, job.train_state)

    def on_best(snapshot: Snapshot) -> None:
        utils.save_torch(checkpoint_dict(settings, job, method, False, best=snapshot.__dict__), job.checkpoint)

    trainer = Trainer(method, encoder, train, tests, FitHooks(on_best=on_best, save_state=save_state),
                      progress)
    saved = read_train_state(job)
    if saved is not None:
        trainer.resume(saved)
        previous = saved["train_seconds"]
        LOG.info("%s: resuming from the training state saved at epoch %d, step %d", job.name, trainer.epoch,
                 len(trainer.steps))
    else:
        trainer.start()
    csv_log = epoch_logger(job, settings.config.meta_epochs, trainer.history)
    with TensorBoard(job.tensorboard, sum(len(log.steps) for log in trainer.history), trainer.epoch) as board:
        def on_epoch(log: EpochLog) -> None:
            csv_log(log)
            board.epoch(log)

        trainer.hooks.on_epoch = on_epoch
        started = time.time()
        result = trainer.run()
        board.hparams(job.config, result)
    return result, previous + time.time() - started


class TensorBoard:
    """TensorBoard event files of a job (torch.utils.tensorboard): every step's losses, p_true and p_fake
    (``train/...`` in FOLDER, step = training step), every evaluation's per-class and mean I-AUROC and P-AUROC
    (``eval/CLASS/...``, ``eval/mean/...`` in FOLDER/eval, step = epoch) and, at the end, the hyper-parameters
    with the selected epoch's mean metrics (FOLDER/hparams). Written at epoch ends (no extra synchronisation
    per step).

    A (re)started training purges what a killed run wrote after the state it continues from: each writer
    opens with its purge step (the writer's purge_step; TensorBoard drops the events at or after it), the
    training steps and epochs already done (0 and 0 for a start from scratch). The two step axes are why
    the evaluations have their own folder.
    """

    def __init__(self, folder: str, first_step: int = 0, first_epoch: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when training

        self.writer = SummaryWriter(log_dir=folder, purge_step=first_step)
        self.eval_writer = SummaryWriter(log_dir=os.path.join(folder, TENSORBOARD_EVAL), purge_step=first_epoch)
        self.step = first_step

    def __enter__(self) -> "TensorBoard":
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()
        self.eval_writer.close()

    def epoch(self, log: EpochLog) -> None:
        for stats in log.steps:
            for key, value in stats.items():
                self.writer.add_scalar(f"train/{key}", value, self.step)
            self.step += 1
        if log.per_class:
            for name, values in log.per_class.items():
                for key in ("image_auroc", "pixel_auroc"):
                    self.eval_writer.add_scalar(f"eval/{name}/{key}", values[key], log.epoch)
            self.eval_writer.add_scalar("eval/mean/image_auroc", log.image_auroc, log.epoch)
            self.eval_writer.add_scalar("eval/mean/pixel_auroc", log.pixel_auroc, log.epoch)
            self.eval_writer.flush()
        self.writer.flush()

    def hparams(self, config: dict, result: FitResult) -> None:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                for k, v in {**config, **config["net"]}.items() if k != "net"}
        best = {f"hparam/{k}": mean_over_classes(result.best.metrics, k) for k in ("image_auroc", "pixel_auroc")}
        self.writer.add_hparams(flat, {**best, "hparam/best_epoch": result.best.epoch}, run_name="hparams")


def build_model(job: Job, settings: RunSettings, make_embedder: Callable[[], Embedder], device: torch.device
                ) -> tuple[Method, Encoder]:
    """The job's modules in the releases' order and random stream (RNG_REPLAY_SPEC 2-3): seed, a fresh backbone
    (its constructor's draws), its BatchNorm statistics (``backbone_stats`` 'release'), P and D; then the
    '.seed-N' reseed when given."""
    cfg = settings.config
    utils.set_seed(job.seed)  # the initial weights come from it
    embedder = make_embedder().to(device)
    if cfg.backbone_stats == "release":
        release_statistics(embedder.extractor, cfg.imagesize, device)
    method = settings.method(cfg, len(job.classnames), settings.precision).to(device)
    stream_seed = job.seed if cfg.reseed is None else cfg.reseed
    if cfg.reseed is not None:
        utils.set_seed(cfg.reseed)  # data order and noise come from N
    method.seed_streams(stream_seed, device)
    return method, Encoder(embedder, settings.precision, cfg.train_backbone)


def restore_statistics(encoder: Encoder, stats: dict, source: str) -> None:
    """The backbone statistics stored with a checkpoint; a one-line UserError when they do not fit."""
    try:
        encoder.embedder.load_statistics(stats)
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{source}: its backbone statistics do not fit the backbone ({str(exc).splitlines()[0]})") from exc


def run_job(job: Job, settings: RunSettings, make_embedder: Callable[[], Embedder], device: torch.device,
            progress: Callable = utils.progress) -> dict[str, dict]:
    """Train (or reuse, or load released weights) and test one job; return its results.csv rows by class.

    ``make_embedder()`` builds a fresh embedder on the pretrained backbone; it is called once the job is seeded.
    """
    method, encoder = build_model(job, settings, make_embedder, device)
    if job.finished:  # score with the statistics it was trained with (before any feature is cached)
        restore_statistics(encoder, read_checkpoint(job.checkpoint, settings.method.name)["backbone_stats"],
                           job.checkpoint)
    train, tests = job_sources(job, encoder, settings, device, progress)
    try:
        return train_and_test(job, settings, method, encoder, train, tests, progress)
    finally:
        if train.source.shared is not None:
            train.source.shared.close()


def train_and_test(job: Job, settings: RunSettings, method: Method, encoder: Encoder, train: TrainSet,
                   tests: list[ClassTest], progress: Callable) -> dict[str, dict]:
    """Train (or reuse a checkpoint, or load released weights), then the final evaluation and the job's files."""
    parts: dict = {}
    if job.release is not None:
        state, epoch, center = load_release(job.release, method)
        restore(method, encoder, state, center, f"released weights in {job.release}")
        best = last = Snapshot(epoch, trained_state(method, encoder), {})
        parts["release"] = job.release
        LOG.info("%s: evaluating the released weights of epoch %d in %s", job.name, epoch, job.release)
    elif job.finished:
        ckpt = read_checkpoint(job.checkpoint, settings.method.name)
        LOG.info("%s: testing the finished checkpoint %s", job.name, job.checkpoint)
        restore(method, encoder, ckpt["best"]["state"], ckpt["center"], job.checkpoint)
        best = Snapshot(ckpt["best"]["epoch"], ckpt["best"]["state"], {})
        last = Snapshot(ckpt["last"]["epoch"], ckpt["last"]["state"], {})
        parts["train_seconds"] = ckpt.get("train_seconds", math.nan)
    else:
        fitted, parts["train_seconds"] = train_job(job, settings, method, encoder, train, tests, progress)
        best, last = fitted.best, fitted.last

    if last.epoch != best.epoch:  # not a pass of the releases' testers: it draws nothing
        load_trained_state(method, encoder, last.state)
        last_metrics, _ = evaluate(method, tests, full=True, draw=False)
    load_trained_state(method, encoder, best.state)
    scores: dict[str, torch.Tensor] = {}
    best_metrics, maps = evaluate(method, tests, full=True, scores_out=scores)  # the releases' tester
    if last.epoch == best.epoch:
        last_metrics = best_metrics
    for test, ds in zip(tests, job.tests):
        write_heatmaps(os.path.join(job.folder, "heatmaps", test.name), ds, maps[test.name])
    utils.save_text(scores_csv(job, scores), os.path.join(job.folder, SCORES_NAME))
    rows = {name: {**best_metrics[name], "best_epoch": best.epoch, "last_epoch": last.epoch,
                   **{f"last_{k}": last_metrics[name][k] for k in (*utils.METRIC_COLUMNS, "pixel_aupro", "pixel_aupro_05")}}
            for name in job.row_names}
    if not job.finished:
        utils.save_torch(checkpoint_dict(
            settings, job, method, True,
            best={"epoch": best.epoch, "state": best.state, "metrics": best_metrics},
            last={"epoch": last.epoch, "state": last.state, "metrics": last_metrics},
            normal_scores=normal_score_statistics(method, train, job.row_names),  # the best state is loaded
            backbone_stats=encoder.embedder.statistics(),
            torch_version=str(torch.__version__), **parts), job.checkpoint)
        if os.path.exists(job.train_state):
            os.remove(job.train_state)  # the finished checkpoint supersedes it
    utils.save_json({"method": settings.method.name, "setting": job.config["setting"], "seed": job.seed,
                     "requested": job.requested, "rows": rows}, os.path.join(job.folder, METRICS_NAME))
    return rows
