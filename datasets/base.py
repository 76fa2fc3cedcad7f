"""Shared pieces of the dataset loaders: constants, transforms, sample list, torch Dataset.

On-disk layouts: LAYOUT_MVTEC (ROOT/CLASS/train/good, test/DEFECT, ground_truth/DEFECT; MVTec AD, MPDD, ITDD
and the MVTec-layout conversion of VisA), LAYOUT_SPLIT_CSV (VisA's ROOT/split_csv/1cls.csv), LAYOUT_MVTEC_AD2
(ROOT/CLASS/train/good, test_public/{good,bad}, test_public/ground_truth/bad), LAYOUT_BTAD (ROOT/CLASS/train/ok,
test/{ok,ko}, ground_truth/ko; masks paired by file stem) and LAYOUT_FOLDER (the user's own images:
ROOT/CLASS/train/, test/LABEL/, optional ground_truth/LABEL/ or masks/LABEL/). Masks are binarised (> 0) only in
the split_csv layout, as the PBAS release's VisA loader does.

Decoding (read_rgb, read_mask) accepts more than 8-bit RGB: 16-bit grayscale (I;16*, and I holding
0..65535) is scaled to 8 bits as round(v / 257), or as round(v * 255 / (2^b - 1)) when the file says that only b
bits are significant (PNG sBIT, TIFF MaxSampleValue; e.g. 12-bit camera images) and no value exceeds 2^b - 1;
float F images must lie in [0, 1] (scaled by 255), other modes are converted by PIL (alpha dropped). Masks are
normalised before the resize to an L image with 0 (background) and 255 (any non-zero value: palette index, any
colour channel; alpha ignored), so a 0/1, palette, 16-bit or coloured mask reads like a standard 0/255 one. A
mask stored with lossy compression (JPEG, or TIFF with JPEG compression) is binarised at half range instead
(largest colour channel >= 128), so that compression noise around its edges is not a defect.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from errors import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"  # folder / defect name of normal images
SPLITS = ("train", "test")

DATASET_NAMES = ("mvtec", "visa", "mpdd", "itdd", "mvtec_ad2", "btad", "folder")
CLASSES: dict[str, tuple[str, ...]] = {
    "mvtec": (
        "carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule",
        "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
    ),
    "visa": (
        "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
        "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
    ),
    "mpdd": ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"),
    "itdd": ("cotton_fabric", "dyed_fabric", "hemp_fabric", "plaid_fabric"),  # CRAS authors' textile dataset
    "mvtec_ad2": ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts"),
    "btad": ("01", "02", "03"),  # BTech_Dataset_transformed
    "folder": (),  # the user's own class folders: no official list, give the classes with -d
}
# PBAS release only: these MVTec classes are resized to imagesize * 8 / 7 before the centre crop (CRAS: never).
WIDE_RESIZE_CLASSES: dict[str, tuple[str, ...]] = {"mvtec": ("toothbrush", "wood")}
WIDE_RESIZE_FACTOR = 8 / 7
LAYOUT_MVTEC = "mvtec"  # ROOT/CLASS/{train,test,ground_truth}/...
LAYOUT_SPLIT_CSV = "split_csv"  # ROOT/split_csv/1cls.csv (prepared VisA)
LAYOUT_MVTEC_AD2 = "mvtec_ad2"  # ROOT/CLASS/{train/good,test_public/{good,bad},test_public/ground_truth/bad}
LAYOUT_BTAD = "btad"  # ROOT/CLASS/{train/ok,test/{ok,ko},ground_truth/ko}, masks paired by stem
LAYOUT_FOLDER = "folder"  # ROOT/CLASS/{train,test/LABEL,[ground_truth|masks]/LABEL}, masks optional
LAYOUTS = (LAYOUT_MVTEC, LAYOUT_SPLIT_CSV, LAYOUT_MVTEC_AD2, LAYOUT_BTAD, LAYOUT_FOLDER)
BINARIZED_MASK_LAYOUTS = (LAYOUT_SPLIT_CSV,)

# Errors PIL / the OS raise for missing, unreadable or corrupt image files.
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Sample:
    """One image of a split: its path, its mask path (None for normal images), label and defect type."""

    image_path: str
    mask_path: str | None
    is_anomaly: int
    defect: str


def effective_resize(
    dataset: str, classname: str, resize: int, imagesize: int, class_resize_rule: bool = True
) -> int:
    """Resize actually used: with class_resize_rule (PBAS release) MVTec toothbrush/wood use
    int(imagesize * 8 / 7); without it (CRAS release) `resize` for every class."""
    if class_resize_rule and classname in WIDE_RESIZE_CLASSES.get(dataset, ()):
        return int(imagesize * WIDE_RESIZE_FACTOR)
    return resize


_MAX_16BIT = 65535
_SAVE_HINT = "save it as 8-bit RGB or grayscale (e.g. PNG)"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_MAX_SAMPLE_VALUE = 281  # TIFF tag MaxSampleValue
LOSSY_MASK_THRESHOLD = 128  # half of the 8-bit range: a lossy mask's defect pixels


def _image_name(image: Image.Image) -> str:
    return getattr(image, "filename", "") or "<in-memory image>"


def _gray8_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")


def _png_significant_bits(path: str) -> int | None:
    """The first value of a PNG file's sBIT chunk (the gray channel's significant bits), or None without one."""
    try:
        with open(path, "rb") as f:
            if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                return None
            while len(head := f.read(8)) == 8:
                length, kind = struct.unpack(">I4s", head)
                if kind == b"sBIT":
                    data = f.read(length)
                    return data[0] if data else None
                if kind in (b"IDAT", b"IEND"):  # sBIT comes before the image data
                    return None
                f.seek(length + 4, os.SEEK_CUR)  # data and CRC
    except OSError:
        return None
    return None


def significant_bits(image: Image.Image, path: str | None) -> int | None:
    """How many low bits of a 16-bit grayscale image the file says carry data (PNG sBIT, TIFF MaxSampleValue);
    None when the file does not say."""
    if image.format == "PNG" and path and os.path.isfile(path):
        return _png_significant_bits(path)
    if image.format == "TIFF":
        value = getattr(image, "tag_v2", {}).get(TIFF_MAX_SAMPLE_VALUE)
        value = value[0] if isinstance(value, tuple) and value else value
        return int(value).bit_length() if isinstance(value, int) and value > 0 else None
    return None


def _scale_16bit(values: np.ndarray, bits: int | None) -> np.ndarray:
    """16-bit gray values -> 0..255: round(v * 255 / (2^bits - 1)) when the file says ``bits`` < 16 significant bits
    and no value exceeds 2^bits - 1 (a 12-bit sensor: 4095 -> 255), else round(v / 257). No ties either way."""
    top = _MAX_16BIT
    if bits is not None and 8 <= bits < 16 and (not values.size or values.max() < 1 << bits):
        top = (1 << bits) - 1
    return (values.astype(np.uint64) * 510 + top) // (2 * top)


def to_rgb8(image: Image.Image, path: str | None = None) -> Image.Image:
    """8-bit RGB version of a decoded PIL image (the image itself if it is RGB already).

    16-bit grayscale (modes I;16, I;16B, I;16L, I;16N, and I holding 0..65535) -> round(v / 257), or
    round(v * 255 / (2^b - 1)) when the file says b significant bits (``significant_bits``); F (float)
    -> round(v * 255) if every value is in [0, 1]; any other mode via PIL's convert("RGB") (alpha dropped;
    PIL already reduces 16-bit RGB files to 8 bits by keeping the high byte). DatasetError naming `path`
    for values out of range or a mode PIL cannot convert.
    """
    if image.mode == "RGB":
        return image
    name = path or _image_name(image)
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > _MAX_16BIT):
            raise DatasetError(
                f"Integer image file '{name}' (mode {image.mode}) holds values {values.min()}..{values.max()}, "
                f"outside the 16-bit range 0..{_MAX_16BIT}; {_SAVE_HINT}."
            )
        return _gray8_to_rgb(_scale_16bit(values, significant_bits(image, path or getattr(image, "filename", None))))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        outside = values[~((values >= 0.0) & (values <= 1.0))]  # NaN counts as outside
        if outside.size:
            raise DatasetError(
                f"Float image file '{name}' (mode F) holds {outside.size} value(s) outside [0, 1] (e.g. "
                f"{outside[0]:.6g}); scale it to [0, 1] or {_SAVE_HINT}."
            )
        return _gray8_to_rgb(np.rint(values * 255.0))
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise DatasetError(
            f"Image file '{name}' has pixel mode '{image.mode}', which cannot be converted to RGB ({error}); "
            f"{_SAVE_HINT}."
        ) from error


def _nonzero(image: Image.Image, name: str) -> np.ndarray:
    """bool[H, W]: pixels with any non-zero value (palette index for P/PA, colour channels only)."""
    mode = image.mode
    if mode in ("1", "L", "P", "I", "F") or mode.startswith("I;16"):
        return np.asarray(image) != 0
    if mode in ("PA", "LA", "La"):
        return np.asarray(image)[..., 0] != 0
    if mode in ("RGB", "RGBA", "RGBa", "RGBX"):
        return (np.asarray(image)[..., :3] != 0).any(axis=-1)
    return (np.asarray(to_rgb8(image, name)) != 0).any(axis=-1)  # CMYK, YCbCr, LAB, HSV: their RGB colour


def is_lossy(image: Image.Image) -> bool:
    """Whether a decoded file was stored with lossy compression: JPEG (and MPO), or TIFF with JPEG compression."""
    return image.format in ("JPEG", "MPO") or (image.format == "TIFF"
                                                and image.info.get("compression") in ("jpeg", "tiff_jpeg"))


def _upper_half(image: Image.Image, name: str) -> np.ndarray:
    """bool[H, W]: pixels whose largest colour channel is at least half the 8-bit range (a lossy mask's defects)."""
    values = np.asarray(image) if image.mode == "L" else np.asarray(to_rgb8(image, name)).max(axis=-1)
    return values >= LOSSY_MASK_THRESHOLD


def to_binary_mask(image: Image.Image, path: str | None = None) -> Image.Image:
    """Mask image -> "L" image with 0 (background) and 255 (defect): any non-zero pixel of a losslessly stored
    mask (identity for 0/255 L masks), the upper half of the range of a lossy one (JPEG: compression noise
    around the edges is not a defect)."""
    name = path or _image_name(image)
    if is_lossy(image):
        return Image.fromarray(_upper_half(image, name).astype(np.uint8) * 255, "L")
    if image.mode == "L":
        return image.point([0] + [255] * 255)
    return Image.fromarray(_nonzero(image, name).astype(np.uint8) * 255, "L")


class _ToRGB:
    """Convert any PIL image (L, RGBA, P, 16-bit, ...) to 8-bit RGB with to_rgb8; a class so that it pickles
    for DataLoader workers."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return to_rgb8(image)


def image_transform(resize: int, imagesize: int) -> transforms.Compose:
    """PIL image -> normalised FloatTensor[3, imagesize, imagesize]."""
    return transforms.Compose([
        _ToRGB(),
        transforms.Resize(resize),
        transforms.CenterCrop(imagesize),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def mask_transform(resize: int, imagesize: int) -> transforms.Compose:
    """PIL "L" 0/255 mask (to_binary_mask) -> FloatTensor[1, imagesize, imagesize] in [0, 1] (bilinear, not
    re-binarised)."""
    return transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(imagesize),
        transforms.ToTensor(),
    ])


def _decode(path: str) -> Image.Image:
    """Open and fully decode an image file; any decoding problem becomes a DatasetError naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except IMAGE_READ_ERRORS as error:
        raise DatasetError(
            f"Cannot decode image file '{path}' ({type(error).__name__}: {error}); "
            "replace or remove the file."
        ) from error


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image (to_rgb8 scaling of 16-bit / float images); the one
    image reader of training, testing and prediction. DatasetError (one line, naming the file) otherwise."""
    path = os.fspath(path)
    return to_rgb8(_decode(path), path)


def read_mask(path: str | os.PathLike) -> Image.Image:
    """Decode a mask file into an "L" image with 0 and 255 (to_binary_mask); DatasetError naming the file."""
    path = os.fspath(path)
    return to_binary_mask(_decode(path), path)


def _apply_image(path: str, transform: transforms.Compose) -> torch.Tensor:
    return transform(read_rgb(path))  # [3, S, S]


def _apply_mask(path: str | None, transform: transforms.Compose, imagesize: int, binarize: bool) -> torch.Tensor:
    if path is None:
        return torch.zeros(1, imagesize, imagesize)
    mask = read_mask(path)  # L, 0 / 255
    if binarize:  # the PBAS VisA loader resizes the mask as a float image, then keeps every pixel > 0
        return (transform(mask.convert("F")) > 0).float()
    return transform(mask)  # [1, S, S], values k / 255


def load_image(path: str, resize: int, imagesize: int) -> torch.Tensor:
    """Read an image file with read_rgb and return the normalised FloatTensor[3, imagesize, imagesize]."""
    return _apply_image(path, image_transform(resize, imagesize))


def load_mask(path: str | None, resize: int, imagesize: int, binarize: bool) -> torch.Tensor:
    """Read a mask file with read_mask as FloatTensor[1, imagesize, imagesize]; zeros for None; `> 0` if
    binarize."""
    return _apply_mask(path, mask_transform(resize, imagesize), imagesize, binarize)


def list_images(folder: str) -> list[str]:
    """Sorted names of the image files (by extension, case-insensitive) directly inside `folder`."""
    return sorted(
        name for name in os.listdir(folder)
        if not name.startswith(".")
        and name.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, name))
    )


def list_subfolders(folder: str) -> list[str]:
    """Sorted names of the visible sub-folders of `folder`."""
    return sorted(
        name for name in os.listdir(folder)
        if not name.startswith(".") and os.path.isdir(os.path.join(folder, name))
    )


def _header_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header (cheap); DatasetError naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except IMAGE_READ_ERRORS as error:
        raise DatasetError(
            f"Cannot read image file '{path}' ({type(error).__name__}: {error}); "
            "replace or remove the file."
        ) from error


def check_readable(samples: Iterable[Sample]) -> None:
    """Open the header of every image and mask (cheap); raise DatasetError naming the first bad file, or the
    first mask whose size (width, height) differs from its image's."""
    for sample in samples:
        size = _header_size(sample.image_path)
        if sample.mask_path is None:
            continue
        mask_size = _header_size(sample.mask_path)
        if mask_size != size:
            raise DatasetError(
                f"Mask '{sample.mask_path}' is {mask_size[0]}x{mask_size[1]} (width x height) but its image "
                f"'{sample.image_path}' is {size[0]}x{size[1]}; a mask must have its image's size: check that "
                "they belong together (pairs are formed in sorted order, or by file name for btad and folder) or resize the mask to the image."
            )


def check_test_labels(samples: Iterable[Sample], classname: str, location: str) -> None:
    """DatasetError unless the test set holds both normal and defective images (image AUROC needs both)."""
    labels = [sample.is_anomaly for sample in samples]
    n_defective = sum(1 for label in labels if label)
    n_normal = len(labels) - n_defective
    if not n_defective:
        raise DatasetError(
            f"Test set of class '{classname}' ({location}) has {n_normal} normal and no defective image, so image "
            "AUROC is undefined; add defective test images with their masks."
        )
    if not n_normal:
        raise DatasetError(
            f"Test set of class '{classname}' ({location}) has {n_defective} defective and no normal image, so "
            "image AUROC is undefined; add normal (good) test images."
        )


def check_masks_not_all_empty(samples: Iterable[Sample], classname: str, location: str) -> None:
    """DatasetError if no mask of the class has a non-zero pixel (pixel metrics undefined). Decodes masks only
    until the first non-empty one (normally the first); single empty masks are allowed."""
    paths = [sample.mask_path for sample in samples if sample.mask_path is not None]
    if not paths or any(read_mask(path).getbbox() is not None for path in paths):
        return
    raise DatasetError(
        f"All {len(paths)} masks of class '{classname}' ({location}) are empty (no non-zero pixel), so pixel "
        "metrics are undefined; mark the defects in the masks with non-zero pixels (e.g. 255 on 0)."
    )


class AnomalyDataset(torch.utils.data.Dataset):
    """Images (and masks) of one class and split, transformed like the released PBAS / CRAS code.

    `layout` records the on-disk layout the samples were read from (one of LAYOUTS). `has_masks` is False only
    for a folder-dataset class without any mask folder: its masks are all zeros and pixel metrics are undefined.
    """

    def __init__(
        self,
        dataset: str,
        classname: str,
        split: str,
        samples: list[Sample],
        resize: int,
        imagesize: int,
        binarize_mask: bool = False,
        layout: str = LAYOUT_MVTEC,
        has_masks: bool = True,
    ) -> None:
        self.dataset = dataset
        self.classname = classname
        self.split = split
        self.samples = list(samples)
        self.resize = resize
        self.imagesize = imagesize
        self.binarize_mask = binarize_mask
        self.layout = layout
        self.has_masks = has_masks
        self.transform_image = image_transform(resize, imagesize)
        self.transform_mask = mask_transform(resize, imagesize)

    def __len__(self) -> int:
        return len(self.samples)

    def mask(self, index: int) -> torch.Tensor:
        """The mask of sample ``index`` alone, without decoding its image: [1, S, S]."""
        sample = self.samples[index]
        return _apply_mask(sample.mask_path, self.transform_mask, self.imagesize, self.binarize_mask)

    def image_item(self, index: int) -> dict:
        """{"image", "index"} of sample ``index``, without decoding its mask (the feature cache needs only this)."""
        return {"image": _apply_image(self.samples[index].image_path, self.transform_image), "index": index}

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        return {
            "image": _apply_image(sample.image_path, self.transform_image),  # [3, S, S]
            "mask": self.mask(index),  # [1, S, S]
            "is_anomaly": sample.is_anomaly,
            "image_path": sample.image_path,
            "defect": sample.defect,
            "index": index,
        }

    def __repr__(self) -> str:
        return (
            f"AnomalyDataset({self.dataset}/{self.classname}, split={self.split}, n={len(self)}, "
            f"resize={self.resize}, imagesize={self.imagesize}, layout={self.layout}"
            f"{'' if self.has_masks else ', no masks'})"
        )


def heatmap_names(dataset: AnomalyDataset) -> list[str]:
    """File name of each test image's heatmap: DEFECT_STEM.png (DEFECT_STEM-2.png, ... when stems repeat)."""
    names, used = [], set()
    for sample in dataset.samples:
        base = f"{sample.defect}_{os.path.splitext(os.path.basename(sample.image_path))[0]}"
        name, count = base, 1
        while name in used:
            count += 1
            name = f"{base}-{count}"
        used.add(name)
        names.append(f"{name}.png")
    return names
