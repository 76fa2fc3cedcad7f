"""Segmentation trained on synthetic anomalies (segment/): split, metrics, baseline synthesis, training that finds
the matching real defects, predict / ONNX parity, exact resume, bad input. Tiny data, 32-pixel crops, CPU."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
import metrics
import runstate
import utils
from datasets.synthetic import make_dataset
from segment import data as segdata
from segment import evaluate, networks, predict, synthesis, train

SIZE = 64  # generated images
CROP = 32  # network input
# the real class: 3 defect types x 3 anomalies (the first of each is the synthesis part with --anomaly_split third)
REAL = {"n_train": 8, "n_test_good": 4, "n_test_defect": 9}
# 'easy' synthetic anomalies: the same generator (other seed), so they match the real defects
EASY = {"n_train": 1, "n_test_good": 1, "n_test_defect": 24}
TRAIN = ("--encoder", "efficientnet_lite0", "--imagesize", str(CROP), "--resize", str(CROP), "--steps", "12",
         "--batch_size", "8", "--lr", "2e-3", "--num_workers", "0")


@pytest.fixture(scope="module")
def real_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg_real")
    make_dataset(root, classes=("texture",), size=SIZE, seed=0, **REAL)
    return root


@pytest.fixture(scope="module")
def easy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg_easy")
    make_dataset(root, classes=("texture",), size=SIZE, seed=1, **EASY)
    return root


@pytest.fixture(scope="module")
def trained(real_root: Path, easy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder with a segmenter trained through the CLI on the easy synthetic anomalies."""
    results = tmp_path_factory.mktemp("seg_results")
    code = main.cli(["--gpu", "-1", "--seed", "0", "--results_path", str(results), "segment", "mvtec", str(real_root),
                     "-d", "texture", "--synthetic", str(easy_root), "--source", "easy", *TRAIN])
    assert code == 0
    return results


def job_folder(results: Path) -> Path:
    return results / "models" / "segment-easy-third" / "mvtec_texture" / "seed0"


def test_split_never_leaks(real_root: Path, easy_root: Path) -> None:
    data = segdata.load_class("mvtec", str(real_root), str(easy_root), "texture", CROP, CROP, "third")
    real_test = [s for s in data.test.samples]
    held = {s.image_path for s in data.synthesis_part}
    assert len(held) == 3 and {os.path.basename(p) for p in held} == {"000.png"}  # the first of each defect by name
    assert held.isdisjoint(s.image_path for s in real_test)
    assert {s.mask_path for s in data.synthesis_part}.isdisjoint(s.mask_path for s in real_test)
    assert sum(s.is_anomaly for s in real_test) == 6 and sum(1 - s.is_anomaly for s in real_test) == 4
    training = {p for ds in (data.normal, data.synthetic) for s in ds.samples for p in (s.image_path, s.mask_path) if p}
    real_files = {p for s in real_test + data.synthesis_part for p in (s.image_path, s.mask_path) if p}
    assert training.isdisjoint(real_files)
    everything = segdata.load_class("mvtec", str(real_root), str(easy_root), "texture", CROP, CROP, "all")
    assert len(everything.test) == REAL["n_test_good"] + REAL["n_test_defect"]
    # the real dataset given as the synthetic folder is refused
    with pytest.raises(segdata.DatasetError, match="real test set"):
        segdata.load_class("mvtec", str(real_root), str(real_root), "texture", CROP, CROP, "third")


def test_class_row_headlines_the_fixed_threshold_and_names_the_test_optimal_one_oracle() -> None:
    maps = torch.tensor([[[0.9, 0.8, 0.1], [0.7, 0.2, 0.3]]])
    # a resized mask: the 0.7 edge is a defect pixel under the rule the segmenter trains with (above 0.5)
    masks = torch.tensor([[[1.0, 0, 0], [1, 0, 0.7]]])
    # pixels above 0.5: TP 2, FP 1, FN 1 -> F1 2/3, IoU 1/2; the test-optimal threshold 0.3: F1 6/7, IoU 3/4
    maps2 = torch.cat([maps, maps * 0.1])  # a normal image below every threshold above: the F1 figures unchanged
    masks2 = torch.cat([masks, torch.zeros_like(masks)])
    scores = torch.tensor([0.45, 0.3])  # the defective image is below 0.5: image F1 0 at the segmenter's threshold
    row = evaluate.class_row(scores, maps2, torch.tensor([1, 0]), masks2, steps=7)
    assert evaluate.THRESHOLD == predict.DEFAULT_THRESHOLD == 0.5  # what segment-predict decides with
    assert row["pixel_f1_threshold"] == row["image_f1_threshold"] == 0.5
    assert row["pixel_f1"] == pytest.approx(2 / 3) and row["pixel_iou"] == pytest.approx(1 / 2)
    assert row["pixel_f1_oracle"] == pytest.approx(6 / 7) and row["pixel_iou_oracle"] == pytest.approx(3 / 4)
    assert row["pixel_f1_threshold_oracle"] == pytest.approx(0.3)
    assert row["image_f1"] == 0.0 and row["image_f1_oracle"] == 1.0 and row["image_f1_threshold_oracle"] == pytest.approx(0.45)
    gt = metrics.pixel_ground_truth(metrics.binarize_masks(masks2, "half"))
    assert row["pixel_aupro"] == metrics.aupro(gt, maps2) and row["pixel_auroc"] == metrics.auroc(maps2, gt)
    assert row["image_auroc"] == 1.0
    assert row["best_epoch"] == row["last_epoch"] == 7 and row["last_pixel_auroc"] == row["pixel_auroc"]
    # every figure of the row has a column in the results tables
    assert set(row) <= set(utils.RESULT_COLUMNS)


def test_rows_written_before_the_oracle_names_are_read_as_oracles() -> None:
    old = {"image_auroc": 0.9, "image_f1_threshold": 0.31, "image_f1": 0.8, "pixel_f1": 0.6, "pixel_iou": 0.43,
           "pixel_f1_threshold": 0.2}
    new = utils.upgrade_metrics_row(old)
    assert new == {"image_auroc": 0.9, "image_f1_threshold_oracle": 0.31, "image_f1_oracle": 0.8, "pixel_f1_oracle": 0.6,
                   "pixel_iou_oracle": 0.43, "pixel_f1_threshold_oracle": 0.2}
    current = {**new, "pixel_f1": 0.5}
    assert utils.upgrade_metrics_row(current) is current


def test_baseline_synthesis(real_root: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mask = synthesis.perlin_mask((48, 40), rng)
    assert mask.shape == (48, 40) and synthesis.MIN_AREA <= mask.mean() <= synthesis.MAX_AREA
    image = np.full((48, 40, 3), 100, np.uint8)
    out, m = synthesis.synthesize(image, np.full_like(image, 30), np.random.default_rng(1))
    assert set(np.unique(m)) <= {0, 255} and (out[m == 0] == 100).all() and (out[m == 255] != 100).any()
    for name in ("a", "b"):  # seeded: the same command writes the same files
        args = ["--seed", "3", "synth-baseline", "mvtec", str(real_root), "-d", "texture", "--output",
                str(tmp_path / name), "--count", "3", "--texture", "other"]
        assert main.cli(args) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert [str(p) for p in files] == ["texture/ground_truth/perlin/0000_mask.png", "texture/ground_truth/perlin/0001_mask.png",
                                       "texture/ground_truth/perlin/0002_mask.png", "texture/test/perlin/0000.png",
                                       "texture/test/perlin/0001.png", "texture/test/perlin/0002.png"]
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in files)
    # what segment reads from it: 3 anomalies with their (non-empty) masks, the real image size
    samples = segdata.synthetic_samples(str(tmp_path / "a"), "texture", "third")
    assert len(samples) == 3 and all(Image.open(s.mask_path).size == (SIZE, SIZE) for s in samples)


def test_segment_finds_matching_defects(trained: Path) -> None:
    rows = {r["Row Names"]: r for r in csv.DictReader(open(trained / "results.csv"))}
    row = rows["mvtec_texture"]
    assert row["method"] == "segment" and row["setting"] == "easy:third"
    assert float(row["pixel_auroc"]) > 0.9 and float(row["pixel_iou_oracle"]) > 0.3 and float(row["image_auroc"]) > 0.8
    # the headline decides at the segmenter's 0.5 (after 12 steps it still calls too many pixels defective); the
    # test-optimal threshold can only do as well or better
    assert float(row["pixel_iou"]) > 0.2 and float(row["image_f1"]) > 0.5
    assert float(row["pixel_f1_threshold"]) == float(row["image_f1_threshold"]) == 0.5
    assert float(row["pixel_iou_oracle"]) >= float(row["pixel_iou"]) and float(row["image_f1_oracle"]) >= float(row["image_f1"])
    folder = job_folder(trained)
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert ckpt["complete"] and ckpt["kind"] == "segment" and len(ckpt["synthesis_part"]) == 3
    scores = list(csv.DictReader(open(folder / "scores.csv")))
    assert len(scores) == 10 and all((folder / r["heatmap"]).is_file() for r in scores)
    page = (trained / "report.html").read_text()
    assert "pixel_iou" in page and "pixel_iou_oracle" in page and "image threshold fixed before testing 0.5" in page
    # the loss log the report plots: per logged step (every tenth of a short run and the last one; 12 steps here)
    log = list(csv.DictReader(open(folder / "loss.csv")))
    assert list(log[0]) == ["step", "loss", "focal", "dice"] and [r["step"] for r in log] == [str(s) for s in range(1, 13)]
    assert "models_segment-easy-third_mvtec_texture_seed0_epochs.png" in (trained / "report.html").read_text()


def test_predict_and_onnx_parity(trained: Path, real_root: Path, tmp_path: Path) -> None:
    path = job_folder(trained) / "checkpoint.pt"
    graph, _ = predict.load(str(path))
    images = sorted((real_root / "texture" / "test").rglob("*.png"))
    assert main.cli(["--gpu", "-1", "segment-predict", str(real_root / "texture" / "test"), "--checkpoint", str(path),
                     "--output", str(tmp_path / "pred")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert len(rows) == len(images)
    # the map of predict = the network's map of the same input (same crop at the original size here: 64 -> 32)
    transform = segdata.datasets.image_transform(CROP, CROP)
    batch = torch.stack([transform(segdata.datasets.read_rgb(p)) for p in images])
    with torch.no_grad():
        scores, maps = graph(batch)
    by_path = {r["path"]: r for r in rows}
    for p, s, m in zip(images, scores, maps):
        r = by_path[str(p)]
        assert float(r["image_score"]) == pytest.approx(float(s), abs=1e-6)
        mask = np.asarray(Image.open(tmp_path / "pred" / r["mask"]))
        assert mask.shape == (SIZE, SIZE)
        up = torch.nn.functional.interpolate(m[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
        assert ((mask > 0) == (up > 0.5).numpy()).mean() > 0.99
    assert main.cli(["segment-export", "--checkpoint", str(path), "--output", str(tmp_path / "seg.onnx")]) == 0
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"])
    got_scores, got_maps = session.run(None, {"images": batch.numpy()})
    assert np.abs(got_scores - scores.numpy()).max() < 1e-4 and np.abs(got_maps - maps.numpy()).max() < 1e-4


def test_resume_is_exact(real_root: Path, easy_root: Path, tmp_path: Path) -> None:
    data = segdata.load_class("mvtec", str(real_root), str(easy_root), "texture", CROP, CROP, "third")
    images = segdata.TrainImages(data.normal, data.synthetic)
    config = train.SegmentConfig(arch="segformer", encoder="efficientnet_lite0", encoder_weights="none",  # the option
                                 imagesize=CROP, resize=CROP, steps=4, batch_size=2)
    job = {"net": config.to_dict()}

    def run(state: Path, stop_at: int | None = None) -> dict:
        utils.set_seed(0)
        model = networks.create(config.arch, config.encoder, config.encoder_weights)
        hook = (lambda step: runstate.request_stop(signal.SIGTERM) if step == stop_at else None)
        train.fit(model, images, config, job, 0, str(state), torch.device("cpu"), on_step=hook)
        return model.state_dict()

    whole = run(tmp_path / "whole.pt")
    runstate.request_stop(0)
    try:
        with pytest.raises(runstate.Interrupted):
            run(tmp_path / "stopped.pt", stop_at=2)
    finally:
        runstate.request_stop(0)
    assert torch.load(tmp_path / "stopped.pt", weights_only=True)["step"] == 2
    resumed = run(tmp_path / "stopped.pt")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    with pytest.raises(utils.UserError, match="another configuration"):
        train.read(str(tmp_path / "stopped.pt"), {"net": {}})


class _Bar:
    """Records what fit() shows on its progress bar."""

    def __init__(self, total: int, initial: int, disable: bool) -> None:
        self.total, self.initial, self.disable = total, initial, disable  # disable: not a terminal, no bar
        self.updates, self.postfix, self.closed = 0, {}, False

    def update(self, n: int) -> None:
        self.updates += n

    def set_postfix(self, refresh: bool = True, **values: str) -> None:
        self.postfix = values

    def close(self) -> None:
        self.closed = True


def test_progress_from_the_first_step_at_the_current_rate(real_root: Path, easy_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A bar over every step from the first (on a terminal: no log lines between its updates); without a terminal,
    log lines whose s/step is that of the steps since the previous line (a fake clock: steps of 1, 1, 5, 5 s), not
    the running average since the start (7 / 3 s at step 3)."""
    import types

    data = segdata.load_class("mvtec", str(real_root), str(easy_root), "texture", CROP, CROP, "third")
    images = segdata.TrainImages(data.normal, data.synthetic)
    config = train.SegmentConfig(arch="segformer", encoder="efficientnet_lite0", encoder_weights="none",
                                 imagesize=CROP, resize=CROP, steps=4, batch_size=2)
    bars: list[_Bar] = []
    shown = [False, True]  # the first run without a terminal (no bar), the second with one

    def progress(_iterable, _desc: str, total: int, initial: int = 0) -> _Bar:
        bars.append(_Bar(total, initial, disable=not shown[len(bars)]))
        return bars[-1]

    monkeypatch.setattr(utils, "progress", progress)
    clock = iter([0.0, 1.0, 2.0, 7.0, 12.0] + [0.0] * 5)  # the start, then the time of each progress line
    monkeypatch.setattr(train, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    model = torch.nn.Conv2d(3, 1, 1)  # any network of images [B, 3, S, S] -> logits [B, 1, S, S]: a tiny one
    for run, bar in enumerate(shown):
        caplog.clear()
        with caplog.at_level("INFO", logger="pbas"):
            history = train.fit(model, images, config, {"net": config.to_dict(), "class": "texture"}, 0,
                                str(tmp_path / f"state{run}.pt"), torch.device("cpu"))
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
        if bar:  # the bar shows the steps, the loss and the rate: no lines between its updates
            assert lines == []
        else:
            assert [line.split("(")[1] for line in lines] == [f"{t:.2f} s/step over the last 1)" for t in (1, 1, 5, 5)]
        assert [h["step"] for h in history] == [1, 2, 3, 4]  # a row every tenth of a short run, at least every step
    for bar in bars:
        assert (bar.total, bar.initial, bar.updates, bar.closed) == (4, 0, 4, True) and "loss" in bar.postfix
    assert train.log_every(config) == 1 and train.log_every(train.SegmentConfig()) == train.LOG_EVERY


def _cli_error(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    assert main.cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input(real_root: Path, easy_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    def segment(real: Path, synth: Path, *extra: str) -> list[str]:
        return ["--gpu", "-1", "--results_path", str(tmp_path / "res"), "segment", "mvtec", str(real), "-d", "texture",
                "--synthetic", str(synth), *TRAIN, *extra]

    no_masks = Path(shutil.copytree(easy_root, tmp_path / "no_masks"))
    shutil.rmtree(no_masks / "texture" / "ground_truth")
    assert "ground_truth" in _cli_error(capsys, segment(real_root, no_masks))
    resized = Path(shutil.copytree(easy_root, tmp_path / "resized"))
    mask = next((resized / "texture" / "ground_truth").rglob("*.png"))
    Image.open(mask).resize((SIZE // 2, SIZE // 2)).save(mask)
    assert "must have its image's size" in _cli_error(capsys, segment(real_root, resized))
    no_normals = Path(shutil.copytree(real_root, tmp_path / "no_normals"))
    for image in (no_normals / "texture" / "train" / "good").iterdir():
        image.unlink()
    assert "no images" in _cli_error(capsys, segment(no_normals, easy_root))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    err = _cli_error(capsys, segment(real_root, easy_root, "--encoder", "resnet18", "--encoder_weights", "imagenet"))
    assert "resnet18-" in err and "--encoder_weights" in err
    assert "multiple of 32" in _cli_error(capsys, segment(real_root, easy_root, "--imagesize", "48", "--resize", "48"))
    assert "--test test: no finished checkpoint" in _cli_error(capsys, ["--test", "test", *segment(real_root, easy_root)])
    assert not (tmp_path / "res" / "models").exists()  # nothing trained or written for bad input
    assert "checkpoint" in _cli_error(capsys, ["segment-export", "--checkpoint", str(mask),
                                                               "--output", str(tmp_path / "x.onnx")])


class _RunsCode:
    """Unpickling this runs code (creates a file): what a tampered weights file could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_default_encoder_weights_come_from_the_hub_cache_only(real_root: Path, easy_root: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The default encoder (resnet34) follows the backbones' policy: read from $TORCH_HOME/hub/checkpoints with
    weights_only, never downloaded; a missing file names its exact path, a file with code in it is refused unrun."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    downloads = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: downloads.append(a))
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    args = ["--gpu", "-1", "--results_path", str(tmp_path / "res"), "segment", "mvtec", str(real_root), "-d",
            "texture", "--synthetic", str(easy_root), "--imagesize", str(CROP), "--resize", str(CROP)]
    err = _cli_error(capsys, args)  # no --encoder: the default resnet34
    assert f"put resnet34-b627a593.pth (from https://download.pytorch.org/models/resnet34-b627a593.pth) at {path}" in err
    assert downloads == []
    path.parent.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"conv1.weight": _RunsCode(str(marker))}, path)
    err = _cli_error(capsys, args)
    assert f"{path} is not a plain weights file (it asks to run code" in err and not marker.exists()
    assert not (tmp_path / "res" / "models").exists()
    source = torchvision.models.resnet34(weights=None).state_dict()  # the torchvision file's keys and shapes
    torch.save(source, path)
    model = networks.create("unet", "resnet34", "imagenet")
    assert torch.equal(model.encoder.layer3[5].conv2.weight, source["layer3.5.conv2.weight"])


def baseline(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--seed", "3", "synth-baseline", "mvtec", str(data), "-d", "texture", "--output", str(out), "--count", "2",
            *extra]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_baseline_output_inside_the_dataset_is_refused(real_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    data = Path(shutil.copytree(real_root, tmp_path / "real"))
    before = files(data)
    for out in (data, data / "texture" / "synth", tmp_path / "link"):
        if out.name == "link":
            out.symlink_to(data)  # the same folder under another name
        err = _cli_error(capsys, baseline(data, out))
        assert err.startswith(f"error: --output {out} is inside DATAPATH {data}")
    assert files(data) == before  # nothing written beside the real images


def test_baseline_folder_holds_one_configuration(real_root: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "synth"
    assert main.cli(baseline(real_root, out)) == 0
    written = files(out)
    record = json.loads((out / "texture" / "synth-baseline-perlin.json").read_text())
    assert (record["pairs"], record["seed"], record["texture"], record["anomaly_split"]) == (2, 3, "self", None)
    assert len(record["normals"]) == REAL["n_train"]
    assert "(different texture)" in _cli_error(capsys, baseline(real_root, out, "--texture", "other"))
    assert "(different pairs)" in _cli_error(capsys, baseline(real_root, out, "--count", "3"))
    assert files(out) == written  # no pair of another configuration mixed in
    assert main.cli(baseline(real_root, out)) == 0 and files(out) == written  # the same command: the same files
    foreign = tmp_path / "foreign"  # pairs without a record (another program's, or an earlier version's)
    shutil.copytree(out / "texture" / "test", foreign / "texture" / "test")
    assert "no synth-baseline record" in _cli_error(capsys, baseline(real_root, foreign))
    for split in ("third", "all"):  # a synthesis that saw no real anomaly fits either split
        segdata.load_class("mvtec", str(real_root), str(out), "texture", CROP, CROP, split)


def test_an_unfinished_synthetic_folder_is_refused(real_root: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "synth"
    assert main.cli(baseline(real_root, out)) == 0
    for path in (out / "texture" / "test" / "perlin" / "0001.png", out / "texture" / "ground_truth" / "perlin" / "0001_mask.png"):
        path.unlink()  # as if stopped after the first pair
    err = _cli_error(capsys, ["--gpu", "-1", "--results_path", str(tmp_path / "res"), "segment", "mvtec",
                              str(real_root), "-d", "texture", "--synthetic", str(out), *TRAIN])
    assert "holds 1 of the 2 perlin pairs" in err and "synth-baseline-perlin.json" in err
    assert not (tmp_path / "res" / "models").exists()


def test_a_damaged_checkpoint_stops_the_run_unless_set_aside(real_root: Path, easy_root: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "res"
    ckpt = results / "models" / "segment-easy-third" / "mvtec_texture" / "seed0" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"truncated")
    args = ["--results_path", str(results), "segment", "mvtec", str(real_root), "-d", "texture", "--synthetic",
            str(easy_root), "--source", "easy", *TRAIN, "--steps", "2", "--encoder_weights", "none"]
    err = _cli_error(capsys, ["--gpu", "-1", *args])
    assert str(ckpt) in err and "pass --discard_damaged_state" in err
    assert main.cli(["--gpu", "-1", "--discard_damaged_state", *args]) == 0
    assert (ckpt.parent / "checkpoint.pt.damaged").read_bytes() == b"truncated"
    assert torch.load(ckpt, weights_only=True)["complete"]


def test_the_default_source_names_what_is_wrong(real_root: Path, easy_root: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    def segment(synth: Path) -> list[str]:
        return ["--gpu", "-1", "--results_path", str(tmp_path / "res"), "segment", "mvtec", str(real_root),
                "-d", "texture", "--synthetic", str(synth), *TRAIN]

    err = _cli_error(capsys, segment(tmp_path / "no-such"))
    assert f"synthetic folder '{tmp_path / 'no-such'}' does not exist" in err
    dashed = Path(shutil.copytree(easy_root, tmp_path / "my-synth"))
    err = _cli_error(capsys, segment(dashed))
    assert "folder's name 'my-synth'" in err and "give --source NAME" in err and "--source 'my-synth'" not in err


def test_one_class_pipeline_script(tmp_path: Path) -> None:
    """shell/run-panda-segment.sh: PANDA train -> generate into SYNTH/panda -> segment on it -> the Perlin baseline
    through the same segmenter, in that order (main.py replaced by a stub that records its command lines)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/usr/bin/env bash\necho "$@" >> "$STUB_LOG"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "calls.log"),
           "DATAPATH": "/data/mvtec", "LDM": "/models/ldm", "RESULTS": str(tmp_path / "res")}
    script = Path(__file__).resolve().parent.parent / "shell" / "run-panda-segment.sh"
    subprocess.run(["bash", str(script), "mvtec", "carpet", "--precision", "bf16"], env=env, check=True, capture_output=True)
    synth = tmp_path / "res" / "synthetic"
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [c.split(" --precision bf16 ")[1].split()[0] for c in calls] == [
        "panda-train", "panda-generate", "segment", "synth-baseline", "segment"]
    assert f"--output {synth}/panda" in calls[1] and f"--synthetic {synth}/panda --anomaly_split third" in calls[2]
    assert "-d carpet" in calls[3] and f"--output {synth}/perlin" in calls[3]
    assert f"--synthetic {synth}/perlin" in calls[4]
    assert subprocess.run(["bash", str(script), "mvtec"], env=env, capture_output=True).returncode == 2


def test_encoder_weights_file(tmp_path: Path) -> None:
    """--encoder_weights PATH: a torchvision classification state dict fills the smp ResNet encoder (head ignored);
    weights of another network are refused in one line."""
    import torchvision

    source = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(source, tmp_path / "r18.pth")
    model = networks.create("unet", "resnet18", str(tmp_path / "r18.pth"))
    assert torch.equal(model.encoder.conv1.weight, source["conv1.weight"])
    assert torch.equal(model.encoder.layer4[1].bn2.running_var, source["layer4.1.bn2.running_var"])
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(utils.UserError, match="not resnet18 weights"):
        networks.create("unet", "resnet18", str(tmp_path / "other.pth"))
