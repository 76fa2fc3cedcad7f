"""Sample lists for the MVTec AD layout, shared by MVTec AD, MPDD, ITDD and MVTec-layout VisA.

ROOT/CLASS/train/good/*.png, ROOT/CLASS/test/{good,DEFECT}/*.png, ROOT/CLASS/ground_truth/DEFECT/*_mask.png.
The i-th image of a defect type (sorted) pairs with the i-th mask of that type (sorted), as in the releases;
when masks are named after their images (stem + optional _mask/_gt/-mask/_label), a pair whose mask is named
after another image of the folder is a DatasetError instead of a silent mispairing. The helpers defect_samples
(this sorted-order pairing; also MVTec AD 2) and mask_by_stem (pairing by file stem; BTAD, folder dataset) serve
the other loaders.
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


MASK_LAYOUT = "ROOT/CLASS/ground_truth/DEFECT/*_mask.png"


def _unmasked(images: list[str], masks: list[str]) -> list[str]:
    """Images no mask is named after (stem, or stem + one MASK_SUFFIXES suffix)."""
    owners = {mask_owner(os.path.basename(path)) for path in masks}
    return [path for path in images if os.path.splitext(os.path.basename(path))[0] not in owners]


def _defect_masks(mask_folder: str, defect: str, image_folder: str, images: list[str],
                  layout: str = MASK_LAYOUT) -> list[str]:
    """Sorted mask paths of one defect type; their count must match the image count."""
    if not os.path.isdir(mask_folder):
        raise DatasetError(
            f"Ground-truth folder '{mask_folder}' for defect type '{defect}' is missing; "
            f"add one mask per image of '{image_folder}' (layout {layout})."
        )
    masks = [os.path.join(mask_folder, name) for name in list_images(mask_folder)]
    if len(masks) != len(images):
        unmasked = _unmasked(images, masks) if len(masks) < len(images) else []
        named = f" (no mask is named after '{unmasked[0]}')" if unmasked and len(unmasked) < len(images) else ""
        raise DatasetError(
            f"Defect type '{defect}' has {len(images)} test images in '{image_folder}' but {len(masks)} masks "
            f"in '{mask_folder}'{named}; every defective image needs exactly one mask (paired in sorted order)."
        )
    return masks


def mask_owner(mask_name: str) -> str:
    """Stem of the image a mask file is named after: its stem without one MASK_SUFFIXES suffix."""
    stem = os.path.splitext(mask_name)[0]
    for suffix in MASK_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def mask_by_stem(image: str, mask_folder: str, mask_names: list[str], layout: str) -> str:
    """The mask of `image` among `mask_names` (files of `mask_folder`): the one with the image's stem (any image
    extension), else the one named stem + a MASK_SUFFIXES suffix; DatasetError naming the image if there is none
    or more than one."""
    stem = os.path.splitext(os.path.basename(image))[0]
    found = [name for name in mask_names if os.path.splitext(name)[0] == stem]
    if not found:
        found = [name for name in mask_names if mask_owner(name) == stem]
    if len(found) > 1:
        raise DatasetError(
            f"Test image '{image}' has {len(found)} masks in '{mask_folder}' ({', '.join(found)}); "
            "keep exactly one mask per image."
        )
    if not found:
        raise DatasetError(
            f"Test image '{image}' has no mask in '{mask_folder}'; add one named after the image ('{stem}' + any "
            f"image extension, optionally with a _mask suffix) (layout {layout})."
        )
    return os.path.join(mask_folder, found[0])


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


def defect_samples(image_folder: str, mask_folder: str, defect: str, layout: str = MASK_LAYOUT) -> list[Sample]:
    """Defective test images of `image_folder`, paired in sorted order with the masks of `mask_folder`
    (count and naming checked: _defect_masks, check_pairing)."""
    images = [os.path.join(image_folder, name) for name in list_images(image_folder)]
    masks = _defect_masks(mask_folder, defect, image_folder, images, layout)
    check_pairing(images, masks)
    return [Sample(image, mask, 1, defect) for image, mask in zip(images, masks)]


def _defect_samples(class_path: str, defect: str) -> list[Sample]:
    """Test images of one folder of CLASS/test, paired with their masks unless the folder is `good`."""
    folder = os.path.join(class_path, TEST_DIR, defect)
    if defect == GOOD:
        return [Sample(os.path.join(folder, name), None, 0, GOOD) for name in list_images(folder)]
    return defect_samples(folder, os.path.join(class_path, GROUND_TRUTH_DIR, defect), defect)


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
