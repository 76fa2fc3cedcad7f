"""PANDA speed and memory: ms per training step, ms per sampler step per image, peak memory; fp32 vs bf16.

Random weights (timing only, no weights file): ``--size tiny`` is the tests' tiny LDM (panda.ldm.tiny_ldm) on
the CPU; ``--size full`` is the full-size architecture of CompVis/ldm-text2im-large-256 (PANDA_SPEC section 2:
UNet 320 x (1, 2, 4, 4) with 2 res-blocks, cross-attention at the three finest levels, 8 heads, context 1280;
KL-f8 VAE 128-256-512-512; LDMBert 32 layers x 1280, 77 tokens) built from its configuration with random
weights, for a GPU. Measured per precision, after warm-up steps:

    train step       Panda.loss + backward + AdamW step at --batch_size (the public run: 8 at 256 px)
    sampler step     one step of Panda.sample's 1000-step loop at --sample_batch, per image (the loop is timed
                     over --sample_steps steps, then stopped; VAE encode/decode are excluded)
    peak memory      torch.cuda.max_memory_allocated (GPU) or the process's peak RSS (CPU)

and, for the full size, projects the public protocol: 80 000 training steps per (class, defect), 2000 pairs x
1000 steps, over MVTec AD's 73 defect types.

    python benchmarks/bench_panda.py --threads 1                        # tiny, CPU, fp32
    python benchmarks/bench_panda.py --size full --device cuda:0 --precision fp32 bf16
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from panda.ldm import LDM, TINY_VOCAB, tiny_ldm  # noqa: E402
from panda.model import Panda  # noqa: E402
from panda.noise import GeneratorNoise  # noqa: E402

NAME = "bottle+broken_large"
INIT_WORD = "large"
TRAIN_STEPS, PAIRS, SAMPLER_STEPS, MVTEC_DEFECT_TYPES = 80_000, 2000, 1000, 73


class _Stop(Exception):
    """Ends a timed sampler loop after the measured steps."""


def full_ldm(vocab_file: str) -> LDM:
    """The full-size architecture with random weights (the tokenizer is the tiny vocabulary: it only maps the
    prompt's words to ids)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion import LDMBertModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig
    from transformers import BertTokenizer

    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1280, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)
    bert = LDMBertModel(LDMBertConfig())  # its defaults are the real model's: 32 x 1280, vocab 30522, 77 tokens
    return LDM(unet=unet, vae=vae, bert=bert, tokenizer=BertTokenizer(vocab=vocab_file, do_lower_case=True))


def build(size: str, vocab_file: str, device: torch.device) -> LDM:
    ldm = full_ldm(vocab_file) if size == "full" else tiny_ldm(0)
    if ldm.tokenizer is None:
        from transformers import BertTokenizer

        ldm.tokenizer = BertTokenizer(vocab=vocab_file, do_lower_case=True)
    for part in (ldm.unet, ldm.vae, ldm.bert):
        part.to(device).eval().requires_grad_(False)
    return ldm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (RSS)"


def time_training(model: Panda, batch: int, imagesize: int, steps: int, warmup: int, device: torch.device) -> float:
    """ms per training step."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1.6e-2, weight_decay=0.01)
    noise = GeneratorNoise.seeded(0, device)
    images = torch.rand(batch, 3, imagesize, imagesize, device=device) * 2 - 1
    masks = (torch.rand(batch, 1, imagesize, imagesize, device=device) > 0.7).float()
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            started = time.perf_counter()
        loss, _ = model.loss(images, masks, [NAME] * batch, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return (time.perf_counter() - started) / steps * 1000


def time_sampling(model: Panda, batch: int, imagesize: int, steps: int, warmup: int, device: torch.device) -> float:
    """ms per sampler step per image (steps warmup+1 .. warmup+steps of the loop)."""
    noise = GeneratorNoise.seeded(0, device)
    clean = torch.rand(batch, 3, imagesize, imagesize, device=device) * 2 - 1
    masks = (torch.rand(batch, 1, imagesize, imagesize, device=device) > 0.7).float()
    marks: dict[int, float] = {}

    def progress(done: int) -> None:
        if done in (warmup, warmup + steps):
            sync(device)
            marks[done] = time.perf_counter()
        if done == warmup + steps:
            raise _Stop

    model.eval()
    try:
        model.sample(clean, masks, [NAME] * batch, noise, progress)
    except _Stop:
        pass
    return (marks[warmup + steps] - marks[warmup]) / steps / batch * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    ap.add_argument("--batch_size", type=int, default=None, help="training batch (default: 8 full, 2 tiny)")
    ap.add_argument("--sample_batch", type=int, default=None, help="sampler batch (default: 32 full, 2 tiny)")
    ap.add_argument("--imagesize", type=int, default=None, help="default: 256 full, 32 tiny")
    ap.add_argument("--train_steps", type=int, default=10)
    ap.add_argument("--sample_steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--output", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    full = args.size == "full"
    batch = args.batch_size or (8 if full else 2)
    sample_batch = args.sample_batch or (32 if full else 2)
    imagesize = args.imagesize or (256 if full else 32)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_panda: no CUDA GPU is visible", file=sys.stderr)
        return 1
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.txt")
        with open(vocab_file, "w") as f:
            f.write("\n".join(TINY_VOCAB) + "\n")
        ldm = build(args.size, vocab_file, device)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for precision in args.precision:
        torch.manual_seed(0)
        model = Panda(ldm, [NAME], INIT_WORD, precision=precision).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_ms = time_training(model, batch, imagesize, args.train_steps, args.warmup, device)
        sample_ms = time_sampling(model, sample_batch, imagesize, args.sample_steps, args.warmup, device)
        per_defect_h = (TRAIN_STEPS * train_ms + PAIRS * SAMPLER_STEPS * sample_ms) / 3.6e6
        rows.append((precision, train_ms, sample_ms, peak_memory(device), per_defect_h))
        del model
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    lines = [f"PANDA {args.size} ({device_name}, torch {torch.__version__}): train batch {batch}, sampler batch "
             f"{sample_batch}, {imagesize} px", ""]
    if full:  # the public protocol's totals, from the measured rates
        lines += ["| precision | ms / train step | ms / sampler step / image | peak memory | h per defect type "
                  "(80k steps + 2000 x 1000 steps) | h for MVTec AD (73 types) |", "|---|---|---|---|---|---|"]
        lines += [f"| {p} | {t:.1f} | {s:.2f} | {m} | {h:.2f} | {h * MVTEC_DEFECT_TYPES:.0f} |"
                  for p, t, s, m, h in rows]
    else:
        lines += ["| precision | ms / train step | ms / sampler step / image | peak memory |", "|---|---|---|---|"]
        lines += [f"| {p} | {t:.1f} | {s:.2f} | {m} |" for p, t, s, m, _ in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
