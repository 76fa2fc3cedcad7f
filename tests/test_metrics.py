"""Tests for metrics.py against scikit-learn, scipy and slow reference implementations."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metrics  # noqa: E402
from common import gaussian_blur  # noqa: E402

GOLDEN_PRO = Path(__file__).resolve().parent / "golden" / "pro.pt"
TOL = 1e-6
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- #
# Helpers and slow references
# --------------------------------------------------------------------------- #
def _random_binary_problem(seed: int, n: int, pos_frac: float, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores with many ties (rounded) and labels with both classes present."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < pos_frac).astype(np.int64)
    labels[0], labels[1] = 0, 1
    scores = np.round(rng.random(n) + 0.3 * labels, decimals)
    return scores, labels


def _blob_masks(rng: np.random.Generator, n: int, size: int, max_blobs: int) -> np.ndarray:
    """[n, size, size] float32 masks of ellipse blobs, smoothed to get fractional edges."""
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), np.float32)
    for i in range(n):
        for _ in range(rng.integers(0, max_blobs + 1)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.integers(2, size // 6, 2)
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1.0
        # a few isolated single pixels (own regions, also diagonal neighbours)
        px = rng.integers(0, size, (3, 2))
        masks[i][px[:, 0], px[:, 1]] = 1.0
    # fractional edges like a bilinear resize: keep exact ones inside, fractions outside
    blurred = ndimage.uniform_filter(masks, size=(1, 3, 3)).astype(np.float32)
    return np.where(masks == 1.0, np.float32(1.0), np.round(blurred, 3)).astype(np.float32)


def _pro_released_reference(masks: np.ndarray, amaps: np.ndarray, num_th: int = 200) -> float:
    """Literal loop of the released PRO (cv2.dilate replaced by a binary 5x5 maximum filter)."""
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / num_th
    regions = [measure.regionprops(measure.label(mask)) for mask in masks]
    rows = []
    for th in np.arange(min_th, max_th, delta):
        binary = amaps > th
        pros = []
        for b, mask_regions in zip(binary, regions):
            b_dil = ndimage.maximum_filter(b.astype(np.uint8), size=5, mode="constant", cval=0)
            for region in mask_regions:
                tp = b_dil[region.coords[:, 0], region.coords[:, 1]].sum()
                pros.append(tp / region.area)
        inverse_masks = 1 - masks
        fpr = np.logical_and(inverse_masks, binary).sum() / inverse_masks.sum()
        rows.append((np.mean(pros), fpr))
    table = np.array(rows, dtype=np.float64)
    table = table[table[:, 1] < 0.3]
    fpr = table[:, 1]
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    return float(auc(fpr, table[:, 0]))


def _aupro_reference(gt: np.ndarray, amaps: np.ndarray, fpr_limit: float) -> float:
    """Slow MVTec AUPRO: one binary map per distinct threshold, explicit region loop."""
    regions = []  # (image index, boolean region mask)
    for i, g in enumerate(gt):
        lab, num = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, num + 1)]
    neg = ~gt
    xs, ys = [0.0], [0.0]
    for t in np.unique(amaps)[::-1]:
        pred = amaps >= t
        xs.append((pred & neg).sum() / neg.sum())
        ys.append(np.mean([(pred[i] & reg).sum() / reg.sum() for i, reg in regions]))
    xs, ys = np.array(xs), np.array(ys)
    inside = xs <= fpr_limit
    x_in, y_in = list(xs[inside]), list(ys[inside])
    if x_in[-1] < fpr_limit:
        j = int(np.argmax(xs > fpr_limit))
        y_lim = ys[j - 1] + (ys[j] - ys[j - 1]) * (fpr_limit - xs[j - 1]) / (xs[j] - xs[j - 1])
        x_in.append(fpr_limit)
        y_in.append(y_lim)
    x_in, y_in = np.array(x_in), np.array(y_in)
    return float(np.sum(np.diff(x_in) * (y_in[1:] + y_in[:-1]) / 2) / fpr_limit)


# --------------------------------------------------------------------------- #
# AUROC / AP / F1
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [5, 300, 20000])
@pytest.mark.parametrize("pos_frac", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("decimals", [0, 2])
def test_auroc_ap_match_sklearn(device: str, seed: int, n: int, pos_frac: float, decimals: int) -> None:
    scores, labels = _random_binary_problem(seed, n, pos_frac, decimals)
    s = torch.from_numpy(scores).float().to(device)
    y = torch.from_numpy(labels).to(device)
    # float32 scores: compare with sklearn on the same float32 values
    s_np = s.cpu().numpy()
    assert abs(metrics.auroc(s, y) - roc_auc_score(labels, s_np)) < TOL
    assert abs(metrics.average_precision(s, y) - average_precision_score(labels, s_np)) < TOL
    # bool labels and 2-D shapes are accepted too
    assert abs(metrics.auroc(s.reshape(1, -1), y.bool().reshape(1, -1)) - roc_auc_score(labels, s_np)) < TOL


def test_auroc_ap_large_with_ties() -> None:
    rng = np.random.default_rng(7)
    n = 2_000_000
    labels = (rng.random(n) < 0.02).astype(np.int64)
    scores = np.round(rng.random(n) * 0.8 + 0.2 * labels, 3)
    s, y = torch.from_numpy(scores), torch.from_numpy(labels)
    assert abs(metrics.auroc(s, y) - roc_auc_score(labels, scores)) < 1e-9
    assert abs(metrics.average_precision(s, y) - average_precision_score(labels, scores)) < 1e-9


def test_auroc_all_tied_is_half() -> None:
    assert metrics.auroc(torch.zeros(10), torch.tensor([0, 1] * 5)) == 0.5


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_auroc_one_class_raises(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="one class"):
        metrics.auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor(labels))


def test_ap_no_positive_raises() -> None:
    with pytest.raises(ValueError):
        metrics.average_precision(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_f1_optimal_threshold_brute_force(device: str, seed: int) -> None:
    scores, labels = _random_binary_problem(seed, 400, [0.1, 0.5][seed % 2], 2)
    best_f1, best_t = -1.0, None
    for t in np.unique(scores)[::-1]:  # descending: first maximum = highest threshold
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        f1 = 2 * tp / (pred.sum() + labels.sum())
        if f1 > best_f1:
            best_f1, best_t = f1, t
    t, f1 = metrics.f1_optimal_threshold(torch.from_numpy(scores).to(device), torch.from_numpy(labels).to(device))
    assert t == pytest.approx(best_t, abs=1e-12)
    assert f1 == pytest.approx(best_f1, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_f1_at_a_fixed_threshold_brute_force(seed: int) -> None:
    scores, labels = _random_binary_problem(seed, 300, 0.3, 2)
    for t in (0.2, 0.5, float(scores[5])):  # a threshold equal to a score: that score is not above it
        pred = scores > t
        tp, fp = np.sum(pred & (labels == 1)), np.sum(pred & (labels == 0))
        assert metrics.f1_at(torch.from_numpy(scores), torch.from_numpy(labels), t) == 2 * tp / (2 * tp + fp + (labels.sum() - tp))
    with pytest.raises(metrics.UndefinedMetricError):
        metrics.f1_at(torch.tensor([0.9]), torch.tensor([0]), 0.5)


def test_pixel_f1_iou_at_a_fixed_threshold_and_the_oracle() -> None:
    maps = torch.tensor([[[0.9, 0.8, 0.1], [0.7, 0.2, 0.3]]])
    masks = torch.tensor([[[1.0, 0, 0], [1, 0, 1]]])
    # > 0.5: TP 2, FP 1, FN 1 -> F1 2/3, IoU 1/2; the oracle (>= 0.3 on the test pixels): F1 6/7, IoU 3/4
    fixed = metrics.pixel_f1_iou_at(maps, masks, 0.5)
    assert fixed == {"pixel_f1_threshold": 0.5, "pixel_f1": pytest.approx(2 / 3), "pixel_iou": pytest.approx(1 / 2)}
    oracle = metrics.pixel_f1_iou(maps, masks)
    assert oracle == {"pixel_f1_threshold_oracle": pytest.approx(0.3), "pixel_f1_oracle": pytest.approx(6 / 7),
                      "pixel_iou_oracle": pytest.approx(3 / 4)}
    assert math.isnan(metrics.pixel_f1_iou_at(maps, torch.zeros_like(masks), 0.5)["pixel_iou"])


# --------------------------------------------------------------------------- #
# Ground truth
# --------------------------------------------------------------------------- #
def test_pixel_ground_truth_truncates() -> None:
    masks = torch.tensor([[[0.0, 0.5, 0.999, 1.0]]])
    assert metrics.pixel_ground_truth(masks).tolist() == [[[False, False, False, True]]]


def test_binarize_masks_release_keeps_the_resized_mask_and_half_thresholds_it() -> None:
    masks = torch.tensor([[[0.0, 0.5, 0.51, 0.999, 1.0]]])
    assert metrics.binarize_masks(masks, "release") is masks  # the released PRO still sees the fractional edges
    assert metrics.binarize_masks(masks, "half").tolist() == [[[0.0, 0.0, 1.0, 1.0, 1.0]]]
    with pytest.raises(ValueError, match="unknown mask rule"):
        metrics.binarize_masks(masks, "third")


def test_a_thin_defect_downscaled_keeps_pixels_only_with_the_half_rule() -> None:
    """A 4 px scratch in a 1024 px mask resized to 256 px by the datasets' mask transform (antialiased bilinear):
    no pixel stays exactly 1, so the release rule has no defect pixel; the half rule keeps about a 1 px line."""
    from PIL import Image

    from datasets import mask_transform

    mask = np.zeros((1024, 1024), np.uint8)
    mask[:, 508:512] = 255  # exactly one 256 px column under it
    masks = mask_transform(256, 256)(Image.fromarray(mask))  # [1, 256, 256]
    assert not metrics.pixel_ground_truth(metrics.binarize_masks(masks, "release")).any()
    assert 256 <= int(metrics.pixel_ground_truth(metrics.binarize_masks(masks, "half")).sum()) <= 2 * 256


# --------------------------------------------------------------------------- #
# Released PRO
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("device", DEVICES)
def test_pro_released_golden(device: str) -> None:
    golden = torch.load(GOLDEN_PRO, weights_only=False)
    masks, maps = golden["masks"], golden["anomaly_maps"]
    value = metrics.pro_released(masks.to(device), maps.to(device))
    assert abs(value - golden["pro"]) < TOL
    assert abs(value - _pro_released_reference(masks.numpy(), maps.numpy())) < TOL


def test_pro_released_golden_is_min_max_normalised() -> None:
    """Dividing the FPR by its max only would give a value far from the golden one."""
    golden = torch.load(GOLDEN_PRO, weights_only=False)
    masks, maps = golden["masks"].numpy(), golden["anomaly_maps"].numpy()
    min_th, max_th = maps.min(), maps.max()
    fprs, pros = [], []
    gts = [measure.regionprops(measure.label(m)) for m in masks]
    for th in np.arange(min_th, max_th, (max_th - min_th) / 200):
        binary = maps > th
        dil = ndimage.maximum_filter(binary.astype(np.uint8), size=(1, 5, 5), mode="constant", cval=0)
        pros.append(np.mean([dil[i][r.coords[:, 0], r.coords[:, 1]].mean() for i, rs in enumerate(gts) for r in rs]))
        fprs.append(np.logical_and(1 - masks, binary).sum() / (1 - masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    divide_by_max = auc(fprs[keep] / fprs[keep].max(), pros[keep])
    assert abs(divide_by_max - golden["pro"]) > 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pro_released_random_vs_reference(device: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, 8, 96, 3)
    assert ((masks > 0) & (masks < 1)).any()
    smooth = ndimage.gaussian_filter(masks, sigma=(0, 3, 3)) + 0.6 * rng.random(masks.shape)
    maps = np.round(smooth, 2).astype(np.float32)  # many ties
    expected = _pro_released_reference(masks, maps)
    value = metrics.pro_released(torch.from_numpy(masks).to(device), torch.from_numpy(maps).to(device))
    assert abs(value - expected) < TOL


def test_pro_released_201_thresholds() -> None:
    """Maps whose min/max make np.arange yield 201 thresholds are reproduced too."""
    lo = np.float32(0.1)
    hi = next(
        h for h in (np.float32(0.1 + k * 1e-3) for k in range(1, 5000))
        if len(np.arange(lo, h, (h - lo) / 200)) == 201
    )
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, 3, 48, 2)
    maps = (lo + (hi - lo) * np.round(rng.random(masks.shape) * 0.5 + 0.5 * masks, 2)).astype(np.float32)
    maps[0, 0, 0], maps[-1, -1, -1] = lo, hi
    assert len(np.arange(maps.min(), maps.max(), (maps.max() - maps.min()) / 200)) == 201
    value = metrics.pro_released(torch.from_numpy(masks), torch.from_numpy(maps))
    assert abs(value - _pro_released_reference(masks, maps)) < TOL


def test_pro_released_undefined_is_nan() -> None:
    maps = torch.rand(2, 16, 16)
    assert math.isnan(metrics.pro_released(torch.zeros(2, 16, 16), maps))
    masks = torch.zeros(2, 16, 16)
    masks[0, 4:8, 4:8] = 1.0
    assert math.isnan(metrics.pro_released(masks, torch.ones(2, 16, 16)))


# --------------------------------------------------------------------------- #
# MVTec AUPRO
# --------------------------------------------------------------------------- #
def _hand_case_intermediate() -> tuple[torch.Tensor, torch.Tensor]:
    """One 4-pixel region, 10 negatives; AUPRO@0.3 = 11/36 (derived in the test)."""
    gt = torch.zeros(1, 2, 7, dtype=torch.bool)
    gt[0, 0, :4] = True
    maps = torch.zeros(1, 2, 7)
    maps[0, 0, :4] = torch.tensor([0.9, 0.5, 0.1, 0.1])
    maps[0, 0, 4:] = torch.tensor([0.8, 0.5, 0.5])
    maps[0, 1, :] = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.2, 0.0, 0.0])
    return gt, maps


@pytest.mark.parametrize("device", DEVICES)
def test_aupro_hand_cases(device: str) -> None:
    gt = torch.zeros(2, 6, 6, dtype=torch.bool)
    gt[0, 1:3, 1:3] = True
    gt[1, 4, 4] = True
    perfect = gt.float() + 0.1 * torch.rand(2, 6, 6)
    assert metrics.aupro(gt.to(device), perfect.to(device)) == pytest.approx(1.0, abs=1e-12)
    reversed_map = 2.0 - perfect
    assert metrics.aupro(gt.to(device), reversed_map.to(device)) == pytest.approx(0.0, abs=1e-12)

    # Curve (0,0) -> (0,1/4) -> (0.1,1/4) -> (0.4,1/2) -> ...; at FPR 0.3 the PRO is
    # 1/4 + (0.2/0.3)(1/4) = 5/12, so area = 0.1*1/4 + 0.2*(1/4+5/12)/2 = 11/120 and
    # AUPRO = (11/120)/0.3 = 11/36.
    gt_i, maps_i = _hand_case_intermediate()
    assert metrics.aupro(gt_i.to(device), maps_i.to(device)) == pytest.approx(11 / 36, abs=1e-12)

    # Regions are averaged, not pixels: a 1-pixel region found first, a 3-pixel region
    # last -> PRO is 1/2 on the whole [0, 1) FPR range (pixel averaging would give 1/4).
    gt_r = torch.zeros(2, 3, 3, dtype=torch.bool)
    gt_r[0, 0, 0] = True
    gt_r[1, 2, :] = True
    maps_r = torch.full((2, 3, 3), 0.5)
    maps_r[0, 0, 0] = 1.0
    maps_r[1, 2, :] = 0.0
    assert metrics.aupro(gt_r.to(device), maps_r.to(device)) == pytest.approx(0.5, abs=1e-12)
    # with fpr_limit=1 the final vertical jump to (1,1) adds no area
    assert metrics.aupro(gt_r.to(device), maps_r.to(device), fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_diagonal_neighbours_are_one_region() -> None:
    """(0,0),(0,1),(1,2) is one 8-connected region: finding (1,2) first gives PRO 1/3
    (4-connectivity would give two regions and PRO (0 + 1) / 2)."""
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, 0, 0] = gt[0, 0, 1] = gt[0, 1, 2] = True
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 2] = 1.0
    maps[0, 0, :2] = -1.0  # below every negative pixel
    assert metrics.aupro(gt, maps, fpr_limit=1.0) == pytest.approx(1 / 3, abs=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_random_vs_reference(device: str, seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(seed)
    gt = _blob_masks(rng, 3, 32, 3) == 1.0
    maps = np.round(rng.random(gt.shape) + 0.4 * gt, [2, 1, 3][seed])
    expected = _aupro_reference(gt, maps, fpr_limit)
    value = metrics.aupro(torch.from_numpy(gt).to(device), torch.from_numpy(maps).float().to(device), fpr_limit)
    ref32 = _aupro_reference(gt, maps.astype(np.float32), fpr_limit)
    assert abs(value - ref32) < TOL
    assert abs(metrics.aupro(torch.from_numpy(gt), torch.from_numpy(maps), fpr_limit) - expected) < TOL


def test_aupro_no_region_is_nan() -> None:
    assert math.isnan(metrics.aupro(torch.zeros(1, 4, 4, dtype=torch.bool), torch.rand(1, 4, 4)))


# --------------------------------------------------------------------------- #
# Gaussian blur
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 288, 288), (4, 20, 20), (2, 5, 9), (1, 1, 3)])
def test_gaussian_blur_matches_scipy(device: str, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    maps64 = rng.random(shape) * 2.0
    maps64[:, : shape[1] // 3, : shape[2] // 2] += 1.0  # some structure near the border
    for dtype, tol in [(np.float32, 1e-5), (np.float64, 1e-12)]:
        maps = maps64.astype(dtype)
        expected = np.stack([ndimage.gaussian_filter(m, sigma=4) for m in maps])
        out = gaussian_blur(torch.from_numpy(maps).to(device))
        assert out.dtype == torch.from_numpy(maps).dtype and out.shape == maps.shape
        assert np.abs(out.cpu().numpy().astype(np.float64) - expected).max() <= tol


def test_gaussian_blur_other_sigma() -> None:
    maps = np.random.default_rng(0).random((2, 30, 17))
    expected = np.stack([ndimage.gaussian_filter(m, sigma=1.5, truncate=3.0) for m in maps])
    out = gaussian_blur(torch.from_numpy(maps), sigma=1.5, truncate=3.0).numpy()
    assert np.abs(out - expected).max() <= 1e-12


# --------------------------------------------------------------------------- #
# Convenience wrappers
# --------------------------------------------------------------------------- #
def test_image_metrics() -> None:
    scores, labels = _random_binary_problem(0, 200, 0.4, 2)
    out = metrics.image_metrics(torch.from_numpy(scores), torch.from_numpy(labels))
    assert set(out) == {"image_auroc", "image_ap"}
    assert abs(out["image_auroc"] - roc_auc_score(labels, scores)) < TOL
    assert abs(out["image_ap"] - average_precision_score(labels, scores)) < TOL
    one_class = metrics.image_metrics(torch.rand(5), torch.zeros(5))
    assert math.isnan(one_class["image_auroc"]) and math.isnan(one_class["image_ap"])


def test_pixel_metrics() -> None:
    golden = torch.load(GOLDEN_PRO, weights_only=False)
    masks, maps = golden["masks"], golden["anomaly_maps"]
    out = metrics.pixel_metrics(maps, masks, with_pro=True)
    gt = (masks.long() == 1).numpy().ravel()
    assert set(out) == {"pixel_auroc", "pixel_ap", "pixel_pro", "pixel_aupro", "pixel_aupro_05"}
    assert abs(out["pixel_auroc"] - roc_auc_score(gt, maps.numpy().ravel())) < TOL
    assert abs(out["pixel_ap"] - average_precision_score(gt, maps.numpy().ravel())) < TOL
    assert abs(out["pixel_pro"] - golden["pro"]) < TOL
    assert 0.0 <= out["pixel_aupro"] <= 1.0
    assert set(metrics.pixel_metrics(maps, masks, with_pro=False)) == {"pixel_auroc", "pixel_ap"}
    empty = metrics.pixel_metrics(maps, torch.zeros_like(masks), with_pro=True)
    assert all(math.isnan(v) for v in empty.values())


def test_aupro_at_several_limits_shares_one_curve_and_pixel_metrics_report_both() -> None:
    rng = np.random.default_rng(4)
    gt = torch.from_numpy(_blob_masks(rng, 3, 32, 3) == 1.0)
    maps = torch.from_numpy(np.round(rng.random(gt.shape) + 0.4 * gt.numpy(), 2)).float()
    both = metrics.aupro(gt, maps, (0.3, 0.05))
    assert both == [metrics.aupro(gt, maps, 0.3), metrics.aupro(gt, maps, 0.05)]
    out = metrics.pixel_metrics(maps, gt.float(), with_pro=True)
    assert (out["pixel_aupro"], out["pixel_aupro_05"]) == tuple(both)
