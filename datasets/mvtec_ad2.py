"""Sample lists for MVTec AD 2 (as distributed; the MVTec AD loader's semantics, masks not binarised).

ROOT/CLASS/train/good/*.png: training; ROOT/CLASS/validation/good/*.png: present but not used (not required);
ROOT/CLASS/test_public/{good,bad}/*.png: evaluation; ROOT/CLASS/test_public/ground_truth/bad/*_mask.png: masks of
the bad images, paired as in MVTec AD (sorted order, names checked: stem + _mask). test_private and
test_private_mixed hold images without ground truth: score them with `main.py predict` (any folder of images).
"""

from __future__ import annotations

import os

from datasets import mvtec
from datasets.base import GOOD, DatasetError, Sample, list_images, list_subfolders

TEST_DIR = "test_public"
GROUND_TRUTH_DIR = "ground_truth"  # inside test_public/
DEFECT = "bad"
PRIVATE_DIRS = ("test_private", "test_private_mixed")
MASK_LAYOUT = "ROOT/CLASS/test_public/ground_truth/bad/*_mask.png"
_TEST_LAYOUT = "MVTec AD 2 layout ROOT/CLASS/test_public/{good,bad}/*.png with masks in test_public/ground_truth/bad"


def test_split(class_path: str) -> list[Sample]:
    """Test images of every folder of CLASS/test_public except ground_truth/ (good: normal, others: defective
    with masks in test_public/ground_truth/DEFECT), sorted by folder, then file name."""
    folder = os.path.join(class_path, TEST_DIR)
    if not os.path.isdir(folder):
        private = [name for name in PRIVATE_DIRS if os.path.isdir(os.path.join(class_path, name))]
        note = (f" ({' and '.join(private)} hold no ground truth: score them with 'main.py predict')"
                if private else "")
        raise DatasetError(
            f"Test folder '{folder}' is missing{note}; evaluation needs the public test set ({_TEST_LAYOUT}): "
            "restore it from the MVTec AD 2 archive."
        )
    samples: list[Sample] = []
    for defect in list_subfolders(folder):
        if defect == GROUND_TRUTH_DIR:
            continue
        image_folder = os.path.join(folder, defect)
        if defect == GOOD:
            samples += [Sample(os.path.join(image_folder, name), None, 0, GOOD) for name in list_images(image_folder)]
        else:
            mask_folder = os.path.join(folder, GROUND_TRUTH_DIR, defect)
            samples += mvtec.defect_samples(image_folder, mask_folder, defect, MASK_LAYOUT)
    if not samples:
        raise DatasetError(f"Test folder '{folder}' contains no images; add them ({_TEST_LAYOUT}).")
    return samples


def collect_samples(root: str, classname: str) -> tuple[list[Sample], list[Sample]]:
    """(train, test) sample lists of one MVTec AD 2 class (train/good; test_public)."""
    path = mvtec.class_dir(root, classname)
    return mvtec.train_split(path), test_split(path)
