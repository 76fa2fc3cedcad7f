"""PANDA on a tiny random LDM written with save_pretrained (tiny configs of the three diffusers/transformers
models and a tiny tokenizer vocabulary): the gradient scope of a training step, the loss's draw order, the
trainable state, and sampling end to end (loading the LDM folder and its faults: test_panda_ldm.py)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from panda import GeneratorNoise, RecordedNoise, latent_mask, training_loss
from panda.ldm import LDM, load_ldm, write_tiny_ldm
from panda.model import Panda
from utils import UserError

NAMES = ["texture+scratch", "texture+spot", "object+missing"]
INIT = {"texture+scratch": "scratch", "texture+spot": "spot", "object+missing": "missing"}
SIZE = 32  # images 32 px -> 4 x 4 latents


@pytest.fixture(scope="module")
def ldm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_tiny_ldm(str(tmp_path_factory.mktemp("ldm")), seed=0))


@pytest.fixture(scope="module")
def ldm(ldm_folder: Path) -> LDM:
    return load_ldm(str(ldm_folder), "cpu")


def batch(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] and binary masks (a square per image)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, SIZE, SIZE, generator=generator) * 2 - 1
    masks = torch.zeros(n, 1, SIZE, SIZE)
    masks[:, :, 8:24, 12:28] = 1
    return images, masks


def test_init_words_must_be_one_known_token(ldm: LDM):
    with pytest.raises(UserError, match="init word 'scratches' is not one token"):
        Panda(ldm, ["texture+scratch"], "scratches")
    with pytest.raises(UserError, match="no init word"):
        Panda(ldm, NAMES, {"texture+scratch": "scratch"})
    model = Panda(ldm, NAMES, INIT)
    table = ldm.bert.get_input_embeddings().weight
    spot = ldm.tokenizer.convert_tokens_to_ids("spot")
    assert torch.equal(model.embeddings.vectors(["texture+spot"])[0], table[spot].expand(4, -1))


def test_gradients_reach_only_vectors_and_adapters(ldm: LDM):
    model = Panda(ldm, NAMES, INIT).train()
    assert not any(m.training for m in model.frozen_modules()) and model.fine_image.training
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1.6e-2, weight_decay=0.01)
    frozen = {k: v.clone() for m in model.frozen_modules() for k, v in m.state_dict().items()}
    trainable = {k: v.clone() for k, v in model.trainable_state().items()}
    images, masks = batch()
    loss, terms = model.loss(images, masks, NAMES[:2], GeneratorNoise.seeded(0))
    loss.backward()
    assert terms["loss"] == pytest.approx(4 * terms["loss_simple"] + terms["loss_mask"], rel=1e-6)
    for module in model.frozen_modules():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    used, unused = model.embeddings.params[:2], model.embeddings.params[2]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used) and unused.grad is None
    for adapter in (model.fine_image, model.fine_mask):
        assert all(p.grad is not None for p in adapter.parameters())
        assert adapter.conv[-1].weight.grad.abs().sum() > 0
    optimizer.step()
    after = {k: v for m in model.frozen_modules() for k, v in m.state_dict().items()}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # bit-identical
    changed = {k for k, v in model.trainable_state().items() if not torch.equal(v, trainable[k])}
    assert "embedding.texture+scratch" in changed and "embedding.object+missing" not in changed
    assert "fine_image.conv.0.weight" in changed and "fine_mask.conv.1.running_mean" in changed  # BN stats moved


def test_loss_draw_order_and_wiring(ldm: LDM):
    model = Panda(ldm, NAMES, INIT).train()
    images, masks = batch()
    generator = torch.Generator().manual_seed(3)
    posterior, eps, eps_prime = (torch.randn(2, 4, 4, 4, generator=generator) for _ in range(3))
    t = torch.tensor([150, 900])
    noise = RecordedNoise([posterior, t, eps, eps_prime])
    loss, _ = model.loss(images, masks, NAMES[1:], noise)
    assert noise.exhausted()
    # the same step by hand: z0 = 0.18215 (mean + std xi), binary latent mask, "Anomaly *" conditioning
    dist = ldm.vae.encode(images).latent_dist
    z0 = 0.18215 * (dist.mean + dist.std * posterior)
    m = latent_mask(masks, (4, 4))
    expected, _ = training_loss(model.eps, model.adapters(), model.schedule, z0, m, model.conditioning(NAMES[1:]), t,
                                RecordedNoise([eps, eps_prime]))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="recorded draw 0"):  # t drawn before the posterior sample
        model.loss(images, masks, NAMES[1:], RecordedNoise([t, posterior, eps, eps_prime]))


def test_trainable_state_round_trip(ldm: LDM):
    model = Panda(ldm, NAMES, INIT)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p))
    buffer = io.BytesIO()
    torch.save(model.trainable_state(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # tensors only
    fresh = Panda(ldm, NAMES, "a")
    fresh.load_trainable_state(state)
    assert all(torch.equal(v, state[k]) for k, v in fresh.trainable_state().items())
    with pytest.raises(UserError, match="does not match"):
        Panda(ldm, NAMES[:2], INIT).load_trainable_state(state)


def test_sample_end_to_end(ldm: LDM):
    model = Panda(ldm, NAMES, INIT).eval()
    images, masks = batch()
    calls: list[int] = []
    out = model.sample(images, masks, NAMES[:2], GeneratorNoise.seeded(1), progress=calls.append, steps=20)
    assert out.shape == images.shape and torch.isfinite(out).all() and out.abs().max() <= 1
    assert calls == list(range(1, 21))
    again = model.sample(images, masks, NAMES[:2], GeneratorNoise.seeded(1), steps=20)
    assert torch.equal(out, again)  # seeded: the same pairs
    latent, mask = torch.zeros(2, 4, 4, 4), torch.zeros(2, 1, 4, 4)
    noise = RecordedNoise([latent, latent] + [latent, mask, latent] * 20)  # posterior, x_T, then 3 per step
    model.sample(images, masks, NAMES[:2], noise, steps=20)
    assert noise.exhausted()


def test_bf16_autocasts_only_the_frozen_parts(ldm: LDM):
    """precision bf16: the UNet runs in bfloat16, the adapters, the loss and every gradient stay float32."""
    model = Panda(ldm, NAMES, INIT, precision="bf16").train()
    reference = Panda(ldm, NAMES, INIT).train()
    reference.load_trainable_state(model.trainable_state())
    dtypes: list[torch.dtype] = []
    hook = ldm.unet.conv_out.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    images, masks = batch()
    try:
        loss, _ = model.loss(images, masks, NAMES[:2], GeneratorNoise.seeded(0))
    finally:
        hook.remove()
    expected, _ = reference.loss(images, masks, NAMES[:2], GeneratorNoise.seeded(0))
    loss.backward()
    assert dtypes == [torch.bfloat16, torch.bfloat16] and loss.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.fine_image.parameters())
    assert model.embeddings.params[0].grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0.05, atol=0)  # bf16 rounding in the frozen parts only


def test_generator_noise_state_replays_draws():
    noise = GeneratorNoise.seeded(7)
    noise.randn((3,), "cpu")
    state = noise.get_state()
    first = (noise.randn((2, 2), "cpu"), noise.randint(1000, (4,), "cpu"))
    noise.set_state(state)
    assert torch.equal(noise.randn((2, 2), "cpu"), first[0]) and torch.equal(noise.randint(1000, (4,), "cpu"), first[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA tier needs a GPU")
def test_cuda_bf16_step_and_sample(ldm_folder: Path):
    """On the GPU: a bf16 training step stays close to fp32 (same draws from a CPU generator) and sampling runs."""
    cuda_ldm = load_ldm(str(ldm_folder), "cuda")
    images, masks = (x.cuda() for x in batch())
    losses = []
    for precision in ("fp32", "bf16"):
        model = Panda(cuda_ldm, NAMES, INIT, precision=precision).train()
        torch.manual_seed(0)  # the same adapter init for both
        model.load_trainable_state(Panda(cuda_ldm, NAMES, INIT).trainable_state())
        loss, _ = model.loss(images, masks, NAMES[:2], GeneratorNoise.seeded(0))
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.trainable_parameters() if p.grad is not None)
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
    out = model.eval().sample(images, masks, NAMES[:2], GeneratorNoise.seeded(1), steps=10)
    assert out.is_cuda and torch.isfinite(out).all()
