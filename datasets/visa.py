"""Sample lists for VisA after its standard preparation (ROOT/split_csv/1cls.csv, paths relative to ROOT).

VisA is accepted in two layouts, chosen by detect_layout from what is on disk:
- LAYOUT_SPLIT_CSV: ROOT/split_csv/1cls.csv exists (the PBAS release's loader; masks binarised > 0);
- LAYOUT_MVTEC: ROOT/CLASS/train and ROOT/CLASS/test exist (the spot-diff 1cls conversion to MVTec layout
  that the CRAS release reads with its MVTec loader; masks kept as read, fractional edges included).
"""

from __future__ import annotations

import os

import pandas as pd

from datasets.base import GOOD, LAYOUT_MVTEC, LAYOUT_SPLIT_CSV, DatasetError, Sample, list_subfolders
from datasets.mvtec import TEST_DIR, TRAIN_DIR

SPLIT_DIR = "split_csv"
SPLIT_CSV = os.path.join(SPLIT_DIR, "1cls.csv")
COLUMNS = ("object", "split", "label", "image", "mask")
NORMAL = "normal"
ANOMALY = "anomaly"
ANOMALY_DEFECT = "bad"  # defect name given to VisA anomalies (VisA has no per-type folders)
_PREPARE_HINT = "run VisA's standard preparation script prepare_data.py (split type 1cls) to produce it"


def _is_mvtec_class(root: str, classname: str) -> bool:
    """True if ROOT/CLASS is a folder holding train/ and test/ folders (MVTec layout)."""
    class_path = os.path.join(root, classname)
    return all(os.path.isdir(os.path.join(class_path, split)) for split in (TRAIN_DIR, TEST_DIR))


def detect_layout(root: str, classname: str) -> str:
    """LAYOUT_SPLIT_CSV if ROOT/split_csv/1cls.csv exists, else LAYOUT_MVTEC if ROOT/CLASS has train/ and
    test/, else a DatasetError naming both accepted layouts and the paths looked for."""
    csv_path = os.path.join(root, SPLIT_CSV)
    if os.path.isfile(csv_path):
        return LAYOUT_SPLIT_CSV
    if _is_mvtec_class(root, classname):
        return LAYOUT_MVTEC
    class_path = os.path.join(root, classname)
    folders = ", ".join(name for name in list_subfolders(root) if name != SPLIT_DIR) or "none"
    raise DatasetError(
        f"VisA root '{root}' is in neither accepted layout: no split file '{csv_path}' (split_csv/1cls.csv) "
        f"and no class folder '{class_path}' with train/ and test/ (MVTec-layout conversion, "
        f"ROOT/CLASS/train/good, ROOT/CLASS/test/DEFECT, ROOT/CLASS/ground_truth/DEFECT); class folders under "
        f"'{root}': {folders}. Either {_PREPARE_HINT}, or point DATAPATH to the MVTec-layout VisA root "
        "and check the class name."
    )


def read_split_csv(root: str) -> tuple[pd.DataFrame, str]:
    """The 1cls.csv table (all columns as stripped strings) and its path."""
    csv_path = os.path.join(root, SPLIT_CSV)
    if not os.path.isfile(csv_path):
        raise DatasetError(f"VisA split file '{csv_path}' not found; {_PREPARE_HINT}.")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DatasetError(f"Cannot parse VisA split file '{csv_path}' ({error}); {_PREPARE_HINT}.") from error
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise DatasetError(
            f"VisA split file '{csv_path}' lacks columns {', '.join(missing)}; "
            f"expected {', '.join(COLUMNS)}; {_PREPARE_HINT}."
        )
    return table[list(COLUMNS)].apply(lambda column: column.str.strip()), csv_path


def _existing_file(root: str, relative: str, csv_path: str, line: int) -> str:
    """Absolute path of a file listed in the CSV; DatasetError if it does not exist."""
    path = os.path.join(root, relative)
    if not os.path.isfile(path):
        raise DatasetError(
            f"File '{path}' listed in '{csv_path}' (line {line}) does not exist; "
            "check DATAPATH or re-run VisA's prepare_data.py."
        )
    return path


def _row_sample(root: str, row: pd.Series, csv_path: str, line: int) -> Sample:
    """Sample of one CSV row (label normal -> good without mask, anomaly -> bad with mask)."""
    label = row["label"].lower()
    if label not in (NORMAL, ANOMALY):
        raise DatasetError(
            f"Line {line} of '{csv_path}' has label '{row['label']}'; expected '{NORMAL}' or '{ANOMALY}'."
        )
    image = _existing_file(root, row["image"], csv_path, line)
    if label == NORMAL:
        return Sample(image, None, 0, GOOD)
    if not row["mask"]:
        raise DatasetError(
            f"Anomaly image '{image}' (line {line} of '{csv_path}') has no mask; "
            "fill its mask column or re-run VisA's prepare_data.py."
        )
    return Sample(image, _existing_file(root, row["mask"], csv_path, line), 1, ANOMALY_DEFECT)


def _split_samples(root: str, rows: pd.DataFrame, csv_path: str, split: str, classname: str) -> list[Sample]:
    """Samples of the rows of one split, in CSV order; DatasetError if there are none."""
    selected = rows[rows["split"].str.lower() == split]
    if selected.empty:
        raise DatasetError(f"No '{split}' rows for object '{classname}' in '{csv_path}'; {_PREPARE_HINT}.")
    return [_row_sample(root, row, csv_path, int(index) + 2) for index, row in selected.iterrows()]


def _check_train_normal(samples: list[Sample], csv_path: str, classname: str) -> None:
    anomalous = [sample.image_path for sample in samples if sample.is_anomaly]
    if anomalous:
        raise DatasetError(
            f"Train split of object '{classname}' in '{csv_path}' lists anomaly image '{anomalous[0]}'; "
            "training must use normal images only (re-run prepare_data.py)."
        )


def collect_samples(root: str, classname: str) -> tuple[list[Sample], list[Sample]]:
    """(train, test) sample lists of one VisA object."""
    table, csv_path = read_split_csv(root)
    rows = table[table["object"] == classname]
    if rows.empty:
        objects = ", ".join(sorted(set(table["object"]))) or "none"
        folders = ", ".join(name for name in list_subfolders(root) if name != SPLIT_DIR) or "none"
        raise DatasetError(
            f"Class '{classname}' not found in '{csv_path}'; objects listed there: {objects}; "
            f"class folders under '{root}': {folders}. Check the class name or DATAPATH."
        )
    train = _split_samples(root, rows, csv_path, "train", classname)
    _check_train_normal(train, csv_path, classname)
    return train, _split_samples(root, rows, csv_path, "test", classname)
