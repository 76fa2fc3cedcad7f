"""The HTML report of a results folder: ``RESULTS/report.html`` with its images in ``RESULTS/report/``.

It opens from disk, with no server (relative links only), and shows
    the results table (selected and last epoch; mean +- std over the seeds when there are several),
    per job and class: the image-level ROC and precision-recall curves of the selected epoch, the per-epoch
    curves of loss, I-AUROC and P-AUROC, and a gallery of the worst false negatives and false positives at
    the F1-optimal image threshold (the job's heatmaps).
Everything is read from the folder (results.csv, config.json, each job's metrics.json, scores.csv, heatmaps
and per-epoch CSV log), so ``python main.py report RESULTS`` rebuilds it for any finished folder.
"""
from __future__ import annotations

import csv
import glob
import html
import io
import math
import os
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

import utils
from utils import UserError

REPORT_NAME = "report.html"
IMAGES_DIR = "report"
GALLERY_SIZE = 6  # worst false negatives and false positives shown per class
TABLE_COLUMNS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_pro", "pixel_aupro", "pixel_aupro_05", "pixel_f1", "pixel_iou", "pixel_f1_oracle", "pixel_iou_oracle", "best_epoch",
                 "last_image_auroc", "last_pixel_auroc", "last_pixel_pro", "last_epoch")
FIGURE_SIZE = (4.0, 3.2)


@dataclass
class JobRun:
    """One job folder (models/METHOD/JOB/seedN) and what the report needs from it."""

    folder: str  # relative to RESULTS
    method: str
    setting: str
    seed: int
    rows: dict[str, dict]  # DATASET_CLASS -> metrics row
    scores: list[dict]  # scores.csv rows
    log: list[dict]  # per-epoch CSV log rows ([] when missing)


def _read_csv(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def collect(results: str) -> list[JobRun]:
    """Every finished job of the folder (those with a metrics.json), in folder order."""
    runs = utils.read_json(os.path.join(results, "config.json")).get("runs", {})
    found = []
    for path in sorted(glob.glob(os.path.join(results, "models", "*", "*", "seed*", "metrics.json"))):
        data = utils.read_json(path)
        if not isinstance(data.get("rows"), dict):
            continue
        folder = os.path.relpath(os.path.dirname(path), results)
        log = runs.get(folder, {}).get("log")
        found.append(JobRun(folder, data.get("method", "?"), data.get("setting", "?"), int(data.get("seed", 0)),
                            {name: utils.upgrade_metrics_row(row) for name, row in data["rows"].items()},
                            _read_csv(os.path.join(results, folder, "scores.csv")),
                            _read_csv(os.path.join(results, log)) if isinstance(log, str) else []))
    return found


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------


def _save(fig: Figure, results: str, name: str) -> str:
    """Write a figure as PNG under RESULTS/report/; its path relative to RESULTS."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    relative = os.path.join(IMAGES_DIR, name)
    utils.save_bytes(buf.getvalue(), os.path.join(results, relative))
    return relative


def curves(results: str, stem: str, labels: np.ndarray, scores: np.ndarray) -> list[str]:
    """ROC and precision-recall curves of one class (image level); [] when a class is missing from the labels."""
    if len(set(labels.tolist())) < 2:
        return []
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    out = []
    for name, x, y, xlabel, ylabel in (("roc", fpr, tpr, "false positive rate", "true positive rate"),
                                       ("pr", recall, precision, "recall", "precision")):
        fig = Figure(figsize=FIGURE_SIZE)
        ax = fig.add_subplot()
        ax.plot(x, y, drawstyle="steps-post" if name == "pr" else "default")
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02), title=f"{name.upper()}")
        ax.grid(alpha=0.3)
        out.append(_save(fig, results, f"{stem}_{name}.png"))
    return out


def epoch_curves(results: str, stem: str, log: list[dict], classes: list[str]) -> str | None:
    """Loss and the evaluated I-AUROC / P-AUROC per epoch (each class's for multi-class jobs)."""
    if not log:
        return None
    epochs = [int(r["epoch"]) for r in log]
    fig = Figure(figsize=(2 * FIGURE_SIZE[0], FIGURE_SIZE[1]))
    loss_ax, metric_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [float(r["loss"]) for r in log])
    loss_ax.set(xlabel="epoch", ylabel="loss", title="training loss")
    series = [("mean", "")] if len(classes) < 2 else [(c, f"{c}_") for c in classes]
    for label, prefix in series:
        for metric, style in (("image_auroc", "-"), ("pixel_auroc", "--")):
            values = [float(r.get(f"{prefix}{metric}", "nan")) for r in log]
            metric_ax.plot(epochs, values, style, label=f"{label} {metric.split('_')[0][0].upper()}-AUROC")
    metric_ax.set(xlabel="epoch", ylabel="AUROC", title="test metrics per epoch")
    metric_ax.legend(fontsize=6)
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
    return _save(fig, results, f"{stem}_epochs.png")


def worst(scores: list[dict], threshold: float) -> tuple[list[dict], list[dict]]:
    """(false negatives, lowest score first; false positives, highest first) at ``threshold`` (anomalous: score >= it,
    as the F1-optimal threshold is one of the scores)."""
    fn = sorted((r for r in scores if r["label"] == "1" and float(r["image_score"]) < threshold),
                key=lambda r: float(r["image_score"]))
    fp = sorted((r for r in scores if r["label"] == "0" and float(r["image_score"]) >= threshold),
                key=lambda r: -float(r["image_score"]))
    return fn[:GALLERY_SIZE], fp[:GALLERY_SIZE]


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------


def _cell(value: str) -> str:
    """A results.csv value as shown in the table: fractions as percentages with two decimals."""
    try:
        number = float(value)
    except ValueError:
        return html.escape(value)
    if math.isnan(number):
        return "nan"
    return f"{100 * number:.2f}"


def format_cell(row: dict, column: str, seeds: bool) -> str:
    """A table cell: the value (percent; epochs as they are), with +- std when there are several seeds."""
    if column.endswith("epoch"):
        value = float(row[column])
        return f"{value:.1f}" if seeds else f"{value:.0f}"
    text = _cell(row[column])
    std = row.get(f"{column}_std")
    if seeds and std not in (None, ""):
        text += f" &plusmn; {_cell(std)}"
    return text


def results_table(rows: list[dict]) -> str:
    several = any(len(r.get("seeds", "").split()) > 1 for r in rows)
    head = "".join(f"<th>{c}</th>" for c in ("class", "method", "setting", "seeds", *TABLE_COLUMNS))
    body = []
    for row in rows:
        cells = [html.escape(row["Row Names"]), html.escape(row.get("method", "")), html.escape(row.get("setting", "")),
                 html.escape(row.get("seeds", ""))]
        cells += [format_cell(row, c, several) for c in TABLE_COLUMNS]
        css = ' class="mean"' if row["Row Names"] == "Mean" else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table id="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _img(src: str, caption: str = "") -> str:
    tip = f' title="{html.escape(caption)}"' if caption else ""
    return f'<figure><img src="{html.escape(src)}"{tip}><figcaption>{html.escape(caption)}</figcaption></figure>'


def gallery_threshold(row: dict) -> tuple[float, str]:
    """The image threshold of a class's galleries and how it was chosen: the one fixed before testing (the
    segmenter's), else the F1-optimal one of the test set (PBAS/CRAS); NaN when the row has neither."""
    fixed = float(row.get("image_f1_threshold", math.nan))
    if not math.isnan(fixed):
        return fixed, "the fixed threshold"
    return float(row.get("image_f1_threshold_oracle", math.nan)), "the test set's F1-optimal threshold (oracle)"


def job_section(results: str, run: JobRun) -> str:
    stem = run.folder.replace(os.sep, "_")
    classes = list(run.rows)
    parts = [f"<h2>{html.escape(run.method.upper())} {html.escape(run.setting)} &mdash; "
             f"{html.escape(os.path.basename(os.path.dirname(run.folder)))}, seed {run.seed}</h2>"]
    epochs = epoch_curves(results, stem, run.log, classes)
    if epochs:
        parts.append(_img(epochs, "per-epoch loss and test AUROC"))
    for name in classes:
        rows = [r for r in run.scores if r["class"] == name]
        parts.append(f"<h3>{html.escape(name)}</h3>")
        if not rows:
            parts.append("<p>no scores.csv in this job folder</p>")
            continue
        labels = np.array([int(r["label"]) for r in rows])
        scores = np.array([float(r["image_score"]) for r in rows])
        parts += [_img(p, os.path.basename(p)) for p in curves(results, f"{stem}_{name}", labels, scores)]
        threshold, which = gallery_threshold(run.rows[name])
        if math.isnan(threshold):
            continue
        fn, fp = worst(rows, threshold)
        for title, items in (("worst false negatives", fn), ("worst false positives", fp)):
            parts.append(f"<h4>{title} at {which} {threshold:.4g} ({len(items)} shown)</h4><div class=gallery>")
            parts += [_img(os.path.join(run.folder, r["heatmap"]),
                           f"{os.path.basename(r['image_path'])} ({r['defect']}): {float(r['image_score']):.4g}")
                      for r in items]
            parts.append("</div>")
    return "\n".join(parts)


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}tr.mean{font-weight:bold}
figure{display:inline-block;margin:4px}figure img{max-width:420px}figcaption{font-size:11px;color:#555}
.gallery img{max-width:330px}"""


def write_report(results: str) -> str:
    """Write RESULTS/report.html (and its images); return its path. A UserError when there is nothing to report."""
    results = os.path.abspath(results)
    table = _read_csv(os.path.join(results, "results.csv"))
    runs = collect(results)
    if not table or not runs:
        raise UserError(f"{results} holds no finished jobs (results.csv and models/*/*/seed*/metrics.json); "
                        "train or test into it first")
    body = [f"<h1>Results: {html.escape(results)}</h1>",
            "<p>Fractions as percent; the selected epoch (on the test set, as the releases) and the last epoch. "
            "With several seeds: mean &plusmn; standard deviation over the seeds.</p>", results_table(table)]
    body += [job_section(results, run) for run in runs]
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>report</title><style>{STYLE}</style></head>" \
           f"<body>{''.join(body)}</body></html>\n"
    path = os.path.join(results, REPORT_NAME)
    utils.save_text(page, path)
    return path
