"""PANDA's training loss and its graded dual-branch ancestral sampler on latents (PANDA_SPEC.md sections 3-4),
independent of the networks: the eps-network is any callable ``eps_model(x [B,C,h,w], t [B], context) -> eps``
(the UNet adapter in model.py; a stub in the golden tests), the two MGA adapters are modules, every random draw
comes from a NoiseSource."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panda.noise import NoiseSource
from panda.schedule import Schedule, ema_mask

EpsModel = Callable[[Tensor, Tensor, Tensor], Tensor]
StepHook = Callable[[int, Tensor, Tensor], None]  # (step i, x after step i, mask_image after step i)

SIMPLE_WEIGHT = 4.0  # l_simple_weight: L = 4 * masked L1 + anomaly-only L1
MASK_THRESHOLD = 0.5
ANOMALY_ONLY_WINDOWS = ((700, 800), (300, 400))  # inclusive step ranges of the anomaly-only branch


@dataclass
class Adapters:
    """The two MGA adapters: fine_image on the anomaly-aware branch, fine_mask on the anomaly-only branch."""
    fine_image: nn.Module
    fine_mask: nn.Module


VAE_FACTOR = 8  # the f8 autoencoder: S x S images have S/8 x S/8 latents (and latent masks)


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Binary latent mask: bilinear resize without antialias (torchvision 0.13 ``Resize`` on tensors, as the
    release ran), then >= 0.5 -> 1. mask [B, 1, S, S] -> [B, 1, h, w] float {0, 1}."""
    resized = F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=False, antialias=False)
    return (resized >= MASK_THRESHOLD).float()


def anomaly_only_step(i: int) -> bool:
    """True on the steps of the anomaly-only branch: 800 >= i >= 700 or 400 >= i >= 300."""
    return any(low <= i <= high for low, high in ANOMALY_ONLY_WINDOWS)


def training_loss(eps_model: EpsModel, adapters: Adapters, schedule: Schedule, z0: Tensor, m: Tensor,
                  context: Tensor, t: Tensor, noise: NoiseSource) -> tuple[Tensor, dict[str, Tensor]]:
    """``STAGE.p_losses`` (spec section 3, draws eps then eps'):
        m_t = a(t)(1 - m) + m,  x_t = q(z0, t, eps),  x'_t = q(z0 * m, t, eps'),
        eps_hat = MGA_img(UNet(x_t), m_t),  eps_hat' = MGA_mask(UNet(x'_t), m),
        L = 4 mean|m_t eps - m_t eps_hat| + mean|eps' - eps_hat'|.
    z0 [B, C, h, w] (scaled latents), m [B, 1, h, w] binary, context [B, L, H], t [B] int64."""
    if not schedule.full:
        raise ValueError("training uses the full T-step schedule, not a respaced one")
    eps = noise.randn(tuple(z0.shape), z0.device)
    eps_prime = noise.randn(tuple(z0.shape), z0.device)
    m_t = ema_mask(t, m, schedule.num_timesteps)
    x_t = schedule.q_sample(z0, t, eps)
    x_t_prime = schedule.q_sample(z0 * m, t, eps_prime)
    eps_hat = adapters.fine_image(eps_model(x_t, t, context).float(), m_t)
    eps_hat_prime = adapters.fine_mask(eps_model(x_t_prime, t, context).float(), m)
    loss_simple = (eps * m_t - eps_hat * m_t).abs().mean((1, 2, 3)).mean()  # per-sample mean, then batch mean
    loss_mask = (eps_prime - eps_hat_prime).abs().mean((1, 2, 3)).mean()
    loss = SIMPLE_WEIGHT * loss_simple + loss_mask
    return loss, {"loss_simple": loss_simple.detach(), "loss_mask": loss_mask.detach(), "loss": loss.detach(),
                  "eps_hat": eps_hat.detach(), "eps_hat_prime": eps_hat_prime.detach()}


def _p_sample(eps_model: EpsModel, adapter: nn.Module, schedule: Schedule, x: Tensor, k: Tensor, context: Tensor,
              guide: Tensor, clean: Tensor, noise: NoiseSource) -> Tensor:
    """One ancestral step (``STAGE.p_sample``, fixed-small variance, no clipping) at table index k [B]:
    x0_hat = guide * x0_pred(x, MGA(UNet(x, t), guide)) + (1 - guide) * clean; x_{t-1} ~ q(x_{t-1} | x_t, x0_hat)
    with t = timesteps[k]. The posterior noise is drawn at k = 0 too and multiplied by 0 there (it matters for
    replaying draws)."""
    eps = adapter(eps_model(x, schedule.timesteps[k], context).float(), guide)
    x0_hat = guide * schedule.predict_start(x, k, eps) + clean * (1 - guide)
    mean, log_variance = schedule.posterior(x0_hat, x, k)
    xi = noise.randn(tuple(x.shape), x.device)
    nonzero = (k != 0).float().reshape(-1, *((1,) * (x.dim() - 1)))
    return mean + nonzero * (0.5 * log_variance).exp() * xi


@torch.no_grad()
def sample_latents(eps_model: EpsModel, adapters: Adapters, schedule: Schedule, z_clean: Tensor, m: Tensor,
                   context: Tensor, noise: NoiseSource, on_step: StepHook | None = None) -> Tensor:
    """The graded dual-branch sampler (``STAGE.p_sample_loop``, spec section 4): T ancestral steps, the noised
    real background injected every step, the anomaly-only branch in its two windows, no guidance.
    z_clean [B, C, h, w] (scaled latent of the normal image), m [B, 1, h, w] binary -> final latent [B, C, h, w].
    Draws: x_T once, then per step background [B, C, h, w], mask [B, 1, h, w], posterior [B, C, h, w].
    A respaced ``schedule`` visits only its ``timesteps`` (branch windows and EMA at those original steps)."""
    b = z_clean.shape[0]
    x = noise.randn(tuple(z_clean.shape), z_clean.device)
    mask_image = x
    guide = torch.ones_like(m)  # M: the soft mask of the anomaly-aware branch, one step late (all ones at T - 1)
    timesteps = schedule.timesteps.tolist()  # once: no device sync per step
    for index in reversed(range(len(timesteps))):
        i = timesteps[index]  # the original timestep; the tables are read at `index`
        k = torch.full((b,), index, device=z_clean.device, dtype=torch.long)
        s = (k - 1).clamp(min=0)  # where the chain is after this step
        background = schedule.q_sample(z_clean, s, noise.randn(tuple(z_clean.shape), z_clean.device))
        mask_noised = schedule.q_sample(m, s, noise.randn(tuple(m.shape), m.device))  # 1 channel, broadcast
        if anomaly_only_step(i):
            mask_image = _p_sample(eps_model, adapters.fine_mask, schedule, mask_image, k, context, m, m, noise)
            x = m * mask_image + background * (1 - m)
            mask_image = m * mask_image + mask_noised * (1 - m)
        else:
            x_prev = _p_sample(eps_model, adapters.fine_image, schedule, x, k, context, guide, z_clean, noise)
            mask_image = m * x_prev + mask_noised * (1 - m)
            x = guide * x_prev + background * (1 - guide)
        guide = ema_mask(i, m, schedule.num_timesteps)
        if on_step is not None:
            on_step(i, x, mask_image)
    return x
