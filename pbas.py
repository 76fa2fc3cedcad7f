"""PBAS: model, center initialization, training and evaluation (spec sections 3-7).

Reading order:
    PBASConfig                     every hyper-parameter, released defaults
    Projection, Discriminator      P_theta and D_psi (spec section 3)
    nearest_center, update_center  the 1-NN search and the EMA update of ABL (section 4)
    PBAS                           E_phi + P_theta + D_psi + center c; train_step (section 5), score (section 6)
    FeatureSource                  features of a dataset in given batches, embedded once (cached) or per pass
    evaluate, fit                  per-epoch test evaluation, best-epoch selection (section 7)

Nothing here touches the file system: ``fit`` reports through callbacks and ``main.py`` owns the run folder.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

import metrics
from backbones import Stages
from common import SMOOTHING_SIGMA, FeatureExtractor, PatchEmbedder, anomaly_maps

CENTER_EMA_BETA = 0.1  # beta of the center EMA (paper section III-C, released value)
PROJECTOR_WEIGHT_DECAY = 1e-5  # the paper's gamma (Adam on P_theta)
DISCRIMINATOR_WEIGHT_DECAY = 1e-2  # the paper's delta (AdamW default in the release)
LEAKY_RELU_SLOPE = 0.2
CENTER_METRICS = ("cosine", "euclidean")
DSC_OPTIMIZERS = ("adamw", "adam")
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class PBASConfig:
    """Model and training configuration; defaults are the released ones (spec section 8)."""

    backbone: str = "wideresnet50"
    layers: tuple[str, ...] = ("layer2", "layer3")
    pretrain_embed_dimension: int = 1536
    target_embed_dimension: int = 1536
    patchsize: int = 3
    meta_epochs: int = 640
    eval_epochs: int = 1
    dsc_layers: int = 2
    dsc_hidden: int = 1024
    dsc_margin: float = 0.5  # only for the p_true / p_fake progress figures
    pre_proj: int = 1
    k: float = 0.25  # the paper's alpha (0.3 in the paper)
    lr: float = 1e-4
    train_backbone: bool = False
    center_metric: str = "cosine"  # the paper says Euclidean 1-NN
    dsc_optimizer: str = "adamw"  # the paper says Adam
    imagesize: int = 288
    batch_size: int = 8

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "PBASConfig":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in values.items() if k in known}
        if "layers" in values:
            values["layers"] = tuple(values["layers"])
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# Modules (spec section 3). Sub-module names follow the release so its state dicts load as they are.
# ----------------------------------------------------------------------------------------------


def _xavier_linears(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.xavier_normal_(module.weight)


class Projection(torch.nn.Module):
    """P_theta: ``n_layers`` Linear(D, D) layers with bias, no activation; xavier-normal weights."""

    def __init__(self, dim: int, n_layers: int = 1):
        super().__init__()
        self.layers = torch.nn.Sequential()
        for i in range(n_layers):
            self.layers.add_module(f"{i}fc", torch.nn.Linear(dim, dim))
        self.apply(_xavier_linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, D]
        return self.layers(x)


class Discriminator(torch.nn.Module):
    """D_psi: (n_layers - 1) x [Linear -> BatchNorm1d -> LeakyReLU(0.2)], then Linear(hidden, 1, no bias) -> Sigmoid."""

    def __init__(self, dim: int, n_layers: int = 2, hidden: int = 1024):
        super().__init__()
        self.body = torch.nn.Sequential()
        width = dim
        for i in range(n_layers - 1):
            block = torch.nn.Sequential(
                torch.nn.Linear(width, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.LeakyReLU(LEAKY_RELU_SLOPE)
            )
            self.body.add_module(f"block{i + 1}", block)
            width = hidden
        self.tail = torch.nn.Sequential(torch.nn.Linear(width, 1, bias=False), torch.nn.Sigmoid())
        self.apply(_xavier_linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, 1]
        return self.tail(self.body(x))


# ----------------------------------------------------------------------------------------------
# Center initialization (spec section 4, paper Algorithm 1)
# ----------------------------------------------------------------------------------------------


def nearest_center(u: torch.Tensor, center: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Index of each row's nearest center row: largest cosine similarity (release) or smallest L2 (paper).

    u [N, D], center [M, D] -> [N] int64
    """
    if metric == "cosine":
        sim = F.normalize(u, dim=1) @ F.normalize(center, dim=1).T  # [N, M]
        return sim.argmax(dim=1)
    if metric == "euclidean":
        return torch.cdist(u, center).argmin(dim=1)
    raise ValueError(f"unknown center metric '{metric}'; valid: {', '.join(CENTER_METRICS)}")


def update_center(center: torch.Tensor, a: torch.Tensor, idx: torch.Tensor, beta: float = CENTER_EMA_BETA) -> torch.Tensor:
    """Apply, for j = 0, 1, ... in order, ``c[idx[j]] = (1 - beta) c[idx[j]] + beta a[j]``, vectorised.

    A row hit m times ends as (1-beta)^m c + sum_t beta (1-beta)^(m-t) a_(j_t) (t = 1..m in increasing j).
    center [M, D], a [N, D], idx [N] -> [M, D]
    """
    order = torch.argsort(idx, stable=True)  # hits grouped by target row, increasing j inside a group
    target = idx[order]
    counts = torch.bincount(idx, minlength=len(center))  # [M]
    first = torch.cumsum(counts, 0) - counts  # position of each group's first hit in ``order``
    rank = torch.arange(len(idx), device=idx.device) - first[target]  # 0-based hit number within its group
    remaining = (counts[target] - 1 - rank).to(center.dtype)  # later hits that will shrink this contribution
    weights = beta * (1 - beta) ** remaining  # [N]
    out = center * ((1 - beta) ** counts.to(center.dtype)).unsqueeze(1)
    return out.index_add(0, target, weights.unsqueeze(1) * a[order])


def initialize_center(batch_means: Iterator[torch.Tensor], metric: str = "cosine") -> torch.Tensor:
    """ABL center initialization over a stream of batch means a_i [H*W, D] (Algorithm 1, lines 4-17)."""
    center = None
    for a in batch_means:
        if center is None:
            center = a.clone()
        else:
            center = update_center(center, a, nearest_center(a, center, metric))
    if center is None:
        raise ValueError("center initialization needs at least one training batch")
    return center


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class PBAS(torch.nn.Module):
    """E_phi (frozen unless train_backbone) + P_theta + D_psi + the center c."""

    def __init__(self, config: PBASConfig, stages: Stages, precision: str = "fp32"):
        super().__init__()
        self.config = config
        self.extractor = FeatureExtractor(stages, config.layers)
        self.embedder = PatchEmbedder(config.patchsize, config.pretrain_embed_dimension, config.target_embed_dimension)
        dim = config.target_embed_dimension
        self.projector = Projection(dim, config.pre_proj) if config.pre_proj > 0 else torch.nn.Identity()
        self.discriminator = Discriminator(dim, config.dsc_layers, config.dsc_hidden)
        self.register_buffer("center", torch.zeros(0, dim))
        self.precision = precision
        self.optimizers: list[torch.optim.Optimizer] = []
        if not config.train_backbone:
            self.extractor.requires_grad_(False)

    # -- numerics ---------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the forward passes when precision == 'bf16'; a no-op otherwise."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.center.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- E_phi ------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor, train: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, 3, S, S] -> ([B*H*W, D] float32, (H, W)); gradients only when training the backbone."""
        grad = train and self.config.train_backbone
        self.extractor.train(grad)
        with torch.set_grad_enabled(grad), self.autocast():
            feats, grid = self.embedder(self.extractor(images))
        return feats.float(), grid

    # -- training (spec section 5) -----------------------------------------------------------
    def build_optimizers(self) -> None:
        cfg = self.config
        self.optimizers = []
        if cfg.pre_proj > 0:
            self.optimizers.append(torch.optim.Adam(self.projector.parameters(), cfg.lr, weight_decay=PROJECTOR_WEIGHT_DECAY))
        dsc_opt = torch.optim.AdamW if cfg.dsc_optimizer == "adamw" else torch.optim.Adam
        self.optimizers.append(dsc_opt(self.discriminator.parameters(), lr=2 * cfg.lr, weight_decay=DISCRIMINATOR_WEIGHT_DECAY))
        if cfg.train_backbone:
            self.optimizers.append(torch.optim.AdamW(self.extractor.parameters(), cfg.lr))

    def synthesize(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ABL distance and AFS anomalies (Eqs. 6-7). u [N, D] -> (L_c, z [N, D], nearest index [N])."""
        idx = nearest_center(u.detach(), self.center, self.config.center_metric)
        offset = u - self.center[idx]  # [N, D]
        dist = offset.norm(dim=1, keepdim=True)  # [N, 1]
        radius = dist.mean()  # L_c
        z = u + (offset / dist * radius * self.config.k).detach()
        return radius, z, idx

    def train_step(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch of patch features [B*H*W, D] (spec section 5).

        Returns 0-dim tensors on the device (no synchronisation): loss, svdd_loss (L_c, Eq. 6),
        true_loss (L_n, Eq. 8), fake_loss (L_a, Eq. 9), p_true / p_fake (share of normal rows scored
        below ``dsc_margin`` / synthetic rows at or above it).
        """
        self.projector.train()
        self.discriminator.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        with self.autocast():
            u = self.projector(feats)
            svdd_loss, z, _ = self.synthesize(u.float())
            scores = self.discriminator(torch.cat([u, z.to(u.dtype)])).float()  # [2N, 1]: normal rows, then synthetic
        true_scores, fake_scores = scores[: len(u)], scores[len(u) :]
        true_loss = F.binary_cross_entropy(true_scores, torch.zeros_like(true_scores))
        fake_loss = F.binary_cross_entropy(fake_scores, torch.ones_like(fake_scores))
        loss = svdd_loss + true_loss + fake_loss
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        margin = self.config.dsc_margin
        return {
            "loss": loss.detach(),
            "svdd_loss": svdd_loss.detach(),
            "true_loss": true_loss.detach(),
            "fake_loss": fake_loss.detach(),
            "p_true": (true_scores < margin).float().mean(),
            "p_fake": (fake_scores >= margin).float().mean(),
        }

    @torch.no_grad()
    def project(self, feats: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.projector(feats).float()

    # -- scoring (spec section 6) -------------------------------------------------------------
    @torch.no_grad()
    def patch_scores(self, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """D(P(E(x))) in eval mode: [B*H*W, D] -> [B, H, W]."""
        self.projector.eval()
        self.discriminator.eval()
        with self.autocast():
            s = self.discriminator(self.projector(feats)).float()
        return s.reshape(-1, *grid)

    @torch.no_grad()
    def score(self, feats: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (Eq. 11, max over patches) [B] and anomaly maps (Eq. 12) [B, S, S]."""
        s = self.patch_scores(feats, grid)
        return s.flatten(1).max(dim=1).values, anomaly_maps(s, self.config.imagesize, SMOOTHING_SIGMA)

    # -- state --------------------------------------------------------------------------------
    def trained_state(self) -> dict:
        """The trainable state (CPU copies): projector, discriminator, and the backbone if it is trained."""
        state = {
            "projector": self.projector.state_dict(),
            "discriminator": self.discriminator.state_dict(),
        }
        if self.config.train_backbone:
            state["backbone"] = self.extractor.state_dict()
        return {k: {n: t.detach().cpu().clone() for n, t in v.items()} for k, v in state.items()}

    def load_trained_state(self, state: dict) -> None:
        self.projector.load_state_dict(state["projector"])
        self.discriminator.load_state_dict(state["discriminator"])
        if self.config.train_backbone:
            self.extractor.load_state_dict(state["backbone"])


# ----------------------------------------------------------------------------------------------
# Feature sources: the same batches with or without a feature cache
# ----------------------------------------------------------------------------------------------


def batches_of(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive chunks of ``order`` (the last one may be smaller, as a DataLoader without drop_last)."""
    order = list(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_order(n: int, seed: int, pass_index: int) -> list[int]:
    """The shuffled order of pass ``pass_index`` (0: center initialization, e >= 1: training epoch e - 1).

    Each pass draws from its own generator, so the order does not depend on anything else consuming
    random numbers (feature caching, evaluation, data loading workers).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + pass_index)
    return torch.randperm(n, generator=gen).tolist()


class FeatureSource:
    """Patch features of a dataset's images for given batches of indices.

    ``cache='off'``: every request runs the data loader and the backbone (needed with --train_backbone).
    ``cache='device'`` / ``'host'``: all images are embedded once, on first use, and kept on the
    compute device or in pinned host memory; requests then only index that tensor.
    Either way the same indices give the same batches, so training sees identical data.
    """

    def __init__(self, model: PBAS, dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int,
                 device: torch.device, cache: str = "device", progress: Callable | None = None):
        self.model = model
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.cache = cache
        self.progress = progress or (lambda it, **_: it)
        self.grid: tuple[int, int] | None = None
        self._features: torch.Tensor | None = None  # [N, H*W, D]

    def __len__(self) -> int:
        return len(self.dataset)

    def _loader(self, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _embed_all(self) -> torch.Tensor:
        batches = batches_of(range(len(self.dataset)), self.batch_size)
        store = None
        for batch in self.progress(self._loader(batches), desc="embedding", total=len(batches)):
            feats, self.grid = self.model.embed(batch["image"].to(self.device, non_blocking=True))
            feats = feats.reshape(len(batch["image"]), -1, feats.shape[-1])  # [b, H*W, D]
            if store is None:
                shape = (len(self.dataset), *feats.shape[1:])
                if self.cache == "host":
                    store = torch.empty(shape, dtype=feats.dtype, pin_memory=self.device.type == "cuda")
                else:
                    store = torch.empty(shape, dtype=feats.dtype, device=self.device)
            idx = batch["index"]
            store[idx] = feats.to(store.device)
        return store

    def prepare(self) -> None:
        """Embed and store every image now (cached modes); otherwise this happens on first use."""
        if self.cache != "off" and self._features is None:
            self._features = self._embed_all()

    def batches(self, order: Sequence[int], train: bool = False) -> Iterator[torch.Tensor]:
        """Features [b*H*W, D] of each consecutive batch of ``order``."""
        chunks = batches_of(order, self.batch_size)
        if self.cache == "off":
            for batch in self._loader(chunks):
                feats, self.grid = self.model.embed(batch["image"].to(self.device, non_blocking=True), train=train)
                yield feats
            return
        self.prepare()
        for chunk in chunks:
            idx = torch.as_tensor(chunk, device=self._features.device)
            if self.cache == "device":
                feats = self._features[idx]
            else:  # host cache: gather into pinned memory so the copy to the device can overlap
                staging = torch.empty((len(chunk), *self._features.shape[1:]), dtype=self._features.dtype,
                                      pin_memory=self.device.type == "cuda")
                feats = torch.index_select(self._features, 0, idx, out=staging).to(self.device, non_blocking=True)
            yield feats.reshape(-1, feats.shape[-1])


# ----------------------------------------------------------------------------------------------
# Evaluation and training loop (spec section 7)
# ----------------------------------------------------------------------------------------------


@dataclass
class TestSet:
    """What evaluation needs besides features: image labels [N] and pixel masks [N, S, S] on the device."""

    labels: torch.Tensor
    masks: torch.Tensor


@torch.no_grad()
def predict(model: PBAS, source: FeatureSource) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores [N] and anomaly maps [N, S, S] of every image of ``source``, in dataset order."""
    scores, maps = [], []
    for feats in source.batches(range(len(source))):
        s, m = model.score(feats, source.grid)
        scores.append(s)
        maps.append(m)
    return torch.cat(scores), torch.cat(maps)


def evaluate(model: PBAS, source: FeatureSource, test: TestSet, full: bool) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Metrics on the test set: I-AUROC and P-AUROC per epoch; everything (AP, PRO, AUPRO) when ``full``."""
    scores, maps = predict(model, source)
    if not full:
        return {"image_auroc": _auroc_or_nan(scores, test.labels),
                "pixel_auroc": _auroc_or_nan(maps.flatten(), metrics.pixel_ground_truth(test.masks).flatten())}, scores, maps
    result = {**metrics.image_metrics(scores, test.labels), **metrics.pixel_metrics(maps, test.masks, with_pro=True)}
    try:
        result["image_f1_threshold"], result["image_f1"] = metrics.f1_optimal_threshold(scores, test.labels)
    except metrics.UndefinedMetricError:
        result["image_f1_threshold"], result["image_f1"] = math.nan, math.nan
    return result, scores, maps


@torch.no_grad()
def batch_means(model: PBAS, source: FeatureSource, order: Sequence[int]) -> Iterator[torch.Tensor]:
    """a_i of Algorithm 1: the mean over a batch's images of P(E(x)), one row per grid position [H*W, D]."""
    for feats in source.batches(order):
        u = model.project(feats)  # [b*H*W, D]
        positions = source.grid[0] * source.grid[1]
        yield u.reshape(-1, positions, u.shape[-1]).mean(0)


def _auroc_or_nan(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC, or NaN when the labels hold a single class (e.g. a test set without defect pixels)."""
    try:
        return metrics.auroc(scores, labels)
    except metrics.UndefinedMetricError:
        return math.nan


PIXEL_QUANTILES = 1001  # stored quantiles (0, 0.001, ..., 1) of the normal training pixel scores


def sorted_quantiles(values: torch.Tensor, count: int = PIXEL_QUANTILES) -> torch.Tensor:
    """``count`` evenly spaced quantiles (linear interpolation, as torch.quantile) of any number of values."""
    v = values.flatten().double().sort().values
    pos = torch.linspace(0, len(v) - 1, count, dtype=torch.float64, device=v.device)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return (v[lo] + (v[hi] - v[lo]) * (pos - lo)).float()


def normal_score_statistics(model: PBAS, train: FeatureSource) -> dict:
    """Score distributions of the (normal) training images under the current state, for thresholds:
    every image score [N] and PIXEL_QUANTILES quantiles of all pixel scores."""
    scores, maps = predict(model, train)
    return {"image_scores": scores.cpu(), "pixel_quantiles": sorted_quantiles(maps).cpu(),
            "quantile_levels": torch.linspace(0, 1, PIXEL_QUANTILES)}


@dataclass
class EpochLog:
    epoch: int  # 0-based, as the release counts
    stats: dict
    image_auroc: float = math.nan
    pixel_auroc: float = math.nan


@dataclass
class FitResult:
    best_epoch: int
    best_state: dict
    best_metrics: dict
    last_epoch: int
    last_state: dict
    last_metrics: dict
    history: list[EpochLog] = field(default_factory=list)


def initialize(model: PBAS, train: FeatureSource, seed: int) -> None:
    """Center initialization (one pass of shuffled batches, untrained projector), then fresh optimizers."""
    model.center = initialize_center(batch_means(model, train, epoch_order(len(train), seed, 0)), model.config.center_metric)
    model.build_optimizers()


def train_epoch(model: PBAS, train: FeatureSource, order: Sequence[int]) -> dict[str, float]:
    """One epoch of training steps over ``order``; the mean of each step statistic."""
    steps = [model.train_step(feats) for feats in train.batches(order, train=True)]
    means = torch.stack([torch.stack(list(s.values())) for s in steps]).mean(0).tolist()  # one sync per epoch
    return dict(zip(steps[0], means))


def selection_key(m: dict) -> float:
    """The release keeps the epoch with the largest I-AUROC + P-AUROC (NaN counts as 0)."""
    return sum(0.0 if math.isnan(m[k]) else m[k] for k in ("image_auroc", "pixel_auroc"))


def fit(model: PBAS, train: FeatureSource, test: FeatureSource, test_set: TestSet, seed: int,
        on_epoch: Callable[[EpochLog], None] | None = None,
        on_best: Callable[[int, dict, dict], None] | None = None,
        progress: Callable | None = None) -> FitResult:
    """Center initialization, then ``meta_epochs`` epochs with test evaluation every ``eval_epochs``.

    The best epoch (strictly larger I-AUROC + P-AUROC; ties keep the earlier one) is selected on the
    test set as in the release; the last epoch is evaluated too, so both can be reported.
    """
    cfg = model.config
    progress = progress or (lambda it, **_: it)
    n = len(train)
    initialize(model, train, seed)

    best_key, best = -math.inf, None
    history: list[EpochLog] = []
    last_metrics: dict = {}
    bar = progress(range(cfg.meta_epochs), desc="epochs", total=cfg.meta_epochs)
    for epoch in bar:
        log = EpochLog(epoch, train_epoch(model, train, epoch_order(n, seed, epoch + 1)))
        if (epoch + 1) % cfg.eval_epochs == 0 or epoch == cfg.meta_epochs - 1:
            last_metrics, _, _ = evaluate(model, test, test_set, full=False)
            log.image_auroc, log.pixel_auroc = last_metrics["image_auroc"], last_metrics["pixel_auroc"]
            key = selection_key(last_metrics)
            if key > best_key:
                best_key = key
                best = (epoch, model.trained_state(), dict(last_metrics))
                if on_best is not None:
                    on_best(epoch, best[1], best[2])
        history.append(log)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{log.stats['loss']:.4f}", p_true=f"{log.stats['p_true']:.2f}",
                            p_fake=f"{log.stats['p_fake']:.2f}", i_auroc=f"{log.image_auroc:.4f}",
                            p_auroc=f"{log.pixel_auroc:.4f}")
        if on_epoch is not None:
            on_epoch(log)
    assert best is not None  # the last epoch is always evaluated
    return FitResult(best_epoch=best[0], best_state=best[1], best_metrics=best[2],
                     last_epoch=cfg.meta_epochs - 1, last_state=model.trained_state(),
                     last_metrics=last_metrics, history=history)
