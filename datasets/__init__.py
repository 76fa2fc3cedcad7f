"""Dataset loaders for MVTec AD, VisA and MPDD (no augmentation), as in the released PBAS code."""

from __future__ import annotations

import os

from datasets import mvtec, visa
from datasets.base import (
    BINARIZED_MASK_DATASETS,
    CLASSES,
    DATASET_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnomalyDataset,
    DatasetError,
    Sample,
    check_readable,
    effective_resize,
    image_transform,
    load_image,
    load_mask,
    mask_transform,
)

__all__ = [
    "AnomalyDataset", "CLASSES", "DATASET_NAMES", "DatasetError", "IMAGENET_MEAN", "IMAGENET_STD",
    "Sample", "build_datasets", "effective_resize", "image_transform", "load_image", "load_mask",
    "mask_transform",
]

_COLLECTORS = {"mvtec": mvtec.collect_samples, "mpdd": mvtec.collect_samples, "visa": visa.collect_samples}


def _check_request(dataset: str, root: str, resize: int, imagesize: int) -> None:
    """DatasetError for an unknown dataset name, a missing DATAPATH or non-positive sizes."""
    if dataset not in DATASET_NAMES:
        raise DatasetError(f"Unknown dataset '{dataset}'; valid names: {', '.join(DATASET_NAMES)}.")
    if not os.path.isdir(root):
        raise DatasetError(
            f"DATAPATH '{root}' does not exist or is not a directory; point it to the {dataset} root folder."
        )
    if resize <= 0 or imagesize <= 0:
        raise DatasetError(f"resize ({resize}) and imagesize ({imagesize}) must be positive integers.")


def build_datasets(
    dataset: str, root: str | os.PathLike, classname: str, resize: int, imagesize: int
) -> tuple[AnomalyDataset, AnomalyDataset]:
    """(train, test) datasets of one class; applies effective_resize and checks every file up front."""
    root = os.fspath(root)
    _check_request(dataset, root, resize, imagesize)
    train, test = _COLLECTORS[dataset](root, classname)
    check_readable(train + test)
    size = effective_resize(dataset, classname, resize, imagesize)
    binarize = dataset in BINARIZED_MASK_DATASETS
    return (
        AnomalyDataset(dataset, classname, "train", train, size, imagesize, binarize),
        AnomalyDataset(dataset, classname, "test", test, size, imagesize, binarize),
    )
