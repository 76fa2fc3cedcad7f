"""The LDM folder (panda/ldm.py) on a tiny random LDM written with save_pretrained: every part (unet, vqvae,
bert, tokenizer) fails with the same one line for a missing, truncated, pickled or wrong-architecture file; the
tokenizer the pinned transformers writes and the real folder's layout (pickled .bin weights, vocab.txt) load,
the latter without the libraries' "unsafe serialization" lines."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from transformers import BertTokenizer

from panda.ldm import LDMBertConfig, LDMBertModel, load_ldm, write_tiny_ldm
from utils import UserError

PARTS = ("unet", "vqvae", "bert", "tokenizer")
FAULTS = ("missing", "truncated", "pickled", "wrong_architecture")
WEIGHT_FILES = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),  # what the
                "vqvae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),  # libraries
                "bert": ("model.safetensors", "pytorch_model.bin")}  # write and read: (safetensors, pickled)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_tiny_ldm(str(tmp_path_factory.mktemp("ldm"))))


class Payload:
    """A pickled object that would create ``path`` when unpickled without weights_only."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class Records(logging.Handler):
    """Collects the messages of the loggers it is added to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def recorded(*names: str):
    """The messages logged to the loggers ``names`` (and their children) inside the block."""
    records = Records()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(records)
    try:
        yield records.messages
    finally:
        for logger in loggers:
            logger.removeHandler(records)


def weights(folder: Path, part: str) -> Path:
    """The safetensors weights file of a model part."""
    return folder / part / WEIGHT_FILES[part][0]


def bpe_tokenizer_json() -> str:
    """A GPT-2 style (BPE) tokenizer.json: a tokenizer of another architecture."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    return Tokenizer(BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).to_str()


def damage(folder: Path, part: str, fault: str, ran: Path) -> str:
    """Apply ``fault`` to ``part`` of ``folder``; returns what the one-line error must say about it."""
    tokenizer = folder / "tokenizer"
    if part == "tokenizer":
        if fault == "missing":
            (tokenizer / "tokenizer.json").unlink()
            return r"no vocabulary \(tokenizer.json or vocab.txt\)"
        if fault == "truncated":
            (tokenizer / "tokenizer.json").write_text((tokenizer / "tokenizer.json").read_text()[:300])
            return r"tokenizer.json is unreadable"
        if fault == "pickled":  # a pickle where the real folder's vocab.txt belongs
            (tokenizer / "tokenizer.json").unlink()
            torch.save({"vocab": Payload(str(ran))}, tokenizer / "vocab.txt")
            return "vocab.txt is not a UTF-8 text file"
        (tokenizer / "tokenizer.json").write_text(bpe_tokenizer_json())
        return "tokenizer.json holds a BPE, not BERT's WordPiece"
    file = weights(folder, part)
    if fault == "missing":
        file.unlink()
        return rf"no weights file \({WEIGHT_FILES[part][0]} or {WEIGHT_FILES[part][1]}\)"
    if fault == "truncated":
        file.write_bytes(file.read_bytes()[:1000])
        return f"{WEIGHT_FILES[part][0]} is truncated or not a safetensors file"
    if fault == "pickled":
        file.unlink()
        torch.save({"weight": Payload(str(ran))}, folder / part / WEIGHT_FILES[part][1])
        return f"{WEIGHT_FILES[part][1]} holds pickled objects other than tensors"
    other = "vqvae" if part == "unet" else "unet"  # the weights of another model under this part's config
    shutil.copy(weights(folder, other), file)
    return f"{WEIGHT_FILES[part][0]} lacks [0-9]+ of the model's tensors"


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("fault", FAULTS)
def test_every_part_fails_in_one_line(tiny: Path, tmp_path: Path, part: str, fault: str):
    folder = Path(shutil.copytree(tiny, tmp_path / "ldm"))
    ran = tmp_path / "code-ran"
    reason = damage(folder, part, fault, ran)
    with pytest.raises(UserError) as error:
        load_ldm(str(folder), "cpu")
    message = str(error.value)
    assert "\n" not in message
    prefix = f"--ldm {folder}: cannot load {part}/ as the "
    assert message.startswith(prefix), message
    assert re.search(reason, message), message
    assert not ran.exists()  # nothing in a pickle is run


def test_missing_folders_and_configs_fail_in_one_line(tiny: Path, tmp_path: Path):
    with pytest.raises(UserError, match="no such folder"):
        load_ldm(str(tmp_path / "absent"), "cpu")
    folder = Path(shutil.copytree(tiny, tmp_path / "ldm"))
    for part in ("unet", "bert", "tokenizer"):
        saved = tmp_path / part
        shutil.move(folder / part, saved)
        with pytest.raises(UserError, match=rf"^--ldm {folder}: cannot load {part}/ as .*: the folder is missing"):
            load_ldm(str(folder), "cpu")
        shutil.move(saved, folder / part)
    shutil.copy(folder / "unet" / "config.json", folder / "vqvae")
    with pytest.raises(UserError, match="cannot load vqvae/ as the AutoencoderKL: its config.json names "
                                        "UNet2DConditionModel, not AutoencoderKL"):
        load_ldm(str(folder), "cpu")
    shutil.copy(tiny / "vqvae" / "config.json", folder / "vqvae")
    (folder / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))  # a plain BERT
    with pytest.raises(UserError, match="cannot load bert/ as the LDMBertModel text encoder: its config.json names "
                                        "bert, not LDMBertModel"):
        load_ldm(str(folder), "cpu")
    shutil.copy(tiny / "bert" / "config.json", folder / "bert")
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "GPT2Tokenizer"}))
    with pytest.raises(UserError, match="tokenizer_config.json names GPT2Tokenizer, not BertTokenizer"):
        load_ldm(str(folder), "cpu")
    shutil.copy(tiny / "tokenizer" / "tokenizer_config.json", config)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    unet["block_out_channels"] = [8, 16]  # the config disagrees with the stored weights' shapes
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    with pytest.raises(UserError, match="cannot load unet/ as the UNet2DConditionModel: "):
        load_ldm(str(folder), "cpu")


def test_a_git_lfs_pointer_is_named(tiny: Path, tmp_path: Path):
    folder = Path(shutil.copytree(tiny, tmp_path / "ldm"))
    weights(folder, "unet").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 3\n")
    with pytest.raises(UserError, match="cannot load unet/ .* is a Git LFS pointer, not the weights"):
        load_ldm(str(folder), "cpu")


def test_only_the_unused_head_may_be_missing_and_the_parts_must_fit(tiny: Path, tmp_path: Path):
    folder = Path(shutil.copytree(tiny, tmp_path / "ldm"))
    state = load_file(weights(folder, "bert"))
    save_file({k: v for k, v in state.items() if not k.startswith("to_logits.")}, weights(folder, "bert"),
              metadata={"format": "pt"})
    assert isinstance(load_ldm(str(folder), "cpu").bert, LDMBertModel)  # the text encoder never uses to_logits
    shutil.rmtree(folder / "vqvae")  # an f4 autoencoder: latents of another size than generation plans for
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                  block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3).save_pretrained(folder / "vqvae")
    with pytest.raises(UserError, match="vqvae/ downsamples by 4, PANDA's latents .and latent masks. are S/8"):
        load_ldm(str(folder), "cpu")
    shutil.rmtree(folder / "vqvae")
    shutil.copytree(tiny / "vqvae", folder / "vqvae")
    save_file({k: v for k, v in state.items() if k != "model.embed_positions.weight"}, weights(folder, "bert"),
              metadata={"format": "pt"})
    with pytest.raises(UserError, match="model.safetensors lacks 1 of the model's tensors "
                                        r"\(e.g. model.embed_positions.weight\)"):
        load_ldm(str(folder), "cpu")
    shutil.rmtree(folder / "bert")  # another width than the UNet cross-attends to
    LDMBertModel(LDMBertConfig(vocab_size=64, max_position_embeddings=77, encoder_layers=1, encoder_ffn_dim=16,
                               encoder_attention_heads=2, head_dim=8, d_model=16)).save_pretrained(folder / "bert")
    with pytest.raises(UserError, match="unet/ cross-attends to width 32 but bert/ is 16 wide"):
        load_ldm(str(folder), "cpu")


def test_the_tokenizer_the_pinned_transformers_writes_loads(tiny: Path, tmp_path: Path):
    folder = Path(shutil.copytree(tiny, tmp_path / "ldm"))
    shutil.rmtree(folder / "tokenizer")
    vocab = tmp_path / "vocab.txt"
    tokenizer = BertTokenizer.from_pretrained(tiny / "tokenizer")
    vocab.write_text("\n".join(tokenizer.convert_ids_to_tokens(range(len(tokenizer)))) + "\n")
    BertTokenizer(vocab=str(vocab), do_lower_case=True).save_pretrained(folder / "tokenizer")
    assert "vocab.txt" not in os.listdir(folder / "tokenizer")  # transformers 5 writes tokenizer.json only
    ids = load_ldm(str(folder), "cpu").tokenizer("a photo of a * anomaly").input_ids
    assert ids == load_ldm(str(tiny), "cpu").tokenizer("a photo of a * anomaly").input_ids


def real_layout(tiny: Path, folder: Path) -> Path:
    """``tiny`` in the layout of the real CompVis/ldm-text2im-large-256: pickled .bin state dicts only, and a
    tokenizer of vocab.txt, tokenizer_config.json and special_tokens_map.json."""
    shutil.copytree(tiny, folder)
    for part in ("unet", "vqvae", "bert"):
        torch.save(load_file(weights(folder, part)), folder / part / WEIGHT_FILES[part][1])
        weights(folder, part).unlink()
    tokenizer = BertTokenizer.from_pretrained(tiny / "tokenizer")
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    tokens = tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "model_max_length": 77, "tokenizer_class": "BertTokenizer"}))
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(
        {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
         "unk_token": "[UNK]"}))
    return folder


def test_the_real_folder_layout_loads_without_unsafe_serialization_lines(tiny: Path, tmp_path: Path):
    folder = real_layout(tiny, tmp_path / "ldm")
    with recorded("diffusers", "transformers") as messages:  # the libraries' own loggers
        ldm = load_ldm(str(folder), "cpu")
    said = "\n".join(messages)
    assert "unsafe serialization" not in said and "An error occurred" not in said, said
    reference = load_ldm(str(tiny), "cpu")
    for ours, theirs in ((ldm.unet, reference.unet), (ldm.vae, reference.vae), (ldm.bert, reference.bert)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
    prompt = "a photo of a * anomaly"
    assert ldm.tokenizer(prompt).input_ids == reference.tokenizer(prompt).input_ids


def test_the_libraries_key_tables_become_one_line(tiny: Path, tmp_path: Path):
    folder = Path(shutil.copytree(tiny, tmp_path / "ldm"))
    shutil.copy(weights(folder, "unet"), weights(folder, "bert"))  # a UNet's tensors under bert/
    with recorded("diffusers", "transformers") as messages, pytest.raises(UserError, match="lacks 17 of"):
        load_ldm(str(folder), "cpu")
    assert messages == []  # no LOAD REPORT table of every key before the one-line error
    state = load_file(weights(tiny, "bert"))
    save_file({**state, "extra.weight": torch.zeros(2)}, weights(folder, "bert"), metadata={"format": "pt"})
    with recorded("diffusers", "transformers", "pbas") as messages:
        load_ldm(str(folder), "cpu")
    assert len(messages) == 1 and "bert/model.safetensors holds 1 tensors the model does not use (e.g. extra.weight)" \
        in messages[0]
