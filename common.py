"""Feature extraction and patch aggregation: the frozen extractor E_phi (paper Eq. 4, spec section 2).

Data flow for one batch of images:
    images [B, 3, S, S]
      -> FeatureExtractor: one map per requested layer, e.g. layer2 [B, 512, S/8, S/8], layer3 [B, 1024, S/16, S/16]
      -> PatchEmbedder: 3x3 neighbourhood of every location, pooled per layer to ``pretrain_dim``,
         aligned to the first layer's grid, stacked and pooled again to ``target_dim``
      -> [B*H*W, target_dim] patch features, row-major over the first layer's grid.

It also holds what both methods (``pbas.py``, ``cras.py``) are built from:
    Embedder                      FeatureExtractor + PatchEmbedder: images -> patch features
    Projection, Discriminator     the projector P and the MLP discriminator D (release key names)
    finite_bce                    the discriminator's loss, NaN (not a device-side assert) on a NaN score
    autocast                      the one place where reduced precision is switched on
    Method                        the interface a method implements for the engine, with the shared parts

Nothing in this module does I/O.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ClassVar, Iterable, Sequence

import torch
import torch.nn.functional as F

from backbones import Stages
from choices import PRECISIONS  # re-exported: common.PRECISIONS
from methods import MethodConfig

SMOOTHING_SIGMA = 4.0  # Gaussian smoothing of the anomaly maps (Eq. 12)
SMOOTHING_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter default
LEAKY_RELU_SLOPE = 0.2  # discriminator activations (both releases)


class FeatureExtractor(torch.nn.Module):
    """Runs a backbone's stages in order and returns the requested ones; stops after the last requested stage."""

    def __init__(self, stages: Stages, layers: list[str] | tuple[str, ...]):
        super().__init__()
        names = [name for name, _ in stages]
        last = max(names.index(layer) for layer in layers)
        self.names = names[: last + 1]
        self.layers = tuple(layers)
        self.stages = torch.nn.ModuleList(module for _, module in stages[: last + 1])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, S, S] -> one feature map [B, C_l, H_l, W_l] per requested layer, in request order."""
        found: dict[str, torch.Tensor] = {}
        x = images
        for name, stage in zip(self.names, self.stages):
            x = stage(x)
            if name in self.layers:
                found[name] = x
        return [found[layer] for layer in self.layers]


def patch_vectors(features: torch.Tensor, patchsize: int) -> torch.Tensor:
    """Every location's patchsize x patchsize neighbourhood (zero padded), flattened in (channel, row, column) order.

    The values of ``F.unfold(features, patchsize, padding=(patchsize - 1) // 2)``, built from p*p shifted slices of
    the padded map: the same copies without unfold's index arithmetic, which the ONNX exporter writes as Gather
    ops that took about 10 % of an exported WideResNet50 graph's time (docs/deployment.md).

    [B, C, H, W] -> [B, C*p*p, H, W]
    """
    b, c, h, w = features.shape
    pad = (patchsize - 1) // 2
    padded = F.pad(features, (pad, pad, pad, pad))  # [B, C, H + 2 pad, W + 2 pad]
    shifts = [padded[:, :, i:i + h, j:j + w] for i in range(patchsize) for j in range(patchsize)]
    return torch.stack(shifts, dim=2).reshape(b, c * patchsize * patchsize, h, w)  # [B, C, p*p, H, W] -> [B, C*p*p, H, W]


def pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D adaptive average pooling over the channel axis of a map: [B, K, H, W] -> [B, dim, H, W].

    When ``dim`` divides K, every output averages K / dim consecutive channels: a mean over a reshaped axis,
    with no transposes of the K-channel map (the release's shapes: 1536 of 512*9 and 1024*9). Otherwise
    F.adaptive_avg_pool1d's overlapping bins over the channels of each location.
    """
    b, k, h, w = x.shape
    if k % dim == 0:
        return x.reshape(b, dim, k // dim, h, w).mean(2)
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, 1, k)  # [B*H*W, 1, K]
    pooled = F.adaptive_avg_pool1d(rows, dim)  # [B*H*W, 1, dim]
    return pooled.reshape(b, h, w, dim).permute(0, 3, 1, 2)


def patch_features(features: torch.Tensor, patchsize: int, dim: int) -> torch.Tensor:
    """``pool_channels(patch_vectors(features, patchsize), dim)``: each location's pooled neighbourhood.

    When every pooling bin holds whole kernel rows (dim divides C*p*p and p divides the bin size: 1536 of WideResNet50's
    512*9 and 1024*9), each output is a mean of row means of the neighbourhood: one horizontal box mean of the
    padded map and p vertical shifts of it ([B, C, p, H, W], a third of the p*p copies), equal to the general path
    up to float rounding (tests/test_golden.py). Otherwise the general path.

    [B, C, H, W] -> [B, dim, H, W]
    """
    b, c, h, w = features.shape
    k = c * patchsize * patchsize
    group = k // dim if k % dim == 0 else 0  # channels of the patch vector per output
    if not group or group % patchsize:
        return pool_channels(patch_vectors(features, patchsize), dim)
    pad = (patchsize - 1) // 2
    padded = F.pad(features, (pad, pad, pad, pad))  # [B, C, H + 2 pad, W + 2 pad]
    row_sum = padded[..., 0:w]
    for j in range(1, patchsize):
        row_sum = row_sum + padded[..., j:j + w]  # [B, C, H + 2 pad, W]
    rows = torch.stack([row_sum[:, :, i:i + h] for i in range(patchsize)], dim=2)  # [B, C, p, H, W]: (channel, row) order
    return rows.reshape(b, dim, group // patchsize, h, w).mean(2) / patchsize  # [B, dim, H, W]


def pool_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D adaptive average pooling of each row: [N, K] -> [N, dim] (a mean over K / dim columns when dim divides K)."""
    rows, k = x.shape
    if k % dim == 0:
        return x.reshape(rows, dim, k // dim).mean(2)
    return F.adaptive_avg_pool1d(x.reshape(rows, 1, k), dim).reshape(rows, dim)


class PatchEmbedder(torch.nn.Module):
    """Locally aware patch features (spec section 2); parameter free.

    The released code resizes each layer's full C*p*p patch grid to the reference grid and then pools
    to ``pretrain_dim``. Pooling (over channels) and bilinear resizing (over space) are both linear and
    act on different axes, so they commute: we pool first, which resizes ``pretrain_dim`` instead of
    C*p*p maps. The result is the same up to float rounding (checked against the golden vectors).
    """

    def __init__(self, patchsize: int = 3, pretrain_dim: int = 1536, target_dim: int = 1536):
        super().__init__()
        self.patchsize = patchsize
        self.pretrain_dim = pretrain_dim
        self.target_dim = target_dim

    def forward(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Per-layer maps -> ([B*H*W, target_dim], (H, W)) with (H, W) the first layer's grid."""
        grid = tuple(feature_maps[0].shape[-2:])
        per_layer = []
        for fmap in feature_maps:
            x = patch_features(fmap, self.patchsize, self.pretrain_dim)  # [B, pretrain_dim, h, w]
            if tuple(x.shape[-2:]) != grid:
                x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)  # [B, pretrain_dim, H, W]
            per_layer.append(x.permute(0, 2, 3, 1).reshape(-1, self.pretrain_dim))  # [B*H*W, pretrain_dim]
        stacked = torch.cat(per_layer, dim=1)  # [B*H*W, L*pretrain_dim], layer by layer
        return pool_rows(stacked, self.target_dim), grid  # [B*H*W, target_dim]


def _gaussian_kernel(sigma: float, truncate: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius int(truncate * sigma + 0.5): [2r + 1] float64 (CPU)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 * x * x / (sigma * sigma))
    return phi / phi.sum()


def _reflect_indices(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source indices of a half-sample symmetric ('reflect', d c b a | a b c d) padding.

    Repeats the reflection as often as needed (valid for n < radius): [n + 2 radius] int64.
    """
    i = torch.arange(-radius, n + radius, device=device)
    m = torch.remainder(i, 2 * n)
    return torch.where(m >= n, 2 * n - 1 - m, m)


def _correlate_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Correlate x with a symmetric 1-D kernel along dim, reflect boundary; same shape as x.

    Shifted multiply-adds in x.dtype (no TF32 convolution paths on CUDA).
    """
    n = x.shape[dim]
    radius = (kernel.numel() - 1) // 2
    padded = x.index_select(dim, _reflect_indices(n, radius, x.device))
    w = kernel.tolist()
    out = padded.narrow(dim, 0, n) * w[0]
    for k in range(1, kernel.numel()):
        out = out + padded.narrow(dim, k, n) * w[k]
    return out


def gaussian_blur(maps: torch.Tensor, sigma: float = SMOOTHING_SIGMA, truncate: float = SMOOTHING_TRUNCATE) -> torch.Tensor:
    """Per-map Gaussian blur equal to scipy.ndimage.gaussian_filter(map, sigma) (mode 'reflect').

    maps: [N, H, W] (or [..., H, W]) floating -> same shape and dtype, same device.
    Separable; computed in the input dtype.
    """
    if not maps.is_floating_point():
        raise TypeError(f"gaussian_blur needs a floating tensor, got {maps.dtype}")
    if maps.dim() < 2:
        raise ValueError(f"gaussian_blur needs [..., H, W], got shape {tuple(maps.shape)}")
    kernel = _gaussian_kernel(sigma, truncate)
    out = _correlate_axis(maps, kernel, maps.dim() - 1)
    return _correlate_axis(out, kernel, maps.dim() - 2)


def anomaly_maps(patch_scores: torch.Tensor, image_size: int, sigma: float = SMOOTHING_SIGMA) -> torch.Tensor:
    """Paper Eq. 12: bilinear upsampling of patch scores to the image, then Gaussian smoothing.

    [B, H_m, W_m] -> [B, S, S]
    """
    up = F.interpolate(patch_scores.unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=False)
    return gaussian_blur(up.squeeze(1), sigma=sigma)


# ----------------------------------------------------------------------------------------------
# numerics: reduced precision only where it is safe
# ----------------------------------------------------------------------------------------------


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``precision == 'bf16'``, else a no-op.

    Used around the backbone and the Linear layers only: center search, anomaly synthesis, the
    sigmoid, the losses, center initialisation and every metric run in float32 (callers cast back
    with ``.float()`` right after the autocast block).
    """
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Embedder(torch.nn.Module):
    """E_phi: the frozen backbone stages and the patch aggregation. [B, 3, S, S] -> ([B*H*W, D], (H, W))."""

    def __init__(self, stages: Stages, layers: tuple[str, ...], patchsize: int, pretrain_dim: int, target_dim: int):
        super().__init__()
        self.extractor = FeatureExtractor(stages, layers)
        self.patches = PatchEmbedder(patchsize, pretrain_dim, target_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.patches(self.extractor(images))

    def statistics(self) -> dict[str, torch.Tensor]:
        """CPU copies of the backbone's buffers (its BatchNorm running statistics): what a checkpoint stores."""
        return {name: t.detach().cpu().clone() for name, t in self.extractor.named_buffers()}

    def load_statistics(self, stats: dict[str, torch.Tensor]) -> None:
        """Restore ``statistics()``; KeyError/RuntimeError when they belong to another backbone or layers."""
        own = dict(self.extractor.named_buffers())
        if set(own) != set(stats):
            raise KeyError(f"backbone statistics for {len(stats)} buffers, this backbone has {len(own)}")
        with torch.no_grad():
            for name, value in stats.items():
                own[name].copy_(value)


def release_statistics(extractor: torch.nn.Module, imagesize: int, device: torch.device) -> None:
    """The releases' backbone statistics (RNG_REPLAY_SPEC 3.2): while building the model, their
    ``feature_dimensions`` runs one forward of an all-ones image [1, 3, S, S] through the backbone in train
    mode, so every BatchNorm updates its running statistics once (momentum 0.1) and every later feature uses
    them. Draws no random numbers. Stages after the last requested layer are not run: they shape no feature.
    """
    was_training = extractor.training
    extractor.train()
    with torch.no_grad():
        extractor(torch.ones(1, 3, imagesize, imagesize, device=device))
    extractor.train(was_training)


# ----------------------------------------------------------------------------------------------
# P and D (module and parameter names follow the releases, so their state dicts load unchanged)
# ----------------------------------------------------------------------------------------------


def _xavier_linears(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.xavier_normal_(module.weight)


class Projection(torch.nn.Module):
    """P_theta: ``n_layers`` Linear(D, D) layers with bias, no activation; xavier-normal weights. [N, D] -> [N, D]."""

    def __init__(self, dim: int, n_layers: int = 1):
        super().__init__()
        self.layers = torch.nn.Sequential()
        for i in range(n_layers):
            self.layers.add_module(f"{i}fc", torch.nn.Linear(dim, dim))
        self.apply(_xavier_linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Discriminator(torch.nn.Module):
    """D_psi: one [Linear -> BatchNorm1d -> LeakyReLU(0.2)] block per hidden width, then Linear(last, 1, no bias).

    ``logits`` is the pre-sigmoid score (run it under autocast); ``forward`` applies the sigmoid in float32.
    [N, in_dim] -> [N, 1]
    """

    def __init__(self, in_dim: int, hidden: Iterable[int]):
        super().__init__()
        self.body = torch.nn.Sequential()
        width = in_dim
        for i, out in enumerate(hidden):
            block = torch.nn.Sequential(torch.nn.Linear(width, out), torch.nn.BatchNorm1d(out),
                                        torch.nn.LeakyReLU(LEAKY_RELU_SLOPE))
            self.body.add_module(f"block{i + 1}", block)
            width = out
        self.tail = torch.nn.Sequential(torch.nn.Linear(width, 1, bias=False))
        self.apply(_xavier_linears)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x).float())


def finite_bce(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of scores in [0, 1] (PBAS Eq. 8-9, CRAS Eq. 9), NaN when any score is not finite.

    ``F.binary_cross_entropy`` requires 0 <= p <= 1: a NaN score raises on the CPU and is a device-side assert on
    CUDA, which breaks the process's CUDA context for every later job. Here a NaN score is replaced by 0.5 for the
    kernel and the loss becomes NaN, so the epoch's statistics stop the job as ``Diverged`` with no host
    synchronisation per step. With finite scores, value and gradient are those of ``F.binary_cross_entropy``.
    scores, target [N, 1] -> [] float32
    """
    finite = torch.isfinite(scores)  # [N, 1]
    loss = F.binary_cross_entropy(torch.where(finite, scores, torch.full_like(scores, 0.5)), target)
    return torch.where(finite.all(), loss, torch.full_like(loss, math.nan))


def cosine_argmax(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar bank row, per batch element, in float32.

    x [..., N, D], bank [..., M, D] -> [..., N] int64
    """
    sim = F.normalize(x.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).transpose(-1, -2)  # [..., N, M]
    return sim.argmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# the method interface
# ----------------------------------------------------------------------------------------------


StepStats = dict[str, torch.Tensor]


class Method(torch.nn.Module):
    """What the engine needs from a method: centers, the loss of one batch, patch scores, its state.

    A method owns P (``projector``), D (``discriminator``) and its center buffer ``center``. Everything
    else (features, batches, optimisation loop, evaluation, selection, checkpoints) is the engine's.
    Subclasses set ``name`` (stored in checkpoints), ``Config``, ``class_resize_rule`` (whether the
    MVTec toothbrush/wood resize rule of the PBAS release applies) and implement the four methods below.
    ``center`` is [H*W, D] (one bank) or [C, H*W, D] (one per class); it is saved with every checkpoint.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    class_resize_rule: ClassVar[bool] = False
    needs_center_to_score: ClassVar[bool] = False  # released weights without center.pth can still be scored
    projector: torch.nn.Module
    discriminator: Discriminator
    center: torch.Tensor

    def __init__(self, config: MethodConfig, num_classes: int, precision: str = "fp32"):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.precision = precision

    # -- to implement ---------------------------------------------------------------------------
    def initialize(self, class_batches: Callable[[int], Iterable[torch.Tensor]], positions: int) -> None:
        """Set ``center`` from the untrained projector; ``class_batches(c)`` yields class c's training
        features [b*positions, D], batch by batch, in the initialisation pass's shuffled order."""
        raise NotImplementedError

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        """Fresh optimizers of P and D (the engine adds the backbone's when it is trained)."""
        raise NotImplementedError

    def loss(self, feats: torch.Tensor, labels: torch.Tensor, positions: int,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, StepStats]:
        """Training loss of one batch (train mode): features [B*positions, D], class index per image [B].

        Returns the loss and 0-dim statistics (no synchronisation); ``noise`` overrides a method's own draw.
        """
        raise NotImplementedError

    def patch_scores(self, feats: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode patch scores [B, H, W] of features [B*H*W, D], and the class index used per image [B]."""
        raise NotImplementedError

    def seed_streams(self, seed: int, device: torch.device) -> None:
        """Seed the method's own random streams (called once before training; none by default)."""

    def epoch_draws(self, batch_lengths: Sequence[int], positions: int, device: torch.device
                    ) -> contextlib.AbstractContextManager:
        """Context around one training epoch whose steps have these batch lengths (images), in order: a method
        that draws random numbers every step may draw them ahead from it (none by default)."""
        return contextlib.nullcontext()

    def stream_state(self) -> dict:
        """The state of the method's own random streams (for an exact resume)."""
        return {}

    def set_stream_state(self, state: dict) -> None:
        """Restore ``stream_state()``."""

    # -- shared ---------------------------------------------------------------------------------
    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """P(e) with the configured precision, returned in float32: [N, D] -> [N, D]."""
        with autocast(self.precision, feats.device.type):
            return self.projector(feats).float()

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """D(x): Linear layers in the configured precision, sigmoid in float32. [N, in] -> [N, 1]."""
        with autocast(self.precision, x.device.type):
            logits = self.discriminator.logits(x)
        return torch.sigmoid(logits.float())

    @torch.no_grad()
    def score(self, feats: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image scores (max over patches) [B], anomaly maps (upsampled, smoothed) [B, S, S], class per image [B]."""
        self.eval()
        s, classes = self.patch_scores(feats, grid)
        return s.flatten(1).max(dim=1).values, anomaly_maps(s, self.config.imagesize, SMOOTHING_SIGMA), classes

    def trained_state(self) -> dict:
        """CPU copies of the trainable state: projector and discriminator (BatchNorm buffers included)."""
        state = {"projector": self.projector.state_dict(), "discriminator": self.discriminator.state_dict()}
        return {k: {n: t.detach().cpu().clone() for n, t in v.items()} for k, v in state.items()}

    def load_trained_state(self, state: dict) -> None:
        self.projector.load_state_dict(state["projector"])
        self.discriminator.load_state_dict(state["discriminator"])
