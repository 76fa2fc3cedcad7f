"""The frozen latent diffusion model (CompVis txt2img-f8-large) through diffusers and transformers, read from a
local folder in the diffusers layout of ``CompVis/ldm-text2im-large-256`` (PANDA_SPEC.md sections 2 and 8):
unet/ (UNet2DConditionModel), vqvae/ (AutoencoderKL), bert/ (LDMBertModel), tokenizer/ (BertTokenizer).
Nothing is ever downloaded (``local_files_only``). Weights load as tensors only: safetensors, or pickled ``.bin``
files (the real folder's) through ``torch.load(weights_only=True)``, the libraries' defaults, which refuse a pickle
of anything but tensors without running it; ``use_safetensors`` follows what is on disk, so the libraries try no
other format. A weights file must cover its model (a missing tensor would stay random). Every fault of a part
(missing folder or file, truncated, pickled, another architecture) is one ``--ldm PATH: cannot load PART/ ...``
line. ``write_tiny_ldm`` writes a tiny random LDM."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import tempfile
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.latent_diffusion import LDMBertModel
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig
from safetensors import SafetensorError
from transformers import BertTokenizer

from panda.diffusion import VAE_FACTOR
from panda.embedding import MAX_LENGTH, PLACEHOLDER
from utils import UserError

LDM_SOURCE = "the diffusers layout of CompVis/ldm-text2im-large-256"
# part folder -> (what it holds, the class names its config.json may name; the tokenizer: its tokenizer classes)
PARTS = {
    "unet": ("the UNet2DConditionModel", ("UNet2DConditionModel",)),
    "vqvae": ("the AutoencoderKL", ("AutoencoderKL",)),
    "bert": ("the LDMBertModel text encoder", ("ldmbert", "LDMBertModel")),
    "tokenizer": ("the BertTokenizer", ("BertTokenizer", "BertTokenizerFast")),
}
# the weights file of a model part: (safetensors name, pickled torch name); either may be sharded (NAME.index.json)
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vqvae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "bert": ("model.safetensors", "pytorch_model.bin"),
}
# the tokenizer's files: transformers >= 5 writes tokenizer.json only; the real folder ships vocab.txt
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# tensors a part may lack: LDMBertModel's language-model head, which its forward (the text encoder) never uses
UNUSED = {"bert": ("to_logits.",)}
# what loading a broken part raises (missing/corrupt weight files, shape mismatches, bad JSON); the tokenizers
# library raises plain Exception for a malformed file (only that exact type is caught, see _load_tokenizer)
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, json.JSONDecodeError,
               pickle.UnpicklingError, SafetensorError)
LFS_POINTER = b"version https://git-lfs"
# the loggers whose multi-line reports of missing / unexpected tensors _check_keys replaces with one line each
KEY_REPORT_LOGGERS = ("transformers.modeling_utils", "diffusers.models.modeling_utils")
LOG = logging.getLogger("pbas")
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


class PartError(Exception):
    """Why one part cannot be loaded (``load_ldm`` turns it into one UserError line naming the part)."""


def _read_json(folder: str, name: str) -> dict:
    """A part's JSON file as a dict; PartError when it is unreadable or not an object."""
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError) as error:
        raise PartError(f"{name} is unreadable ({_first_line(error)})") from None
    if not isinstance(content, dict):
        raise PartError(f"{name} is not a JSON object")
    return content


def _config_class(folder: str, part: str) -> str:
    """The class a part's config.json names: diffusers' ``_class_name``, else transformers' ``model_type``, else
    its first ``architectures`` entry."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise PartError("config.json is missing")
    config = _read_json(folder, "config.json")
    architectures = config.get("architectures") or ["nothing"]
    return str(config.get("_class_name") or config.get("model_type") or architectures[0])


def weights_file(folder: str, part: str) -> tuple[str, bool]:
    """(the weights file a model part's folder holds, whether it is safetensors): safetensors first, else the
    pickled torch file, each whole or sharded (NAME.index.json); PartError when there is none."""
    for name, safetensors in zip(WEIGHT_FILES[part], (True, False)):
        for candidate in (name, f"{name}.index.json"):
            if os.path.isfile(os.path.join(folder, candidate)):
                return candidate, safetensors
    raise PartError(f"no weights file ({' or '.join(WEIGHT_FILES[part])})")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _reason(error: BaseException, name: str) -> str:
    """What went wrong, from the library's exception and those it was raised from: a pickle of more than
    tensors, a truncated or damaged file, else the first line of the innermost message."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    if any(isinstance(e, pickle.UnpicklingError) for e in chain):
        return (f"{name} holds pickled objects other than tensors (read with weights_only: nothing in it ran; save "
                "it again as tensors or safetensors)")
    damaged = [e for e in chain if isinstance(e, SafetensorError)]
    if damaged:
        return f"{name} is truncated or not a safetensors file ({_first_line(damaged[0])})"
    if any("PytorchStreamReader" in str(e) for e in chain):
        return f"{name} is truncated or not a torch file"
    return _first_line(next((e for e in reversed(chain) if str(e).strip()), error))


def _check_lfs(folder: str, name: str) -> None:
    """PartError when a weights file is a Git LFS pointer (a clone without git-lfs), not the weights."""
    with open(os.path.join(folder, name), "rb") as f:
        if f.read(len(LFS_POINTER)) == LFS_POINTER:
            raise PartError(f"{name} is a Git LFS pointer, not the weights (get the folder with 'hf download', or "
                            "run 'git lfs pull' in it)")


def _not_key_report(record: logging.LogRecord) -> bool:
    """A logging filter: False for a library's report of missing / unexpected tensors (transformers' "LOAD
    REPORT" table, diffusers' "Some weights of ... were not initialized / not used" lists)."""
    message = record.getMessage()
    return not ("LOAD REPORT" in message or message.startswith("Some weights of"))


@contextlib.contextmanager
def _own_key_reports():
    """While a part loads, the libraries' own reports of missing and unexpected tensors (a line per key) are not
    printed: _check_keys refuses the first and warns of the second in one line. A filter on the two loggers that
    write them, for the call only, dropping only those reports (their levels stay: transformers checks more when
    its level is raised)."""
    loggers = [logging.getLogger(name) for name in KEY_REPORT_LOGGERS]
    for logger in loggers:
        logger.addFilter(_not_key_report)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_not_key_report)


def _check_keys(info: dict, name: str, part: str, path: str) -> None:
    """PartError when the weights file lacks tensors of the model (they would be random: weights of another
    architecture or an incomplete file) or holds tensors of other shapes; a warning for tensors the model does
    not use."""
    missing = [key for key in info.get("missing_keys", ()) if not key.startswith(UNUSED.get(part, ()))]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing:
        raise PartError(f"{name} lacks {len(missing)} of the model's tensors (e.g. {sorted(missing)[0]}): weights of "
                        "another model, or an incomplete file")
    if mismatched:
        raise PartError(f"{name} holds {len(mismatched)} tensors of other shapes than config.json says "
                        f"(e.g. {mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]})")
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        LOG.warning("--ldm %s: %s/%s holds %d tensors the model does not use (e.g. %s); they are ignored", path, part,
                    name, len(unexpected), unexpected[0])


def _load_model(folder: str, part: str, cls, path: str) -> object:
    """A model part (unet, vqvae, bert) from its folder: the config names ``cls``, the weights are read as
    tensors only (use_safetensors as on disk, so the libraries try no other format) and cover the model."""
    found = _config_class(folder, part)
    if found not in PARTS[part][1]:
        raise PartError(f"its config.json names {found}, not {PARTS[part][1][-1]}")
    name, safetensors = weights_file(folder, part)
    _check_lfs(folder, name)
    options = LOCAL if part != "bert" else {"local_files_only": True}
    try:
        with _own_key_reports():
            model, info = cls.from_pretrained(folder, use_safetensors=safetensors, output_loading_info=True, **options)
    except LOAD_ERRORS as error:
        raise PartError(_reason(error, name)) from None
    _check_keys(info, name, part, path)
    return model


def _load_tokenizer(folder: str) -> BertTokenizer:
    """The BertTokenizer from tokenizer.json (what transformers >= 5 writes) or vocab.txt (the real folder's),
    after checking that the files are what a BertTokenizer reads."""
    present = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, name))]
    if not present:
        raise PartError(f"no vocabulary ({' or '.join(TOKENIZER_FILES)})")
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        found = _read_json(folder, "tokenizer_config.json").get("tokenizer_class")
        if found is not None and found not in PARTS["tokenizer"][1]:
            raise PartError(f"its tokenizer_config.json names {found}, not BertTokenizer")
    if "tokenizer.json" in present:
        model = _read_json(folder, "tokenizer.json").get("model")
        kind = model.get("type") if isinstance(model, dict) else None
        if kind != "WordPiece":
            raise PartError(f"tokenizer.json holds a {kind or 'tokenizer of no model type'}, not BERT's WordPiece")
    else:
        try:
            with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
                f.read()
        except (OSError, UnicodeDecodeError) as error:
            raise PartError(f"vocab.txt is not a UTF-8 text file ({_first_line(error)})") from None
    try:
        return BertTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # narrowed below: the tokenizers library raises plain Exception
        if not isinstance(error, LOAD_ERRORS) and type(error) is not Exception:
            raise
        raise PartError(_first_line(error)) from None


def _load(path: str, part: str, load) -> object:
    """``load(folder)`` of one part, any fault (missing folder or file, truncated, pickled, of another
    architecture) turned into one line: ``--ldm PATH: cannot load PART/ as WHAT: why``."""
    folder = os.path.join(path, part)
    what = PARTS[part][0]
    try:
        if not os.path.isdir(folder):
            raise PartError(f"the folder is missing ({LDM_SOURCE}; docs/panda.md says how to get it)")
        return load(folder)
    except PartError as error:
        raise UserError(f"--ldm {path}: cannot load {part}/ as {what}: {error}") from None


def _check_compatible(path: str, ldm: LDM) -> None:
    """The parts fit together: the VAE's factor, latent channels, cross-attention width, context length,
    vocabulary, '*' token."""
    unet, vae, bert = ldm.unet.config, ldm.vae.config, ldm.bert.config
    factor = 2 ** (len(vae.block_out_channels) - 1)
    if factor != VAE_FACTOR:
        raise UserError(f"--ldm {path}: vqvae/ downsamples by {factor}, PANDA's latents (and latent masks) are "
                        f"S/{VAE_FACTOR}")
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
        raise UserError(f"--ldm {path}: no such folder (the LDM in {LDM_SOURCE}; docs/panda.md says how to get it)")
    ldm = LDM(
        unet=_load(path, "unet", lambda f: _load_model(f, "unet", UNet2DConditionModel, path)),
        vae=_load(path, "vqvae", lambda f: _load_model(f, "vqvae", AutoencoderKL, path)),
        bert=_load(path, "bert", lambda f: _load_model(f, "bert", LDMBertModel, path)),
        tokenizer=_load(path, "tokenizer", _load_tokenizer),
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
    """Write a tiny random LDM to ``folder`` with save_pretrained, in the layout ``load_ldm`` reads (what the pinned
    libraries write: safetensors weights, tokenizer.json without vocab.txt); returns it."""
    ldm = tiny_ldm(seed)
    ldm.unet.save_pretrained(os.path.join(folder, "unet"))
    ldm.vae.save_pretrained(os.path.join(folder, "vqvae"))
    ldm.bert.save_pretrained(os.path.join(folder, "bert"))
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = os.path.join(scratch, "vocab.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            f.write("\n".join(TINY_VOCAB) + "\n")
        BertTokenizer(vocab=vocab_file, do_lower_case=True).save_pretrained(os.path.join(folder, "tokenizer"))
    return folder
