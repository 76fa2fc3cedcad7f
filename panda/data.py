"""PANDA's data: the (class, defect) pairs of MVTec AD, BTAD and the user's own folders, their anomaly split, and
the tensors that training and generation read (PANDA_SPEC section 1).

One PANDA model is trained per (class, defect). Its data are the normal training images of the class (the
backgrounds of generation) and the anomalous images of the defect with their masks, split by
``datasets.split`` (default ``third``: the first third by file name trains the model and provides the masks of
generation; ``all``: every anomaly, as the public code). The files are found with the project's dataset readers
(``datasets.mvtec``, ``datasets.btad``, ``datasets.folder``: the PANDA README's own-data layout ``train/``,
``test/LABEL/``, ``masks/LABEL/`` is a class folder of the ``folder`` dataset).

Images are resized bicubically to S x S (no crop) and scaled to [-1, 1]; masks must be binary (0 and one other
value; a JPEG mask is binarised at half range as everywhere here), mark a defect (not all 0) and be of their
image's size; they are resized
bicubically and thresholded at 0.5 to {0, 1}, as the public code's ``MvtecDataset_singel_anomaly``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from choices import PANDA_DATASETS
from datasets import btad, folder, mvtec
from datasets.base import (DatasetError, Sample, check_readable, is_lossy, list_images, list_subfolders, read_mask,
                           read_rgb)
from datasets.split import split_anomalies

# MVTec AD's 73 defect types (15 classes); the public training script has 67 (pill: only pill_type).
MVTEC_DEFECTS: dict[str, tuple[str, ...]] = {
    "bottle": ("broken_large", "broken_small", "contamination"),
    "cable": ("bent_wire", "cable_swap", "combined", "cut_inner_insulation", "cut_outer_insulation", "missing_cable",
              "missing_wire", "poke_insulation"),
    "capsule": ("crack", "faulty_imprint", "poke", "scratch", "squeeze"),
    "carpet": ("color", "cut", "hole", "metal_contamination", "thread"),
    "grid": ("bent", "broken", "glue", "metal_contamination", "thread"),
    "hazelnut": ("crack", "cut", "hole", "print"),
    "leather": ("color", "cut", "fold", "glue", "poke"),
    "metal_nut": ("bent", "color", "flip", "scratch"),
    "pill": ("color", "combined", "contamination", "crack", "faulty_imprint", "pill_type", "scratch"),
    "screw": ("manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"),
    "tile": ("crack", "glue_strip", "gray_stroke", "oil", "rough"),
    "toothbrush": ("defective",),
    "transistor": ("bent_lead", "cut_lead", "damaged_case", "misplaced"),
    "wood": ("color", "combined", "hole", "liquid", "scratch"),
    "zipper": ("broken_teeth", "combined", "fabric_border", "fabric_interior", "rough", "split_teeth",
               "squeezed_teeth"),
}
BTAD_CLASSES = ("01", "02", "03")
# The init word of each defect type in the public training script (train-MVTEC.sh, 67 lines; PANDA_SPEC appendix):
# the word whose embedding the textual-inversion vectors start from. Pill has only pill_type there; its six
# other types, and every type of another dataset, take the rule of panda.train.resolve_init_word.
MVTEC_INIT_WORDS: dict[str, dict[str, str]] = {
    "bottle": {"broken_large": "large", "broken_small": "small", "contamination": "contamination"},
    "cable": {"bent_wire": "wire", "cable_swap": "swap", "combined": "combined", "cut_inner_insulation": "cut",
              "cut_outer_insulation": "cut", "missing_cable": "miss", "missing_wire": "miss",
              "poke_insulation": "poke"},
    "capsule": {"crack": "crack", "faulty_imprint": "imprint", "poke": "poke", "scratch": "scratch",
                "squeeze": "squeeze"},
    "carpet": {"color": "color", "thread": "thread", "hole": "hole", "cut": "cut",
               "metal_contamination": "contamination"},
    "grid": {"broken": "grid", "glue": "glue", "bent": "bent", "thread": "thread",
             "metal_contamination": "contamination"},
    "hazelnut": {"crack": "crack", "cut": "cut", "hole": "hole", "print": "print"},
    "leather": {"color": "color", "cut": "cut", "fold": "fold", "glue": "glue", "poke": "poke"},
    "metal_nut": {"color": "color", "bent": "bent", "flip": "flip", "scratch": "scratch"},
    "pill": {"pill_type": "pill"},
    "screw": {"manipulated_front": "front", "scratch_head": "head", "scratch_neck": "neck", "thread_side": "side",
              "thread_top": "top"},
    "tile": {"crack": "crack", "glue_strip": "strip", "gray_stroke": "gray", "oil": "oil", "rough": "rough"},
    "toothbrush": {"defective": "defective"},
    "transistor": {"bent_lead": "bent", "cut_lead": "cut", "damaged_case": "damage", "misplaced": "miss"},
    "wood": {"color": "color", "hole": "hole", "liquid": "liquid", "combined": "combined", "scratch": "scratch"},
    "zipper": {"rough": "rough", "broken_teeth": "broken", "combined": "combined", "fabric_border": "border",
               "fabric_interior": "interior", "split_teeth": "split", "squeezed_teeth": "teeth"},
}
MASK_THRESHOLD = 0.5  # the public code: mask / 255 after the bicubic resize, >= 0.5 -> 1


@dataclass
class DefectData:
    """The files of one (class, defect): normal training images, and the anomalies (image, mask) of the
    synthesis part of the split; ``held_out``: how many anomalies the split keeps for evaluation."""

    dataset: str
    classname: str
    defect: str
    normals: list[str]
    anomalies: list[Sample]
    held_out: int

    @property
    def name(self) -> str:
        """The model's name, as the public code's ``class+defect`` (e.g. ``bottle+broken_large``)."""
        return f"{self.classname}+{self.defect}"

    @property
    def anomaly_images(self) -> list[str]:
        return [sample.image_path for sample in self.anomalies]

    @property
    def masks(self) -> list[str]:
        return [sample.mask_path for sample in self.anomalies]


def default_classes(dataset: str) -> tuple[str, ...]:
    """The classes swept when none is given: MVTec AD's 15, BTAD's 3; the folder dataset has no list."""
    if dataset == "mvtec":
        return tuple(MVTEC_DEFECTS)
    if dataset == "btad":
        return BTAD_CLASSES
    raise DatasetError("dataset 'folder' has no official class list; give the class folders with -d CLASS")


def defect_types(dataset: str, root: str, classname: str) -> list[str]:
    """Every defect type of a class: MVTec AD's table (all 73 over the classes), the anomalous folders of
    BTAD's test/ (``ko``) and of a folder class's test/ (every label but good/normal/ok)."""
    if dataset == "mvtec":
        if classname in MVTEC_DEFECTS:
            return list(MVTEC_DEFECTS[classname])
        return _anomalous_labels(os.path.join(mvtec.class_dir(root, classname), mvtec.TEST_DIR), (mvtec.GOOD,))
    test_dir = os.path.join(mvtec.class_dir(root, classname), btad.TEST_DIR)
    return _anomalous_labels(test_dir, (btad.NORMAL,) if dataset == "btad" else folder.NORMAL_LABELS)


def _anomalous_labels(test_dir: str, normal: tuple[str, ...]) -> list[str]:
    """Sub-folders of ``test_dir`` that are not normal labels (case-insensitive)."""
    if not os.path.isdir(test_dir):
        raise DatasetError(f"Test folder '{test_dir}' is missing; put the anomalous images in '{test_dir}/DEFECT/'.")
    labels = [name for name in list_subfolders(test_dir) if name.lower() not in normal]
    if not labels:
        raise DatasetError(f"Test folder '{test_dir}' has no anomalous sub-folder (test/DEFECT/ with images).")
    return labels


def _normals(dataset: str, class_path: str) -> list[str]:
    """Normal training images of the class (the dataset's reader)."""
    reader = {"mvtec": mvtec.train_split, "btad": btad.train_split, "folder": folder.train_split}[dataset]
    return [sample.image_path for sample in reader(class_path)]


def _defect_samples(dataset: str, class_path: str, defect: str) -> list[Sample]:
    """Anomalous images of one defect with their masks; DatasetError when the defect has no images or masks."""
    image_dir = os.path.join(class_path, mvtec.TEST_DIR, defect)
    if not os.path.isdir(image_dir) or not list_images(image_dir):
        raise DatasetError(f"Defect '{defect}' has no anomalous images in '{image_dir}'; PANDA learns a defect "
                           "from its images and masks.")
    if dataset == "mvtec":
        mask_dir = os.path.join(class_path, mvtec.GROUND_TRUTH_DIR, defect)
        if not os.path.isdir(mask_dir):
            raise DatasetError(f"Defect '{defect}' has no masks: '{mask_dir}' is missing; PANDA needs one mask per "
                               f"anomalous image ({mvtec.MASK_LAYOUT}).")
        return mvtec.defect_samples(image_dir, mask_dir, defect)
    reader = btad.test_split if dataset == "btad" else folder.test_split
    samples = [sample for sample in reader(class_path) if sample.defect == defect]
    if any(sample.mask_path is None for sample in samples):
        wanted = os.path.join(class_path, folder.MASK_DIRS[1], defect)
        raise DatasetError(f"Defect '{defect}' has no masks: add '{wanted}' with one mask per anomalous image, named "
                           "like it; PANDA learns from masked anomalies.")
    return samples


def collect(dataset: str, root: str, classname: str, defect: str, anomaly_split: str) -> DefectData:
    """The checked files of one (class, defect): normals, the synthesis part of its anomalies (sorted by name),
    every synthesis mask binary and of its image's size. DatasetError (one line) otherwise."""
    if dataset not in PANDA_DATASETS:
        raise DatasetError(f"Unknown PANDA dataset '{dataset}'; valid: {', '.join(PANDA_DATASETS)}.")
    if not os.path.isdir(root):
        raise DatasetError(f"DATAPATH '{root}' does not exist or is not a directory.")
    class_path = mvtec.class_dir(root, classname)
    normals = _normals(dataset, class_path)
    samples = _defect_samples(dataset, class_path, defect)
    synthesis, evaluation = split_anomalies(samples, anomaly_split, key=lambda sample: sample.image_path)
    check_readable(synthesis)
    for sample in synthesis:
        check_binary(sample.mask_path)
    return DefectData(dataset, classname, defect, normals, synthesis, 0 if anomaly_split == "all" else len(evaluation))


def _mask_values(image: Image.Image) -> np.ndarray:
    """Pixel values of a mask image as one channel (palette and colour masks through PIL's L conversion)."""
    if image.mode in ("1", "L", "I", "F") or image.mode.startswith("I;16"):
        return np.asarray(image)
    return np.asarray(image.convert("L"))


def check_binary(path: str) -> None:
    """DatasetError unless the mask holds at most two values, 0 and one other (0/255, 0/1, ...), and marks a
    defect (some pixel not 0: an all-zero mask teaches PANDA nothing and would be drawn for generation). A mask
    stored with lossy compression (JPEG) cannot be binary: it is binarised at half range as every reader here does
    (datasets.base.to_binary_mask), and must keep a defect pixel."""
    try:
        with Image.open(path) as image:
            if is_lossy(image):
                values = np.unique(np.asarray(read_mask(path)))
            else:
                values = np.unique(_mask_values(image))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"Cannot decode mask '{path}' ({type(exc).__name__}); replace or remove it.") from exc
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise DatasetError(f"Mask '{path}' is not binary (values {shown}); PANDA needs 0 for background and one "
                           "value (e.g. 255) for the anomaly.")
    if not values.any():
        raise DatasetError(f"Mask '{path}' marks no defect (every pixel is 0); PANDA learns a defect where its masks "
                           "mark it: mark the defect (e.g. 255 on 0) or remove the mask and its image.")


def load_image(path: str, size: int) -> torch.Tensor:
    """An image file -> [3, S, S] in [-1, 1] (bicubic resize)."""
    image = read_rgb(path).resize((size, size), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # [S, S, 3] in [0, 255]
    return array.permute(2, 0, 1) / 127.5 - 1.0


def load_mask(path: str, size: int) -> torch.Tensor:
    """A binary mask file -> [1, S, S] in {0, 1} (read_mask's 0/255, bicubic resize, then >= 0.5)."""
    binary = read_mask(path).resize((size, size), Image.BICUBIC)
    return (torch.from_numpy(np.asarray(binary, dtype=np.float32) / 255.0) >= MASK_THRESHOLD).float()[None]


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """[N, 3, S, S] in [-1, 1]."""
    return torch.stack([load_image(path, size) for path in paths])


def load_masks(paths: list[str], size: int) -> torch.Tensor:
    """[N, 1, S, S] in {0, 1}."""
    return torch.stack([load_mask(path, size) for path in paths])
