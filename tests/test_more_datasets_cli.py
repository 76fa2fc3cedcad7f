"""MVTec AD 2, BTAD and the generic folder dataset train and evaluate from the command line (tiny data: the
conftest's generated 'texture' class rearranged into each layout)."""
from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

import main

NET = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "32",
       "--target_embed_dimension", "32", "--dsc_hidden", "16", "--meta_epochs", "2"]
DATA = ["dataset", "--batch_size", "4", "--resize", "64", "--imagesize", "64", "--num_workers", "0"]


def source(mvtec_root: Path):
    """(train images, good test images, [(defect, image, mask)]) of the generated class 'texture'."""
    cls = mvtec_root / "texture"
    defects = [(d.name, image, mask) for d in sorted((cls / "test").iterdir()) if d.name != "good"
               for image, mask in zip(sorted(d.iterdir()), sorted((cls / "ground_truth" / d.name).iterdir()))]
    return sorted((cls / "train" / "good").iterdir()), sorted((cls / "test" / "good").iterdir()), defects


def copy(src: Path, dst: Path, fmt: str | None = None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if fmt is None:
        shutil.copy(src, dst)
    else:
        Image.open(src).save(dst, format=fmt)


def as_mvtec_ad2(mvtec_root: Path, root: Path) -> None:
    train, good, defects = source(mvtec_root)
    cls = root / "walnuts"
    for f in train:
        copy(f, cls / "train" / "good" / f.name)
    copy(train[0], cls / "validation" / "good" / train[0].name)
    for f in good:
        copy(f, cls / "test_public" / "good" / f.name)
    for defect, image, mask in defects:
        copy(image, cls / "test_public" / "bad" / f"{defect}_{image.name}")
        copy(mask, cls / "test_public" / "ground_truth" / "bad" / f"{defect}_{image.stem}_mask.png")


def as_btad(mvtec_root: Path, root: Path) -> None:
    train, good, defects = source(mvtec_root)
    cls = root / "03"
    for f in train:
        copy(f, cls / "train" / "ok" / f"{f.stem}.bmp", "BMP")
    for f in good:
        copy(f, cls / "test" / "ok" / f"{f.stem}.bmp", "BMP")
    for i, (_, image, mask) in enumerate(defects):
        copy(image, cls / "test" / "ko" / f"{i:04d}.bmp", "BMP")
        copy(mask, cls / "ground_truth" / "ko" / f"{i:04d}.png")


def as_folder(mvtec_root: Path, root: Path, masks: bool) -> None:
    train, good, defects = source(mvtec_root)
    cls = root / "widget"
    for f in train:
        copy(f, cls / "train" / f.name)
    for f in good:
        copy(f, cls / "test" / "normal" / f.name)
    for defect, image, mask in defects:
        copy(image, cls / "test" / defect / image.name)
        if masks:
            copy(mask, cls / "masks" / defect / f"{image.stem}_mask.png")


def run(results: Path, root: Path, dataset: str, classname: str) -> dict[str, str]:
    assert main.cli(["--gpu", "-1", "--results_path", str(results), *NET, *DATA, "-d", classname, dataset, str(root)]) == 0
    with open(results / "results.csv") as f:
        rows = {r["Row Names"]: r for r in csv.DictReader(f)}
    assert list(rows) == [f"{dataset}_{classname}", "Mean"]
    return rows[f"{dataset}_{classname}"]


@pytest.mark.parametrize("dataset,classname,layout", [("mvtec_ad2", "walnuts", as_mvtec_ad2), ("btad", "03", as_btad)])
def test_mvtec_ad2_and_btad_train_and_evaluate(mvtec_root: Path, tmp_path: Path, dataset, classname, layout):
    layout(mvtec_root, tmp_path / "data")
    row = run(tmp_path / "r", tmp_path / "data", dataset, classname)
    for key in ("image_auroc", "pixel_auroc", "pixel_pro", "pixel_aupro", "pixel_aupro_05"):
        assert 0.0 <= float(row[key]) <= 1.0, key
    if dataset == "mvtec_ad2":
        assert float(row["pixel_aupro_05"]) != float(row["pixel_aupro"])  # both limits are reported


def test_folder_dataset_with_and_without_masks(mvtec_root: Path, tmp_path: Path):
    as_folder(mvtec_root, tmp_path / "with", masks=True)
    as_folder(mvtec_root, tmp_path / "without", masks=False)
    with_masks = run(tmp_path / "r1", tmp_path / "with", "folder", "widget")
    without = run(tmp_path / "r2", tmp_path / "without", "folder", "widget")
    assert 0.0 <= float(with_masks["pixel_auroc"]) <= 1.0
    assert 0.0 <= float(without["image_auroc"]) <= 1.0  # selected on I-AUROC alone (the undefined P-AUROC counts 0)
    for key in ("pixel_auroc", "pixel_ap", "pixel_pro", "pixel_aupro"):  # image metrics only without masks
        assert math.isnan(float(without[key])), key


def test_folder_dataset_needs_its_classes(tmp_path: Path, capfd):
    code = main.cli(["--results_path", str(tmp_path / "r"), "net", "dataset", "folder", str(tmp_path)])
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and "-d" in err[0]
