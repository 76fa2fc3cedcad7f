"""Image and mask files other than 8-bit RGB with 0/255 masks: decoding, mask normalisation, mismatched
masks and degenerate class data (datasets/base.py, datasets/mvtec.py, build_datasets)."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import datasets.base as base
from datasets import DatasetError, build_datasets, image_transform, load_image, load_mask, mask_transform
from conftest import dataset_error as _error

SIZE = 64  # image size of the conftest fixtures
VALUES_16 = np.array([0, 128, 129, 255, 256, 1000, 32768, 32896, 65407, 65535], dtype=np.uint16)
EXPECTED_8 = np.array([round(v / 257) for v in VALUES_16.tolist()], dtype=np.uint8)




def _rgb(path: Path) -> np.ndarray:
    image = base.read_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def _png16_rgb(path: Path, array: np.ndarray) -> None:
    """Write a 16-bit-per-channel RGB PNG (PIL cannot write one) from uint16 [H, W, 3]."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _gray16(mode: str, values: np.ndarray) -> Image.Image:
    """A 1-row image of mode I;16 / I;16B / I;16L holding `values`."""
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, (values.size, 1), values.astype(dtype).tobytes())


# ----------------------------------------------------------------------------- 1. images

@pytest.mark.parametrize("mode,ext", [("I;16", "png"), ("I;16", "tif"), ("I;16B", "tif"), ("I;16L", "tif")])
def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path, mode: str, ext: str) -> None:
    path = tmp_path / f"gray16.{ext}"
    _gray16(mode, VALUES_16).save(path)
    rgb = _rgb(path)  # [1, N, 3]
    assert rgb.dtype == np.uint8 and rgb.shape == (1, VALUES_16.size, 3)
    assert (rgb == EXPECTED_8[None, :, None]).all()


def test_32bit_integer_image_holding_16bit_values(tmp_path: Path) -> None:
    path = tmp_path / "gray32.tif"
    Image.fromarray(VALUES_16.astype(np.int32)[None]).save(path)
    with Image.open(path) as image:
        assert image.mode == "I"
    assert (_rgb(path) == EXPECTED_8[None, :, None]).all()
    bad = tmp_path / "too_big.tif"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(bad)
    message = _error(base.read_rgb, bad)
    assert str(bad) in message and "70000" in message


def test_16bit_image_through_loader_and_transform(tmp_path: Path) -> None:
    path = tmp_path / "mid_gray16.png"
    Image.fromarray(np.full((20, 30), 128 * 257, dtype=np.uint16)).save(path)  # I;16
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(base.IMAGENET_MEAN, base.IMAGENET_STD)])
    image = load_image(str(path), 16, 12)  # [3, 12, 12]
    assert torch.allclose(image, expected[:, None, None].expand(3, 12, 12), atol=1e-5)
    with Image.open(path) as pil:  # an opened PIL image given to the transform (predict tool path)
        assert torch.allclose(image_transform(16, 12)(pil), image, atol=1e-6)


def test_16bit_rgb_png_keeps_pils_high_byte(tmp_path: Path) -> None:
    """PIL decodes 16-bit RGB files to 8 bits itself (high byte: v >> 8): exact for 8-bit data stored as
    v * 257, at most 1 below round(v / 257) otherwise."""
    path = tmp_path / "rgb16.png"
    channels = np.stack([VALUES_16, VALUES_16[::-1], np.arange(256, dtype=np.uint16)[:10] * 257], axis=-1)
    _png16_rgb(path, channels[None])
    rgb = _rgb(path)[0].astype(int)  # [N, 3]
    assert (rgb == (channels >> 8)).all()
    assert (rgb[:, 2] == np.arange(10)).all()
    assert np.abs(rgb - np.rint(channels / 257)).max() <= 1


def test_float_image_in_unit_range_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "F"
    assert (_rgb(path)[..., 0] == np.rint(values * 255)).all()


@pytest.mark.parametrize("bad_value", [1.5, -0.1, float("nan")])
def test_float_image_out_of_range_is_an_error(tmp_path: Path, bad_value: float) -> None:
    path = tmp_path / "float_bad.tif"
    Image.fromarray(np.array([[0.0, bad_value]], dtype=np.float32)).save(path)
    assert str(path) in _error(base.read_rgb, path)
    assert str(path) in _error(load_image, str(path), 2, 2)


def test_palette_la_rgba_cmyk_and_bilevel_give_expected_rgb(tmp_path: Path) -> None:
    palette = tmp_path / "palette.png"
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 200, 30, 10, 5, 250, 60])
    p.putpixel((0, 0), 1)
    p.putpixel((1, 0), 2)
    p.save(palette)
    assert _rgb(palette).tolist() == [[[200, 30, 10], [5, 250, 60]]]
    la = tmp_path / "la.png"
    Image.new("LA", (1, 1), (100, 7)).save(la)
    assert _rgb(la).tolist() == [[[100, 100, 100]]]
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (1, 1), (10, 20, 30, 0)).save(rgba)  # alpha dropped, not composited
    assert _rgb(rgba).tolist() == [[[10, 20, 30]]]
    cmyk = tmp_path / "cmyk.tif"
    Image.new("CMYK", (2, 1), (0, 255, 255, 0)).save(cmyk)
    assert _rgb(cmyk).tolist() == [[[255, 0, 0], [255, 0, 0]]]
    bilevel = tmp_path / "bilevel.png"
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    one.save(bilevel)
    assert _rgb(bilevel).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_unconvertible_mode_and_corrupt_file_name_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "weird.tif")
    message = _error(base.to_rgb8, Image.new("La", (2, 2)), path)
    assert path in message and "'La'" in message
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    assert str(corrupt) in _error(base.read_rgb, corrupt)
    assert issubclass(DatasetError, base.IMAGE_READ_ERRORS)  # what the predict tool catches


def test_read_rgb_is_exported_and_used_by_the_datasets(mvtec_copy: Path) -> None:
    import datasets

    assert datasets.read_rgb is base.read_rgb
    victim = sorted((mvtec_copy / "texture/train/good").iterdir())[0]
    with Image.open(victim) as image:
        gray = np.asarray(image.convert("L"), dtype=np.uint16)
    Image.fromarray(gray * 257).save(victim)  # same picture as 16-bit grayscale
    train, _ = build_datasets("mvtec", mvtec_copy, "texture", SIZE, SIZE)
    index = next(i for i, s in enumerate(train.samples) if s.image_path == str(victim))
    expected = image_transform(SIZE, SIZE)(Image.fromarray(gray.astype(np.uint8)))
    assert torch.allclose(train[index]["image"], expected, atol=1e-6)


# ----------------------------------------------------------------------------- 2. masks

def _square(value: int = 255, dtype=np.uint8, size: int = 20) -> np.ndarray:
    array = np.zeros((size, size), dtype=dtype)
    array[3:11, 5:16] = value
    return array


def _reference_mask(tmp_path: Path, resize: int = 15, imagesize: int = 13, binarize: bool = False) -> torch.Tensor:
    path = tmp_path / "reference_0_255.png"
    Image.fromarray(_square()).save(path)
    return load_mask(str(path), resize, imagesize, binarize)


def _old_transform(path: Path, resize: int, imagesize: int) -> torch.Tensor:
    """The transform of the release (and of this loader before masks were normalised)."""
    with Image.open(path) as image:
        return mask_transform(resize, imagesize)(image.convert("L"))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_standard_0_255_mask_is_bit_identical_to_before(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"std_{mode}.png"
    Image.fromarray(_square()).convert(mode).save(path)
    new, old = load_mask(str(path), 15, 13, binarize=False), _old_transform(path, 15, 13)
    assert ((new > 0) & (new < 1)).any()  # fractional edges after the bilinear resize
    assert torch.equal(new, old)
    assert torch.equal(load_mask(str(path), 15, 13, binarize=True), (old > 0).float())  # VisA split_csv


def _write_mask(path: Path, kind: str) -> None:
    if kind == "L_0_1":
        Image.fromarray(_square(1)).save(path)
    elif kind == "palette_red":
        mask = Image.fromarray(_square(1), "L").convert("P")
        mask.putpalette([0, 0, 0, 128, 0, 0])  # index 1 = dark red (luminance 38)
        mask.save(path)
    elif kind == "I16_0_1":
        Image.fromarray(_square(1, np.uint16)).save(path)
    elif kind == "I16_0_65535":
        Image.fromarray(_square(65535, np.uint16)).save(path)
    elif kind == "RGB_blue":
        rgb = np.zeros((20, 20, 3), dtype=np.uint8)
        rgb[_square() > 0] = (0, 0, 128)
        Image.fromarray(rgb).save(path)
    elif kind == "RGBA_red_alpha_ignored":
        rgba = np.zeros((20, 20, 4), dtype=np.uint8)
        rgba[..., 3] = 255  # opaque background
        rgba[_square() > 0] = (90, 0, 0, 0)  # transparent defect still counts
        Image.fromarray(rgba).save(path)
    elif kind == "LA_0_3":
        Image.fromarray(np.stack([_square(3), np.full((20, 20), 255, np.uint8)], -1), "LA").save(path)
    elif kind == "bilevel":
        Image.fromarray(_square() > 0).save(path)
    else:
        raise AssertionError(kind)


MASK_KINDS = ["L_0_1", "palette_red", "I16_0_1", "I16_0_65535", "RGB_blue", "RGBA_red_alpha_ignored", "LA_0_3",
              "bilevel"]


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_any_nonzero_mask_pixel_is_a_defect(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.png"
    _write_mask(path, kind)
    soft = load_mask(str(path), 15, 13, binarize=False)
    assert (soft == 1.0).any()  # anomalous pixels exist (pixel metrics count only exact 1.0)
    assert torch.equal(soft, _reference_mask(tmp_path))
    assert torch.equal(load_mask(str(path), 15, 13, binarize=True), _reference_mask(tmp_path, binarize=True))
    normalised = base.read_mask(path)
    assert normalised.mode == "L" and set(np.unique(np.asarray(normalised)).tolist()) == {0, 255}


def test_dataset_masks_with_0_1_values_have_anomalous_pixels(mvtec_copy: Path) -> None:
    for path in (mvtec_copy / "object/ground_truth").rglob("*.png"):
        with Image.open(path) as mask:
            array = np.asarray(mask)
        Image.fromarray((array > 0).astype(np.uint8)).save(path)  # 0/1 instead of 0/255
    _, test = build_datasets("mvtec", mvtec_copy, "object", 72, SIZE)
    masks = torch.stack([test[i]["mask"] for i, s in enumerate(test.samples) if s.is_anomaly])  # [N, 1, S, S]
    assert (masks == 1.0).flatten(1).any(dim=1).all()


# ----------------------------------------------------------------------------- 3. masks that do not match

def test_mask_size_mismatch_names_both_files_and_sizes(mvtec_copy: Path) -> None:
    mask = sorted((mvtec_copy / "texture/ground_truth/spot").iterdir())[0]
    Image.new("L", (SIZE + 6, SIZE), 255).save(mask)
    message = _error(build_datasets, "mvtec", mvtec_copy, "texture", SIZE, SIZE)
    image = sorted((mvtec_copy / "texture/test/spot").iterdir())[0]
    assert str(mask) in message and str(image) in message
    assert f"{SIZE + 6}x{SIZE}" in message and f"{SIZE}x{SIZE}" in message


def test_visa_mask_size_mismatch(visa_copy: Path) -> None:
    table = pd.read_csv(visa_copy / "split_csv/1cls.csv", keep_default_na=False)
    row = table[(table["object"] == "object") & (table["label"] == "anomaly")].iloc[0]
    Image.new("L", (SIZE, SIZE // 2), 255).save(visa_copy / row["mask"])
    message = _error(build_datasets, "visa", visa_copy, "object", SIZE, SIZE)
    assert str(visa_copy / row["mask"]) in message and str(visa_copy / row["image"]) in message
    assert f"{SIZE}x{SIZE // 2}" in message


def _defect_class(root: Path, image_names: list[str], mask_names: list[str]) -> Path:
    """ROOT/custom with one train image, one good test image and a defect type 'dent' (8x8, masks 255)."""
    class_dir = root / "custom"
    for folder in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (class_dir / folder).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(class_dir / "train/good/a.png")
    Image.new("RGB", (8, 8)).save(class_dir / "test/good/a.png")
    for name in image_names:
        Image.new("RGB", (8, 8)).save(class_dir / "test/dent" / name)
    for name in mask_names:
        Image.new("L", (8, 8), 255).save(class_dir / "ground_truth/dent" / name)
    return class_dir


def test_unpadded_numbers_mispair_is_detected(tmp_path: Path) -> None:
    class_dir = _defect_class(tmp_path, ["1.png", "2.png", "10.png"], ["1_mask.png", "2_mask.png", "10_mask.png"])
    message = _error(build_datasets, "mvtec", tmp_path, "custom", 8, 8)  # sorted: 1 <-> 10_mask
    assert str(class_dir / "test/dent/1.png") in message and str(class_dir / "ground_truth/dent/10_mask.png") in message
    assert "1_mask.png" in message


def test_image_without_a_mask_of_its_name(tmp_path: Path) -> None:
    class_dir = _defect_class(tmp_path, ["a.png", "b.png", "c.png"], ["a_mask.png", "c_gt.png", "c_mask.png"])
    message = _error(build_datasets, "mvtec", tmp_path, "custom", 8, 8)
    assert str(class_dir / "test/dent/b.png") in message and str(class_dir / "ground_truth/dent/c_gt.png") in message
    assert "no mask is named after it" in message


@pytest.mark.parametrize("suffix", ["_mask", "_gt", "-mask", "_label", "_MASK", "_Gt", ""])
def test_recognised_mask_names_pair_silently(tmp_path: Path, suffix: str) -> None:
    _defect_class(tmp_path, ["000.png", "001.jpg", "002.png"], [f"00{i}{suffix}.png" for i in range(3)])
    _, test = build_datasets("mvtec", tmp_path, "custom", 8, 8)
    pairs = [(Path(s.image_path).stem, Path(s.mask_path).name) for s in test.samples if s.mask_path]
    assert pairs == [(f"00{i}", f"00{i}{suffix}.png") for i in range(3)]


# ----------------------------------------------------------------------------- 4. degenerate class data

def test_test_set_without_defective_images(mvtec_copy: Path) -> None:
    for folder in ("test", "ground_truth"):
        for path in (mvtec_copy / "texture" / folder).iterdir():
            if path.name != "good":
                shutil.rmtree(path)
    message = _error(build_datasets, "mvtec", mvtec_copy, "texture", SIZE, SIZE)
    assert "'texture'" in message and str(mvtec_copy / "texture/test") in message and "no defective" in message


def test_test_set_without_normal_images(mvtec_copy: Path) -> None:
    shutil.rmtree(mvtec_copy / "object/test/good")
    message = _error(build_datasets, "mvtec", mvtec_copy, "object", SIZE, SIZE)
    assert "'object'" in message and str(mvtec_copy / "object/test") in message and "no normal" in message


def test_visa_test_set_without_normal_images(visa_copy: Path) -> None:
    csv_path = visa_copy / "split_csv/1cls.csv"
    table = pd.read_csv(csv_path, keep_default_na=False)
    keep = ~((table["object"] == "object") & (table["split"] == "test") & (table["label"] == "normal"))
    table[keep].to_csv(csv_path, index=False)
    message = _error(build_datasets, "visa", visa_copy, "object", SIZE, SIZE)
    assert "'object'" in message and str(csv_path) in message and "no normal" in message


def _blank_masks(paths) -> None:
    for path in paths:
        with Image.open(path) as mask:
            size = mask.size
        Image.new("L", size, 0).save(path)


def test_all_masks_empty_is_an_error(mvtec_copy: Path) -> None:
    masks = sorted((mvtec_copy / "texture/ground_truth").rglob("*.png"))
    _blank_masks(masks[1:])
    train, _ = build_datasets("mvtec", mvtec_copy, "texture", SIZE, SIZE)  # one non-empty mask is enough
    assert len(train) > 0
    _blank_masks(masks[:1])
    message = _error(build_datasets, "mvtec", mvtec_copy, "texture", SIZE, SIZE)
    assert "'texture'" in message and str(mvtec_copy / "texture/ground_truth") in message and "empty" in message


def test_visa_all_masks_empty_is_an_error(visa_copy: Path) -> None:
    csv_path = visa_copy / "split_csv/1cls.csv"
    table = pd.read_csv(csv_path, keep_default_na=False)
    masks = table[(table["object"] == "texture") & (table["mask"] != "")]["mask"]
    _blank_masks(visa_copy / mask for mask in masks)
    message = _error(build_datasets, "visa", visa_copy, "texture", SIZE, SIZE)
    assert "'texture'" in message and str(csv_path) in message and "empty" in message


def test_empty_mask_check_decodes_one_mask_normally(mvtec_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    read_mask = base.read_mask

    def counting(path):
        calls.append(path)
        return read_mask(path)

    monkeypatch.setattr(base, "read_mask", counting)
    build_datasets("mvtec", mvtec_root, "object", SIZE, SIZE)
    assert len(calls) == 1


def test_visa_split_csv_masks_follow_the_release_exactly(tmp_path):
    """PBAS's VisA loader: the mask as a float image ('F'), resized, then every pixel > 0 (raw values 0/1/2)."""
    from torchvision import transforms

    import datasets.base as base

    rng = np.random.default_rng(0)
    raw = np.zeros((500, 600), np.uint8)
    raw[100:170, 200:330] = rng.integers(1, 3, (70, 130))
    raw[400:403, 50:550] = 1  # a thin defect: most of it lies between pixels after the resize
    path = tmp_path / "m.png"
    Image.fromarray(raw).save(path)
    release = transforms.Compose([transforms.Resize(144), transforms.CenterCrop(128), transforms.ToTensor()])
    expected = (release(Image.open(path).convert("F")) > 0).float()
    assert torch.equal(base.load_mask(str(path), 144, 128, True), expected)
