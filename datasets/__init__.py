"""Dataset loaders for MVTec AD, VisA, MPDD and ITDD (no augmentation), as in the released PBAS / CRAS code.

MVTec AD, MPDD and ITDD use the MVTec AD layout; VisA is read from ROOT/split_csv/1cls.csv (PBAS release,
masks binarised) or, when that file is absent, from its MVTec-layout conversion (CRAS release, masks as read);
`AnomalyDataset.layout` records which. `build_datasets(..., class_resize_rule=False)` drops the PBAS release's
MVTec toothbrush/wood resize rule (CRAS uses the given resize for every class).
"""

from __future__ import annotations

import os
from typing import Callable

from datasets import mvtec, visa
from datasets.base import (
    BINARIZED_MASK_LAYOUTS,
    CLASSES,
    DATASET_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LAYOUT_MVTEC,
    LAYOUT_SPLIT_CSV,
    LAYOUTS,
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
    "LAYOUTS", "LAYOUT_MVTEC", "LAYOUT_SPLIT_CSV", "Sample", "build_datasets", "dataset_layout",
    "effective_resize", "image_transform", "load_image", "load_mask", "mask_transform",
]

Collector = Callable[[str, str], tuple[list[Sample], list[Sample]]]
_COLLECTORS: dict[str, Collector] = {LAYOUT_MVTEC: mvtec.collect_samples, LAYOUT_SPLIT_CSV: visa.collect_samples}


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


def dataset_layout(dataset: str, root: str | os.PathLike, classname: str) -> str:
    """On-disk layout of a class: VisA is detected from the folder (visa.detect_layout), the others are MVTec."""
    if dataset == "visa":
        return visa.detect_layout(os.fspath(root), classname)
    return LAYOUT_MVTEC


def build_datasets(
    dataset: str,
    root: str | os.PathLike,
    classname: str,
    resize: int,
    imagesize: int,
    class_resize_rule: bool = True,
) -> tuple[AnomalyDataset, AnomalyDataset]:
    """(train, test) datasets of one class; checks every file up front.

    class_resize_rule: apply the PBAS release's MVTec toothbrush/wood resize (effective_resize); False (CRAS)
    uses `resize` for every class. Masks are binarised iff the detected layout is split_csv.
    """
    root = os.fspath(root)
    _check_request(dataset, root, resize, imagesize)
    layout = dataset_layout(dataset, root, classname)
    train, test = _COLLECTORS[layout](root, classname)
    check_readable(train + test)
    size = effective_resize(dataset, classname, resize, imagesize, class_resize_rule)
    binarize = layout in BINARIZED_MASK_LAYOUTS
    return (
        AnomalyDataset(dataset, classname, "train", train, size, imagesize, binarize, layout),
        AnomalyDataset(dataset, classname, "test", test, size, imagesize, binarize, layout),
    )
