"""Sample lists for BTAD (BTech Dataset, as distributed in "BTech_Dataset_transformed").

ROOT/CLASS/train/ok/*: normal training images; ROOT/CLASS/test/ok/*: normal and ROOT/CLASS/test/ko/*: anomalous
test images; ROOT/CLASS/ground_truth/ko/*: their masks, paired with the image of the SAME STEM (not by sorted
position), any image extension: as distributed, class 01 has .bmp images and .png masks, 02 .png for both and 03
.bmp for both. Any test folder other than ok/ is anomalous (defect = folder name, "ko") with masks in
ground_truth/FOLDER; normal samples keep the defect name "ok". Masks are read as in MVTec AD (not binarised).
"""

from __future__ import annotations

import os

from datasets import mvtec
from datasets.base import GOOD, DatasetError, Sample, list_images, list_subfolders

TRAIN_DIR = "train"
TEST_DIR = "test"
GROUND_TRUTH_DIR = "ground_truth"
NORMAL = "ok"
ANOMALY = "ko"
MASK_LAYOUT = "ROOT/CLASS/ground_truth/ko/STEM.png or .bmp, STEM as the image's"
_LAYOUT = "BTAD layout ROOT/CLASS/train/ok, ROOT/CLASS/test/{ok,ko}, ROOT/CLASS/ground_truth/ko"


def train_split(class_path: str) -> list[Sample]:
    """Normal training images from CLASS/train/ok."""
    folder = os.path.join(class_path, TRAIN_DIR, NORMAL)
    if not os.path.isdir(folder):
        mvtec_like = os.path.isdir(os.path.join(class_path, TRAIN_DIR, GOOD))
        hint = " (found train/good: that is the MVTec layout, use dataset 'mvtec' or 'folder')" if mvtec_like else ""
        raise DatasetError(
            f"Training folder '{folder}' is missing{hint}; put the normal training images there ({_LAYOUT})."
        )
    names = list_images(folder)
    if not names:
        raise DatasetError(f"Training folder '{folder}' contains no images; add normal training images.")
    return [Sample(os.path.join(folder, name), None, 0, NORMAL) for name in names]


def _anomalous_samples(class_path: str, defect: str) -> list[Sample]:
    """Images of CLASS/test/DEFECT, each with the mask of its stem from CLASS/ground_truth/DEFECT."""
    image_folder = os.path.join(class_path, TEST_DIR, defect)
    mask_folder = os.path.join(class_path, GROUND_TRUTH_DIR, defect)
    images = [os.path.join(image_folder, name) for name in list_images(image_folder)]
    if images and not os.path.isdir(mask_folder):
        raise DatasetError(
            f"Ground-truth folder '{mask_folder}' for the anomalous test images of '{image_folder}' is missing; "
            f"add one mask per image, named like it ({_LAYOUT})."
        )
    mask_names = list_images(mask_folder) if images else []
    return [Sample(image, mvtec.mask_by_stem(image, mask_folder, mask_names, MASK_LAYOUT), 1, defect)
            for image in images]


def test_split(class_path: str) -> list[Sample]:
    """Test images of every folder of CLASS/test (ok: normal; others, i.e. ko: anomalous with masks), sorted by
    folder, then file name."""
    folder = os.path.join(class_path, TEST_DIR)
    if not os.path.isdir(folder):
        raise DatasetError(f"Test folder '{folder}' is missing; put the test images in ok/ and ko/ there ({_LAYOUT}).")
    samples: list[Sample] = []
    for label in list_subfolders(folder):
        if label == NORMAL:
            image_folder = os.path.join(folder, label)
            samples += [Sample(os.path.join(image_folder, name), None, 0, NORMAL) for name in list_images(image_folder)]
        else:
            samples += _anomalous_samples(class_path, label)
    if not samples:
        raise DatasetError(f"Test folder '{folder}' contains no images; add test images in ok/ and ko/ ({_LAYOUT}).")
    return samples


def collect_samples(root: str, classname: str) -> tuple[list[Sample], list[Sample]]:
    """(train, test) sample lists of one BTAD class."""
    path = mvtec.class_dir(root, classname)
    return train_split(path), test_split(path)
