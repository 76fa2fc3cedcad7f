"""Sample lists for a generic folder dataset (the user's own images; class names are the user's folders).

ROOT/CLASS/train/: normal training images, directly or in ONE sub-folder good/, normal/ or ok/;
ROOT/CLASS/test/LABEL/: test images per label; LABEL good, normal or ok (case-insensitive) is normal, any other
LABEL is anomalous (defect = LABEL);
ROOT/CLASS/ground_truth/LABEL/ or ROOT/CLASS/masks/LABEL/ (optional): one mask per image of anomalous LABEL,
paired by file stem (the mask's stem may add _mask, _gt, -mask or _label; any image extension).
Either every anomalous label has a mask folder, or none has: then the class has no masks (mask_path None,
AnomalyDataset.has_masks False, image metrics only). Masks are read as in MVTec AD (not binarised).
"""

from __future__ import annotations

import os

from datasets import mvtec
from datasets.base import DatasetError, Sample, list_images, list_subfolders

TRAIN_DIR = "train"
TEST_DIR = "test"
NORMAL_LABELS = ("good", "normal", "ok")  # case-insensitive
MASK_DIRS = ("ground_truth", "masks")
MASK_LAYOUT = "ROOT/CLASS/ground_truth/LABEL/STEM[_mask].png"
_LAYOUT = ("folder layout ROOT/CLASS/train/[good/]*.png, ROOT/CLASS/test/LABEL/*.png with LABEL good/normal/ok "
           "for normal images, optional masks in ROOT/CLASS/ground_truth/LABEL/")


def is_normal(label: str) -> bool:
    """True for the normal labels good, normal and ok (any case)."""
    return label.lower() in NORMAL_LABELS


def _image_subfolders(folder: str) -> list[str]:
    """Sorted sub-folders of `folder` that hold image files directly (empty ones are ignored)."""
    return [name for name in list_subfolders(folder) if list_images(os.path.join(folder, name))]


def train_split(class_path: str) -> list[Sample]:
    """Normal training images: CLASS/train/* or CLASS/train/{good,normal,ok}/* (exactly one of these)."""
    folder = os.path.join(class_path, TRAIN_DIR)
    if not os.path.isdir(folder):
        raise DatasetError(
            f"Training folder '{folder}' is missing; put the normal training images there, directly or in one "
            f"sub-folder good/, normal/ or ok/ ({_LAYOUT})."
        )
    direct = list_images(folder)
    subfolders = _image_subfolders(folder)
    others = [name for name in subfolders if not is_normal(name)]
    if others:
        raise DatasetError(
            f"Training folder '{folder}' has sub-folder(s) {', '.join(others)} with images; training uses normal "
            "images only, directly in train/ or in one sub-folder good/, normal/ or ok/: move the others to "
            "test/LABEL/."
        )
    if len(subfolders) + bool(direct) > 1:
        places = (["train/ itself"] if direct else []) + [f"train/{name}/" for name in subfolders]
        raise DatasetError(
            f"Training folder '{folder}' holds images in {' and '.join(places)}; keep the normal training "
            "images in one place (directly in train/ or in one sub-folder good/, normal/ or ok/)."
        )
    if not direct and not subfolders:
        raise DatasetError(
            f"Training folder '{folder}' contains no images; add normal training images there, directly or in "
            "one sub-folder good/, normal/ or ok/."
        )
    image_folder = folder if direct else os.path.join(folder, subfolders[0])
    label = os.path.basename(image_folder) if subfolders else "good"
    return [Sample(os.path.join(image_folder, name), None, 0, label) for name in list_images(image_folder)]


def _mask_folder(class_path: str, label: str) -> str | None:
    """CLASS/ground_truth/LABEL or CLASS/masks/LABEL, whichever exists (None if neither; error if both)."""
    found = [os.path.join(class_path, name, label) for name in MASK_DIRS]
    found = [path for path in found if os.path.isdir(path)]
    if len(found) > 1:
        raise DatasetError(
            f"Label '{label}' has two mask folders, '{found[0]}' and '{found[1]}'; keep only one of them."
        )
    return found[0] if found else None


def test_split(class_path: str) -> list[Sample]:
    """Test samples of every label folder of CLASS/test (sorted by label, then file name), masks paired by
    stem when the anomalous labels have mask folders (all or none of them)."""
    folder = os.path.join(class_path, TEST_DIR)
    if not os.path.isdir(folder):
        raise DatasetError(
            f"Test folder '{folder}' is missing; put the test images in one sub-folder per label, good/ for normal "
            f"and any other name for anomalous images ({_LAYOUT})."
        )
    direct = list_images(folder)
    if direct:
        raise DatasetError(
            f"Test folder '{folder}' holds images directly (e.g. '{direct[0]}'), which have no label; move them "
            "into sub-folders per label: good/ (normal) or LABEL/ (anomalous)."
        )
    labels = _image_subfolders(folder)
    if not labels:
        raise DatasetError(
            f"Test folder '{folder}' contains no images; add test images in sub-folders good/ (normal) and "
            "LABEL/ (anomalous)."
        )
    masks = {label: _mask_folder(class_path, label) for label in labels if not is_normal(label)}
    with_masks = [label for label, path in masks.items() if path is not None]
    without = [label for label, path in masks.items() if path is None]
    if with_masks and without:
        raise DatasetError(
            f"Anomalous label(s) {', '.join(without)} of '{folder}' have no mask folder but {', '.join(with_masks)} "
            f"do; add '{os.path.join(class_path, MASK_DIRS[0], without[0])}' (one mask per image, named like it) "
            "and likewise for the others, or remove every mask folder to evaluate without masks (image metrics only)."
        )
    samples: list[Sample] = []
    for label in labels:
        image_folder = os.path.join(folder, label)
        images = [os.path.join(image_folder, name) for name in list_images(image_folder)]
        if is_normal(label):
            samples += [Sample(image, None, 0, label) for image in images]
            continue
        mask_folder = masks[label]
        mask_names = list_images(mask_folder) if mask_folder is not None else []
        samples += [
            Sample(image, None if mask_folder is None else mvtec.mask_by_stem(image, mask_folder, mask_names,
                                                                              MASK_LAYOUT), 1, label)
            for image in images
        ]
    return samples


def collect_samples(root: str, classname: str) -> tuple[list[Sample], list[Sample]]:
    """(train, test) sample lists of one class folder."""
    path = mvtec.class_dir(root, classname)
    return train_split(path), test_split(path)
