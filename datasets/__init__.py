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
    check_masks_not_all_empty,
    check_readable,
    check_test_labels,
    effective_resize,
    image_transform,
    load_image,
    load_mask,
    mask_transform,
    read_mask,
    read_rgb,
)

__all__ = [
    "AnomalyDataset", "CLASSES", "DATASET_NAMES", "DatasetError", "IMAGENET_MEAN", "IMAGENET_STD",
    "LAYOUTS", "LAYOUT_MVTEC", "LAYOUT_SPLIT_CSV", "Sample", "build_datasets", "dataset_layout",
    "effective_resize", "image_transform", "load_image", "load_mask", "mask_transform", "read_mask", "read_rgb",
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


def _locations(layout: str, root: str, classname: str) -> tuple[str, str]:
    """Where the test images and the masks of a class are listed, for error messages."""
    if layout == LAYOUT_SPLIT_CSV:
        listed = f"listed in '{os.path.join(root, visa.SPLIT_CSV)}'"
        return listed, listed
    class_path = os.path.join(root, classname)
    return (f"folder '{os.path.join(class_path, mvtec.TEST_DIR)}'",
            f"folder '{os.path.join(class_path, mvtec.GROUND_TRUTH_DIR)}'")


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
    Checked before any training (DatasetError): every file header is readable, every mask has its image's size,
    the test set holds normal and defective images, and not every mask is empty.
    """
    root = os.fspath(root)
    _check_request(dataset, root, resize, imagesize)
    layout = dataset_layout(dataset, root, classname)
    train, test = _COLLECTORS[layout](root, classname)
    test_location, mask_location = _locations(layout, root, classname)
    check_test_labels(test, classname, test_location)
    check_readable(train + test)
    check_masks_not_all_empty(test, classname, mask_location)
    size = effective_resize(dataset, classname, resize, imagesize, class_resize_rule)
    binarize = layout in BINARIZED_MASK_LAYOUTS
    return (
        AnomalyDataset(dataset, classname, "train", train, size, imagesize, binarize, layout),
        AnomalyDataset(dataset, classname, "test", test, size, imagesize, binarize, layout),
    )
