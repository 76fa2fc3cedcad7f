"""Shared pieces of the dataset loaders: constants, transforms, sample list, torch Dataset.

Two on-disk layouts exist: LAYOUT_MVTEC (ROOT/CLASS/train/good, test/DEFECT, ground_truth/DEFECT; MVTec AD,
MPDD, ITDD and the MVTec-layout conversion of VisA) and LAYOUT_SPLIT_CSV (VisA's ROOT/split_csv/1cls.csv).
Masks are binarised (> 0) only in the split_csv layout, as the PBAS release's VisA loader does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
from PIL import Image
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"  # folder / defect name of normal images
SPLITS = ("train", "test")

DATASET_NAMES = ("mvtec", "visa", "mpdd", "itdd")
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
}
# PBAS release only: these MVTec classes are resized to imagesize * 8 / 7 before the centre crop (CRAS: never).
WIDE_RESIZE_CLASSES: dict[str, tuple[str, ...]] = {"mvtec": ("toothbrush", "wood")}
WIDE_RESIZE_FACTOR = 8 / 7
LAYOUT_MVTEC = "mvtec"  # ROOT/CLASS/{train,test,ground_truth}/...
LAYOUT_SPLIT_CSV = "split_csv"  # ROOT/split_csv/1cls.csv (prepared VisA)
LAYOUTS = (LAYOUT_MVTEC, LAYOUT_SPLIT_CSV)
BINARIZED_MASK_LAYOUTS = (LAYOUT_SPLIT_CSV,)

# Errors PIL / the OS raise for missing, unreadable or corrupt image files.
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """Bad dataset input; the message is one line naming the path/name and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


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


class _ToRGB:
    """Convert any PIL image (L, RGBA, P, ...) to RGB; a class so that it pickles for DataLoader workers."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")


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
    """PIL "L" mask -> FloatTensor[1, imagesize, imagesize] in [0, 1] (bilinear, not re-binarised)."""
    return transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(imagesize),
        transforms.ToTensor(),
    ])


def _read_pil(path: str, mode: str) -> Image.Image:
    """Decode a whole image file into `mode`; any decoding problem becomes a DatasetError naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except IMAGE_READ_ERRORS as error:
        raise DatasetError(
            f"Cannot decode image file '{path}' ({type(error).__name__}: {error}); "
            "replace or remove the file."
        ) from error


def _apply_image(path: str, transform: transforms.Compose) -> torch.Tensor:
    return transform(_read_pil(path, "RGB"))  # [3, S, S]


def _apply_mask(path: str | None, transform: transforms.Compose, imagesize: int, binarize: bool) -> torch.Tensor:
    if path is None:
        return torch.zeros(1, imagesize, imagesize)
    mask = transform(_read_pil(path, "L"))  # [1, S, S], values k / 255
    return (mask > 0).float() if binarize else mask


def load_image(path: str, resize: int, imagesize: int) -> torch.Tensor:
    """Read an image file as RGB and return the normalised FloatTensor[3, imagesize, imagesize]."""
    return _apply_image(path, image_transform(resize, imagesize))


def load_mask(path: str | None, resize: int, imagesize: int, binarize: bool) -> torch.Tensor:
    """Read a mask file as FloatTensor[1, imagesize, imagesize]; zeros for None; `> 0` if binarize."""
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


def check_readable(samples: Iterable[Sample]) -> None:
    """Open the header of every image and mask (cheap); raise DatasetError naming the first bad file."""
    for sample in samples:
        for path in (sample.image_path, sample.mask_path):
            if path is None:
                continue
            try:
                with Image.open(path):
                    pass
            except IMAGE_READ_ERRORS as error:
                raise DatasetError(
                    f"Cannot read image file '{path}' ({type(error).__name__}: {error}); "
                    "replace or remove the file."
                ) from error


class AnomalyDataset(torch.utils.data.Dataset):
    """Images (and masks) of one class and split, transformed like the released PBAS / CRAS code.

    `layout` records the on-disk layout the samples were read from (LAYOUT_MVTEC or LAYOUT_SPLIT_CSV).
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
    ) -> None:
        self.dataset = dataset
        self.classname = classname
        self.split = split
        self.samples = list(samples)
        self.resize = resize
        self.imagesize = imagesize
        self.binarize_mask = binarize_mask
        self.layout = layout
        self.transform_image = image_transform(resize, imagesize)
        self.transform_mask = mask_transform(resize, imagesize)

    def __len__(self) -> int:
        return len(self.samples)

    def mask(self, index: int) -> torch.Tensor:
        """The mask of sample ``index`` alone, without decoding its image: [1, S, S]."""
        sample = self.samples[index]
        return _apply_mask(sample.mask_path, self.transform_mask, self.imagesize, self.binarize_mask)

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
            f"resize={self.resize}, imagesize={self.imagesize}, layout={self.layout})"
        )
