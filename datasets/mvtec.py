"""Sample lists for the MVTec AD layout, shared by MVTec AD, MPDD, ITDD and MVTec-layout VisA.

ROOT/CLASS/train/good/*.png, ROOT/CLASS/test/{good,DEFECT}/*.png, ROOT/CLASS/ground_truth/DEFECT/*_mask.png.
The i-th image of a defect type (sorted) pairs with the i-th mask of that type (sorted).
"""

from __future__ import annotations

import os

from datasets.base import GOOD, IMAGE_EXTENSIONS, DatasetError, Sample, list_images, list_subfolders

TRAIN_DIR = "train"
TEST_DIR = "test"
GROUND_TRUTH_DIR = "ground_truth"
_EXTENSIONS_TEXT = "/".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


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


def _defect_samples(class_path: str, defect: str) -> list[Sample]:
    """Test images of one folder of CLASS/test, paired with their masks unless the folder is `good`."""
    folder = os.path.join(class_path, TEST_DIR, defect)
    images = [os.path.join(folder, name) for name in list_images(folder)]
    if defect == GOOD:
        return [Sample(path, None, 0, GOOD) for path in images]
    masks = _defect_masks(class_path, defect, folder, len(images))
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
