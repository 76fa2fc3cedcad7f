"""The PANDA golden vectors of ../shared/golden/panda_*.pt (copied to tests/golden), produced by running the
public STAGE code on CPU in float32 with a stub eps-network and seeded MGA adapters (PANDA_GOLDEN.md),
reproduced by the panda package with the recorded draws injected through RecordedNoise."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch
from torch import nn

from panda import (MGA, Adapters, RecordedNoise, Schedule, anomaly_only_step, ema_alpha, ema_mask, latent_mask,
                   sample_latents, splice, training_loss)
from panda.schedule import SCHEDULE_BUFFERS, linear_betas, schedule_tables

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
SAMPLE_STEPS = 1000


def golden(name: str) -> dict:
    return torch.load(os.path.join(GOLDEN, f"panda_{name}.pt"), weights_only=True)


def sha256(tensor: torch.Tensor) -> str:
    """sha256 of the raw little-endian bytes, as PANDA_GOLDEN.md hashes them."""
    return hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def seeded_mga(seed: int) -> MGA:
    """The golden recipe: torch.manual_seed(seed), then MGA(4) with PyTorch's default init."""
    torch.manual_seed(seed)
    return MGA(4)


class StubUNet(nn.Module):
    """eps = conv3x3(x) + (t / 1000) t_vec + Linear(context.mean(1)), per channel (PANDA_GOLDEN.md)."""

    def __init__(self, state: dict):
        super().__init__()
        width = state["ctx.weight"].shape[1]
        self.conv, self.ctx = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(width, 4)
        self.t_vec = nn.Parameter(torch.zeros(4))
        self.load_state_dict(state)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) + (t.float() / 1000)[:, None, None, None] * self.t_vec[None, :, None, None]
                + self.ctx(context.mean(1))[:, :, None, None])


def test_golden_schedule():
    g = golden("schedule")
    assert torch.equal(linear_betas(), g["betas_float64"])
    assert g["config"]["timesteps"] == SAMPLE_STEPS and g["clip_denoised"] is False
    schedule = Schedule()
    for name in SCHEDULE_BUFFERS:
        torch.testing.assert_close(getattr(schedule, name), g[name], atol=1e-7, rtol=0, msg=name)
    assert set(SCHEDULE_BUFFERS) == set(schedule_tables(linear_betas()))
    assert not schedule.state_dict()  # non-persistent: never in a checkpoint


def test_golden_ema_mask():
    g = golden("ema")
    m = g["mask"]
    assert torch.equal(ema_alpha(torch.arange(SAMPLE_STEPS)), g["alpha"])
    for t, expected in g["full_at"].items():
        assert torch.equal(ema_mask(int(t), m)[0], expected), t
    assert torch.equal(ema_mask(g["batch_t"], m.expand(len(g["batch_t"]), -1, -1, -1)), g["batch_out"])
    # the sampler's M is one step late: step i uses a(i + 1), all ones at i = 999
    assert torch.equal(torch.cat([ema_alpha(torch.arange(1, SAMPLE_STEPS)), torch.ones(1)]),
                       g["sampler_alpha_M_at_step"])
    branch = torch.tensor([anomaly_only_step(i) for i in range(SAMPLE_STEPS)], dtype=torch.uint8)
    assert torch.equal(branch, g["sampler_branch"])


def test_golden_mga():
    g = golden("mga")
    mga = seeded_mga(g["seed"])
    state = mga.state_dict()
    assert list(state) == g["state_dict_keys"]
    assert sum(p.numel() for p in mga.parameters()) == g["param_count"]
    for key, tensor in state.items():
        assert list(tensor.shape) == g["state_dict_shapes"][key], key
        assert sha256(tensor) == g["state_dict_sha256"][key], key
    for key, tensor in g["state_dict_small"].items():
        assert torch.equal(state[key], tensor), key
    for key, digest in g["state_dict_digest"].items():
        assert torch.equal(state[key].flatten()[digest["flat_index"]], digest["values"]), key
    with torch.no_grad():
        mga.eval()
        torch.testing.assert_close(mga(g["input_eps"], g["input_mask"]), g["out_eval_fresh"], atol=1e-5, rtol=0)
        mga.train()
        torch.testing.assert_close(mga(g["input_eps"], g["input_mask"]), g["out_train"], atol=1e-5, rtol=0)
        for key, tensor in g["bn_buffers_after_train"].items():
            torch.testing.assert_close(mga.state_dict()[key], tensor, atol=1e-6, rtol=0, msg=key)
        mga.eval()
        torch.testing.assert_close(mga(g["input_eps"], g["input_mask"]), g["out_eval_after_train"], atol=1e-5,
                                   rtol=0)


def _grad_close(grad: torch.Tensor, expected, msg: str) -> None:
    """A stored gradient: the tensor itself (<= 5000 elements) or a digest (sum, abs_sum, l2, values at indices)."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=msg)
        return
    g64 = grad.double()
    for stat, value in (("sum", g64.sum()), ("abs_sum", g64.abs().sum()), ("l2", g64.norm())):
        scale = max(abs(expected[stat]), expected["abs_sum"] * 1e-3)  # a sum of mixed signs: relative to |g|_1
        assert abs(value.item() - expected[stat]) <= 1e-4 * scale, (msg, stat, value.item(), expected[stat])
    torch.testing.assert_close(grad.flatten()[expected["flat_index"]], expected["values"], rtol=1e-4, atol=1e-6,
                               msg=msg)


@pytest.mark.parametrize("case", [0, 1])
def test_golden_loss_and_gradients(case: int):
    g = golden("loss")
    c = g["cases"][case]
    unet = StubUNet(g["stub_unet"]).requires_grad_(False)
    adapters = Adapters(fine_image=seeded_mga(g["fine_image_seed"]), fine_mask=seeded_mga(g["fine_mask_seed"]))
    # the adapters are re-seeded before each case: fine_mask (seed 1) and fine_image (seed 2) hash as recorded
    for name, module in (("fine_image", adapters.fine_image), ("fine_mask", adapters.fine_mask)):
        for key, tensor in module.state_dict().items():
            assert sha256(tensor) == g[f"{name}_sha256"][key], (name, key)
        module.train()
    m = latent_mask(g["mask_input_256"], (32, 32))
    assert torch.equal(m, c["mask_binary_32"])
    context = g["context"].clone().requires_grad_(True)
    noise = RecordedNoise([c["eps"], c["eps_prime"]])
    loss, terms = training_loss(unet, adapters, Schedule(), g["z0"], m, context, c["t"], noise)
    assert noise.exhausted()
    for key in ("loss_simple", "loss_mask", "loss"):
        torch.testing.assert_close(terms[key], c["loss_dict"][key], rtol=1e-5, atol=0, msg=key)
    torch.testing.assert_close(loss.detach(), c["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["eps_hat"], c["eps_hat"], atol=1e-5, rtol=0)
    torch.testing.assert_close(terms["eps_hat_prime"], c["eps_hat_prime"], atol=1e-5, rtol=0)
    loss.backward()
    torch.testing.assert_close(context.grad, c["grad_context"], rtol=1e-4, atol=1e-7)
    for name, module in (("fine_image", adapters.fine_image), ("fine_mask", adapters.fine_mask)):
        grads = {key: p.grad for key, p in module.named_parameters()}
        assert set(grads) == set(c[f"grad_{name}"])
        for key, expected in c[f"grad_{name}"].items():
            _grad_close(grads[key], expected, f"{name}.{key}")
        buffers = module.state_dict()
        for key, expected in c[f"{name}_bn_running_after"].items():
            torch.testing.assert_close(buffers[key], expected, atol=1e-6, rtol=1e-5, msg=f"{name}.{key}")
    assert all(p.grad is None for p in unet.parameters())


def test_golden_splice():
    g = golden("splice")
    placeholder = g["placeholder_token"]
    vectors = torch.stack([g["placeholder_vectors"][name] for name in g["batch_names"]])
    tokens, embedded, position = splice(g["tokens_before"].clone(), g["embedded_before"].clone(), vectors,
                                        placeholder)
    assert torch.equal(tokens, g["tokens_after"])
    assert torch.equal(embedded, g["embedded_after"])
    assert torch.equal(position, g["position"])
    with pytest.raises(ValueError, match="no placeholder"):  # the release: UnboundLocalError
        splice(g["tokens_before"][3:], g["embedded_before"][3:], vectors[3:], placeholder)
    # the conditioning of the loss/sampler files: "Anomaly *" = [CLS] anomaly * [SEP] [PAD]...
    table = dict(zip(g["token_emb_rows"]["ids"].tolist(), g["token_emb_rows"]["rows"]))
    prompt = torch.zeros(2, 77, dtype=torch.long)
    prompt[:, :4] = torch.tensor([101, g["initializer_token"], placeholder, 102])
    prompt_embedded = torch.stack([torch.stack([table[i] for i in row.tolist()]) for row in prompt])
    name_vectors = torch.stack([g["placeholder_vectors"][name] for name in g["conditioning_names"]])
    _, conditioned, cond_position = splice(prompt, prompt_embedded, name_vectors, placeholder)
    assert torch.equal(conditioned, g["conditioning_splice_output"])
    assert torch.equal(cond_position, g["conditioning_position"])


def _sample_noise(g: dict, hi: dict, lo: dict) -> list[torch.Tensor]:
    """The recorded draws in call order: x_T, then per step 999..0 background, mask, posterior."""
    background = torch.cat([hi["noise_background"], lo["noise_background"]])
    posterior = torch.cat([hi["noise_posterior"], lo["noise_posterior"]])
    assert hi["steps"] + lo["steps"] == list(range(SAMPLE_STEPS - 1, -1, -1))
    draws = [g["noise_x_T"]]
    for k in range(SAMPLE_STEPS):
        draws += [background[k], g["noise_mask_noise"][k], posterior[k]]
    return draws


def test_golden_sampler():
    g, hi, lo = golden("sample"), golden("sample_noise_hi"), golden("sample_noise_lo")
    unet = StubUNet(g["stub_unet"]).requires_grad_(False)
    adapters = Adapters(fine_image=seeded_mga(g["fine_image_seed"]), fine_mask=seeded_mga(g["fine_mask_seed"]))
    for name, module in (("fine_image", adapters.fine_image), ("fine_mask", adapters.fine_mask)):
        module.load_state_dict(g[f"{name}_bn_buffers"], strict=False)
        module.eval()
        for key, tensor in module.state_dict().items():
            assert sha256(tensor) == g[f"{name}_sha256"][key], (name, key)
    noise = RecordedNoise(_sample_noise(g, hi, lo))
    x_sums, mask_sums, x_at, mask_at, intermediates = {}, {}, {}, {}, [g["noise_x_T"]]

    def on_step(i: int, x: torch.Tensor, mask_image: torch.Tensor) -> None:
        x_sums[i], mask_sums[i] = x.double().sum().item(), mask_image.double().sum().item()
        if i in g["x_after_step"]:
            x_at[i], mask_at[i] = x.clone(), mask_image.clone()
        if i % 200 == 0 or i == SAMPLE_STEPS - 1:
            intermediates.append(x.clone())

    final = sample_latents(unet, adapters, Schedule(), g["z_clean"], g["mask"], g["context"], noise, on_step)
    assert noise.exhausted()
    steps = list(range(SAMPLE_STEPS - 1, -1, -1))
    x_sum = torch.tensor([x_sums[i] for i in range(SAMPLE_STEPS)], dtype=torch.float64)
    diverged = [i for i in steps if not torch.isclose(x_sum[i], g["x_sum_after_step"][i], rtol=1e-4, atol=1e-2)]
    assert not diverged, f"x first diverges after step {diverged[0]}"
    mask_sum = torch.tensor([mask_sums[i] for i in range(SAMPLE_STEPS)], dtype=torch.float64)
    torch.testing.assert_close(mask_sum, g["mask_image_sum_after_step"], rtol=1e-4, atol=1e-2)
    for i, expected in g["x_after_step"].items():
        torch.testing.assert_close(x_at[i], expected, rtol=1e-4, atol=1e-4, msg=f"x after step {i}")
        torch.testing.assert_close(mask_at[i], g["mask_image_after_step"][i], rtol=1e-4, atol=1e-4,
                                   msg=f"mask_image after step {i}")
    torch.testing.assert_close(torch.stack(intermediates), g["intermediates"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, g["final_latent"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, g["final_latent_fp64_same_draws"], rtol=1e-4, atol=1e-4)
    # where the mask is 0 the final latent is q(z_clean, 0) with the last background draw
    background = Schedule().q_sample(g["z_clean"], torch.zeros(2, dtype=torch.long), lo["noise_background"][-1])
    outside = g["mask"].expand_as(final) == 0
    torch.testing.assert_close(final[outside], background[outside], rtol=0, atol=1e-6)


def test_respaced_schedule_keeps_alpha_bar_at_its_steps():
    full, short = Schedule(), Schedule(steps=50)
    assert full.full and not short.full and Schedule(steps=1000).full
    assert short.timesteps[0] == 0 and short.timesteps[-1] == SAMPLE_STEPS - 1 and len(short.timesteps) == 50
    torch.testing.assert_close(short.alphas_cumprod, full.alphas_cumprod[short.timesteps], rtol=1e-6, atol=0)
    assert short.betas[1:].gt(full.betas[short.timesteps[1:]]).all()  # larger jumps between its steps
    with pytest.raises(ValueError, match="training uses the full"):
        training_loss(None, None, short, torch.zeros(1, 4, 2, 2), torch.zeros(1, 1, 2, 2), None,
                      torch.zeros(1, dtype=torch.long), RecordedNoise([]))
