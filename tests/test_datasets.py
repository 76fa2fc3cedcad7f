"""Tests of the dataset loaders (datasets/) and the synthetic data generator."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from datasets import (
    CLASSES,
    DATASET_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnomalyDataset,
    build_datasets,
    effective_resize,
    image_transform,
    load_image,
    load_mask,
)
from datasets.synthetic import DEFECT_TYPES, MARKER_FILE, class_kinds, main, make_dataset, make_visa_dataset
from conftest import dataset_error as _error

SIZE = 64  # image size of the conftest fixtures
N_TRAIN, N_GOOD, N_DEFECT = 8, 3, 4  # counts of the conftest fixtures




def _expected_normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])  # [3]


# ----------------------------------------------------------------------------- constants

def test_class_lists_and_names() -> None:
    assert DATASET_NAMES[:4] == ("mvtec", "visa", "mpdd", "itdd")  # the others: tests/test_datasets_more.py
    assert list(CLASSES) == list(DATASET_NAMES)
    assert [len(CLASSES[name]) for name in DATASET_NAMES[:4]] == [15, 12, 6, 4]
    assert CLASSES["itdd"] == ("cotton_fabric", "dyed_fabric", "hemp_fabric", "plaid_fabric")
    assert CLASSES["mvtec"][:5] == ("carpet", "grid", "leather", "tile", "wood")
    assert CLASSES["mvtec"][-1] == "zipper" and CLASSES["visa"][-1] == "pipe_fryum"
    assert CLASSES["mpdd"] == ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")


def test_effective_resize_rule() -> None:
    assert effective_resize("mvtec", "wood", 288, 288) == 329  # int(288 * 8 / 7)
    assert effective_resize("mvtec", "toothbrush", 100, 224) == 256
    assert effective_resize("mvtec", "carpet", 300, 288) == 300
    assert effective_resize("mpdd", "wood", 300, 288) == 300
    assert effective_resize("visa", "toothbrush", 300, 288) == 300
    assert effective_resize("itdd", "wood", 300, 288) == 300
    assert effective_resize("mvtec", "wood", 329, 288, class_resize_rule=False) == 329
    assert effective_resize("mvtec", "toothbrush", 300, 288, False) == 300


# ----------------------------------------------------------------------------- transforms

def test_constant_image_is_normalised_with_imagenet_stats(tmp_path: Path) -> None:
    rgb = (200, 100, 50)
    path = tmp_path / "constant.png"
    Image.new("RGB", (30, 20), rgb).save(path)
    image = load_image(str(path), 16, 12)
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32
    expected = _expected_normalised(rgb)[:, None, None].expand(3, 12, 12)
    assert torch.allclose(image, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_become_three_channels(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"image_{mode}.png"
    Image.new("RGB", (40, 24), (102, 102, 102)).convert(mode).save(path)  # 102: exact in the web palette
    image = load_image(str(path), 20, 16)
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image[:, 8, 8], _expected_normalised((102, 102, 102)), atol=1e-5)
    with Image.open(path) as pil:
        assert image_transform(20, 16)(pil).shape == (3, 16, 16)


def test_load_mask_keeps_fractions_unless_binarised(tmp_path: Path) -> None:
    array = np.zeros((10, 10), dtype=np.uint8)
    array[:, :5] = 255
    path = tmp_path / "half_mask.png"
    Image.fromarray(array).save(path)
    soft = load_mask(str(path), 15, 15, binarize=False)
    hard = load_mask(str(path), 15, 15, binarize=True)
    assert soft.shape == hard.shape == (1, 15, 15)
    assert ((soft > 0) & (soft < 1)).any()  # bilinear edge stays fractional
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(hard, (soft > 0).float())
    assert torch.equal(load_mask(None, 15, 12, binarize=False), torch.zeros(1, 12, 12))


# ----------------------------------------------------------------------------- MVTec layout

def test_mvtec_shapes_labels_and_counts(mvtec_root: Path) -> None:
    train, test = build_datasets("mvtec", str(mvtec_root), "texture", 72, SIZE)
    assert isinstance(train, AnomalyDataset) and (train.split, test.split) == ("train", "test")
    assert (train.dataset, train.classname, train.resize, train.imagesize) == ("mvtec", "texture", 72, SIZE)
    assert len(train) == N_TRAIN and len(test) == N_GOOD + N_DEFECT
    item = test[len(test) - 1]
    assert item["image"].shape == (3, SIZE, SIZE) and item["mask"].shape == (1, SIZE, SIZE)
    assert item["index"] == len(test) - 1 and item["image_path"] == test.samples[-1].image_path
    assert all(train[i]["is_anomaly"] == 0 and not train[i]["mask"].any() for i in range(len(train)))
    labels = {s.defect: s.is_anomaly for s in test.samples}
    assert labels == {"good": 0, "scratch": 1, "spot": 1, "discolor": 1}
    assert all((s.mask_path is None) == (s.defect == "good") for s in test.samples)


def test_mvtec_masks_keep_fractional_edges(mvtec_root: Path) -> None:
    _, test = build_datasets("mvtec", mvtec_root, "object", 72, SIZE)
    masks = torch.stack([test[i]["mask"] for i, s in enumerate(test.samples) if s.is_anomaly])  # [N, 1, S, S]
    assert ((masks > 0) & (masks < 1)).any()
    assert (masks.long() == 1).any(dim=(1, 2, 3)).all()  # every defect keeps anomalous pixels


def test_mvtec_pairs_images_and_masks_in_sorted_order(tmp_path: Path) -> None:
    class_dir = tmp_path / "custom"
    for folder in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (class_dir / folder).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(class_dir / "train/good/a.png")
    Image.new("RGB", (8, 8)).save(class_dir / "test/good/z.JPG")
    for name in ("c.png", "a.png", "b.bmp"):
        Image.new("RGB", (8, 8)).save(class_dir / "test/dent" / name)
    for name in ("y_mask.png", "z_mask.png", "x_mask.png"):  # names unrelated to the images: paired silently
        Image.new("L", (8, 8), 255).save(class_dir / "ground_truth/dent" / name)
    (class_dir / "test/dent/notes.txt").write_text("ignored")
    _, test = build_datasets("mpdd", tmp_path, "custom", 8, 8)
    pairs = [(os.path.basename(s.image_path), s.mask_path and os.path.basename(s.mask_path)) for s in test.samples]
    assert pairs == [("a.png", "x_mask.png"), ("b.bmp", "y_mask.png"), ("c.png", "z_mask.png"), ("z.JPG", None)]


def test_wood_and_toothbrush_resize_rule_applied(mvtec_root: Path, tmp_path: Path) -> None:
    shutil.copytree(mvtec_root / "texture", tmp_path / "wood")
    train, test = build_datasets("mvtec", tmp_path, "wood", 100, SIZE)
    assert train.resize == test.resize == int(SIZE * 8 / 7)
    assert test[0]["image"].shape == (3, SIZE, SIZE)
    assert build_datasets("mpdd", tmp_path, "wood", 100, SIZE)[0].resize == 100


def test_class_resize_rule_off_keeps_given_resize(mvtec_root: Path, tmp_path: Path) -> None:
    for classname in ("wood", "toothbrush"):
        shutil.copytree(mvtec_root / "texture", tmp_path / classname)
        train, test = build_datasets("mvtec", tmp_path, classname, 100, SIZE, class_resize_rule=False)
        assert train.resize == test.resize == 100
        assert build_datasets("mvtec", tmp_path, classname, 100, SIZE, class_resize_rule=True)[0].resize == 73
    image = build_datasets("mvtec", tmp_path, "wood", 100, SIZE, class_resize_rule=False)[1][0]["image"]
    assert image.shape == (3, SIZE, SIZE)


def test_default_collate_batches(mvtec_root: Path) -> None:
    _, test = build_datasets("mvtec", mvtec_root, "texture", SIZE, SIZE)
    batch = next(iter(torch.utils.data.DataLoader(test, batch_size=4)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["mask"].shape == (4, 1, SIZE, SIZE)
    assert batch["is_anomaly"].tolist() == [s.is_anomaly for s in test.samples[:4]]
    assert batch["defect"] == [s.defect for s in test.samples[:4]]


# ----------------------------------------------------------------------------- ITDD

def test_itdd_named_dataset_loads(tmp_path: Path) -> None:
    main([str(tmp_path), "--classes", *CLASSES["itdd"], "--kinds", "texture", "texture", "texture", "object",
          "--n_train", "2", "--n_test_good", "1", "--n_test_defect", "3", "--size", "32"])
    for classname, kind in zip(CLASSES["itdd"], ("texture", "texture", "texture", "object")):
        train, test = build_datasets("itdd", tmp_path, classname, 32, 32)
        assert (train.dataset, train.classname, train.layout, train.binarize_mask) == ("itdd", classname, "mvtec", False)
        assert len(train) == 2 and sorted(s.is_anomaly for s in test.samples) == [0, 1, 1, 1]
        assert {s.defect for s in test.samples} == {"good", *DEFECT_TYPES[kind]}
        assert test[0]["mask"].shape == (1, 32, 32) and test[0]["mask"].any()
    message = _error(build_datasets, "itdd", tmp_path, "cotton", 32, 32)
    assert str(tmp_path / "cotton") in message and ", ".join(CLASSES["itdd"]) in message


# ----------------------------------------------------------------------------- VisA layout

def test_visa_samples_and_binary_masks(visa_root: Path) -> None:
    train, test = build_datasets("visa", visa_root, "object", 72, SIZE)
    assert train.layout == test.layout == "split_csv" and test.binarize_mask
    assert len(train) == N_TRAIN and len(test) == N_GOOD + N_DEFECT and train.resize == 72
    assert [s.is_anomaly for s in test.samples] == [0] * N_GOOD + [1] * N_DEFECT
    assert {s.defect for s in test.samples} == {"good", "bad"}
    assert all(os.path.isfile(s.image_path) for s in train.samples + test.samples)
    masks = torch.stack([test[i]["mask"] for i in range(len(test))])  # [N, 1, S, S]
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert not masks[:N_GOOD].any() and masks[N_GOOD:].flatten(1).any(dim=1).all()


def test_visa_mvtec_layout_keeps_fractional_masks(mvtec_root: Path) -> None:
    train, test = build_datasets("visa", mvtec_root, "object", 72, SIZE)  # no split_csv/: MVTec conversion
    assert train.layout == test.layout == "mvtec" and not test.binarize_mask
    assert (train.dataset, train.resize) == ("visa", 72)
    assert len(train) == N_TRAIN and len(test) == N_GOOD + N_DEFECT
    assert {s.defect: s.is_anomaly for s in test.samples} == {"discolor": 1, "good": 0, "missing": 1, "scratch": 1}
    masks = torch.stack([test[i]["mask"] for i in range(len(test))])  # [N, 1, S, S]
    assert ((masks > 0) & (masks < 1)).any()  # not binarised
    _, reference = build_datasets("mvtec", mvtec_root, "object", 72, SIZE)
    assert [s.image_path for s in test.samples] == [s.image_path for s in reference.samples]
    assert torch.equal(masks, torch.stack([reference[i]["mask"] for i in range(len(reference))]))
    assert [test[i]["is_anomaly"] for i in range(len(test))] == [s.is_anomaly for s in reference.samples]


def test_visa_split_csv_wins_over_class_folders(visa_copy: Path) -> None:
    for split in ("train", "test"):
        (visa_copy / "object" / split).mkdir()
    train, test = build_datasets("visa", visa_copy, "object", 72, SIZE)
    assert train.layout == "split_csv" and test.binarize_mask and len(train) == N_TRAIN


def test_visa_neither_layout(visa_copy: Path) -> None:
    os.remove(visa_copy / "split_csv/1cls.csv")  # class folders hold Data/, not train/ and test/
    message = _error(build_datasets, "visa", visa_copy, "object", SIZE, SIZE)
    assert str(visa_copy / "split_csv/1cls.csv") in message and "split_csv/1cls.csv" in message
    assert str(visa_copy / "object") in message and "train/ and test/" in message and "object, texture" in message
    (visa_copy / "object/train").mkdir()  # train/ alone is not the MVTec layout
    assert "train/ and test/" in _error(build_datasets, "visa", visa_copy, "object", SIZE, SIZE)


def test_visa_low_valued_mask_is_binarised(visa_copy: Path) -> None:
    table = pd.read_csv(visa_copy / "split_csv/1cls.csv", keep_default_na=False)
    mask_path = visa_copy / table[table["label"] == "anomaly"]["mask"].iloc[0]
    array = np.zeros((SIZE, SIZE), dtype=np.uint8)
    array[10:30, 10:30] = 1  # VisA-style small label value
    Image.fromarray(array).save(mask_path)
    _, test = build_datasets("visa", visa_copy, table["object"].iloc[0], SIZE, SIZE)
    index = next(i for i, s in enumerate(test.samples) if s.mask_path == str(mask_path))
    mask = test[index]["mask"]
    assert mask.max() == 1.0 and (mask.long() == 1).sum() >= 400


# ----------------------------------------------------------------------------- errors

def test_unknown_dataset_name(mvtec_root: Path) -> None:
    message = _error(build_datasets, "mvtech", mvtec_root, "texture", SIZE, SIZE)
    assert "mvtech" in message and all(name in message for name in DATASET_NAMES)


def test_missing_datapath(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert str(missing) in _error(build_datasets, "mvtec", missing, "texture", SIZE, SIZE)


def test_missing_class_lists_found_folders(mvtec_root: Path) -> None:
    message = _error(build_datasets, "mvtec", mvtec_root, "carpet", SIZE, SIZE)
    assert str(mvtec_root / "carpet") in message and "object, texture" in message


def test_missing_train_good(mvtec_copy: Path) -> None:
    shutil.rmtree(mvtec_copy / "texture/train/good")
    assert str(mvtec_copy / "texture/train/good") in _error(build_datasets, "mvtec", mvtec_copy, "texture", SIZE, SIZE)


def test_empty_train_good(mvtec_copy: Path) -> None:
    for path in (mvtec_copy / "texture/train/good").iterdir():
        path.unlink()
    message = _error(build_datasets, "mvtec", mvtec_copy, "texture", SIZE, SIZE)
    assert str(mvtec_copy / "texture/train/good") in message and "no images" in message


def test_missing_test_folder(mvtec_copy: Path) -> None:
    shutil.rmtree(mvtec_copy / "object/test")
    assert str(mvtec_copy / "object/test") in _error(build_datasets, "mvtec", mvtec_copy, "object", SIZE, SIZE)


def test_test_folder_without_images(mvtec_copy: Path) -> None:
    for folder in (mvtec_copy / "object/test").iterdir():
        shutil.rmtree(folder)
    message = _error(build_datasets, "mpdd", mvtec_copy, "object", SIZE, SIZE)
    assert str(mvtec_copy / "object/test") in message and "no images" in message


def test_defect_without_ground_truth(mvtec_copy: Path) -> None:
    shutil.rmtree(mvtec_copy / "texture/ground_truth/spot")
    message = _error(build_datasets, "mvtec", mvtec_copy, "texture", SIZE, SIZE)
    assert str(mvtec_copy / "texture/ground_truth/spot") in message and "'spot'" in message


def test_mask_count_mismatch_gives_both_counts(mvtec_copy: Path) -> None:
    (mvtec_copy / "texture/ground_truth/scratch/001_mask.png").unlink()
    message = _error(build_datasets, "mvtec", mvtec_copy, "texture", SIZE, SIZE)
    assert "'scratch'" in message and "2 test images" in message and "1 masks" in message
    assert str(mvtec_copy / "texture/ground_truth/scratch") in message


def test_unreadable_image_detected_at_build(mvtec_copy: Path) -> None:
    broken = mvtec_copy / "texture/train/good/003.png"
    broken.write_bytes(b"this is not a png")
    assert str(broken) in _error(build_datasets, "mvtec", mvtec_copy, "texture", SIZE, SIZE)


def test_unreadable_mask_detected_at_build(mvtec_copy: Path) -> None:
    broken = mvtec_copy / "object/ground_truth/missing/000_mask.png"
    broken.write_bytes(b"")
    assert str(broken) in _error(build_datasets, "mvtec", mvtec_copy, "object", SIZE, SIZE)


def test_truncated_image_fails_in_getitem(mvtec_copy: Path) -> None:
    truncated = mvtec_copy / "texture/test/good/001.png"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _, test = build_datasets("mvtec", mvtec_copy, "texture", SIZE, SIZE)  # header still parses
    index = next(i for i, s in enumerate(test.samples) if s.image_path == str(truncated))
    assert str(truncated) in _error(test.__getitem__, index)


def test_visa_missing_split_csv(visa_copy: Path) -> None:
    os.remove(visa_copy / "split_csv/1cls.csv")
    message = _error(build_datasets, "visa", visa_copy, "object", SIZE, SIZE)
    assert str(visa_copy / "split_csv/1cls.csv") in message and "prepare_data.py" in message


def test_visa_missing_columns(visa_copy: Path) -> None:
    csv_path = visa_copy / "split_csv/1cls.csv"
    pd.read_csv(csv_path, keep_default_na=False).drop(columns=["mask"]).to_csv(csv_path, index=False)
    message = _error(build_datasets, "visa", visa_copy, "object", SIZE, SIZE)
    assert str(csv_path) in message and "mask" in message


def test_visa_unknown_object_lists_objects(visa_root: Path) -> None:
    message = _error(build_datasets, "visa", visa_root, "candle", SIZE, SIZE)
    assert "'candle'" in message and "object, texture" in message


def test_visa_listed_file_missing(visa_copy: Path) -> None:
    table = pd.read_csv(visa_copy / "split_csv/1cls.csv", keep_default_na=False)
    missing = visa_copy / table[table["object"] == "texture"]["image"].iloc[2]
    missing.unlink()
    assert str(missing) in _error(build_datasets, "visa", visa_copy, "texture", SIZE, SIZE)


def test_visa_anomaly_row_without_mask(visa_copy: Path) -> None:
    csv_path = visa_copy / "split_csv/1cls.csv"
    table = pd.read_csv(csv_path, keep_default_na=False)
    row = table.index[(table["object"] == "texture") & (table["label"] == "anomaly")][0]
    table.loc[row, "mask"] = ""
    table.to_csv(csv_path, index=False)
    message = _error(build_datasets, "visa", visa_copy, "texture", SIZE, SIZE)
    assert str(visa_copy / table.loc[row, "image"]) in message and "no mask" in message


# ----------------------------------------------------------------------------- synthetic generator

def _png_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    kwargs = {"classes": ("texture", "object"), "n_train": 2, "n_test_good": 1, "n_test_defect": 3, "size": 48}
    make_dataset(tmp_path / "a", seed=3, **kwargs)
    make_dataset(tmp_path / "b", seed=3, **kwargs)
    make_dataset(tmp_path / "c", seed=4, **kwargs)
    first, second, other = (_png_bytes(tmp_path / name) for name in "abc")
    assert first == second and len(first) == 2 * (2 + 1 + 3 + 3)
    assert first.keys() == other.keys() and first != other


def test_synthetic_layout_masks_and_variation(mvtec_root: Path) -> None:
    for classname in ("texture", "object"):
        class_dir = mvtec_root / classname
        defects = sorted(p.name for p in (class_dir / "ground_truth").iterdir())
        assert len(defects) >= 2
        assert sorted(p.name for p in (class_dir / "test").iterdir()) == sorted(defects + ["good"])
        counts = [len(list((class_dir / "test" / d).glob("*.png"))) for d in defects]
        assert sum(counts) == N_DEFECT and max(counts) - min(counts) <= 1
        for mask_path in (class_dir / "ground_truth").rglob("*_mask.png"):
            with Image.open(mask_path) as mask:
                assert mask.mode == "L" and mask.size == (SIZE, SIZE)
                values = np.asarray(mask)
            assert set(np.unique(values)) == {0, 255} and 0.015 <= (values > 0).mean() <= 0.15
        goods = [np.asarray(Image.open(p), dtype=np.float64) for p in sorted((class_dir / "train/good").glob("*.png"))]
        assert np.abs(goods[0] - goods[1]).mean() > 2.0  # normal images vary


def test_synthetic_kinds_choose_the_look(tmp_path: Path) -> None:
    counts = {"n_train": 1, "n_test_good": 1, "n_test_defect": 3, "size": 32}
    make_dataset(tmp_path, classes=("texture", "hemp_fabric"), kinds=("object", "texture"), **counts)
    for classname, kind in (("texture", "object"), ("hemp_fabric", "texture")):
        assert sorted(p.name for p in (tmp_path / classname / "ground_truth").iterdir()) == sorted(DEFECT_TYPES[kind])
    assert class_kinds(("texture", "a", "b")) == ["texture", "object", "texture"]  # default: name, else position
    with pytest.raises(ValueError):
        class_kinds(("a", "b"), ("texture",))
    with pytest.raises(ValueError):
        class_kinds(("a",), ("fabric",))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "cli"), "--classes", "a", "b", "--kinds", "object"])


def test_synthetic_mvtec_over_generated_visa_is_read_as_mvtec_layout(tmp_path: Path) -> None:
    counts = {"n_train": 2, "n_test_good": 1, "n_test_defect": 2, "size": 32}
    make_visa_dataset(tmp_path / "own", classes=("texture", "object"), **counts)
    make_dataset(tmp_path / "own", classes=("texture", "object"), **counts)
    assert not (tmp_path / "own/split_csv").exists()
    train, test = build_datasets("visa", tmp_path / "own", "texture", 32, 32)
    assert train.layout == "mvtec" and len(train) == 2 and len(test) == 3
    make_visa_dataset(tmp_path / "mixed", classes=("texture", "object"), **counts)
    make_dataset(tmp_path / "mixed", classes=("texture",), **counts)  # 1cls.csv also lists 'object': kept
    assert (tmp_path / "mixed/split_csv/1cls.csv").is_file()


def test_synthetic_rerun_and_foreign_folder(tmp_path: Path) -> None:
    main([str(tmp_path), "--classes", "texture", "--n_train", "1", "--n_test_good", "1",
          "--n_test_defect", "2", "--size", "32"])
    assert (tmp_path / "texture" / MARKER_FILE).is_file()
    make_dataset(tmp_path, classes=("texture",), n_train=1, n_test_good=1, n_test_defect=2, size=32)  # replaces
    (tmp_path / "object").mkdir()
    (tmp_path / "object" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        make_dataset(tmp_path, classes=("object",), n_train=1, n_test_good=1, n_test_defect=2, size=32)
    assert (tmp_path / "object" / "keep.txt").is_file()
