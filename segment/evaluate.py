"""Test a segmenter on the evaluation part of a real test set: the metrics row, heatmaps and per-image scores.

Defect map = sigmoid of the network's logit per pixel; image score = the map's maximum. Ground truth: the
resized masks binarised at 0.5 (metrics.binarize_masks 'half'), the rule the segmenter trains with. Per class:
    pixel_auroc, pixel_ap, pixel_pro (released PRO), pixel_aupro (MVTec AU-PRO, FPR <= 0.3), pixel_aupro_05
        (metrics.pixel_metrics, as for PBAS/CRAS);
    pixel_f1, pixel_iou of the defect class at the segmenter's own threshold 0.5 (a pixel is defective when its
        probability is above it, as segment-predict decides), pooled over the class's test pixels
        (metrics.pixel_f1_iou_at), and that threshold (pixel_f1_threshold);
    image_auroc, image_ap from the map's maximum; image_f1 at the same fixed threshold (image_f1_threshold);
    *_oracle: the same F1 / IoU at the F1-optimal threshold of the test set itself (pixel_f1_oracle,
        pixel_iou_oracle, pixel_f1_threshold_oracle, image_f1_oracle, image_f1_threshold_oracle), an upper bound
        that no deployed segmenter knows; never the headline.
Nothing is selected on test data: best_epoch = last_epoch = the training steps, last_* = the same values, and the
headline thresholds are fixed before testing. Rows go to metrics.json in the job folder, in the format the run machinery's results tables
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
from segment import data as segdata
from segment.networks import ScoreGraph

SCORE_COLUMNS = ("class", "image_path", "defect", "label", "image_score", "heatmap")  # as the PBAS/CRAS scores.csv
METRICS_NAME, SCORES_NAME, HEATMAPS_DIR = "metrics.json", "scores.csv", "heatmaps"
THRESHOLD = 0.5  # the segmenter's decision (segment-predict's default --threshold and --pixel_threshold)
MASK_RULE = segdata.TRAIN_MASK_RULE  # test masks binarised as the training masks


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
    """The metrics row of one class (the columns of utils.RESULT_COLUMNS).

    scores: [N]; maps: [N, S, S] defect probabilities; labels: [N]; masks: [N, S, S] resized masks in [0, 1]
    (binarised here at 0.5)."""
    masks = metrics.binarize_masks(masks, MASK_RULE)
    row = {**metrics.image_metrics(scores, labels), **metrics.pixel_metrics(maps, masks, with_pro=True),
           **metrics.pixel_f1_iou_at(maps, masks, THRESHOLD), **metrics.pixel_f1_iou(maps, masks)}
    row["image_f1_threshold"] = THRESHOLD
    try:
        row["image_f1"] = metrics.f1_at(scores, labels, THRESHOLD)
        row["image_f1_threshold_oracle"], row["image_f1_oracle"] = metrics.f1_optimal_threshold(scores, labels)
    except metrics.UndefinedMetricError:
        row["image_f1"] = row["image_f1_threshold_oracle"] = row["image_f1_oracle"] = math.nan
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
