"""Backbone table, layer validation, weights handling, and the release's command line."""
from __future__ import annotations

import urllib.error

import pytest
import torch

import backbones
import main
import pbas
import runner
from common import FeatureExtractor


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(backbones.BackboneError, match="wideresnet50, wideresnet101, resnet18, resnet50, efficientnet_lite0"):
        backbones.load_backbone("vgg16")


def _no_downloads(monkeypatch) -> list:
    """Record any attempt to fetch weights (the policy: nothing is downloaded at run time)."""
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "urlopen", offline, raising=False)
    return calls


def test_missing_torchvision_weights_name_the_exact_path_and_nothing_is_downloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = _no_downloads(monkeypatch)
    with pytest.raises(backbones.BackboneError) as info:
        backbones.load_backbone("wideresnet50")
    message = str(info.value)
    assert "\n" not in message
    assert calls == []  # read from the hub cache only: no download attempted
    assert "put wide_resnet50_2-95faca4d.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "wide_resnet50_2-95faca4d.pth") in message
    assert "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth" in message


def test_pbas_run_with_missing_backbone_weights_stops_in_one_line(monkeypatch, tmp_path, mvtec_root, capsys):
    """The CLI: a PBAS run whose backbone file is not in the hub cache stops before training, naming the path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = _no_downloads(monkeypatch)
    code = main.cli(["--gpu", "-1", "--results_path", str(tmp_path / "res"), "net", "-b", "resnet18", "-le", "layer2",
                     "dataset", "--resize", "32", "--imagesize", "32", "-d", "texture", "mvtec", str(mvtec_root)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in err
    assert calls == [] and not (tmp_path / "res" / "models").exists()


class _Payload:
    """Unpickling this runs code (creates a file): what a tampered weights file could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_weights_file_that_runs_code_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"conv1.weight": _Payload(str(marker))}, folder / "resnet18-f37072fd.pth")
    with pytest.raises(backbones.BackboneError) as info:
        backbones.load_backbone("resnet18")
    assert not marker.exists()  # nothing ran
    assert str(folder / "resnet18-f37072fd.pth") in str(info.value) and "\n" not in str(info.value)
    assert "asks to run code" in str(info.value)


def test_a_weights_file_of_another_network_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"not_a_layer.weight": torch.zeros(1)}, folder / "resnet18-f37072fd.pth")
    with pytest.raises(backbones.BackboneError, match="does not hold the weights"):
        backbones.load_backbone("resnet18")


def test_efficientnet_lite0_loads_real_weights_offline():
    model, stages = backbones.load_backbone("efficientnet_lite0")
    random_model, _ = backbones.load_backbone("efficientnet_lite0", pretrained=False)
    # pretrained BatchNorm statistics are not the fresh-module defaults
    assert not torch.allclose(model.bn1.running_var, torch.ones_like(model.bn1.running_var))
    assert torch.allclose(random_model.bn1.running_var, torch.ones_like(random_model.bn1.running_var))
    x = torch.randn(1, 3, 128, 128)
    feats = FeatureExtractor(stages, ["blocks.2", "blocks.4"]).eval()(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8)]  # strides 8 and 16


def test_extractor_runs_nothing_after_the_last_requested_layer():
    _, stages = backbones.load_backbone("resnet18", pretrained=False)
    extractor = FeatureExtractor(stages, ["layer2", "layer3"])
    assert extractor.names == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    calls = []
    stages_by_name = dict(stages)
    stages_by_name["layer4"].register_forward_hook(lambda *a: calls.append("layer4"))
    extractor.eval()(torch.randn(1, 3, 64, 64))
    assert calls == []


def test_layer_validation():
    _, stages = backbones.load_backbone("resnet18", pretrained=False)
    with pytest.raises(backbones.BackboneError, match="valid layers: conv1"):
        backbones.check_layers("resnet18", ["layer2", "blocks.2"], stages)
    with pytest.raises(backbones.BackboneError):
        backbones.check_layers("resnet18", ["layer2", "layer2"], stages)


def test_release_command_line_is_accepted_verbatim(monkeypatch, tmp_path):
    """Spec section 8, with every other option the release has."""
    seen = {}
    monkeypatch.setattr(runner, "run", lambda opts: seen.setdefault("opts", opts) and [])
    argv = ("--gpu 0 --seed 0 --test ckpt --results_path RES --log_group g --log_project p --run_name r "
            "net -b wideresnet50 -le layer2 -le layer3 --pretrain_embed_dimension 1536 "
            "--target_embed_dimension 1536 --patchsize 3 --meta_epochs 640 --eval_epochs 1 "
            "--dsc_layers 2 --dsc_hidden 1024 --pre_proj 1 --k 0.25 --dsc_margin 0.5 --train_backbone "
            "dataset --batch_size 8 --resize 288 --imagesize 288 --num_workers 2 -d carpet -d grid mvtec DATA").split()
    argv = [str(tmp_path / a) if a in ("RES", "DATA") else a for a in argv]
    assert main.cli(argv) == 0
    opts = seen["opts"]
    expected = pbas.PBASConfig(train_backbone=True)  # the dataclass defaults are the released values
    assert opts.config == expected
    assert opts.classes == ["carpet", "grid"] and opts.dataset == "mvtec" and opts.num_workers == 2
    assert opts.log_dir.endswith("logs/p/g/r") and opts.cache == "off"
