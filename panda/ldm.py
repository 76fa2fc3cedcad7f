"""The frozen latent diffusion model (CompVis txt2img-f8-large) through diffusers and transformers, read from a
local folder in the diffusers layout of ``CompVis/ldm-text2im-large-256`` (PANDA_SPEC.md sections 2 and 8):
unet/ (UNet2DConditionModel), vqvae/ (AutoencoderKL), bert/ (LDMBertModel), tokenizer/ (BertTokenizer).
Nothing is ever downloaded (``local_files_only``); weights load as tensors only (safetensors or
``torch.load(weights_only=True)``, the libraries' defaults). ``write_tiny_ldm`` writes a tiny random one."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.latent_diffusion import LDMBertModel
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig
from transformers import BertTokenizer

from panda.embedding import MAX_LENGTH, PLACEHOLDER
from utils import UserError

LDM_SOURCE = "the diffusers layout of CompVis/ldm-text2im-large-256"
# part folder -> (what it holds, the class names its config.json may name; the tokenizer: its vocabulary file)
PARTS = {
    "unet": ("the UNet2DConditionModel", ("UNet2DConditionModel",)),
    "vqvae": ("the AutoencoderKL", ("AutoencoderKL",)),
    "bert": ("the LDMBertModel text encoder", ("ldmbert", "LDMBertModel")),
    "tokenizer": ("the BertTokenizer vocabulary", ("vocab.txt",)),
}
# what loading a broken part raises (missing/corrupt weight files, shape mismatches, bad JSON)
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, json.JSONDecodeError)
LOCAL = {"local_files_only": True, "low_cpu_mem_usage": False}  # diffusers: never download; no accelerate needed
TINY_VOCAB = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", PLACEHOLDER, "anomaly", "a", "good", "defect", "broken", "large",
    "small", "crack", "scratch", "hole", "spot", "discolor", "missing", "color", "cut", "fold", "glue", "poke",
    "contamination", "bent", "squeeze", "damaged", "print", "thread", "rough", "liquid", "oil", "combined", "wire",
    "strip", "split", "type", "flip", "misplaced", "faulty", "ko",
)


@dataclass
class LDM:
    """The four parts of the frozen LDM."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    bert: LDMBertModel
    tokenizer: BertTokenizer


def _config_class(folder: str, part: str) -> str:
    """The class a part's config.json names: diffusers' ``_class_name``, else transformers' ``model_type``, else
    its first ``architectures`` entry."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"--ldm {os.path.dirname(folder)}: {part}/config.json is missing ({PARTS[part][0]} "
                        f"expected, {LDM_SOURCE})")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f"--ldm {os.path.dirname(folder)}: {part}/config.json is unreadable: {error}") from None
    if not isinstance(config, dict):
        raise UserError(f"--ldm {os.path.dirname(folder)}: {part}/config.json is not a JSON object")
    architectures = config.get("architectures") or ["nothing"]
    return str(config.get("_class_name") or config.get("model_type") or architectures[0])


def _check_part(path: str, part: str) -> str:
    """The part's folder, after checking that it exists and names the expected class (one-line UserError)."""
    folder = os.path.join(path, part)
    what, expected = PARTS[part]
    if not os.path.isdir(folder):
        raise UserError(f"--ldm {path}: {part}/ is missing ({what} expected, {LDM_SOURCE})")
    if part == "tokenizer":
        if not os.path.isfile(os.path.join(folder, expected[0])):
            raise UserError(f"--ldm {path}: tokenizer/{expected[0]} is missing ({what} expected, {LDM_SOURCE})")
        return folder
    found = _config_class(folder, part)
    if found not in expected:
        raise UserError(f"--ldm {path}: {part}/ holds a {found}, expected {what} ({LDM_SOURCE})")
    return folder


def _load(path: str, part: str, load) -> object:
    """``load(folder)`` with any library error turned into one line naming the part."""
    folder = _check_part(path, part)
    try:
        return load(folder)
    except LOAD_ERRORS as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--ldm {path}: cannot load {part}/ as {PARTS[part][0]}: {message}") from None


def _check_compatible(path: str, ldm: LDM) -> None:
    """The parts fit together: latent channels, cross-attention width, context length, vocabulary, '*' token."""
    unet, vae, bert = ldm.unet.config, ldm.vae.config, ldm.bert.config
    if not unet.in_channels == unet.out_channels == vae.latent_channels:
        raise UserError(f"--ldm {path}: unet/ has {unet.in_channels} in / {unet.out_channels} out channels but "
                        f"vqvae/ makes {vae.latent_channels}-channel latents")
    if unet.cross_attention_dim != bert.d_model:
        raise UserError(f"--ldm {path}: unet/ cross-attends to width {unet.cross_attention_dim} but bert/ is "
                        f"{bert.d_model} wide")
    if bert.max_position_embeddings < MAX_LENGTH:
        raise UserError(f"--ldm {path}: bert/ has {bert.max_position_embeddings} positions, PANDA's prompts take "
                        f"{MAX_LENGTH}")
    if len(ldm.tokenizer) > bert.vocab_size:
        raise UserError(f"--ldm {path}: tokenizer/ has {len(ldm.tokenizer)} tokens, bert/ embeds {bert.vocab_size}")
    if ldm.tokenizer.convert_tokens_to_ids(PLACEHOLDER) == ldm.tokenizer.unk_token_id:
        raise UserError(f"--ldm {path}: tokenizer/ has no '{PLACEHOLDER}' token (PANDA's placeholder)")


def load_ldm(path: str, device: torch.device | str) -> LDM:
    """Read the four parts from ``path`` (never downloading), check they fit, move them to ``device``, frozen
    (eval, requires_grad False). Anything missing or of the wrong architecture: one-line UserError."""
    if not os.path.isdir(path):
        raise UserError(f"--ldm {path}: no such folder (the LDM in {LDM_SOURCE}; README says how to get it)")
    ldm = LDM(
        unet=_load(path, "unet", lambda f: UNet2DConditionModel.from_pretrained(f, **LOCAL)),
        vae=_load(path, "vqvae", lambda f: AutoencoderKL.from_pretrained(f, **LOCAL)),
        bert=_load(path, "bert", lambda f: LDMBertModel.from_pretrained(f, local_files_only=True)),
        tokenizer=_load(path, "tokenizer", lambda f: BertTokenizer.from_pretrained(f, local_files_only=True)),
    )
    _check_compatible(path, ldm)
    for model in (ldm.unet, ldm.vae, ldm.bert):
        model.to(device).eval().requires_grad_(False)
    return ldm


def tiny_ldm(seed: int = 0, vocab: tuple[str, ...] = TINY_VOCAB) -> LDM:
    """A tiny random LDM with the real parts' structure (f8 VAE with 4 latent channels, cross-attention UNet,
    1-layer LDMBert with 77 positions) for tests and CPU demos; the tokenizer needs a vocab file, so it is
    written by ``write_tiny_ldm``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    bert = LDMBertModel(LDMBertConfig(
        vocab_size=len(vocab), max_position_embeddings=MAX_LENGTH, encoder_layers=1, encoder_ffn_dim=64,
        encoder_attention_heads=2, head_dim=16, d_model=32))
    return LDM(unet=unet, vae=vae, bert=bert, tokenizer=None)  # type: ignore[arg-type]


def write_tiny_ldm(folder: str, seed: int = 0) -> str:
    """Write a tiny random LDM to ``folder`` with save_pretrained, in the layout ``load_ldm`` reads; returns it."""
    ldm = tiny_ldm(seed)
    ldm.unet.save_pretrained(os.path.join(folder, "unet"))
    ldm.vae.save_pretrained(os.path.join(folder, "vqvae"))
    ldm.bert.save_pretrained(os.path.join(folder, "bert"))
    tokenizer_folder = os.path.join(folder, "tokenizer")
    os.makedirs(tokenizer_folder, exist_ok=True)
    vocab_file = os.path.join(tokenizer_folder, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(TINY_VOCAB) + "\n")
    BertTokenizer(vocab=vocab_file, do_lower_case=True).save_pretrained(tokenizer_folder)
    return folder
