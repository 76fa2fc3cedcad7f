"""PANDA (= STAGE): diffusion anomaly synthesis on a frozen latent diffusion model (../shared/PANDA_SPEC.md)."""
from panda.diffusion import (ANOMALY_ONLY_WINDOWS, Adapters, anomaly_only_step, latent_mask, sample_latents,
                             training_loss)
from panda.embedding import MAX_LENGTH, PLACEHOLDER, PROMPT, VECTORS_PER_TOKEN, TextualInversion, splice
from panda.mga import MGA
from panda.noise import GeneratorNoise, NoiseSource, RecordedNoise
from panda.schedule import LATENT_SCALE, NUM_TIMESTEPS, Schedule, ema_alpha, ema_mask

__all__ = [
    "ANOMALY_ONLY_WINDOWS", "Adapters", "GeneratorNoise", "LATENT_SCALE", "MAX_LENGTH", "MGA", "NUM_TIMESTEPS",
    "NoiseSource", "PLACEHOLDER", "PROMPT", "RecordedNoise", "Schedule", "TextualInversion", "VECTORS_PER_TOKEN",
    "anomaly_only_step", "ema_alpha", "ema_mask", "latent_mask", "sample_latents", "splice", "training_loss",
]
