"""What the segmenter trains and is tested on.

Training: the real class's normal training images (target: an empty mask) and the synthetic anomalies of a
synthetic folder in the MVTec layout, SYNTH/CLASS/test/DEFECT/*.png with SYNTH/CLASS/ground_truth/DEFECT/*_mask.png
(what PANDA's generate and ``synth-baseline`` write; a SYNTH/CLASS/test/good folder, if any, adds normal images).
Each training step draws its batch from its own random stream (seed, step): ``anomaly_share`` of the batch from
the synthetic anomalies, the rest from the normal images, so a resumed run draws the same batches. The record a
generator writes beside its pairs (SYNTH/CLASS/panda-DEFECT.json, synth-baseline-DEFECT.json) is checked: the
folder must hold the pairs it records (an unfinished generation is refused), made under the --anomaly_split given.

Testing: the real test set without the anomalies that trained the synthesis (datasets/split.py: by default the
first third of each defect type, sorted by name, is the synthesis part; only the rest is evaluated). Every
normal test image is kept.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import datasets
import metrics
import utils
from datasets import AnomalyDataset, DatasetError, Sample
from datasets.base import GOOD, check_readable, check_test_labels
from datasets.mvtec import class_dir, test_split
from datasets.split import split_anomalies

SYNTHETIC_SPLIT = "synthetic"
TRAIN_MASK_RULE = "half"  # a training mask pixel is a defect where its resized value is above 0.5


@dataclass
class ClassData:
    """One class: normal training images, synthetic training images, the evaluated test set and the synthesis part."""

    normal: AnomalyDataset
    synthetic: AnomalyDataset
    test: AnomalyDataset  # the evaluation part of the real test set
    synthesis_part: list[Sample]  # the real anomalies that trained the synthesis (excluded from the test unless 'all')


def evaluation_samples(samples: list[Sample], mode: str) -> tuple[list[Sample], list[Sample]]:
    """(evaluated samples in their original order, the synthesis part's anomalies) of a real test set."""
    held: list[Sample] = []
    for defect in sorted({s.defect for s in samples if s.is_anomaly}):
        part, _ = split_anomalies([s for s in samples if s.is_anomaly and s.defect == defect], mode,
                                  key=lambda s: s.image_path)
        held += part
    if mode == "all":
        return list(samples), held
    excluded = {s.image_path for s in held}
    return [s for s in samples if s.image_path not in excluded], held


def check_synthetic_folder(root: str) -> None:
    """DatasetError when the synthetic folder does not exist."""
    if not os.path.isdir(root):
        raise DatasetError(f"synthetic folder '{root}' does not exist; write it with synth-baseline or panda-generate")


def synthetic_samples(root: str, classname: str, anomaly_split: str) -> list[Sample]:
    """The images of SYNTH/CLASS/test/* (anomalies paired with their masks by datasets.mvtec); DatasetError for a
    class without a synthetic anomaly, a defect folder without masks, a mask of another size, an unreadable file
    or a generator's record that does not fit (check_records)."""
    check_synthetic_folder(root)
    samples = test_split(class_dir(root, classname))
    if not any(s.is_anomaly for s in samples):
        raise DatasetError(f"synthetic folder '{os.path.join(root, classname, 'test')}' holds no anomaly (only "
                           f"'{GOOD}'); it needs DEFECT/*.png with ground_truth/DEFECT/*_mask.png")
    check_records(class_dir(root, classname), samples, anomaly_split)
    check_readable(samples)
    return samples


def generation_records(class_path: str) -> dict[str, dict]:
    """The records generators write beside their pairs (SYNTH/CLASS/*.json with a 'defect' and a 'pairs' entry:
    panda-DEFECT.json, synth-baseline-DEFECT.json), by file path."""
    records = {}
    for name in sorted(os.listdir(class_path)):
        path = os.path.join(class_path, name)
        if name.endswith(".json") and os.path.isfile(path):
            record = utils.read_json(path)
            if "defect" not in record or "pairs" not in record:
                continue
            if not isinstance(record["defect"], str) or type(record["pairs"]) is not int:
                raise DatasetError(f"{path} is not a readable generation record (its defect must be a name, its "
                                   "pairs a count)")
            records[path] = record
    return records


def check_records(class_path: str, samples: list[Sample], anomaly_split: str) -> None:
    """DatasetError when a generator's record says that its defect folder is unfinished (or holds other pairs
    too), or that its synthesis learned from real anomalies of another split than ``anomaly_split`` (the test
    set would then hold anomalies the synthesis was trained on). A record's anomaly_split null: the synthesis
    saw no real anomaly (synth-baseline). A folder without records (own data) is read as it is."""
    for path, record in generation_records(class_path).items():
        defect, pairs = record["defect"], record["pairs"]
        held = sum(1 for s in samples if s.is_anomaly and s.defect == defect)
        if held < pairs:
            raise DatasetError(f"synthetic folder '{class_path}' holds {held} of the {pairs} {defect} pairs that "
                               f"{path} records: the generation is unfinished; run it again to finish it")
        if held > pairs:
            raise DatasetError(f"synthetic folder '{class_path}' holds {held} {defect} pairs but {path} records "
                               f"{pairs}: other files are mixed in; write it again into an empty folder")
        if "anomaly_split" not in record:
            raise DatasetError(f"{path} does not record the anomaly split its synthesis was trained with (an older "
                               f"version wrote it); generate it again")
        trained = record["anomaly_split"]
        if trained is not None and trained != anomaly_split:
            raise DatasetError(f"{path}: its synthesis was trained with --anomaly_split {trained}, not {anomaly_split}: "
                               f"the test set would hold anomalies it learned from; segment with --anomaly_split "
                               f"{trained}")


def _check_no_leak(synthetic: list[Sample], real: list[Sample]) -> None:
    """DatasetError when a synthetic image or mask is a file of the real test set (the real data given twice)."""
    real_files = {os.path.realpath(p) for s in real for p in (s.image_path, s.mask_path) if p}
    for s in synthetic:
        for path in (s.image_path, s.mask_path):
            if path and os.path.realpath(path) in real_files:
                raise DatasetError(f"synthetic file '{path}' is a file of the real test set; --synthetic must be a "
                                   "folder of generated anomalies, not the dataset")


def load_class(dataset: str, datapath: str, synthetic: str, classname: str, resize: int, imagesize: int,
               anomaly_split: str) -> ClassData:
    """The data of one class, every file checked before training (one-line DatasetError otherwise)."""
    train, test = datasets.build_datasets(dataset, datapath, classname, resize, imagesize, class_resize_rule=False)
    if not test.has_masks:
        raise DatasetError(f"class '{classname}' of {datapath} has no test masks: pixel metrics need them")
    evaluated, held = evaluation_samples(test.samples, anomaly_split)
    check_test_labels(evaluated, classname, f"the evaluation part of {datapath}/{classname} (--anomaly_split)")
    synth = synthetic_samples(synthetic, classname, anomaly_split)
    _check_no_leak(synth, test.samples)
    make = lambda split, samples: AnomalyDataset(dataset, classname, split, samples, train.resize, imagesize,
                                                 test.binarize_mask, test.layout, True)
    return ClassData(normal=train, synthetic=make(SYNTHETIC_SPLIT, synth), test=make("test", evaluated),
                     synthesis_part=held)


class TrainImages(torch.utils.data.ConcatDataset):
    """Normal images (indices [0, n_normal)) then synthetic ones: {"image" [3, S, S], "mask" [1, S, S] in {0, 1}}."""

    def __init__(self, normal: AnomalyDataset, synthetic: AnomalyDataset):
        super().__init__([normal, synthetic])
        self.n_normal = len(normal)
        self.anomalous = [i for i, s in enumerate(synthetic.samples) if s.is_anomaly]
        self.normal_synthetic = [i for i, s in enumerate(synthetic.samples) if not s.is_anomaly]

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        return {"image": item["image"], "mask": metrics.binarize_masks(item["mask"], TRAIN_MASK_RULE)}


def step_batch(data: TrainImages, seed: int, step: int, batch_size: int, anomaly_share: float) -> list[int]:
    """The indices of training step ``step``'s batch, from the stream (seed, step): round(anomaly_share * batch)
    synthetic anomalies, the rest normal images (real training images and synthetic 'good' ones), with replacement."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n_anomalous = round(anomaly_share * batch_size)
    normals = list(range(data.n_normal)) + [data.n_normal + i for i in data.normal_synthetic]
    anomalous = [data.n_normal + i for i in data.anomalous]
    picks = [anomalous[i] for i in torch.randint(len(anomalous), (n_anomalous,), generator=g).tolist()]
    picks += [normals[i] for i in torch.randint(len(normals), (batch_size - n_anomalous,), generator=g).tolist()]
    return picks
