"""Test a segmenter on the evaluation part of a real test set: the metrics row, heatmaps and per-image scores.

Defect map = sigmoid of the network's logit per pixel; image score = the map's maximum. Per class:
    pixel_auroc, pixel_ap, pixel_pro (released PRO), pixel_aupro (MVTec AU-PRO, FPR <= 0.3), pixel_aupro_05
        (metrics.pixel_metrics, as for PBAS/CRAS);
    pixel_f1, pixel_iou of the defect class at the F1-optimal pixel threshold pooled over the class's test pixels,
        and that threshold (metrics.pixel_f1_iou);
    image_auroc, image_ap from the map's maximum, the F1-optimal image threshold and its F1.
The segmenter is never selected on test data: best_epoch = last_epoch = the training steps, last_* = the same
values. Rows go to metrics.json in the job folder, in the format the run machinery's results tables
(runner.rebuild_results) read.
"""
from __future__ import annotations

import csv
import io
import math
import os

import torch

import metrics
import utils
import datasets
from datasets import AnomalyDataset
from segment.networks import ScoreGraph

SCORE_COLUMNS = ("class", "image_path", "defect", "label", "image_score", "heatmap")  # as the PBAS/CRAS scores.csv
METRICS_NAME, SCORES_NAME, HEATMAPS_DIR = "metrics.json", "scores.csv", "heatmaps"


@torch.no_grad()
def score(graph: ScoreGraph, data: AnomalyDataset, batch_size: int, device: torch.device, num_workers: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image scores [N], maps [N, S, S], labels [N], masks [N, S, S]) of a dataset, on the CPU."""
    graph.to(device).eval()
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scores, maps, labels, masks = [], [], [], []
    for batch in loader:
        s, m = graph(batch["image"].to(device))
        scores.append(s.float().cpu())
        maps.append(m.float().cpu())
        labels.append(batch["is_anomaly"])
        masks.append(batch["mask"][:, 0])
    return torch.cat(scores), torch.cat(maps), torch.cat(labels), torch.cat(masks)


def class_row(scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, steps: int) -> dict:
    """The metrics row of one class (the columns of utils.RESULT_COLUMNS)."""
    row = {**metrics.image_metrics(scores, labels), **metrics.pixel_metrics(maps, masks, with_pro=True),
           **metrics.pixel_f1_iou(maps, masks)}
    try:
        row["image_f1_threshold"], row["image_f1"] = metrics.f1_optimal_threshold(scores, labels)
    except metrics.UndefinedMetricError:
        row["image_f1_threshold"], row["image_f1"] = math.nan, math.nan
    row.update({f"last_{k}": row[k] for k in (*utils.METRIC_COLUMNS, "pixel_aupro", "pixel_aupro_05")})
    row["best_epoch"] = row["last_epoch"] = steps
    return row


def write_outputs(folder: str, name: str, data: AnomalyDataset, scores: torch.Tensor, maps: torch.Tensor) -> None:
    """heatmaps/NAME/*.png ([image | ground truth | defect map]) and scores.csv in the job folder."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SCORE_COLUMNS)
    for i, heatmap in enumerate(datasets.heatmap_names(data)):
        item = data[i]
        utils.save_png(utils.heatmap_panel(item["image"], item["mask"], maps[i]), os.path.join(folder, HEATMAPS_DIR, name, heatmap))
        sample = data.samples[i]
        writer.writerow([name, sample.image_path, sample.defect, sample.is_anomaly, repr(float(scores[i])),
                         os.path.join(HEATMAPS_DIR, name, heatmap)])
    utils.save_text(out.getvalue(), os.path.join(folder, SCORES_NAME))
