"""Masks stored with lossy compression are binarised at half range (lossless ones: any non-zero pixel, as before);
16-bit grayscale images whose file says 12 significant bits are scaled as 12-bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from datasets.base import read_mask, read_rgb


def disk_mask(size: int = 64) -> np.ndarray:
    """A 0/255 disk off the 8x8 JPEG block grid (its edges give compression noise)."""
    y, x = np.mgrid[:size, :size]
    return (((y - 29.5) ** 2 + (x - 33.3) ** 2) < 13.7 ** 2).astype(np.uint8) * 255


@pytest.mark.parametrize("suffix,options", [(".jpg", {"quality": 75}), (".tif", {"compression": "jpeg"})])
def test_a_lossy_mask_is_binarised_at_half_range(tmp_path: Path, suffix: str, options: dict):
    truth = disk_mask()
    path = tmp_path / f"mask{suffix}"
    Image.fromarray(np.stack([truth] * 3, -1)).save(path, **options)  # colour, as masks are often saved
    decoded = np.asarray(Image.open(path).convert("RGB")).max(axis=-1)
    assert ((decoded > 0) & (truth == 0)).sum() > 20  # the compression noise that must not count as defect
    mask = np.asarray(read_mask(path))
    assert set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask, (decoded >= 128).astype(np.uint8) * 255)
    assert np.abs(mask.astype(int) - truth).sum() / 255 < 0.05 * (truth > 0).sum()


def test_a_lossless_mask_keeps_every_non_zero_pixel(tmp_path: Path):
    faint = disk_mask() // 85  # 0/3
    Image.fromarray(faint).save(tmp_path / "mask.png")
    assert np.array_equal(np.asarray(read_mask(tmp_path / "mask.png")), (faint > 0).astype(np.uint8) * 255)


def save_16bit(path: Path, values: np.ndarray, significant: int | None) -> None:
    image = Image.fromarray(values.astype(np.uint16))
    if path.suffix == ".png":
        info = PngImagePlugin.PngInfo()
        if significant is not None:
            info.add(b"sBIT", bytes([significant]))
        image.save(path, pnginfo=info)
    else:
        image.save(path, tiffinfo={} if significant is None else {281: (1 << significant) - 1})


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_12_bit_image_in_a_16_bit_file_is_scaled_as_12_bit(tmp_path: Path, suffix: str):
    values = np.array([[0, 100, 2048, 4095]])
    save_16bit(tmp_path / f"twelve{suffix}", values, 12)
    assert np.asarray(read_rgb(tmp_path / f"twelve{suffix}"))[0, :, 0].tolist() == [0, 6, 128, 255]  # round(v*255/4095)
    save_16bit(tmp_path / f"unsaid{suffix}", values, None)  # the file does not say: the full 16-bit range
    assert np.asarray(read_rgb(tmp_path / f"unsaid{suffix}"))[0, :, 0].tolist() == [0, 0, 8, 16]  # round(v/257)
    save_16bit(tmp_path / f"above{suffix}", np.array([[0, 100, 2048, 4096]]), 12)  # a value above 12 bits
    assert np.asarray(read_rgb(tmp_path / f"above{suffix}"))[0, :, 0].tolist() == [0, 0, 8, 16]


# --mask_binarize: the ground truth of the resized test masks for PBAS/CRAS (metrics.binarize_masks)
MB_NET = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "64",
          "--target_embed_dimension", "64", "--dsc_hidden", "32", "--meta_epochs", "1"]
MB_DATA = ["dataset", "--batch_size", "4", "--resize", "56", "--imagesize", "48", "--num_workers", "0", "-d", "texture"]


def _mask_run(results: Path, root: Path, *data: str, test: str = "ckpt") -> int:
    import main

    return main.cli(["--gpu", "-1", "--test", test, "--results_path", str(results), *MB_NET, *MB_DATA, *data, "mvtec", str(root)])


def _row(results: Path) -> dict:
    import csv

    with open(results / "results_seeds.csv") as f:
        return next(csv.DictReader(f))


def test_mask_binarize_half_changes_only_the_pixel_ground_truth_and_is_recorded(mvtec_root: Path, tmp_path: Path, capfd):
    """56 px resized masks have fractional edges: the release rule drops them, the half rule keeps those above
    0.5. One epoch: the same model and maps either way, so the image metrics agree and the pixel ones differ."""
    import json

    import torch

    import utils

    release, half = tmp_path / "release", tmp_path / "half"
    assert _mask_run(release, mvtec_root) == 0  # the default
    assert _mask_run(half, mvtec_root, "--mask_binarize", "half") == 0
    a, b = _row(release), _row(half)
    assert a["image_auroc"] == b["image_auroc"] and a["image_ap"] == b["image_ap"]
    assert a["pixel_ap"] != b["pixel_ap"] and a["pixel_auroc"] != b["pixel_auroc"]
    for results, rule in ((release, "release"), (half, "half")):
        job = json.loads((results / "config.json").read_text())["runs"]["models/pbas/mvtec_texture/seed0"]
        assert job["config"]["mask_binarize"] == rule
    ckpt_path = release / "models" / "pbas" / "mvtec_texture" / "seed0" / "checkpoint.pt"
    assert utils.load_checkpoint(str(ckpt_path))["config"]["mask_binarize"] == "release"
    capfd.readouterr()
    # a checkpoint is tested under the rule it was trained (and its epoch selected) with
    assert _mask_run(release, mvtec_root, "--mask_binarize", "half", test="test") == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "mask_binarize='release' in the checkpoint, 'half' now" in err[0]
    # a checkpoint written before the option existed was made under the release rule
    ckpt = torch.load(ckpt_path, weights_only=False)
    del ckpt["config"]["mask_binarize"]
    utils.save_torch(ckpt, str(ckpt_path))
    assert _mask_run(release, mvtec_root, test="test") == 0
    assert _row(release)["pixel_ap"] == a["pixel_ap"]


def test_engine_masks_under_each_rule(mvtec_root: Path):
    import torch

    import datasets
    import engine

    _, test = datasets.build_datasets("mvtec", str(mvtec_root), "texture", 56, 48)
    _, resized = engine.load_masks(test, torch.device("cpu"))
    _, halved = engine.load_masks(test, torch.device("cpu"), "half")
    fractional = (resized > 0) & (resized < 1)
    assert fractional.any() and torch.equal(halved, (resized > 0.5).float())
    assert int(halved.sum()) > int((resized == 1).sum())  # the half rule keeps edge pixels the release rule drops
