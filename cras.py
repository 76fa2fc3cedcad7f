"""CRAS, the method (CRAS_SPEC section 2): per-class center banks, residual synthesis, class-aware scoring.

Reading order:
    CRASConfig        its hyper-parameters, released defaults (defined in methods.py, torch-free)
    class_centers     the center bank of one class: mean of batch means of P(E(x)) (section 2.4)
    residual_scale    the per-patch noise scale alpha of the distance-guided synthesis (section 2.5, step 4)
    NoiseStream       an epoch's noise, the release's draws from the global CPU generator, drawn one step ahead
    CRAS              P + D + the banks [C, H*W, D]: initialize (2.4), loss (2.5-2.7), patch_scores (2.8)

Everything else (features, batches, the fit loop, evaluation, checkpoints) is the engine's
(``engine.py``); nothing here touches the file system.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import torch

from common import Discriminator, Method, Projection, StepStats, cosine_argmax, finite_bce
from methods import CRASConfig

DISCRIMINATOR_WEIGHT_DECAY = 1e-5  # Adam on D (cras.py: load); P uses AdamW's default 0.01
P_MARGIN = 0.5  # the release's p_true / p_fake logging threshold


def discriminator_widths(dim: int, dsc_layers: int) -> list[int]:
    """Hidden widths of CRAS's D on [x, x - c]: halving from 2*dim, dsc_layers - 1 blocks (3072 -> 1536 -> 768)."""
    return [2 * dim // 2 ** (i + 1) for i in range(dsc_layers - 1)]


def class_centers(projected_batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """The bank of one class: the mean over batches of each batch's mean over images (spec 2.4).

    projected_batches: P(E(x)) per batch [b, H*W, D] -> [H*W, D] (the last, smaller batch weighs as much as the others)
    """
    total, count = None, 0
    for batch in projected_batches:
        m = batch.float().mean(0)  # [H*W, D]
        total = m if total is None else total + m
        count += 1
    if total is None:
        raise ValueError("center initialization needs at least one training batch per class")
    return total / count


def residual_scale(dist: torch.Tensor, noise_norm: torch.Tensor, k: float) -> torch.Tensor:
    """alpha_j = (s_j - 1) k + 1 with s_j = r_j / mean(r), r_j = ||eps_j|| / d_j (spec 2.5 step 4). [N] -> [N].

    A patch exactly on its center (d_j = 0, r_j infinite: spec 4.8) gets alpha_j = 1, the unscaled noise, and
    the mean runs over the other patches (alpha = 1 everywhere when all are on their centers, as on the first
    step of a one-image training set). Without such a patch every value is the release's expression.
    """
    on_center = dist == 0  # [N]
    r = noise_norm / dist  # [N], inf on a center
    off_center_mean = torch.where(on_center, 0.0, r).sum() / (~on_center).sum()  # NaN when every patch is on one
    mean = torch.where(on_center.any(), off_center_mean, r.mean())  # no host synchronisation
    return torch.where(on_center, 1.0, (r / mean - 1) * k + 1)


def batch_vote(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The most frequent class of a batch; a tie goes to the smallest class index. [B] int64 -> [] int64.

    The release's ``torch.mode`` picks the smallest tied value on the CPU but not by contract on CUDA; counting
    against every class index and taking the first maximum (``argmax``'s documented rule) gives the CPU answer
    on every device, without a host synchronisation.
    """
    counts = (classes.unsqueeze(1) == torch.arange(num_classes, device=classes.device)).sum(0)  # [C]
    return counts.argmax()


class NoiseStream:
    """The noise of one epoch's steps, eps_k ~ N(0, std^2) of ``shapes[k]``, exactly as the release draws it: one
    ``torch.normal`` per step from the global CPU generator (RNG_REPLAY_SPEC 6).

    The draws run one step ahead in a background thread, from a private generator that starts from the global
    generator's state; when step k's noise is taken, the global generator is set to the state after draw k, so
    it always reads as if the release's draws had been made in place (a saved training state resumes exactly).
    For a CUDA ``device`` the draws go into two reused pinned buffers and are copied without blocking (an event
    guards each buffer's reuse), so the next step's draw overlaps the current step.
    """

    AHEAD = 1  # draws in flight beyond the one being used

    def __init__(self, shapes: Sequence[tuple[int, int]], std: float, device: torch.device):
        self.shapes, self.std, self.device = list(shapes), std, device
        self.pinned = device.type == "cuda"
        self.generator = torch.Generator()
        self.expected = torch.get_rng_state()  # the global state before the next draw handed out
        self.generator.set_state(self.expected)
        self.buffers: list[torch.Tensor | None] = [None, None]  # pinned staging, by draw parity
        self.copied: list = [None, None]  # CUDA event: the copy out of buffer i finished
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cras-noise")
        self.pending: collections.deque = collections.deque()
        self.taken = 0
        for k in range(min(self.AHEAD + 1, len(self.shapes))):
            self.pending.append(self.pool.submit(self._draw, k))

    def _draw(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw k [rows, D] (into a pinned buffer on CUDA) and the private generator's state after it."""
        rows, dim = self.shapes[k]
        if self.pinned:
            slot = k % 2
            if self.copied[slot] is not None:
                self.copied[slot].synchronize()  # the copy out of this buffer two draws ago has finished
            if self.buffers[slot] is None or self.buffers[slot].numel() < rows * dim:
                self.buffers[slot] = torch.empty(max(s[0] * s[1] for s in self.shapes), pin_memory=True)
            out = self.buffers[slot][: rows * dim].view(rows, dim)
        else:
            out = torch.empty(rows, dim)
        out.normal_(0.0, self.std, generator=self.generator)  # the same bits as torch.normal(0, std, shape)
        return out, self.generator.get_state()

    def next(self) -> torch.Tensor:
        """The next step's noise on ``device``; the global generator then stands after this draw."""
        if not self.pending:
            raise RuntimeError(f"CRAS noise: step {self.taken + 1} of an epoch planned with {len(self.shapes)} steps")
        if not torch.equal(torch.get_rng_state(), self.expected):
            raise RuntimeError("CRAS noise: the global random generator was drawn from during the epoch; the "
                               "release's stream would be lost")
        out, after = self.pending.popleft().result()
        torch.set_rng_state(after)
        self.expected = after
        k = self.taken
        self.taken += 1
        if self.pinned:
            dev = out.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.copied[k % 2] = event
        else:
            dev = out.to(self.device)
        if k + self.AHEAD + 1 < len(self.shapes):
            self.pending.append(self.pool.submit(self._draw, k + self.AHEAD + 1))
        return dev

    def close(self) -> None:
        """Stop drawing ahead (draws not taken leave the global generator untouched)."""
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)
        self.pending.clear()


def noise_draws(shapes: Sequence[tuple[int, int]], std: float, device: torch.device) -> Iterator[torch.Tensor]:
    """Every noise tensor of ``shapes`` in order, through a NoiseStream (what a training epoch takes; for
    benchmarks of the CPU draw against the device draw)."""
    stream = NoiseStream(shapes, std, device)
    try:
        for _ in shapes:
            yield stream.next()
    finally:
        stream.close()


class CRAS(Method):
    """P + D on the residual [x, x - c] + one center bank [H*W, D] per class (``center`` [C, H*W, D])."""

    name = "cras"
    Config = CRASConfig
    class_resize_rule = False  # resize 329 + crop 288 for every class
    needs_center_to_score = True

    def __init__(self, config: CRASConfig, num_classes: int, precision: str = "fp32"):
        super().__init__(config, num_classes, precision)
        dim = config.target_embed_dimension
        self.projector = Projection(dim, config.pre_proj) if config.pre_proj > 0 else torch.nn.Identity()
        self.discriminator = Discriminator(2 * dim, discriminator_widths(dim, config.dsc_layers))
        self.register_buffer("center", torch.zeros(num_classes, 0, dim))
        self.noise_generator: torch.Generator | None = None  # noise_device 'device' only (seed_streams)
        self.noise_stream: NoiseStream | None = None  # the current training epoch's noise (noise_device 'cpu')

    # -- centers (spec 2.4) -----------------------------------------------------------------------
    def initialize(self, class_batches: Callable[[int], Iterable[torch.Tensor]], positions: int) -> None:
        """One bank per class from its own shuffled pass, with the untrained projector."""
        with torch.no_grad():
            banks = [class_centers(self.project(f).reshape(-1, positions, f.shape[-1]) for f in class_batches(c))
                     for c in range(self.num_classes)]
        self.center = torch.stack(banks)  # [C, H*W, D]

    def seed_streams(self, seed: int, device: torch.device) -> None:
        """noise_device 'device': a generator of its own on ``device``, seeded with ``seed``. The release's noise
        ('cpu') comes from the global CPU generator, which the engine seeds and saves."""
        if self.config.noise_device == "device":
            self.noise_generator = torch.Generator(device=device).manual_seed(seed)

    def stream_state(self) -> dict:
        return {} if self.noise_generator is None else {"noise": self.noise_generator.get_state()}

    def set_stream_state(self, state: dict) -> None:
        if self.noise_generator is not None:
            self.noise_generator.set_state(state["noise"])

    @contextlib.contextmanager
    def epoch_draws(self, batch_lengths: Sequence[int], positions: int, device: torch.device) -> Iterator[None]:
        """noise_device 'cpu': the epoch's noise, one [b*positions, D] tensor per step, drawn ahead (NoiseStream)."""
        if self.config.noise_device == "device" or not batch_lengths:
            yield
            return
        dim = self.config.target_embed_dimension
        self.noise_stream = NoiseStream([(b * positions, dim) for b in batch_lengths], self.config.noise, device)
        try:
            yield
        finally:
            self.noise_stream.close()
            self.noise_stream = None

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        cfg = self.config
        opts: list[torch.optim.Optimizer] = []
        if cfg.pre_proj > 0:
            opts.append(torch.optim.AdamW(self.projector.parameters(), lr=cfg.lr))
        opts.append(torch.optim.Adam(self.discriminator.parameters(), lr=2 * cfg.lr, weight_decay=DISCRIMINATOR_WEIGHT_DECAY))
        return opts

    def nearest(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The most cosine-similar center of each patch within its image's class bank (spec 2.5 step 3).

        x [B, H*W, D], classes [B] -> c [B, H*W, D]
        """
        bank = self.center[classes]  # [B, H*W, D]
        idx = cosine_argmax(x, bank)  # [B, H*W]
        return torch.gather(bank, 1, idx.unsqueeze(-1).expand(-1, -1, bank.shape[-1]))

    def draw_noise(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """eps ~ N(0, noise^2) [N, D]: the epoch's NoiseStream when one is open, else one draw from the global CPU
        generator (the release's), or from the method's generator on ``device`` with noise_device 'device'."""
        if self.noise_generator is not None:
            return torch.normal(0.0, self.config.noise, shape, generator=self.noise_generator,
                                device=self.noise_generator.device)
        if self.noise_stream is not None:
            eps = self.noise_stream.next()
            if tuple(eps.shape) != tuple(shape):
                raise RuntimeError(f"CRAS noise: drawn {tuple(eps.shape)} for a step of {tuple(shape)}")
            return eps
        return torch.normal(0.0, self.config.noise, shape).to(device)

    # -- one training step (spec 2.5-2.6) ---------------------------------------------------------
    def synthesize(self, x: torch.Tensor, c: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance-guided residual synthesis, float32: x, c, noise [N, D] -> (x_fake [N, D], alpha [N])."""
        alpha = residual_scale((x - c).norm(dim=1), noise.norm(dim=1), self.config.k)
        return x + (alpha.unsqueeze(1) * noise).detach(), alpha

    def loss(self, feats: torch.Tensor, labels: torch.Tensor, positions: int,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, StepStats]:
        """BCE(D([x, x-c]), 0) + BCE(D([x~, x~-c]), 1) with c from the ground-truth class's bank.

        feats [B*H*W, D], labels [B]; ``noise`` [B*H*W, D] replaces the method's own draw (golden tests).
        """
        x = self.project(feats)  # [N, D] float32
        b = len(labels)
        c = self.nearest(x.detach().reshape(b, positions, -1), labels).reshape_as(x)  # [N, D], constant
        if noise is None:
            noise = self.draw_noise(tuple(x.shape), x.device)
        fake, _ = self.synthesize(x, c, noise)
        scores = self.discriminate(torch.cat([torch.cat([x, x - c], 1), torch.cat([fake, fake - c], 1)]))  # [2N, 1]
        true_scores, fake_scores = scores[: len(x)], scores[len(x):]
        true_loss = finite_bce(true_scores, torch.zeros_like(true_scores))
        fake_loss = finite_bce(fake_scores, torch.ones_like(fake_scores))
        loss = true_loss + fake_loss
        return loss, {
            "loss": loss.detach(), "true_loss": true_loss.detach(), "fake_loss": fake_loss.detach(),
            "p_true": (true_scores < P_MARGIN).float().mean(), "p_fake": (fake_scores >= P_MARGIN).float().mean(),
        }

    # -- scoring (spec 2.8) -------------------------------------------------------------------------
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's most cosine-similar bank as a whole; with class_vote 'batch', the batch's majority
        (``batch_vote``: ties go to the smallest class index on every device).

        x [B, H*W, D] -> [B] int64
        """
        own = cosine_argmax(x.flatten(1), self.center.flatten(1))  # [B]
        if self.config.class_vote == "batch":
            return batch_vote(own, self.num_classes).expand_as(own)
        return own

    @torch.no_grad()
    def patch_scores(self, feats: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """D([x, x - c]) with c the nearest center in the chosen class's bank: [B*H*W, D] -> ([B, H, W], [B])."""
        positions = grid[0] * grid[1]
        x = self.project(feats)
        xb = x.reshape(-1, positions, x.shape[-1])  # [B, H*W, D]
        classes = self.classify(xb)
        c = self.nearest(xb, classes).reshape_as(x)
        s = self.discriminate(torch.cat([x, x - c], 1))
        return s.reshape(-1, *grid), classes
