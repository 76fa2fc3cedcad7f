"""The Python API ``inference.load(checkpoint)(image)``: the scores, decisions, maps and masks of ``main.py predict``
for paths, PIL images and arrays, PBAS and CRAS multi-class (per-image class vote); bad input is one line (CPU)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import inference
import main
import runner
from conftest import TRAINED_CLASS

ATOL = 1e-5


def predicted(checkpoint: Path, folder: Path, out: Path) -> dict[str, dict[str, str]]:
    """predictions.csv rows of ``main.py predict`` on ``folder``, by path."""
    assert main.cli(["--gpu", "-1", "predict", "--checkpoint", str(checkpoint), str(folder), "--output", str(out),
                     "--batch_size", "3"]) == 0
    with open(out / inference.PREDICTIONS_NAME, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def assert_same_as_predict(scorer: inference.Scorer, rows: dict[str, dict[str, str]], out: Path) -> None:
    results = scorer.score_all(list(rows), batch_size=2)
    for (path, row), result in zip(rows.items(), results, strict=True):
        assert result.score == pytest.approx(float(row["image_score"]), abs=ATOL)
        assert result.decision == row["decision"] and result.classname == row["class"]
        assert result.image_threshold == float(row["image_threshold"])
        assert result.pixel_threshold == float(row["pixel_threshold"])
        mask = np.asarray(Image.open(out / row["mask"]))
        assert result.map.shape == result.mask.shape == mask.shape == np.asarray(Image.open(path)).shape[:2]
        assert result.map.dtype == np.float32
        np.testing.assert_array_equal(result.mask, mask == 255)


def test_load_scores_as_predict_does(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path):
    rows = predicted(trained_checkpoint, mvtec_root / TRAINED_CLASS / "test", tmp_path / "out")
    assert {row["decision"] for row in rows.values()} == {"normal", "anomalous"}  # both decisions are checked
    assert_same_as_predict(inference.load(str(trained_checkpoint)), rows, tmp_path / "out")


def test_cras_multi_class_scores_each_image_with_its_own_bank(cras_checkpoint: Path, mvtec_root: Path, tmp_path: Path):
    folder = tmp_path / "mixed"  # images of both classes in one folder: a batch holds both
    folder.mkdir()
    for name in ("texture", "object"):
        for source in sorted((mvtec_root / name / "test").rglob("*.png"))[::2]:
            (folder / f"{name}_{source.parent.name}_{source.name}").write_bytes(source.read_bytes())
    rows = predicted(cras_checkpoint, folder, tmp_path / "out")
    assert {row["class"] for row in rows.values()} == {"mvtec_texture", "mvtec_object"}
    assert_same_as_predict(inference.load(str(cras_checkpoint)), rows, tmp_path / "out")


def test_a_path_a_pil_image_and_an_array_score_alike(trained_checkpoint: Path, mvtec_root: Path):
    scorer = inference.load(str(trained_checkpoint))
    path = sorted((mvtec_root / TRAINED_CLASS / "test").rglob("*.png"))[-1]
    rgb = Image.open(path).convert("RGB").resize((80, 70))  # not square, not the network size
    by_pil, by_array = scorer(rgb), scorer(np.asarray(rgb))
    assert by_pil.score == by_array.score and by_pil.map.shape == (70, 80)
    np.testing.assert_array_equal(by_pil.map, by_array.map)
    gray = np.asarray(rgb.convert("L"))
    assert scorer(gray).score == scorer(np.repeat(gray[..., None], 3, axis=2)).score
    assert scorer(path).score == scorer(str(path)).score == scorer(Image.open(path)).score


def test_given_thresholds_replace_the_automatic_ones(trained_checkpoint: Path, mvtec_root: Path):
    path = sorted((mvtec_root / TRAINED_CLASS / "test" / "good").glob("*.png"))[0]
    result = inference.load(str(trained_checkpoint), threshold=-1.0, pixel_threshold=2.0)(path)
    assert result.decision == "anomalous" and result.image_threshold == -1.0 and not result.mask.any()


@pytest.mark.parametrize("image,words", [
    (np.zeros((8, 8, 3), dtype=np.float32), "uint8"),
    (np.zeros((8, 8, 4), dtype=np.uint8), "[8, 8, 4]"),
    (np.zeros((0, 8, 3), dtype=np.uint8), "uint8"),
    ([1, 2, 3], "list"),
    ("no/such/file.png", "no/such/file.png"),
])
def test_bad_images_are_one_line_errors(trained_checkpoint: Path, image, words):
    scorer = inference.load(str(trained_checkpoint))
    with pytest.raises(inference.UserError) as info:
        scorer(image)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_load_refuses_what_is_not_a_checkpoint(tmp_path: Path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(inference.UserError, match="not a readable checkpoint"):
        inference.load(str(bad))


def test_the_default_methods_are_the_run_registry():
    assert inference.default_methods() == runner.METHODS
