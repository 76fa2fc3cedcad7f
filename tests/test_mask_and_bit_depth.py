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
