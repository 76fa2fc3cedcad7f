"""PBAS, the method (spec sections 3-6): center initialisation, one training step, scoring.

Reading order:
    PBASConfig                     its hyper-parameters, released defaults (defined in methods.py, torch-free)
    nearest_center, update_center  the 1-NN search and the EMA update of ABL (section 4, Algorithm 1)
    center_direction               the unit direction of AFS (Eq. 7), defined as zero on the center
    PBAS                           P_theta + D_psi + the center c: initialize (section 4), loss (section 5),
                                   patch_scores (section 6)

Everything else (features, batches, the fit loop, evaluation, checkpoints) is the engine's
(``engine.py``); nothing here touches the file system.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from common import Discriminator, Method, Projection, StepStats, cosine_argmax, finite_bce
from methods import CENTER_METRICS, PBASConfig

CENTER_EMA_BETA = 0.1  # beta of the center EMA (paper section III-C, released value)
PROJECTOR_WEIGHT_DECAY = 1e-5  # the paper's gamma (Adam on P_theta)
DISCRIMINATOR_WEIGHT_DECAY = 1e-2  # the paper's delta (AdamW default in the release)


# ----------------------------------------------------------------------------------------------
# Center initialization (spec section 4, paper Algorithm 1)
# ----------------------------------------------------------------------------------------------


def nearest_center(u: torch.Tensor, center: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Index of each row's nearest center row: largest cosine similarity (release) or smallest L2 (paper).

    u [N, D], center [M, D] -> [N] int64, computed in float32
    """
    if metric == "cosine":
        return cosine_argmax(u, center)
    if metric == "euclidean":
        return torch.cdist(u.float(), center.float()).argmin(dim=1)
    raise ValueError(f"unknown center metric '{metric}'; valid: {', '.join(CENTER_METRICS)}")


def update_center(center: torch.Tensor, a: torch.Tensor, idx: torch.Tensor, beta: float = CENTER_EMA_BETA) -> torch.Tensor:
    """Apply, for j = 0, 1, ... in order, ``c[idx[j]] = (1 - beta) c[idx[j]] + beta a[j]``, vectorised.

    A row hit m times ends as (1-beta)^m c + sum_t beta (1-beta)^(m-t) a_(j_t) (t = 1..m in increasing j).
    The sum over a row's hits is a matrix product with a one-hot weight matrix (no atomics, so the
    result is the same run to run on every device).
    center [M, D], a [N, D], idx [N] -> [M, D]
    """
    order = torch.argsort(idx, stable=True)  # hits grouped by target row, increasing j inside a group
    target = idx[order]
    counts = torch.bincount(idx, minlength=len(center))  # [M]
    first = torch.cumsum(counts, 0) - counts  # position of each group's first hit in ``order``
    rank = torch.arange(len(idx), device=idx.device) - first[target]  # 0-based hit number within its group
    remaining = (counts[target] - 1 - rank).to(center.dtype)  # later hits that will shrink this contribution
    weights = beta * (1 - beta) ** remaining  # [N]
    scatter = torch.zeros(len(center), len(idx), dtype=center.dtype, device=center.device)  # [M, N]
    scatter[target, torch.arange(len(idx), device=idx.device)] = weights
    out = center * ((1 - beta) ** counts.to(center.dtype)).unsqueeze(1)
    return out + scatter @ a[order]


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


def center_direction(offset: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """(u - c) / ||u - c|| of Eq. 7, and the zero vector for a patch exactly on its center (0/0 in the paper).

    Such a patch gets no synthetic offset (z = u): it happens on the first step of a one-image training set,
    whose centers are that image's own projected features. Every other row is the plain quotient.
    offset [N, D], dist [N, 1] -> [N, D]
    """
    return torch.where(dist > 0, offset / dist, torch.zeros_like(offset))


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


class PBAS(Method):
    """P_theta + D_psi + the center c [H*W, D] (one class per model)."""

    name = "pbas"
    Config = PBASConfig
    class_resize_rule = True  # the release resizes MVTec toothbrush and wood to imagesize * 8 / 7

    def __init__(self, config: PBASConfig, num_classes: int = 1, precision: str = "fp32"):
        if num_classes != 1:
            raise ValueError(f"PBAS trains one model per class, got {num_classes} classes")
        super().__init__(config, num_classes, precision)
        dim = config.target_embed_dimension
        self.projector = Projection(dim, config.pre_proj) if config.pre_proj > 0 else torch.nn.Identity()
        self.discriminator = Discriminator(dim, [config.dsc_hidden] * (config.dsc_layers - 1))
        self.register_buffer("center", torch.zeros(0, dim))

    def initialize(self, class_batches: Callable[[int], Iterable[torch.Tensor]], positions: int) -> None:
        """Algorithm 1: the batch means a_i of P(E(x)) [H*W, D] of one shuffled pass, merged by the EMA rule."""
        with torch.no_grad():
            means = (self.project(f).reshape(-1, positions, f.shape[-1]).mean(0) for f in class_batches(0))
            self.center = initialize_center(means, self.config.center_metric)

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        cfg = self.config
        opts: list[torch.optim.Optimizer] = []
        if cfg.pre_proj > 0:
            opts.append(torch.optim.Adam(self.projector.parameters(), cfg.lr, weight_decay=PROJECTOR_WEIGHT_DECAY))
        dsc_opt = torch.optim.AdamW if cfg.dsc_optimizer == "adamw" else torch.optim.Adam
        opts.append(dsc_opt(self.discriminator.parameters(), lr=2 * cfg.lr, weight_decay=DISCRIMINATOR_WEIGHT_DECAY))
        return opts

    def synthesize(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ABL distance and AFS anomalies (Eqs. 6-7), float32. u [N, D] -> (L_c, z [N, D], nearest index [N])."""
        idx = nearest_center(u.detach(), self.center, self.config.center_metric)
        offset = u - self.center[idx]  # [N, D]
        dist = offset.norm(dim=1, keepdim=True)  # [N, 1]
        radius = dist.mean()  # L_c
        z = u + (center_direction(offset, dist) * radius * self.config.k).detach()
        return radius, z, idx

    def loss(self, feats: torch.Tensor, labels: torch.Tensor, positions: int,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, StepStats]:
        """L_c + L_n + L_a of one batch (spec section 5). PBAS draws no noise; ``noise`` must be None.

        Statistics: svdd_loss (L_c, Eq. 6), true_loss (L_n, Eq. 8), fake_loss (L_a, Eq. 9), p_true / p_fake
        (share of normal rows scored below ``dsc_margin`` / synthetic rows at or above it).
        """
        if noise is not None:
            raise ValueError("PBAS's synthesis is deterministic; it takes no noise")
        u = self.project(feats)  # [N, D] float32
        svdd_loss, z, _ = self.synthesize(u)
        scores = self.discriminate(torch.cat([u, z]))  # [2N, 1]: normal rows, then synthetic
        true_scores, fake_scores = scores[: len(u)], scores[len(u):]
        true_loss = finite_bce(true_scores, torch.zeros_like(true_scores))
        fake_loss = finite_bce(fake_scores, torch.ones_like(fake_scores))
        loss = svdd_loss + true_loss + fake_loss
        margin = self.config.dsc_margin
        return loss, {
            "loss": loss.detach(), "svdd_loss": svdd_loss.detach(), "true_loss": true_loss.detach(),
            "fake_loss": fake_loss.detach(), "p_true": (true_scores < margin).float().mean(),
            "p_fake": (fake_scores >= margin).float().mean(),
        }

    @torch.no_grad()
    def patch_scores(self, feats: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """D(P(E(x))) in eval mode, no center (spec section 6): [B*H*W, D] -> ([B, H, W], class 0 per image)."""
        s = self.discriminate(self.project(feats)).reshape(-1, *grid)
        return s, torch.zeros(s.shape[:1], dtype=torch.long, device=s.device)  # shape, not len(): keeps ONNX batch dynamic
