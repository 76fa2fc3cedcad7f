"""PANDA on a frozen LDM (PANDA_SPEC.md sections 3-4): the per-name textual-inversion vectors and the two MGA
adapters are trained; the UNet, the VAE and LDMBert are frozen (eval, no gradients). ``loss`` is the training
objective, ``sample`` the graded dual-branch 1000-step sampler decoded by the VAE."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from panda.diffusion import Adapters, latent_mask, sample_latents, training_loss
from panda.embedding import MAX_LENGTH, PLACEHOLDER, PROMPT, TextualInversion, splice
from panda.ldm import LDM
from panda.mga import MGA
from panda.noise import NoiseSource
from panda.schedule import LATENT_SCALE, NUM_TIMESTEPS, Schedule
from utils import UserError

PRECISIONS = ("fp32", "bf16")
EMBEDDING_PREFIX = "embedding."  # trainable_state keys: embedding.<name>, fine_image.conv.*, fine_mask.conv.*
ADAPTERS = ("fine_image", "fine_mask")


def word_token(tokenizer, word: str) -> int:
    """The id of ``word`` when the tokenizer makes exactly one known token of it ([CLS] word [SEP]), else a
    one-line UserError (the release asserts the same)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise UserError(f"init word '{word}' is not one token of the LDM's tokenizer ({len(ids)} tokens); "
                        "pick a single common English word")
    return ids[0]


class Panda(nn.Module):
    """Panda(ldm, names, init_word): one set of 4 vectors per name ('class+defect'), initialised from the
    embedding of ``init_word`` (one word for all, or a dict name -> word); ``fine_image`` and ``fine_mask``
    adapters. precision 'bf16' runs the frozen UNet/VAE/BERT under bf16 autocast; adapters and loss stay fp32."""

    def __init__(self, ldm: LDM, names: list[str], init_word: str | dict[str, str], precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.unet, self.vae, self.bert, self.tokenizer = ldm.unet, ldm.vae, ldm.bert, ldm.tokenizer
        for frozen in self.frozen_modules():
            frozen.eval().requires_grad_(False)
        words = init_word if isinstance(init_word, dict) else {name: init_word for name in names}
        missing = sorted(set(names) - set(words))
        if missing:
            raise UserError(f"no init word for {missing}")
        table = self.bert.get_input_embeddings().weight
        self.embeddings = TextualInversion(
            names, {name: table[word_token(self.tokenizer, words[name])] for name in names})
        self.fine_image = MGA(self.unet.config.out_channels)
        self.fine_mask = MGA(self.unet.config.out_channels)
        self.schedule = Schedule()
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        prompt = self.tokenizer(PROMPT, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                return_tensors="pt").input_ids
        self.register_buffer("prompt_tokens", prompt, persistent=False)  # [1, 77] "[CLS] anomaly * [SEP] [PAD]..."
        self.to(table.device)

    # ------------------------------------------------------------------ parameters and state
    def frozen_modules(self) -> tuple[nn.Module, ...]:
        return self.unet, self.vae, self.bert

    def train(self, mode: bool = True) -> Panda:
        """Train/eval the adapters (BatchNorm statistics); the frozen LDM parts stay in eval mode."""
        super().train(mode)
        for frozen in self.frozen_modules():
            frozen.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The textual-inversion vectors, then fine_image and fine_mask parameters (the optimiser's tensors)."""
        return [*self.embeddings.params, *self.fine_image.parameters(), *self.fine_mask.parameters()]

    def trainable_state(self) -> dict[str, Tensor]:
        """Tensors only: ``embedding.<name>`` [4, H] and both adapters' state (BatchNorm buffers included)."""
        state = {EMBEDDING_PREFIX + name: p.detach().clone()
                 for name, p in zip(self.embeddings.names, self.embeddings.params)}
        for adapter in ADAPTERS:
            state.update({f"{adapter}.{k}": v.detach().clone() for k, v in getattr(self, adapter).state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Load what ``trainable_state`` wrote; other names, keys or shapes raise UserError (one line)."""
        expected = self.trainable_state()
        if set(state) != set(expected):
            extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
            raise UserError(f"trainable state does not match this model: unexpected {extra[:4]}, missing {missing[:4]}")
        for key, value in state.items():
            if not isinstance(value, Tensor) or value.shape != expected[key].shape:
                raise UserError(f"trainable state: {key} has shape {getattr(value, 'shape', None)}, "
                                f"expected {tuple(expected[key].shape)}")
        with torch.no_grad():
            for name, param in zip(self.embeddings.names, self.embeddings.params):
                param.copy_(state[EMBEDDING_PREFIX + name])
        for adapter in ADAPTERS:
            prefix = adapter + "."
            getattr(self, adapter).load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                                    if k.startswith(prefix)})

    # ------------------------------------------------------------------ frozen parts
    def _frozen(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast around a frozen part when precision is bf16; nothing otherwise."""
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def eps(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """The UNet call adapter: eps = UNet(x [B,C,h,w], t [B], context [B,77,H]) in float32."""
        with self._frozen(x.device):
            return self.unet(x, t, encoder_hidden_states=context).sample.float()

    def encode(self, images: Tensor, noise: NoiseSource) -> Tensor:
        """z = 0.18215 * (mean + std * xi): a VAE posterior sample with xi from ``noise``. images [B,3,S,S] in
        [-1, 1] -> [B, 4, S/8, S/8]."""
        with torch.no_grad(), self._frozen(images.device):
            posterior = self.vae.encode(images).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        return LATENT_SCALE * (mean + std * noise.randn(tuple(mean.shape), mean.device))

    def decode(self, latents: Tensor) -> Tensor:
        """images = VAE.decode(z / 0.18215), clamped to [-1, 1]. [B, 4, h, w] -> [B, 3, 8h, 8w]."""
        with torch.no_grad(), self._frozen(latents.device):
            images = self.vae.decode(latents / LATENT_SCALE).sample
        return images.float().clamp(-1.0, 1.0)

    def conditioning(self, names: list[str]) -> Tensor:
        """LDMBert("Anomaly *") with the '*' replaced by each name's 4 vectors: [B, 77, H]."""
        tokens = self.prompt_tokens.expand(len(names), -1)
        embedded = self.bert.get_input_embeddings()(tokens)
        _, spliced, _ = splice(tokens, embedded, self.embeddings.vectors(names), self.placeholder_id)
        with self._frozen(spliced.device):
            return self.bert(inputs_embeds=spliced, return_dict=True).last_hidden_state.float()

    # ------------------------------------------------------------------ training and sampling
    def adapters(self) -> Adapters:
        return Adapters(fine_image=self.fine_image, fine_mask=self.fine_mask)

    def loss(self, images: Tensor, masks: Tensor, names: list[str], noise: NoiseSource
             ) -> tuple[Tensor, dict[str, float]]:
        """The training loss of one batch (spec section 3). images [B,3,S,S] in [-1,1], masks [B,1,S,S] {0,1}.
        Draws, in order: VAE posterior sample, t ~ U{0..T-1} [B], eps, eps'."""
        z0 = self.encode(images, noise)
        m = latent_mask(masks, tuple(z0.shape[-2:]))
        t = noise.randint(self.schedule.num_timesteps, (z0.shape[0],), z0.device)
        loss, terms = training_loss(self.eps, self.adapters(), self.schedule, z0, m, self.conditioning(names), t,
                                    noise)
        return loss, {key: float(terms[key]) for key in ("loss", "loss_simple", "loss_mask")}

    @torch.no_grad()
    def sample(self, clean: Tensor, masks: Tensor, names: list[str], noise: NoiseSource,
               progress: Callable[[int], None] | None = None, steps: int = NUM_TIMESTEPS) -> Tensor:
        """Synthesise anomalies of ``names`` in ``masks`` on the normal images ``clean`` (spec section 4):
        clean [B,3,S,S] in [-1,1], masks [B,1,S,S] {0,1} -> images [B,3,S,S] in [-1,1]. Draws: VAE posterior
        sample, x_T, then 3 per step. ``progress(done)`` is called after each step. ``steps`` < 1000 samples a
        respaced chain (faster, not the release's sampler; schedule.respaced_betas)."""
        z_clean = self.encode(clean, noise)
        m = latent_mask(masks, tuple(z_clean.shape[-2:]))
        schedule = self.schedule if steps == self.schedule.num_timesteps else Schedule(steps=steps).to(z_clean.device)
        done = iter(range(1, len(schedule.timesteps) + 1))

        def on_step(i: int, x: Tensor, mask_image: Tensor) -> None:
            if progress is not None:
                progress(next(done))

        latents = sample_latents(self.eps, self.adapters(), schedule, z_clean, m, self.conditioning(names), noise,
                                 on_step)
        return self.decode(latents)
