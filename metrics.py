"""Evaluation metrics for anomaly detection (image and pixel level).

All functions take torch tensors on any device, compute on that device and
return Python floats. Ranking metrics are exact (sort based, integer counts,
float64 accumulation) and agree with scikit-learn including ties.

Pixel ground truth follows the rule of the authors' released code: a mask
pixel is anomalous iff ``int(mask) == 1`` (see :func:`pixel_ground_truth`).
:func:`binarize_masks` applies the chosen rule to resized masks before
evaluation (``release``: unchanged; ``half``: 1 where the mask is above 0.5).

F1 and IoU come in two kinds: at a threshold fixed before testing
(:func:`pixel_f1_iou_at`, :func:`f1_at`), and at the threshold that maximises
F1 on the test set itself (:func:`pixel_f1_iou`, :func:`f1_optimal_threshold`),
which the results tables name ``*_oracle``.

This module does no file I/O.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from scipy import ndimage

from choices import MASK_BINARIZE

MASK_HALF = 0.5  # the 'half' rule of binarize_masks (choices.MASK_BINARIZE): a defect where mask > 0.5

# Released PRO: number of thresholds, dilation window (cv2 5x5 rect), FPR cut-off.
PRO_NUM_THRESHOLDS = 200
PRO_DILATION_SIZE = 5
PRO_FPR_LIMIT = 0.3

# Standard MVTec AUPRO integration limit.
AUPRO_FPR_LIMIT = 0.3
AUPRO_FPR_LIMIT_05 = 0.05  # MVTec AD 2 reports AU-PRO up to FPR 0.05

# 8-connectivity within each image of an [N, H, W] stack (no links across images):
# a 3x3x3 structure whose only non-zero slice is the all-ones 3x3 middle one.
_CONNECTIVITY_8 = np.zeros((3, 3, 3), dtype=bool)
_CONNECTIVITY_8[1] = True


class UndefinedMetricError(ValueError):
    """Raised when a metric is undefined for the given labels (e.g. one class only)."""


# --------------------------------------------------------------------------- #
# Ranking metrics
# --------------------------------------------------------------------------- #
def _binary_clf_curve(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cumulative TP/FP counts at each distinct score, thresholds descending.

    scores, labels: any shape, same numel. Returns (tps [D] int64, fps [D] int64,
    thresholds [D]) where entry d counts samples with score >= thresholds[d].
    """
    s = scores.reshape(-1)
    y = labels.reshape(-1).to(s.device)
    if s.numel() != y.numel():
        raise ValueError(f"scores ({s.numel()}) and labels ({y.numel()}) differ in size")
    if s.numel() == 0:
        raise ValueError("empty input")
    if s.is_floating_point() and bool(torch.isnan(s).any()):
        raise ValueError("scores contain NaN")
    s_sorted, order = torch.sort(s, descending=True)
    y_sorted = (y != 0)[order].to(torch.int64)
    # Last index of every tie group.
    ends = torch.nonzero(s_sorted[1:] != s_sorted[:-1]).reshape(-1)
    ends = torch.cat([ends, ends.new_tensor([s.numel() - 1])])
    tps = torch.cumsum(y_sorted, 0)[ends]
    fps = ends + 1 - tps
    return tps, fps, s_sorted[ends]


def _class_counts(tps: Tensor, fps: Tensor) -> tuple[int, int]:
    """(#positives, #negatives) from the last entry of the cumulative curve."""
    return int(tps[-1].item()), int(fps[-1].item())


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve, equal to sklearn.metrics.roc_auc_score.

    scores, labels: any shape (flattened), same numel; labels binary (non-zero = positive).
    ROC points only at distinct scores (ties count 1/2, Mann-Whitney); exact
    integer arithmetic, O(n log n). Raises UndefinedMetricError (a ValueError)
    if only one class is present.
    """
    tps, fps, _ = _binary_clf_curve(scores, labels)
    n_pos, n_neg = _class_counts(tps, fps)
    if n_pos == 0 or n_neg == 0:
        raise UndefinedMetricError("AUROC is undefined: only one class present in labels")
    zero = tps.new_zeros(1)
    tps = torch.cat([zero, tps])
    fps = torch.cat([zero, fps])
    twice_area = int(((fps[1:] - fps[:-1]) * (tps[1:] + tps[:-1])).sum().item())
    return twice_area / (2 * n_pos * n_neg)


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Average precision, equal to sklearn.metrics.average_precision_score.

    scores, labels: any shape, same numel. AP = sum_n (R_n - R_{n-1}) P_n over
    distinct thresholds (descending). Raises UndefinedMetricError if there is no
    positive label.
    """
    tps, fps, _ = _binary_clf_curve(scores, labels)
    n_pos, _ = _class_counts(tps, fps)
    if n_pos == 0:
        raise UndefinedMetricError("AP is undefined: no positive label")
    tps_f = tps.to(torch.float64)
    precision = tps_f / (tps_f + fps.to(torch.float64))
    d_tp = torch.diff(tps_f, prepend=tps_f.new_zeros(1))
    return float((d_tp * precision).sum().item()) / n_pos


def f1_optimal_threshold(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """Threshold maximising F1 over distinct scores (anomalous iff score >= threshold).

    scores, labels: any shape, same numel. Returns (threshold, F1). Among equal
    F1 values the highest threshold wins. Raises UndefinedMetricError if there
    is no positive label.
    """
    tps, fps, thresholds = _binary_clf_curve(scores, labels)
    n_pos, _ = _class_counts(tps, fps)
    if n_pos == 0:
        raise UndefinedMetricError("F1 is undefined: no positive label")
    tps_f = tps.to(torch.float64)
    f1 = 2.0 * tps_f / (tps_f + fps.to(torch.float64) + n_pos)
    best = int(torch.argmax(f1).item())
    return float(thresholds[best].item()), float(f1[best].item())


def f1_at(scores: Tensor, labels: Tensor, threshold: float) -> float:
    """F1 = 2 TP / (2 TP + FP + FN) of the decision score > threshold (as segment-predict decides).

    scores, labels: any shape, same numel; labels binary (non-zero = positive). Raises UndefinedMetricError
    if there is no positive label.
    """
    s = scores.reshape(-1)
    y = labels.reshape(-1).to(s.device) != 0
    if s.numel() != y.numel():
        raise ValueError(f"scores ({s.numel()}) and labels ({y.numel()}) differ in size")
    n_pos = int(y.sum().item())
    if n_pos == 0:
        raise UndefinedMetricError("F1 is undefined: no positive label")
    predicted = s > threshold
    tp = int((predicted & y).sum().item())
    fp = int((predicted & ~y).sum().item())
    return 2.0 * tp / (tp + fp + n_pos)


def _f1_iou(threshold: float, f1: float, suffix: str) -> dict[str, float]:
    """The row entries of the defect class's F1 and IoU (IoU = F1 / (2 - F1) at one threshold)."""
    return {f"pixel_f1_threshold{suffix}": threshold, f"pixel_f1{suffix}": f1, f"pixel_iou{suffix}": f1 / (2.0 - f1)}


def pixel_f1_iou_at(maps: Tensor, masks: Tensor, threshold: float) -> dict[str, float]:
    """Segmentation quality of the defect class at a threshold fixed before testing, pooled over all pixels.

    maps: [N, H, W] float; masks: [N, H, W] float (ground truth = int(mask) == 1). A pixel is called defective
    iff its score > threshold. Returns pixel_f1_threshold (= threshold), pixel_f1 and
    pixel_iou = TP / (TP + FP + FN) = F1 / (2 - F1); F1 and IoU are NaN without a defect pixel.
    """
    gt = pixel_ground_truth(masks.to(maps.device))
    try:
        f1 = f1_at(maps, gt, threshold)
    except UndefinedMetricError:
        f1 = float("nan")
    return _f1_iou(float(threshold), f1, "")


def pixel_f1_iou(maps: Tensor, masks: Tensor) -> dict[str, float]:
    """Segmentation quality of the defect class at the F1-optimal pixel threshold of the test set itself
    (an oracle: the threshold is chosen on the data it is scored on), pooled over all pixels.

    maps: [N, H, W] float; masks: [N, H, W] float (ground truth = int(mask) == 1). The threshold t maximises
    F1 = 2 TP / (2 TP + FP + FN) over the distinct scores (anomalous iff score >= t); at t,
    IoU = TP / (TP + FP + FN) = F1 / (2 - F1). Returns pixel_f1_threshold_oracle, pixel_f1_oracle,
    pixel_iou_oracle (NaN without a defect pixel).
    """
    gt = pixel_ground_truth(masks.to(maps.device))
    try:
        threshold, f1 = f1_optimal_threshold(maps.reshape(-1), gt.reshape(-1))
    except UndefinedMetricError:
        threshold, f1 = float("nan"), float("nan")
    return _f1_iou(threshold, f1, "_oracle")


# --------------------------------------------------------------------------- #
# Pixel ground truth and connected components
# --------------------------------------------------------------------------- #
def binarize_masks(masks: Tensor, rule: str) -> Tensor:
    """Resized masks as the evaluation reads them (any shape, values in [0, 1]).

    ``release``: unchanged; pixel_ground_truth then counts a pixel only where the antialiased resize left
    exactly 1 (the releases' astype(int)), and released PRO keeps the fractional edges in its FPR.
    ``half``: 1.0 where the mask is above 0.5, else 0.0 (the rule the segmenter trains with), so a thin defect
    keeps the pixels it mostly covers.
    """
    if rule == "release":
        return masks
    if rule == "half":
        return (masks > MASK_HALF).to(masks.dtype)
    raise ValueError(f"unknown mask rule {rule!r}; valid: {', '.join(MASK_BINARIZE)}")


def pixel_ground_truth(masks: Tensor) -> Tensor:
    """Boolean anomaly ground truth, the rule of the released code: int(mask) == 1.

    masks: [N, H, W] float (possibly fractional edges from resizing) -> [N, H, W] bool.
    Truncation to int means only pixels exactly equal to 1 are anomalous.
    """
    return masks.long() == 1


def _region_labels(gt: Tensor) -> tuple[Tensor, int]:
    """8-connected components of each image of gt, labelled on CPU.

    gt: [N, H, W] bool -> (labels [N, H, W] int64 on gt.device, 0 = background,
    1..R unique over the whole stack; R).
    """
    lab, num = ndimage.label(gt.detach().cpu().numpy(), structure=_CONNECTIVITY_8)
    return torch.from_numpy(lab.astype(np.int64)).to(gt.device), int(num)


def _region_pixel_weights(lab: Tensor, num_regions: int) -> tuple[Tensor, Tensor]:
    """Per-pixel weights 1 / area(region) for pixels inside regions.

    lab: [N, H, W] int64 region labels -> (in_region [N, H, W] bool, weights [P] float64
    for the pixels lab[in_region]).
    """
    in_region = lab > 0
    region = lab[in_region] - 1
    area = torch.bincount(region, minlength=num_regions).to(torch.float64)
    return in_region, 1.0 / area[region]


def _count_above(values: Tensor, thresholds: Tensor, weights: Tensor | None = None) -> Tensor:
    """Sum of weights of values strictly above each threshold.

    values: [P]; thresholds: [K] ascending, same dtype; weights: [P] or None (counts).
    Returns [K] float64 with entry k = sum_p w_p [values_p > thresholds_k].
    """
    num = thresholds.numel()
    # idx_p = #{k : thresholds_k < values_p}; value p is above thresholds 0..idx_p-1.
    idx = torch.searchsorted(thresholds, values.contiguous(), right=False)
    w = torch.ones_like(idx, dtype=torch.float64) if weights is None else weights
    hist = torch.zeros(num + 1, dtype=torch.float64, device=values.device).index_add_(0, idx, w)
    tail = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # tail[j] = sum_{i >= j} hist[i]
    return tail[1:]


# --------------------------------------------------------------------------- #
# PRO as released by the authors
# --------------------------------------------------------------------------- #
def _released_thresholds(maps: Tensor, num_thresholds: int) -> np.ndarray | None:
    """Thresholds of the released loop: np.arange(min, max, (max - min) / num).

    min/max are NumPy scalars of the maps' dtype, exactly as in the released
    code, so the count (200 or 201) and values match np.arange. None if max == min.
    """
    min_th = maps.min().detach().cpu().numpy()[()]
    max_th = maps.max().detach().cpu().numpy()[()]
    if not max_th > min_th:
        return None
    delta = (max_th - min_th) / num_thresholds
    return np.arange(min_th, max_th, delta)


def _trapezoid(x: Tensor, y: Tensor) -> Tensor:
    """Trapezoid rule sum((x[i+1] - x[i]) * (y[i+1] + y[i]) / 2); x, y: [K] -> scalar."""
    return ((x[1:] - x[:-1]) * (y[1:] + y[:-1])).sum() / 2.0


def pro_released(masks: Tensor, maps: Tensor, num_thresholds: int = PRO_NUM_THRESHOLDS) -> float:
    """PRO exactly as the authors' released code computes it, vectorised.

    masks: [N, H, W] float (fractional edges allowed); maps: [N, H, W] float.

    Released procedure, reproduced step by step:
    - thresholds th = np.arange(min, max, (max - min) / num_thresholds) with the
      NumPy scalars of maps.min()/maps.max() (200 or 201 values); comparisons
      ``maps > th`` follow NumPy's promotion of the maps against those
      thresholds (float64 with NumPy 2);
    - regions: 8-connected components of int(mask) == 1 (skimage.label of the
      float mask truncates fractional edges to background);
    - per-region overlap uses the binary map dilated by a 5x5 rectangle (cv2,
      pixels outside the image ignored) == (maxfilter5x5(maps) > th);
      PRO(th) = mean over all regions of all images;
    - FPR(th) = #{1 - mask != 0 and maps > th} / sum(1 - mask) (undilated map,
      fractional edges count in the numerator, float sum in the denominator);
    - keep thresholds with FPR < 0.3, min-max normalise the FPR
      (fpr - min) / (max - min) -- the golden output of the released function
      matches min-max, not division by the max -- and return the trapezoid
      area under PRO(FPR) (sklearn.metrics.auc).

    Returns float('nan') if there is no anomalous region, fewer than two
    thresholds are kept, or the kept FPRs are all equal.
    """
    if masks.shape != maps.shape or maps.dim() != 3:
        raise ValueError(f"masks {tuple(masks.shape)} and maps {tuple(maps.shape)} must both be [N, H, W]")
    masks = masks.to(maps.device)
    thresholds_np = _released_thresholds(maps, num_thresholds)
    lab, num_regions = _region_labels(pixel_ground_truth(masks))
    if thresholds_np is None or num_regions == 0:
        return float("nan")
    thresholds = torch.from_numpy(thresholds_np)
    cmp_dtype = torch.promote_types(thresholds.dtype, maps.dtype)  # as NumPy promotes maps > th
    thresholds = thresholds.to(device=maps.device, dtype=cmp_dtype)
    maps_c = maps.to(cmp_dtype)

    # Per-region overlap of the dilated binary map, averaged over regions.
    pad = PRO_DILATION_SIZE // 2
    dilated = F.max_pool2d(maps_c[:, None], PRO_DILATION_SIZE, stride=1, padding=pad)[:, 0]  # -inf padding
    in_region, weights = _region_pixel_weights(lab, num_regions)
    pro = _count_above(dilated[in_region], thresholds, weights) / num_regions

    # FPR of the undilated binary map.
    inverse = 1 - masks
    negative = inverse != 0
    fpr = _count_above(maps_c[negative], thresholds) / inverse.to(torch.float64).sum()

    keep = fpr < PRO_FPR_LIMIT
    if int(keep.sum().item()) < 2:
        return float("nan")
    fpr_k, pro_k = fpr[keep], pro[keep]
    span = fpr_k.max() - fpr_k.min()
    if not bool(span > 0):
        return float("nan")
    fpr_n = (fpr_k - fpr_k.min()) / span
    return float(_trapezoid(fpr_n, pro_k).abs().item())  # FPR decreases with th; auc() uses |area|


# --------------------------------------------------------------------------- #
# Standard MVTec AUPRO
# --------------------------------------------------------------------------- #
def _area_up_to(x: Tensor, y: Tensor, x_max: float) -> Tensor:
    """Trapezoid area under y(x) for x in [x[0], x_max], linear interpolation at x_max.

    x: [K] non-decreasing with x[-1] >= x_max; y: [K]. Returns a scalar tensor.
    """
    last = int(torch.searchsorted(x, x.new_tensor([x_max]), right=True).item()) - 1  # last x <= x_max
    area = _trapezoid(x[: last + 1], y[: last + 1])
    if last + 1 < x.numel() and bool(x[last] < x_max):
        x0, x1, y0, y1 = x[last], x[last + 1], y[last], y[last + 1]
        y_max = y0 + (x_max - x0) * (y1 - y0) / (x1 - x0)
        area = area + (x_max - x0) * (y0 + y_max) / 2.0
    return area


def aupro(gt: Tensor, maps: Tensor, fpr_limit: float | Sequence[float] = AUPRO_FPR_LIMIT) -> float | list[float]:
    """Standard MVTec AUPRO: normalised area under PRO(FPR) for FPR in [0, fpr_limit].

    gt: [N, H, W] bool; maps: [N, H, W] float. Curve points at every distinct
    score t (anomalous iff score >= t), starting at (0, 0); regions are the
    8-connected components of gt per image, PRO(t) = mean over all regions of
    all images of the detected fraction, FPR(t) = FP / #negative pixels. No
    dilation. Exact trapezoid area with linear interpolation at fpr_limit,
    divided by fpr_limit. Returns float('nan') if there is no region or no
    negative pixel. Several limits (a sequence) share one curve: a list of areas.
    """
    limits = [fpr_limit] if isinstance(fpr_limit, (int, float)) else list(fpr_limit)
    if gt.shape != maps.shape or maps.dim() != 3:
        raise ValueError(f"gt {tuple(gt.shape)} and maps {tuple(maps.shape)} must both be [N, H, W]")
    for limit in limits:
        if not 0.0 < limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {limit}")
    gt = gt.to(device=maps.device, dtype=torch.bool)
    lab, num_regions = _region_labels(gt)
    n_neg = int((~gt).sum().item())
    if num_regions == 0 or n_neg == 0:
        areas = [float("nan")] * len(limits)
        return areas[0] if isinstance(fpr_limit, (int, float)) else areas
    in_region, weights = _region_pixel_weights(lab, num_regions)
    pro_w = torch.zeros(gt.shape, dtype=torch.float64, device=maps.device)
    pro_w[in_region] = weights / num_regions

    s_sorted, order = torch.sort(maps.reshape(-1), descending=True)
    ends = torch.nonzero(s_sorted[1:] != s_sorted[:-1]).reshape(-1)
    ends = torch.cat([ends, ends.new_tensor([s_sorted.numel() - 1])])
    fp = torch.cumsum((~gt).reshape(-1)[order].to(torch.int64), 0)[ends]
    pro = torch.cumsum(pro_w.reshape(-1)[order], 0)[ends]
    zero = pro.new_zeros(1)
    fpr = torch.cat([zero, fp.to(torch.float64) / n_neg])
    pro = torch.cat([zero, pro])
    areas = [float(_area_up_to(fpr, pro, limit).item()) / limit for limit in limits]
    return areas[0] if isinstance(fpr_limit, (int, float)) else areas


# --------------------------------------------------------------------------- #
# Convenience wrappers
# --------------------------------------------------------------------------- #
def _nan_if_undefined(fn: Callable[..., float], *args: Tensor) -> float:
    """fn(*args), or NaN if the metric is undefined for these labels."""
    try:
        return fn(*args)
    except UndefinedMetricError:
        return float("nan")


def image_metrics(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Image-level AUROC and AP; scores, labels: [N]. Undefined metrics are NaN."""
    return {
        "image_auroc": _nan_if_undefined(auroc, scores, labels),
        "image_ap": _nan_if_undefined(average_precision, scores, labels),
    }


def pixel_metrics(maps: Tensor, masks: Tensor, with_pro: bool = False) -> dict[str, float]:
    """Pixel-level AUROC, AP and optionally released PRO and MVTec AUPRO.

    maps: [N, H, W] float; masks: [N, H, W] float (ground truth = int(mask) == 1).
    Undefined metrics are NaN.
    """
    masks = masks.to(maps.device)
    gt = pixel_ground_truth(masks)
    out = {
        "pixel_auroc": _nan_if_undefined(auroc, maps, gt),
        "pixel_ap": _nan_if_undefined(average_precision, maps, gt),
    }
    if with_pro:
        out["pixel_pro"] = pro_released(masks, maps)
        out["pixel_aupro"], out["pixel_aupro_05"] = aupro(gt, maps, (AUPRO_FPR_LIMIT, AUPRO_FPR_LIMIT_05))
    return out
