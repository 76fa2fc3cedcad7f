"""``main.py predict``: scores as in ``--test test``, thresholds, any image format/size, bad input (CPU)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import datasets
import engine
import inference
import main
import metrics
import runner
import utils
from conftest import TRAINED_CLASS as CLASS_NAME, TRAINED_IMAGESIZE as IMAGESIZE

ATOL = 1e-5


def predict_cli(checkpoint: Path, output: Path, *inputs: Path | str, extra: tuple[str, ...] = ()) -> int:
    return main.cli(["--gpu", "-1", "predict", "--checkpoint", str(checkpoint), *map(str, inputs), "--output", str(output), *extra])


def read_predictions(output: Path) -> dict[str, dict[str, str]]:
    with open(output / inference.PREDICTIONS_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == list(inference.PREDICTION_COLUMNS)
    return {row["path"]: row for row in rows}


def reference_scores(checkpoint: Path, mvtec_root: Path, split: int) -> tuple[datasets.AnomalyDataset, torch.Tensor]:
    """Image scores of the train (0) or test (1) set the way training and ``--test test`` compute them."""
    cpu = torch.device("cpu")
    model, ckpt = inference.load_model(str(checkpoint), cpu, runner.METHODS)
    sets = datasets.build_datasets("mvtec", str(mvtec_root), CLASS_NAME, ckpt["config"]["resize"], IMAGESIZE)
    source = engine.FeatureSource(model.encoder, sets[split], batch_size=4, num_workers=0, device=cpu, cache="off",
                                  grid=model.encoder.grid(IMAGESIZE, cpu))
    scores, _, _ = engine.predict(model.method, source)
    return sets[split], scores


def one_line_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


# ----------------------------------------------------------------------------------------------
# scores, thresholds, output files
# ----------------------------------------------------------------------------------------------


def test_predict_reproduces_test_scores_and_auroc(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert predict_cli(trained_checkpoint, out, mvtec_root / CLASS_NAME / "test", extra=("--batch_size", "3")) == 0
    rows = read_predictions(out)
    test_set, want = reference_scores(trained_checkpoint, mvtec_root, 1)
    assert len(rows) == len(test_set)
    got = torch.tensor([float(rows[s.image_path]["image_score"]) for s in test_set.samples])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    labels = torch.tensor([s.is_anomaly for s in test_set.samples])
    ckpt = torch.load(trained_checkpoint, weights_only=False)
    assert metrics.auroc(got, labels) == ckpt["best"]["metrics"][f"mvtec_{CLASS_NAME}"]["image_auroc"]
    for sample in test_set.samples:
        row = rows[sample.image_path]
        for column in ("overlay", "mask"):
            with Image.open(out / row[column]) as image:
                assert image.size == Image.open(sample.image_path).size
                pixels = np.asarray(image)
        assert set(np.unique(pixels)) <= {0, 255}  # the mask, read last
        expected = "anomalous" if float(row["image_score"]) > float(row["image_threshold"]) else "normal"
        assert row["decision"] == expected


def test_auto_thresholds_follow_the_documented_rule(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path):
    """image: max normal training score (so every training image is 'normal'); pixel: 0.999 quantile."""
    out = tmp_path / "out"
    assert predict_cli(trained_checkpoint, out, mvtec_root / CLASS_NAME / "train") == 0
    rows = read_predictions(out)
    normal = torch.load(trained_checkpoint, weights_only=False)["normal_scores"][f"mvtec_{CLASS_NAME}"]
    train_set, want = reference_scores(trained_checkpoint, mvtec_root, 0)
    got = torch.tensor([float(rows[s.image_path]["image_score"]) for s in train_set.samples])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, normal["image_scores"], atol=ATOL, rtol=0)
    image_threshold = float(normal["image_scores"].max())
    pixel_threshold = float(np.interp(0.999, normal["quantile_levels"].numpy(), normal["pixel_quantiles"].numpy()))
    assert inference.auto_thresholds(normal) == pytest.approx((image_threshold, pixel_threshold), abs=1e-12)
    for row in rows.values():
        assert float(row["image_threshold"]) == pytest.approx(image_threshold, abs=1e-12)
        assert float(row["pixel_threshold"]) == pytest.approx(pixel_threshold, abs=1e-12)
    assert {row["decision"] for row in rows.values()} == {"normal"}


def test_given_thresholds_override_auto(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path):
    out = tmp_path / "out"
    folder = mvtec_root / CLASS_NAME / "test" / "good"
    assert predict_cli(trained_checkpoint, out, folder, extra=("--threshold", "0", "--pixel_threshold", "1.5")) == 0
    rows = read_predictions(out)
    assert {row["decision"] for row in rows.values()} == {"anomalous"}
    assert {row["pixel_threshold"] for row in rows.values()} == {"1.5"}
    for row in rows.values():
        assert not np.asarray(Image.open(out / row["mask"])).any()  # sigmoid scores never exceed 1.5


# ----------------------------------------------------------------------------------------------
# any format, mode and size; unreadable files; unique output names
# ----------------------------------------------------------------------------------------------


def write_variants(source: Path, other: Path, folder: Path) -> dict[str, Path]:
    """Copies of a test image in other formats and modes, resized copies, and a file that is not an image."""
    rgb = Image.open(source).convert("RGB")
    paths = {name: folder / name for name in ("gray.jpg", "rgba.png", "copy.bmp", "copy.tiff", "big.png", "sub/copy.bmp")}
    paths["sub/copy.bmp"].parent.mkdir(parents=True)
    rgb.convert("L").save(paths["gray.jpg"], quality=95)
    rgb.convert("RGBA").save(paths["rgba.png"])
    rgb.save(paths["copy.bmp"])
    rgb.save(paths["copy.tiff"])
    Image.open(other).convert("RGB").resize((150, 97), Image.BILINEAR).save(paths["big.png"])
    rgb.save(paths["sub/copy.bmp"])
    paths["broken.png"] = folder / "broken.png"
    paths["broken.png"].write_bytes(np.random.default_rng(0).bytes(2000))
    return paths


def test_mixed_formats_sizes_and_an_unreadable_file(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture):
    good = mvtec_root / CLASS_NAME / "test" / "good"
    paths = write_variants(good / "000.png", good / "001.png", tmp_path / "in")
    out = tmp_path / "out"
    capsys.readouterr()
    assert predict_cli(trained_checkpoint, out, tmp_path / "in", good / "000.png") == 1  # 1: a file was skipped
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and str(paths["broken.png"]) in skipped[0]
    assert "Traceback" not in err
    rows = read_predictions(out)
    scored = {os.path.relpath(p, tmp_path / "in") for p in rows if p.startswith(str(tmp_path / "in"))}
    assert scored == set(paths) - {"broken.png"}
    assert len({row["overlay"] for row in rows.values()}) == len(rows) == len(paths)  # 6 variants + the original
    original = float(rows[str(good / "000.png")]["image_score"])
    for name in ("rgba.png", "copy.bmp", "copy.tiff", "sub/copy.bmp"):  # the same RGB pixels: the same score
        assert float(rows[str(paths[name])]["image_score"]) == pytest.approx(original, abs=ATOL)
    for name, path in paths.items():
        if name != "broken.png":
            row = rows[str(path)]
            assert 0.0 <= float(row["image_score"]) <= 1.0
            for column in ("overlay", "mask"):
                assert Image.open(out / row[column]).size == Image.open(path).size


def test_output_names_stay_apart(tmp_path: Path):
    for folder in ("a/x", "b/x"):
        (tmp_path / folder / "good").mkdir(parents=True)
        (tmp_path / folder / "good" / "000.png").write_bytes(b"")
        (tmp_path / folder / "good" / "000.jpg").write_bytes(b"")
    (tmp_path / "a" / "x" / "notes.txt").write_text("not an image")
    items = utils.collect_inputs([str(tmp_path / "a" / "x"), str(tmp_path / "b" / "x"), str(tmp_path / "a/x/good/000.png")])
    assert [i.name for i in items] == ["good__000_jpg", "good__000_png", "good__000_jpg-2", "good__000_png-2", "000_png"]
    assert items[0].path == str(tmp_path / "a" / "x" / "good" / "000.jpg")


# ----------------------------------------------------------------------------------------------
# geometry: the crop's map back at the original size
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height,resize,size", [(64, 64, 64, 64), (100, 80, 64, 56), (80, 100, 72, 64),
                                                      (50, 120, 64, 72), (333, 250, 96, 96)])
def test_anomaly_map_is_mapped_back_through_the_crop(width: int, height: int, resize: int, size: int):
    """Ramps x and y through torchvision Resize + CenterCrop, then back with to_original: the coordinates return."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    crop = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size)])(torch.stack([xs, ys]))  # [2, S, S]
    geometry = inference.CropGeometry.of(width, height, resize, size)
    assert (geometry.resized_width, geometry.resized_height) == tuple(transforms.Resize(resize)(xs[None]).shape[::-1][:2])
    back_x, inside = inference.to_original(crop[0], geometry)
    back_y, _ = inference.to_original(crop[1], geometry)
    sx, sy = width / geometry.resized_width, height / geometry.resized_height
    x0, y0 = geometry.left * sx, geometry.top * sy  # crop box in original pixels
    box = ((xs + 0.5 >= x0) & (xs + 0.5 < x0 + size * sx)) & ((ys + 0.5 >= y0) & (ys + 0.5 < y0 + size * sy))
    assert torch.equal(inside, box)
    assert not back_x[~inside].any()  # score 0 outside the crop
    margin = 2 * max(sx, sy) + 1  # away from the crop's edges and the zero padding of CenterCrop
    core = inside & (xs >= x0 + margin) & (xs < x0 + size * sx - margin) & (ys >= y0 + margin) & (ys < y0 + size * sy - margin)
    core &= (xs >= margin) & (xs < width - margin) & (ys >= margin) & (ys < height - margin)
    assert core.any()
    assert (back_x - xs)[core].abs().max() < 0.05 * sx + 1e-3
    assert (back_y - ys)[core].abs().max() < 0.05 * sy + 1e-3


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit code 2
# ----------------------------------------------------------------------------------------------


def test_corrupt_checkpoint_is_rejected(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture):
    bad = tmp_path / "random.pt"
    bad.write_bytes(np.random.default_rng(1).bytes(5000))
    capsys.readouterr()
    assert predict_cli(bad, tmp_path / "out", mvtec_root / CLASS_NAME / "test") == 2
    one_line_error(capsys, str(bad), "not a readable checkpoint")
    assert predict_cli(tmp_path / "missing.pt", tmp_path / "out", mvtec_root / CLASS_NAME / "test") == 2
    one_line_error(capsys, "no checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,words", [
    (lambda c: c["config"]["net"].update(dsc_hidden=16), ("does not match the configuration", "size mismatch")),
    (lambda c: c["config"]["net"].update(target_embed_dimension=32), ("does not match the configuration",)),
    (lambda c: c.update(complete=False), ("unfinished",)),
    (lambda c: c.update(format=99), ("checkpoint format",)),
])
def test_checkpoint_that_does_not_fit_is_rejected(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture, change, words):
    ckpt = torch.load(trained_checkpoint, weights_only=False)
    change(ckpt)
    path = tmp_path / "changed.pt"
    torch.save(ckpt, path)
    capsys.readouterr()
    assert predict_cli(path, tmp_path / "out", mvtec_root / CLASS_NAME / "test") == 2
    one_line_error(capsys, *words)


@pytest.mark.parametrize("args,words", [
    (("--threshold", "high"), ("--threshold", "'auto' or a number")),
    (("--pixel_threshold", "nan"), ("--pixel_threshold",)),
    (("--batch_size", "0"), ("--batch_size",)),
])
def test_bad_options_are_rejected(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture, args, words):
    capsys.readouterr()
    assert predict_cli(trained_checkpoint, tmp_path / "out", mvtec_root / CLASS_NAME / "test", extra=args) == 2
    one_line_error(capsys, *words)


def test_missing_inputs_are_rejected(trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    capsys.readouterr()
    assert predict_cli(trained_checkpoint, tmp_path / "out", tmp_path / "nothing-here") == 2
    one_line_error(capsys, "no such file or folder")
    (tmp_path / "empty").mkdir()
    assert predict_cli(trained_checkpoint, tmp_path / "out", tmp_path / "empty") == 2
    one_line_error(capsys, "no image files")
    assert main.cli(["predict", "--checkpoint", str(trained_checkpoint), "--output", str(tmp_path / "out")]) == 2
    one_line_error(capsys)


def test_old_checkpoint_without_normal_scores_needs_numbers(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture):
    ckpt = torch.load(trained_checkpoint, weights_only=False)
    del ckpt["normal_scores"]
    path = tmp_path / "old.pt"
    torch.save(ckpt, path)
    folder = mvtec_root / CLASS_NAME / "test" / "good"
    capsys.readouterr()
    assert predict_cli(path, tmp_path / "out", folder) == 2
    one_line_error(capsys, "no normal training scores")
    assert predict_cli(path, tmp_path / "out", folder, extra=("--threshold", "0.5", "--pixel_threshold", "0.5")) == 0


# ----------------------------------------------------------------------------------------------
# one output folder, several predicts
# ----------------------------------------------------------------------------------------------


def test_two_predicts_into_one_folder_keep_each_others_rows_and_files(trained_checkpoint: Path, mvtec_root: Path,
                                                                      tmp_path: Path):
    out = tmp_path / "out"
    a, b = tmp_path / "a", tmp_path / "b"  # two folders holding files of the same names
    for folder, source in ((a, "good"), (b, "scratch")):
        folder.mkdir()
        for i, image in enumerate(sorted((mvtec_root / CLASS_NAME / "test" / source).iterdir())[:2]):
            (folder / f"{i:03d}.png").write_bytes(image.read_bytes())
    assert predict_cli(trained_checkpoint, out, a) == 0
    first = read_predictions(out)
    overlays = {p: Image.open(out / r["overlay"]).tobytes() for p, r in first.items()}
    assert predict_cli(trained_checkpoint, out, b) == 0
    both = read_predictions(out)
    assert set(both) == set(first) | {str(b / "000.png"), str(b / "001.png")}
    assert len({r["overlay"] for r in both.values()}) == 4  # no file of the first run was overwritten
    for path, data in overlays.items():
        assert Image.open(out / both[path]["overlay"]).tobytes() == data
    assert predict_cli(trained_checkpoint, out, a) == 0  # the same images again: replaced, not duplicated
    again = read_predictions(out)
    assert set(again) == set(both) and {p: r["overlay"] for p, r in again.items()} == {p: r["overlay"] for p, r in both.items()}


def test_an_output_folder_that_cannot_be_written_is_a_one_line_error(trained_checkpoint: Path, mvtec_root: Path,
                                                                     tmp_path: Path, capsys: pytest.CaptureFixture):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    capsys.readouterr()
    assert predict_cli(trained_checkpoint, blocker, mvtec_root / CLASS_NAME / "test") == 2
    one_line_error(capsys, "--output", "not a folder")
    assert predict_cli(trained_checkpoint, blocker / "sub", mvtec_root / CLASS_NAME / "test") == 2
    one_line_error(capsys, "--output", "cannot be written")
