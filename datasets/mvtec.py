"""Sample lists for the MVTec AD layout, shared by MVTec AD, MPDD, ITDD and MVTec-layout VisA.

ROOT/CLASS/train/good/*.png, ROOT/CLASS/test/{good,DEFECT}/*.png, ROOT/CLASS/ground_truth/DEFECT/*_mask.png.
The i-th image of a defect type (sorted) pairs with the i-th mask of that type (sorted), as in the releases;
when masks are named after their images (stem + optional _mask/_gt/-mask/_label), a pair whose mask is named
after another image of the folder is a DatasetError instead of a silent mispairing.
"""

from __future__ import annotations

import os

from datasets.base import GOOD, IMAGE_EXTENSIONS, DatasetError, Sample, list_images, list_subfolders

TRAIN_DIR = "train"
TEST_DIR = "test"
GROUND_TRUTH_DIR = "ground_truth"
_EXTENSIONS_TEXT = "/".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
MASK_SUFFIXES = ("_mask", "_gt", "-mask", "_label")  # stripped (case-insensitive) to find a mask's image


def class_dir(root: str, classname: str) -> str:
    """Path of the class folder; DatasetError listing the class folders found if it is missing."""
    path = os.path.join(root, classname)
    if not os.path.isdir(path):
        found = ", ".join(list_subfolders(root)) or "none"
        raise DatasetError(
            f"Class folder '{path}' not found; class folders under '{root}': {found}. "
            "Check the class name or DATAPATH."
        )
    return path


def train_split(class_path: str) -> list[Sample]:
    """Normal training images from CLASS/train/good."""
    folder = os.path.join(class_path, TRAIN_DIR, GOOD)
    if not os.path.isdir(folder):
        raise DatasetError(
            f"Training folder '{folder}' is missing; put the normal training images there "
            "(layout ROOT/CLASS/train/good/*.png)."
        )
    names = list_images(folder)
    if not names:
        raise DatasetError(
            f"Training folder '{folder}' contains no images ({_EXTENSIONS_TEXT}); add normal training images."
        )
    return [Sample(os.path.join(folder, name), None, 0, GOOD) for name in names]


def _defect_masks(class_path: str, defect: str, image_folder: str, n_images: int) -> list[str]:
    """Sorted mask paths of one defect type; their count must match the image count."""
    folder = os.path.join(class_path, GROUND_TRUTH_DIR, defect)
    if not os.path.isdir(folder):
        raise DatasetError(
            f"Ground-truth folder '{folder}' for defect type '{defect}' is missing; "
            f"add one mask per image of '{image_folder}' (layout ROOT/CLASS/ground_truth/DEFECT/*_mask.png)."
        )
    names = list_images(folder)
    if len(names) != n_images:
        raise DatasetError(
            f"Defect type '{defect}' has {n_images} test images in '{image_folder}' but {len(names)} masks "
            f"in '{folder}'; every defective image needs exactly one mask (paired in sorted order)."
        )
    return [os.path.join(folder, name) for name in names]


def mask_owner(mask_name: str) -> str:
    """Stem of the image a mask file is named after: its stem without one MASK_SUFFIXES suffix."""
    stem = os.path.splitext(mask_name)[0]
    for suffix in MASK_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def check_pairing(images: list[str], masks: list[str]) -> None:
    """DatasetError for a clear mispairing of the sorted images and masks of one defect type: an image paired
    with a mask named after another image of the folder. With a recognisable naming scheme (every mask named
    after some image) this flags every pair whose names differ; masks named otherwise are paired silently."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in images]
    image_of = dict(zip(stems, images))
    owners = [mask_owner(os.path.basename(path)) for path in masks]
    for image, stem, mask, owner in zip(images, stems, masks, owners):
        if owner == stem or owner not in image_of:
            continue
        own = [m for m, o in zip(masks, owners) if o == stem]
        own_text = f"its own mask seems to be '{own[0]}'" if own else "no mask is named after it"
        raise DatasetError(
            f"Test image '{image}' is paired (i-th sorted image with i-th sorted mask) with mask '{mask}', which "
            f"is named after image '{image_of[owner]}'; {own_text}. Rename the files so that images and masks "
            "sort in the same order (e.g. zero-padded numbers 000.png / 000_mask.png) and every image has its mask."
        )


def _defect_samples(class_path: str, defect: str) -> list[Sample]:
    """Test images of one folder of CLASS/test, paired with their masks unless the folder is `good`."""
    folder = os.path.join(class_path, TEST_DIR, defect)
    images = [os.path.join(folder, name) for name in list_images(folder)]
    if defect == GOOD:
        return [Sample(path, None, 0, GOOD) for path in images]
    masks = _defect_masks(class_path, defect, folder, len(images))
    check_pairing(images, masks)
    return [Sample(image, mask, 1, defect) for image, mask in zip(images, masks)]


def test_split(class_path: str) -> list[Sample]:
    """Test images of every folder of CLASS/test (sorted by folder, then file name)."""
    folder = os.path.join(class_path, TEST_DIR)
    if not os.path.isdir(folder):
        raise DatasetError(
            f"Test folder '{folder}' is missing; put the test images in '{folder}/good' and '{folder}/DEFECT'."
        )
    samples = [s for defect in list_subfolders(folder) for s in _defect_samples(class_path, defect)]
    if not samples:
        raise DatasetError(
            f"Test folder '{folder}' contains no images ({_EXTENSIONS_TEXT}); "
            "add test images in sub-folders good/ and DEFECT/."
        )
    return samples


def collect_samples(root: str, classname: str) -> tuple[list[Sample], list[Sample]]:
    """(train, test) sample lists of one class in MVTec layout."""
    path = class_dir(root, classname)
    return train_split(path), test_split(path)
