"""The frozen LDM's noise schedule and PANDA's explicit mask alignment (EMA) mask (PANDA_SPEC.md sections 3-4).

Schedule (ldm ``DDPM.register_schedule``, "linear" = diffusers "scaled_linear"):
    beta_t = linspace(sqrt(8.5e-4), sqrt(1.2e-2), T)_t^2,  alpha_bar_t = prod_{s<=t} (1 - beta_s),
every quantity computed in float64 and cast once to float32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

NUM_TIMESTEPS = 1000  # T
LINEAR_START = 0.00085
LINEAR_END = 0.012
LATENT_SCALE = 0.18215  # z = LATENT_SCALE * VAE posterior sample (the LDM's scale_factor)
EMA_SHRINK_END = 200  # a(t) = clamp((t - 200) / 800, 0, 1): the mask is binary from t = 200 down
LOG_VARIANCE_FLOOR = 1e-20  # posterior_log_variance_clipped = log(max(var, 1e-20))

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> Tensor:
    """beta_t = linspace(sqrt(start), sqrt(end), T)^2 in float64 ([T]); ldm ``make_beta_schedule('linear')``."""
    return torch.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, num_timesteps, dtype=torch.float64) ** 2


def schedule_tables(betas: Tensor) -> dict[str, Tensor]:
    """Every table of ``register_schedule`` (v_posterior 0) from float64 betas, in float64 ([T] each)."""
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, 0)
    cumprod_prev = torch.cat([cumprod.new_ones(1), cumprod[:-1]])
    variance = betas * (1.0 - cumprod_prev) / (1.0 - cumprod)  # beta~_t, DDPM eq. 7
    return {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": cumprod_prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cumprod - 1.0).sqrt(),
        "posterior_variance": variance,
        "posterior_log_variance_clipped": variance.clamp(min=LOG_VARIANCE_FLOOR).log(),
        "posterior_mean_coef1": betas * cumprod_prev.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - cumprod_prev) * alphas.sqrt() / (1.0 - cumprod),
    }


def _at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t] shaped [B, 1, 1, 1] to broadcast over ``like`` [B, C, H, W]."""
    return table.gather(0, t).reshape(t.shape[0], *((1,) * (like.dim() - 1)))


def respaced_betas(steps: int, num_timesteps: int = NUM_TIMESTEPS) -> tuple[Tensor, Tensor]:
    """Timestep respacing (Nichol & Dhariwal 2021, sec. 4): ``steps`` evenly spaced timesteps of the T-step
    chain (0 and T-1 included) and the float64 betas of the shorter chain that keeps alpha_bar at those steps,
    beta_k = 1 - alpha_bar(s_k) / alpha_bar(s_{k-1}). -> (timesteps [K] int64, betas [K] float64)."""
    if not 2 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in [2, {num_timesteps}], got {steps}")
    timesteps = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long().unique()
    cumprod = torch.cumprod(1.0 - linear_betas(num_timesteps), 0)[timesteps]
    return timesteps, 1.0 - cumprod / torch.cat([cumprod.new_ones(1), cumprod[:-1]])


class Schedule(nn.Module):
    """The float32 tables as non-persistent buffers (they move with the model, never enter a checkpoint).
    ``steps`` < T: a respaced chain for faster sampling (not the release's; its table index k stands for the
    original timestep ``timesteps[k]``). Default: all T steps, the release's tables, ``timesteps`` = 0..T-1."""

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    timesteps: Tensor

    def __init__(self, num_timesteps: int = NUM_TIMESTEPS, steps: int | None = None):
        super().__init__()
        self.num_timesteps = num_timesteps
        if steps is None or steps == num_timesteps:
            timesteps, betas = torch.arange(num_timesteps), linear_betas(num_timesteps)
        else:
            timesteps, betas = respaced_betas(steps, num_timesteps)
        self.register_buffer("timesteps", timesteps, persistent=False)
        for name, table in schedule_tables(betas).items():
            self.register_buffer(name, table.to(torch.float32), persistent=False)

    @property
    def full(self) -> bool:
        """True for the release's T-step chain (table index = timestep)."""
        return len(self.timesteps) == self.num_timesteps

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4); t [B] int64."""
        return _at(self.sqrt_alphas_cumprod, t, x0) * x0 + _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_start(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0_pred = sqrt(1/alpha_bar_t) x_t - sqrt(1/alpha_bar_t - 1) eps (inverse of eq. 4)."""
        return _at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x0) (DDPM eqs. 6-7)."""
        mean = _at(self.posterior_mean_coef1, t, x_t) * x0 + _at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _at(self.posterior_log_variance_clipped, t, x_t)


def ema_alpha(t: int | Tensor, num_timesteps: int = NUM_TIMESTEPS, shrink_end: int = EMA_SHRINK_END) -> Tensor:
    """a(t) = clamp((t - shrink_end) / (T - shrink_end), 0, 1) in float32 (``STAGE.EMA``); [B] or scalar."""
    t = torch.as_tensor(t).float()
    return ((t - shrink_end) / (num_timesteps - shrink_end)).clamp(0.0, 1.0)


def ema_mask(t: int | Tensor, m: Tensor, T: int = NUM_TIMESTEPS, shrink_end: int = EMA_SHRINK_END) -> Tensor:
    """Explicit mask alignment m_t = a(t) (1 - m) + m (spec section 3 step 4): all ones at t = T - 1, m for
    t <= shrink_end. t: int or [B]; m [B, 1, H, W] binary -> [B, 1, H, W] soft."""
    alpha = ema_alpha(t, T, shrink_end).to(m.device).reshape(-1, *((1,) * (m.dim() - 1)))
    return alpha * (1 - m) + m
