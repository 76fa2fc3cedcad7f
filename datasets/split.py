"""The split of each defect type's anomalies between synthesis training and evaluation (PANDA, segmentation).

A synthesis method that learns from real anomalies (PANDA's textual inversion, its mask sampling) must not see
the anomalies that the segmentation is later tested on. Default ``third``: the first third of each defect
type's anomalies, sorted by file name (at least one), trains the synthesis and provides its masks; the other
two thirds are kept for evaluation. ``all`` reproduces the public PANDA code, which uses every anomaly for both.
"""
from __future__ import annotations

import math
import os
from typing import Sequence, TypeVar

from choices import ANOMALY_SPLITS  # re-exported: datasets.split.ANOMALY_SPLITS

SYNTHESIS_SHARE = 1 / 3  # --anomaly_split third: this share of each defect's anomalies trains the synthesis

T = TypeVar("T")


def synthesis_count(n: int, mode: str) -> int:
    """How many of a defect's ``n`` anomalies (sorted by name) go to synthesis training."""
    if mode not in ANOMALY_SPLITS:
        raise ValueError(f"unknown anomaly split {mode!r}; valid: {', '.join(ANOMALY_SPLITS)}")
    if mode == "all" or n == 0:
        return n
    return max(1, math.floor(n * SYNTHESIS_SHARE))


def split_anomalies(items: Sequence[T], mode: str, key=None) -> tuple[list[T], list[T]]:
    """(synthesis part, evaluation part) of one defect type's anomalies. ``items`` are sorted by the file name
    of ``key(item)`` (the item itself when no key is given: a path); with ``mode='all'`` both parts are every item.
    """
    key = key or (lambda item: item)
    ordered = sorted(items, key=lambda item: os.path.basename(str(key(item))))
    n = synthesis_count(len(ordered), mode)
    if mode == "all":
        return list(ordered), list(ordered)
    return ordered[:n], ordered[n:]
