"""Dataset loaders (no augmentation) for MVTec AD, VisA, MPDD and ITDD, as in the released PBAS / CRAS code,
and for MVTec AD 2, BTAD and the user's own images (folder).

MVTec AD, MPDD and ITDD use the MVTec AD layout; VisA is read from ROOT/split_csv/1cls.csv (PBAS release,
masks binarised) or, when that file is absent, from its MVTec-layout conversion (CRAS release, masks as read);
`AnomalyDataset.layout` records which. mvtec_ad2 (datasets/mvtec_ad2.py), btad (datasets/btad.py) and folder
(datasets/folder.py) have layouts of their own, masks read as in MVTec AD. A folder class may have no masks at
all: `AnomalyDataset.has_masks` is then False (True otherwise). `build_datasets(..., class_resize_rule=False)`
drops the PBAS release's MVTec toothbrush/wood resize rule (CRAS uses the given resize for every class; the rule
never applies to the other datasets).
"""

from __future__ import annotations

import os
from typing import Callable

from datasets import btad, folder, mvtec, mvtec_ad2, visa
from datasets.base import (
    BINARIZED_MASK_LAYOUTS,
    CLASSES,
    DATASET_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LAYOUT_BTAD,
    LAYOUT_FOLDER,
    LAYOUT_MVTEC,
    LAYOUT_MVTEC_AD2,
    LAYOUT_SPLIT_CSV,
    LAYOUTS,
    AnomalyDataset,
    DatasetError,
    Sample,
    check_masks_not_all_empty,
    check_readable,
    check_test_labels,
    effective_resize,
    heatmap_names,
    image_transform,
    load_image,
    load_mask,
    mask_transform,
    read_mask,
    read_rgb,
)

__all__ = [
    "AnomalyDataset", "CLASSES", "DATASET_NAMES", "DatasetError", "IMAGENET_MEAN", "IMAGENET_STD",
    "LAYOUTS", "LAYOUT_BTAD", "LAYOUT_FOLDER", "LAYOUT_MVTEC", "LAYOUT_MVTEC_AD2", "LAYOUT_SPLIT_CSV", "Sample",
    "build_datasets", "dataset_layout", "effective_resize", "heatmap_names", "image_transform", "load_image", "load_mask",
    "mask_transform", "read_mask", "read_rgb", "split_job_name",
]

Collector = Callable[[str, str], tuple[list[Sample], list[Sample]]]
_COLLECTORS: dict[str, Collector] = {
    LAYOUT_MVTEC: mvtec.collect_samples,
    LAYOUT_SPLIT_CSV: visa.collect_samples,
    LAYOUT_MVTEC_AD2: mvtec_ad2.collect_samples,
    LAYOUT_BTAD: btad.collect_samples,
    LAYOUT_FOLDER: folder.collect_samples,
}
_OWN_LAYOUT = {"mvtec_ad2": LAYOUT_MVTEC_AD2, "btad": LAYOUT_BTAD, "folder": LAYOUT_FOLDER}
# (test folder, mask folder) of a class, relative to ROOT/CLASS, named in error messages
_FOLDERS = {
    LAYOUT_MVTEC: (mvtec.TEST_DIR, mvtec.GROUND_TRUTH_DIR),
    LAYOUT_MVTEC_AD2: (mvtec_ad2.TEST_DIR, os.path.join(mvtec_ad2.TEST_DIR, mvtec_ad2.GROUND_TRUTH_DIR)),
    LAYOUT_BTAD: (btad.TEST_DIR, btad.GROUND_TRUTH_DIR),
    LAYOUT_FOLDER: (folder.TEST_DIR, folder.MASK_DIRS[0]),
}


def split_job_name(name: str) -> tuple[str, str]:
    """(dataset, class) of a job name f"{dataset}_{class}" (e.g. "mvtec_ad2_fruit_jelly" -> ("mvtec_ad2",
    "fruit_jelly")): the longest DATASET_NAMES prefix wins, since dataset names may contain "_"; a name with
    no known prefix splits at its first "_"."""
    for dataset in sorted(DATASET_NAMES, key=len, reverse=True):
        if name.startswith(dataset + "_"):
            return dataset, name[len(dataset) + 1:]
    dataset, _, classname = name.partition("_")
    return dataset, classname


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
    """On-disk layout of a class: VisA is detected from the folder (visa.detect_layout); mvtec_ad2, btad and
    folder have their own (LAYOUT_MVTEC_AD2, LAYOUT_BTAD, LAYOUT_FOLDER); MVTec AD, MPDD, ITDD are LAYOUT_MVTEC."""
    if dataset == "visa":
        return visa.detect_layout(os.fspath(root), classname)
    return _OWN_LAYOUT.get(dataset, LAYOUT_MVTEC)


def _locations(layout: str, root: str, classname: str) -> tuple[str, str]:
    """Where the test images and the masks of a class are listed, for error messages."""
    if layout == LAYOUT_SPLIT_CSV:
        listed = f"listed in '{os.path.join(root, visa.SPLIT_CSV)}'"
        return listed, listed
    class_path = os.path.join(root, classname)
    test_dir, mask_dir = _FOLDERS[layout]
    return (f"folder '{os.path.join(class_path, test_dir)}'", f"folder '{os.path.join(class_path, mask_dir)}'")


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
    the test set holds normal and defective images, and not every mask is empty (skipped for a folder class
    without masks, whose datasets have has_masks False).
    """
    root = os.fspath(root)
    _check_request(dataset, root, resize, imagesize)
    layout = dataset_layout(dataset, root, classname)
    train, test = _COLLECTORS[layout](root, classname)
    test_location, mask_location = _locations(layout, root, classname)
    check_test_labels(test, classname, test_location)
    check_readable(train + test)
    has_masks = any(sample.mask_path is not None for sample in test)  # False only for a folder class
    if has_masks:
        check_masks_not_all_empty(test, classname, mask_location)
    size = effective_resize(dataset, classname, resize, imagesize, class_resize_rule)
    binarize = layout in BINARIZED_MASK_LAYOUTS
    return (
        AnomalyDataset(dataset, classname, "train", train, size, imagesize, binarize, layout, has_masks),
        AnomalyDataset(dataset, classname, "test", test, size, imagesize, binarize, layout, has_masks),
    )
