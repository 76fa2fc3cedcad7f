"""Tests of the MVTec AD 2, BTAD and folder datasets (datasets/mvtec_ad2.py, btad.py, folder.py, build_datasets)
on tiny generated layouts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from conftest import dataset_error as _error
from datasets import (
    CLASSES,
    DATASET_NAMES,
    LAYOUT_BTAD,
    LAYOUT_FOLDER,
    LAYOUT_MVTEC,
    LAYOUT_MVTEC_AD2,
    LAYOUTS,
    AnomalyDataset,
    build_datasets,
    dataset_layout,
    effective_resize,
    split_job_name,
)

W, H = 10, 10  # size of the generated images and masks
S = 15  # resize = imagesize of the builds: 10 -> 15 makes bilinear mask edges fractional




def _image(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H), (value, value // 2, 255 - value)).save(path)


def _mask(path: Path, column: int = 5) -> None:
    """0/255 mask whose columns from `column` on are defective (column identifies the mask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((H, W), dtype=np.uint8)
    array[:, column:] = 255
    Image.fromarray(array).save(path)


def _names(samples, attribute: str = "image_path") -> list:
    return [None if getattr(s, attribute) is None else os.path.basename(getattr(s, attribute)) for s in samples]


def _build(dataset: str, root: Path, classname: str) -> tuple[AnomalyDataset, AnomalyDataset]:
    return build_datasets(dataset, root, classname, S, S)


def _fractional(dataset: AnomalyDataset) -> bool:
    masks = torch.stack([dataset.mask(i) for i, s in enumerate(dataset.samples) if s.is_anomaly])  # [N, 1, S, S]
    return bool(((masks > 0) & (masks < 1)).any())


# ----------------------------------------------------------------------------- names, layouts, resize

def test_names_classes_layouts() -> None:
    assert DATASET_NAMES[4:] == ("mvtec_ad2", "btad", "folder")
    assert CLASSES["mvtec_ad2"] == ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs",
                                    "walnuts")
    assert CLASSES["btad"] == ("01", "02", "03") and CLASSES["folder"] == ()
    assert {LAYOUT_MVTEC_AD2, LAYOUT_BTAD, LAYOUT_FOLDER} <= set(LAYOUTS) and len(set(LAYOUTS)) == len(LAYOUTS)
    assert [dataset_layout(name, "/nowhere", "x") for name in ("mvtec_ad2", "btad", "folder", "mpdd")] == [
        LAYOUT_MVTEC_AD2, LAYOUT_BTAD, LAYOUT_FOLDER, LAYOUT_MVTEC]
    for dataset in ("mvtec_ad2", "btad", "folder"):  # the PBAS toothbrush/wood rule is MVTec AD's only
        assert effective_resize(dataset, "wood", 100, 64) == effective_resize(dataset, "toothbrush", 100, 64) == 100
    assert effective_resize("mvtec", "wood", 100, 64) == 73


def test_split_job_name() -> None:
    assert split_job_name("mvtec_ad2_fruit_jelly") == ("mvtec_ad2", "fruit_jelly")
    assert split_job_name("mvtec_metal_nut") == ("mvtec", "metal_nut")
    assert split_job_name("btad_01") == ("btad", "01") and split_job_name("folder_my_part") == ("folder", "my_part")
    assert split_job_name("other_x_y") == ("other", "x_y")


def test_has_masks_defaults_to_true() -> None:
    assert AnomalyDataset("mvtec", "x", "test", [], 8, 8).has_masks
    assert not AnomalyDataset("folder", "x", "test", [], 8, 8, has_masks=False).has_masks


# ----------------------------------------------------------------------------- MVTec AD 2

def _ad2(root: Path, classname: str = "fruit_jelly", n_train: int = 3, n_good: int = 2, n_bad: int = 3) -> Path:
    path = root / classname
    for i in range(n_train):
        _image(path / "train/good" / f"{i:03d}_regular.png")
    (path / "validation/good").mkdir(parents=True)
    (path / "validation/good/000_regular.png").write_bytes(b"not read")  # not used: never opened
    for i in range(n_good):
        _image(path / "test_public/good" / f"{i:03d}_regular.png", 60)
    for i in range(n_bad):
        _image(path / "test_public/bad" / f"{i:03d}_regular.png", 200)
        _mask(path / "test_public/ground_truth/bad" / f"{i:03d}_regular_mask.png", column=2 + i)
    for private in ("test_private", "test_private_mixed"):
        (path / private).mkdir()
        (path / private / "000_regular.png").write_bytes(b"no ground truth, not read")
    return path


def test_mvtec_ad2_builds(tmp_path: Path) -> None:
    _ad2(tmp_path)
    train, test = _build("mvtec_ad2", tmp_path, "fruit_jelly")
    assert (train.layout, test.layout, train.has_masks, test.has_masks) == (LAYOUT_MVTEC_AD2,) * 2 + (True, True)
    assert not test.binarize_mask and train.resize == S
    assert len(train) == 3 and all(s.defect == "good" and s.is_anomaly == 0 for s in train.samples)
    assert all("/train/good/" in s.image_path for s in train.samples)
    assert [(s.defect, s.is_anomaly) for s in test.samples] == [("bad", 1)] * 3 + [("good", 0)] * 2
    assert all("/test_public/" in s.image_path for s in test.samples)
    pairs = list(zip(_names(test.samples), _names(test.samples, "mask_path")))
    assert pairs[:3] == [(f"{i:03d}_regular.png", f"{i:03d}_regular_mask.png") for i in range(3)]
    assert all(mask is None for _, mask in pairs[3:])
    item = test[1]
    assert item["image"].shape == (3, S, S) and item["mask"].shape == (1, S, S)
    assert torch.equal(item["mask"], datasets.load_mask(test.samples[1].mask_path, S, S, False))
    assert _fractional(test)  # MVTec semantics: not binarised after the resize
    assert item["mask"][0, :, -1].eq(1).all() and item["mask"][0, :, 0].eq(0).all()


def test_mvtec_ad2_missing_train_folder(tmp_path: Path) -> None:
    shutil.rmtree(_ad2(tmp_path) / "train")
    message = _error(_build, "mvtec_ad2", tmp_path, "fruit_jelly")
    assert str(tmp_path / "fruit_jelly/train/good") in message and "missing" in message


def test_mvtec_ad2_missing_test_public(tmp_path: Path) -> None:
    shutil.rmtree(_ad2(tmp_path) / "test_public")
    message = _error(_build, "mvtec_ad2", tmp_path, "fruit_jelly")
    assert str(tmp_path / "fruit_jelly/test_public") in message and "missing" in message
    assert "test_private" in message and "main.py predict" in message


def test_mvtec_ad2_missing_mask_of_bad_image(tmp_path: Path) -> None:
    (_ad2(tmp_path) / "test_public/ground_truth/bad/001_regular_mask.png").unlink()
    message = _error(_build, "mvtec_ad2", tmp_path, "fruit_jelly")
    assert str(tmp_path / "fruit_jelly/test_public/bad/001_regular.png") in message
    assert "3 test images" in message and "2 masks" in message


def test_mvtec_ad2_missing_ground_truth_folder(tmp_path: Path) -> None:
    shutil.rmtree(_ad2(tmp_path) / "test_public/ground_truth")
    message = _error(_build, "mvtec_ad2", tmp_path, "fruit_jelly")
    assert str(tmp_path / "fruit_jelly/test_public/ground_truth/bad") in message


def test_mvtec_ad2_mask_named_after_another_image(tmp_path: Path) -> None:
    gt = _ad2(tmp_path) / "test_public/ground_truth/bad"
    os.rename(gt / "001_regular_mask.png", gt / "zzz.png")  # sorted pairing now gives 001 the mask of 002
    message = _error(_build, "mvtec_ad2", tmp_path, "fruit_jelly")
    assert str(tmp_path / "fruit_jelly/test_public/bad/001_regular.png") in message
    assert "002_regular_mask.png" in message and "no mask is named after it" in message


# ----------------------------------------------------------------------------- BTAD

BTAD_EXTENSIONS = {"01": ("bmp", "png"), "02": ("png", "png"), "03": ("bmp", "bmp")}  # (image, mask) as distributed


def _btad(root: Path, classname: str, image_ext: str, mask_ext: str, stems=("0001", "0002", "0010")) -> Path:
    path = root / classname
    for i in range(3):
        _image(path / "train/ok" / f"{i:04d}.{image_ext}")
    for i in range(2):
        _image(path / "test/ok" / f"{i:04d}.{image_ext}", 40)
    for column, stem in enumerate(stems, start=1):
        _image(path / "test/ko" / f"{stem}.{image_ext}", 220)
        _mask(path / "ground_truth/ko" / f"{stem}.{mask_ext}", column=column)
    return path


@pytest.mark.parametrize("classname", ["01", "02", "03"])
def test_btad_builds_with_distributed_extensions(tmp_path: Path, classname: str) -> None:
    image_ext, mask_ext = BTAD_EXTENSIONS[classname]
    _btad(tmp_path, classname, image_ext, mask_ext)
    train, test = _build("btad", tmp_path, classname)
    assert (train.layout, test.has_masks, test.binarize_mask) == (LAYOUT_BTAD, True, False)
    assert len(train) == 3 and all(s.is_anomaly == 0 and s.mask_path is None for s in train.samples)
    assert [(s.defect, s.is_anomaly) for s in test.samples] == [("ko", 1)] * 3 + [("ok", 0)] * 2
    pairs = list(zip(_names(test.samples), _names(test.samples, "mask_path")))
    assert pairs[:3] == [(f"{stem}.{image_ext}", f"{stem}.{mask_ext}") for stem in ("0001", "0002", "0010")]
    assert all(mask is None for _, mask in pairs[3:])
    assert [test[i]["is_anomaly"] for i in range(len(test))] == [1, 1, 1, 0, 0]
    assert _fractional(test)


def test_btad_pairs_by_stem_not_sorted_position(tmp_path: Path) -> None:
    path = _btad(tmp_path, "01", "bmp", "png")
    _mask(path / "ground_truth/ko/0000.png", column=9)  # a stray mask sorting first: position pairing would shift
    os.rename(path / "ground_truth/ko/0010.png", path / "ground_truth/ko/0010.bmp")  # mixed mask extensions
    _, test = _build("btad", tmp_path, "01")
    anomalous = [s for s in test.samples if s.is_anomaly]
    assert [(os.path.basename(s.image_path), os.path.basename(s.mask_path)) for s in anomalous] == [
        ("0001.bmp", "0001.png"), ("0002.bmp", "0002.png"), ("0010.bmp", "0010.bmp")]
    for index, sample in enumerate(test.samples[:3]):  # each image gets its own mask's pixels (column 1, 2, 3)
        mask = datasets.read_mask(sample.mask_path)
        assert np.asarray(mask)[0].tolist().index(255) == index + 1


def test_btad_missing_mask_names_the_image(tmp_path: Path) -> None:
    (_btad(tmp_path, "02", "png", "png") / "ground_truth/ko/0002.png").unlink()
    message = _error(_build, "btad", tmp_path, "02")
    assert str(tmp_path / "02/test/ko/0002.png") in message and str(tmp_path / "02/ground_truth/ko") in message


def test_btad_two_masks_for_one_image(tmp_path: Path) -> None:
    _mask(_btad(tmp_path, "03", "bmp", "bmp") / "ground_truth/ko/0001.png")
    message = _error(_build, "btad", tmp_path, "03")
    assert str(tmp_path / "03/test/ko/0001.bmp") in message and "0001.bmp, 0001.png" in message


def test_btad_missing_train_folder(tmp_path: Path) -> None:
    path = _btad(tmp_path, "01", "bmp", "png")
    os.rename(path / "train/ok", path / "train/good")
    message = _error(_build, "btad", tmp_path, "01")
    assert str(tmp_path / "01/train/ok") in message and "MVTec layout" in message


def test_btad_missing_ground_truth_folder(tmp_path: Path) -> None:
    shutil.rmtree(_btad(tmp_path, "01", "bmp", "png") / "ground_truth")
    message = _error(_build, "btad", tmp_path, "01")
    assert str(tmp_path / "01/ground_truth/ko") in message and str(tmp_path / "01/test/ko") in message


def test_btad_missing_test_folder(tmp_path: Path) -> None:
    shutil.rmtree(_btad(tmp_path, "01", "bmp", "png") / "test")
    assert str(tmp_path / "01/test") in _error(_build, "btad", tmp_path, "01")


# ----------------------------------------------------------------------------- folder dataset

def _folder(root: Path, classname: str = "part", train_sub: str | None = None, masks: bool = True) -> Path:
    """train/[train_sub/] 3 images; test/Good 2, test/ok 1, test/crack a.png + a_b.png, test/scratch s1.jpg;
    masks (if masks) in ground_truth/crack (named *_mask, so that sorted order differs) and masks/scratch (_gt)."""
    path = root / classname
    train = path / "train" / train_sub if train_sub else path / "train"
    for i in range(3):
        _image(train / f"{i}.png")
    _image(path / "test/Good/g0.png", 30)
    _image(path / "test/Good/g1.png", 30)
    _image(path / "test/ok/o0.bmp", 30)
    _image(path / "test/crack/a.png", 200)
    _image(path / "test/crack/a_b.png", 200)
    _image(path / "test/scratch/s1.jpg", 200)
    if masks:
        _mask(path / "ground_truth/crack/a_mask.png", column=1)  # sorts after a_b_mask.png
        _mask(path / "ground_truth/crack/a_b_mask.png", column=2)
        _mask(path / "masks/scratch/s1_gt.png", column=3)
    return path


@pytest.mark.parametrize("train_sub", [None, "good", "Normal", "ok"])
def test_folder_builds_with_masks(tmp_path: Path, train_sub: str | None) -> None:
    _folder(tmp_path, train_sub=train_sub)
    train, test = _build("folder", tmp_path, "part")
    assert (train.layout, train.has_masks, test.has_masks, test.binarize_mask) == (LAYOUT_FOLDER, True, True, False)
    assert len(train) == 3 and all(s.is_anomaly == 0 and s.mask_path is None for s in train.samples)
    expected_dir = os.path.join(str(tmp_path / "part/train"), train_sub) if train_sub else str(tmp_path / "part/train")
    assert {os.path.dirname(s.image_path) for s in train.samples} == {expected_dir}
    rows = [(s.defect, s.is_anomaly, os.path.basename(s.image_path), s.mask_path and os.path.basename(s.mask_path))
            for s in test.samples]
    assert rows == [
        ("Good", 0, "g0.png", None), ("Good", 0, "g1.png", None),
        ("crack", 1, "a.png", "a_mask.png"), ("crack", 1, "a_b.png", "a_b_mask.png"),
        ("ok", 0, "o0.bmp", None), ("scratch", 1, "s1.jpg", "s1_gt.png"),
    ]
    assert str(tmp_path / "part/masks/scratch") in test.samples[-1].mask_path
    assert _fractional(test)


def test_folder_without_masks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _folder(tmp_path, masks=False)
    called = []
    original = datasets.check_masks_not_all_empty
    monkeypatch.setattr(datasets, "check_masks_not_all_empty", lambda *args: called.append(args) or original(*args))
    train, test = _build("folder", tmp_path, "part")
    assert not train.has_masks and not test.has_masks and not called
    assert "no masks" in repr(test)
    assert all(s.mask_path is None for s in test.samples)
    assert [s.is_anomaly for s in test.samples] == [0, 0, 1, 1, 0, 1]
    masks = torch.stack([test[i]["mask"] for i in range(len(test))])  # [N, 1, S, S]
    assert masks.shape == (6, 1, S, S) and not masks.any()
    _folder(tmp_path, classname="masked")
    assert _build("folder", tmp_path, "masked")[1].has_masks and len(called) == 1  # run when there are masks


def test_folder_masks_for_only_some_labels(tmp_path: Path) -> None:
    shutil.rmtree(_folder(tmp_path) / "masks")  # crack has ground_truth/crack, scratch has none
    message = _error(_build, "folder", tmp_path, "part")
    assert "scratch" in message and "crack" in message and str(tmp_path / "part/ground_truth/scratch") in message


def test_folder_mask_folder_lacks_a_mask(tmp_path: Path) -> None:
    (_folder(tmp_path) / "ground_truth/crack/a_b_mask.png").unlink()
    message = _error(_build, "folder", tmp_path, "part")
    assert str(tmp_path / "part/test/crack/a_b.png") in message and str(tmp_path / "part/ground_truth/crack") in message


def _train_mixed(path: Path) -> None:
    _image(path / "train/good/extra.png")  # images directly in train/ and in train/good/


def _train_defect(path: Path) -> None:
    _image(path / "train/crack/x.png")


def _test_direct(path: Path) -> None:
    _image(path / "test/loose.png")


def _two_mask_folders(path: Path) -> None:
    _mask(path / "masks/crack/a_mask.png")


def _only_normal(path: Path) -> None:
    for label in ("crack", "scratch"):
        shutil.rmtree(path / "test" / label)


@pytest.mark.parametrize("damage,named,words", [
    (lambda path: shutil.rmtree(path / "train"), "train", "missing"),
    (_train_mixed, "train", "one place"),
    (_train_defect, "train", "crack"),
    (lambda path: shutil.rmtree(path / "test"), "test", "missing"),
    (_test_direct, "test", "loose.png"),
    (_two_mask_folders, "masks/crack", "two mask folders"),
    (_only_normal, "test", "no defective image"),
])
def test_folder_layout_problems(tmp_path: Path, damage, named: str, words: str) -> None:
    path = _folder(tmp_path)
    damage(path)
    message = _error(_build, "folder", tmp_path, "part")
    assert str(path / named) in message and words in message


def test_folder_missing_class_lists_found_folders(tmp_path: Path) -> None:
    _folder(tmp_path)
    message = _error(_build, "folder", tmp_path, "other")
    assert str(tmp_path / "other") in message and "part" in message
