"""Feature extraction and patch aggregation: the frozen extractor E_phi (paper Eq. 4, spec section 2).

Data flow for one batch of images:
    images [B, 3, S, S]
      -> FeatureExtractor: one map per requested layer, e.g. layer2 [B, 512, S/8, S/8], layer3 [B, 1024, S/16, S/16]
      -> PatchEmbedder: 3x3 neighbourhood of every location, pooled per layer to ``pretrain_dim``,
         aligned to the first layer's grid, stacked and pooled again to ``target_dim``
      -> [B*H*W, target_dim] patch features, row-major over the first layer's grid.

Nothing in this module does I/O.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from backbones import Stages

SMOOTHING_SIGMA = 4.0  # Gaussian smoothing of the anomaly maps (Eq. 12)
SMOOTHING_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter default


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

    [B, C, H, W] -> [B, C*p*p, H, W]
    """
    b, c, h, w = features.shape
    padding = (patchsize - 1) // 2
    unfolded = F.unfold(features, kernel_size=patchsize, padding=padding, stride=1)  # [B, C*p*p, H*W]
    return unfolded.reshape(b, c * patchsize * patchsize, h, w)


def pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D adaptive average pooling over the channel axis of a map: [B, K, H, W] -> [B, dim, H, W]."""
    b, k, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, 1, k)  # [B*H*W, 1, K]
    pooled = F.adaptive_avg_pool1d(rows, dim)  # [B*H*W, 1, dim]
    return pooled.reshape(b, h, w, dim).permute(0, 3, 1, 2)


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
            x = pool_channels(patch_vectors(fmap, self.patchsize), self.pretrain_dim)  # [B, pretrain_dim, h, w]
            if tuple(x.shape[-2:]) != grid:
                x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)  # [B, pretrain_dim, H, W]
            per_layer.append(x.permute(0, 2, 3, 1).reshape(-1, self.pretrain_dim))  # [B*H*W, pretrain_dim]
        stacked = torch.stack(per_layer, dim=1)  # [B*H*W, L, pretrain_dim]
        rows = stacked.shape[0]  # not len(): that would freeze the batch size in an exported (ONNX) graph
        merged = F.adaptive_avg_pool1d(stacked.reshape(rows, 1, -1), self.target_dim)  # [B*H*W, 1, target_dim]
        return merged.reshape(rows, self.target_dim), grid


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
