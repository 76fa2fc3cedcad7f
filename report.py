"""The HTML report of a results folder: ``RESULTS/report.html`` with its images in ``RESULTS/report/``.

It opens from disk, with no server (relative links only), and shows
    the results table: the releases' metrics up front, the other columns behind a toggle (mean +- std over the
    seeds when there are several), each class linked to its section;
    per job (in the table's order): the per-epoch curves of the loss and the test I-AUROC / P-AUROC (the loss
    per logged step for the segmenter, which has no per-epoch test metrics), then per class the image-level ROC
    and precision-recall curves of the selected state with their AUROC / AP, and a few test images with their
    ground truth and anomaly map on one colour scale with its bar: the worst errors at the F1-optimal image
    threshold when there are errors, else the highest- and lowest-scoring defective and normal images.
Everything is read from the folder (results.csv, results_seeds.csv, config.json, each job's metrics.json,
scores.csv, heatmaps and per-epoch CSV log), so ``python main.py report RESULTS`` rebuilds it for any finished
folder.
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
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

import utils
from utils import UserError

REPORT_NAME = "report.html"
IMAGES_DIR = "report"
GALLERY_SIZE = 6  # test images shown per class: up to half false negatives, half false positives
FRONT_COLUMNS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_pro", "best_epoch")  # the releases'
MORE_COLUMNS = ("pixel_aupro", "pixel_aupro_05", "pixel_f1", "pixel_iou", "image_f1", "pixel_f1_oracle",
                "pixel_iou_oracle", "image_f1_oracle", "last_image_auroc",
                "last_pixel_auroc", "last_pixel_pro", "last_epoch")  # behind the toggle; every column: results.csv
GROUP_HEAD = ("class", "method", "setting", "seed")
FIGURE_SIZE = (4.0, 3.4)
DPI = 90
GALLERY_TILE = 1.7  # inches per gallery tile: the tiles are resized to GALLERY_TILE * DPI pixels, then drawn 1:1
JET = ListedColormap(utils.jet(np.linspace(0.0, 1.0, 256)) / 255.0, name="heatmap_jet")  # the heatmaps' colours
COLOUR_BAR_LABEL = "anomaly score"
EPOCH_METHODS = ("pbas", "cras")  # selected on the test set, per epoch, as the releases


@dataclass
class JobRun:
    """One job folder (models/METHOD/JOB/seedN) and what the report needs from it."""

    folder: str  # relative to RESULTS
    method: str
    setting: str
    seed: int
    rows: dict[str, dict]  # DATASET_CLASS -> metrics row
    scores: list[dict]  # scores.csv rows
    log: list[dict]  # per-epoch (segmenter: per-step) CSV log rows ([] when missing)

    @property
    def stem(self) -> str:
        """The job's name in image files and anchors."""
        return self.folder.replace(os.sep, "_")


@dataclass(frozen=True)
class Shown:
    """A test image of the gallery: its scores.csv row and why it is shown."""

    row: dict
    kind: str  # "false negative", "highest-scoring normal", ...


def _read_csv(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _seed_of(row: dict) -> str:
    """The seed column of a results.csv row ('seeds' in earlier versions)."""
    return row.get("seed", row.get("seeds", ""))


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


def table_order(runs: list[JobRun], per_seed: list[dict], table: list[dict]) -> list[JobRun]:
    """The jobs in the order of the tables (results_seeds.csv: dataset, method, setting, seed, class), each job's
    classes too (its rows dict reordered); jobs the tables do not name keep their folder order, after them."""
    position: dict[tuple, int] = {}
    for i, row in enumerate(per_seed):
        position.setdefault((row["Row Names"], row.get("method"), row.get("setting"), row.get("seed")), i)
    names = {r["Row Names"]: i for i, r in enumerate(table)}  # without results_seeds.csv: the class order only
    last = len(per_seed) + len(table)

    def place(run: JobRun, name: str) -> tuple[int, int]:
        return position.get((name, run.method, run.setting, str(run.seed)), last), names.get(name, last)

    for run in runs:
        run.rows = dict(sorted(run.rows.items(), key=lambda item: place(run, item[0])))
    return sorted(runs, key=lambda run: min((place(run, name) for name in run.rows), default=(last, last)))


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------


def _save(fig: Figure, results: str, name: str, tight: bool = True) -> str:
    """Write a figure as PNG under RESULTS/report/ (cropped to its content when ``tight``: drawn twice); its path
    relative to RESULTS."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
    relative = os.path.join(IMAGES_DIR, name)
    utils.save_bytes(buf.getvalue(), os.path.join(results, relative))
    return relative


def _ranked_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true, false) positive counts at each distinct score, scores descending: ([D], [D]) float64."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    ranked, positive = scores[order], (labels[order] != 0).astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]  # the last index of each tie group
    tps = np.cumsum(positive)[ends]
    return tps, ends + 1.0 - tps


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of the ROC curve from (0, 0), without the points that lie on
    a straight line between their neighbours (as sklearn.metrics.roc_curve draws it). Both classes present."""
    tps, fps = _ranked_counts(labels, scores)
    if tps.size > 2:
        corners = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        tps, fps = tps[corners], fps[corners]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    return fps / fps[-1], tps / tps[-1]


def pr_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) of the precision-recall curve, recall decreasing to (1, 0) (sklearn's
    precision_recall_curve). At least one positive label."""
    tps, fps = _ranked_counts(labels, scores)
    return np.r_[(tps / (tps + fps))[::-1], 1.0], np.r_[(tps / tps[-1])[::-1], 0.0]


def curve_areas(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(ROC area, average precision) with ties as metrics.py (and scikit-learn) count them."""
    tps, fps = _ranked_counts(labels, scores)
    t, f = np.r_[0.0, tps], np.r_[0.0, fps]
    auroc = float(np.sum(np.diff(f) * (t[1:] + t[:-1])) / (2 * tps[-1] * fps[-1]))
    return auroc, float(np.sum(np.diff(t) * (tps / (tps + fps))) / tps[-1])


def curve_figures(labels: np.ndarray, scores: np.ndarray) -> list[tuple[str, Figure, str]]:
    """(name, figure, caption) of the image-level ROC and precision-recall curves, each with its area in the
    legend and the axes padded so that a perfect curve stays visible; [] when the labels lack a class."""
    if len(set(labels.tolist())) < 2:
        return []
    fpr, tpr = roc_points(labels, scores)
    precision, recall = pr_points(labels, scores)
    auroc, ap = curve_areas(labels, scores)
    out = []
    for name, x, y, xlabel, ylabel, area in (
            ("roc", fpr, tpr, "false positive rate", "true positive rate", f"I-AUROC {auroc:.4f}"),
            ("pr", recall, precision, "recall", "precision", f"I-AP {ap:.4f}")):
        fig = Figure(figsize=FIGURE_SIZE)
        ax = fig.add_subplot()
        ax.plot(x, y, drawstyle="steps-post" if name == "pr" else "default", linewidth=2, label=area)
        if name == "roc":
            ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=1, label="chance")
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(-0.03, 1.03), ylim=(-0.03, 1.05), aspect="equal",
               title="ROC" if name == "roc" else "precision-recall")
        ax.legend(loc="lower right" if name == "roc" else "lower left", fontsize=10)
        ax.grid(alpha=0.3)
        out.append((name, fig, f"{'ROC' if name == 'roc' else 'PR'}, {area}"))
    return out


def _finite(values: list[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def epoch_figure(log: list[dict], classes: list[str], selected: float | None) -> tuple[Figure | None, str]:
    """The per-epoch loss and evaluated I-AUROC / P-AUROC (each class's for a multi-class job), integer epoch
    ticks, the selected epoch marked; a log of training steps (the segmenter's) has its loss parts only. The
    figure (None when there is nothing to plot) and a sentence on what is left out."""
    if not log:
        return None, "No per-epoch log in this job folder."
    axis = next((name for name in ("epoch", "step") if name in log[0]), None)
    if axis is None:
        return None, "The job's log has neither an epoch nor a step column."
    xs = [int(float(r[axis])) for r in log]
    series = [("mean", "")] if len(classes) < 2 else [(c, f"{c}_") for c in classes]
    metrics = [(f"{label} {'I' if metric == 'image_auroc' else 'P'}-AUROC", style,
                [float(r.get(f"{prefix}{metric}") or "nan") for r in log])
               for label, prefix in series for metric, style in (("image_auroc", "-"), ("pixel_auroc", "--"))]
    metrics = [m for m in metrics if _finite(m[2])]
    fig = Figure(figsize=((2 if metrics else 1) * FIGURE_SIZE[0], FIGURE_SIZE[1]))
    axes = fig.subplots(1, 2 if metrics else 1, squeeze=False)[0]
    loss_ax = axes[0]
    marker = "o" if len(xs) < 20 else None
    for column in ("loss", "focal", "dice") if axis == "step" else ("loss",):
        if column in log[0]:
            loss_ax.plot(xs, [float(r[column]) for r in log], marker=marker, label=column)
    loss_ax.set(xlabel="training step" if axis == "step" else "epoch", ylabel="loss", title="training loss")
    if axis == "step":
        loss_ax.legend(fontsize=9)
    if metrics:
        metric_ax = axes[1]
        for label, style, values in metrics:
            metric_ax.plot(xs, values, style, marker=marker, label=label)
        if selected is not None and math.isfinite(selected):
            metric_ax.axvline(selected, color="grey", linestyle=":", label=f"selected epoch {selected:g}")
        metric_ax.set(xlabel="epoch", ylabel="AUROC", title="test AUROC per epoch")
        many = len(metrics) > 6
        metric_ax.legend(fontsize=9, loc="upper left" if many else "lower right",
                         bbox_to_anchor=(1.02, 1.0) if many else None, ncol=2 if len(metrics) > 16 else 1)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    note = "" if metrics else ("No test metrics per step: the segmenter is tested once, after its last training step."
                               if axis == "step" else "The log holds no test metrics.")
    return fig, note


def worst(scores: list[dict], threshold: float) -> tuple[list[dict], list[dict]]:
    """(false negatives, lowest score first; false positives, highest first) at ``threshold`` (anomalous: score >= it,
    as the F1-optimal threshold is one of the scores)."""
    fn = sorted((r for r in scores if r["label"] == "1" and float(r["image_score"]) < threshold),
                key=lambda r: float(r["image_score"]))
    fp = sorted((r for r in scores if r["label"] == "0" and float(r["image_score"]) >= threshold),
                key=lambda r: -float(r["image_score"]))
    return fn, fp


def pick(scores: list[dict], threshold: float, which: str = "the F1-optimal image threshold") -> tuple[list[Shown], str]:
    """The gallery of a class and a sentence saying what it shows: the worst errors at ``threshold`` (``which``
    says how it was chosen; up to
    GALLERY_SIZE, half of each kind when there are enough), else (no error, or no threshold) the highest- and
    lowest-scoring defective and normal images."""
    fn, fp = worst(scores, threshold) if math.isfinite(threshold) else ([], [])
    if fn or fp:
        half = GALLERY_SIZE // 2
        n_fn = min(len(fn), max(half, GALLERY_SIZE - len(fp)))
        n_fp = min(len(fp), GALLERY_SIZE - n_fn)
        shown = [Shown(r, "false negative") for r in fn[:n_fn]] + [Shown(r, "false positive") for r in fp[:n_fp]]
        return shown, (f"The worst errors at {which} {threshold:.4g}: {n_fn} of {len(fn)} "
                       f"false negatives (lowest scores first), {n_fp} of {len(fp)} false positives (highest first).")
    shown: list[Shown] = []
    for label, name in (("1", "defective"), ("0", "normal")):
        ranked = sorted((r for r in scores if r["label"] == label), key=lambda r: -float(r["image_score"]))
        for row, kind in ((ranked[:1], "highest"), (ranked[-1:], "lowest")):
            if row and all(s.row is not row[0] for s in shown):
                shown.append(Shown(row[0], f"{kind}-scoring {name}"))
    why = (f"No error at {which} {threshold:.4g}" if math.isfinite(threshold)
           else "No image threshold in the metrics")
    return shown, f"{why}: the highest- and lowest-scoring defective and normal images."


def gallery_figure(tiles: list[tuple[np.ndarray, np.ndarray, np.ndarray]], titles: list[str]) -> Figure:
    """One column per test image (rows: image, ground truth, anomaly map; tiles [256, 256, 3]) drawn as one mosaic,
    and the one colour bar of the anomaly maps' scale (the heatmaps' fixed scale, 0 to 1) beside the map row."""
    n, size, gap = len(tiles), round(GALLERY_TILE * DPI), 6  # pixels of the mosaic, drawn 1:1 at DPI
    mosaic = np.full((3 * size + 2 * gap, n * size + (n - 1) * gap, 3), 255, np.uint8)
    for j, column in enumerate(tiles):
        for i, tile in enumerate(column):
            small = np.asarray(Image.fromarray(tile).resize((size, size), Image.BILINEAR))
            mosaic[i * (size + gap):i * (size + gap) + size, j * (size + gap):j * (size + gap) + size] = small
    left, right, top, bottom = 0.35, 0.95, 0.75, 0.1  # inches: row names, the colour bar, the titles
    width, height = left + mosaic.shape[1] / DPI + right, top + mosaic.shape[0] / DPI + bottom
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (top + bottom) / height))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for j, title in enumerate(titles):
        ax.text(j * (size + gap) + size / 2, -8, title, ha="center", va="bottom", fontsize=9)
    for i, label in enumerate(utils.HEATMAP_LABELS):
        ax.text(-10, i * (size + gap) + size / 2, label, ha="right", va="center", rotation=90, fontsize=10)
    # the colour bar beside the map row: its top and bottom in figure coordinates
    box = ax.get_position()
    y0 = box.y0 + box.height * (1 - (3 * size + 2 * gap) / mosaic.shape[0])
    y1 = box.y0 + box.height * (1 - (2 * size + 2 * gap) / mosaic.shape[0])
    cax = fig.add_axes((box.x1 + 0.1 / width, y0, 0.15 / width, y1 - y0))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), JET), cax=cax)
    bar.set_label(COLOUR_BAR_LABEL, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    return fig


def _tiles(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The three tiles of a heatmap PNG; None when it is missing or of another layout."""
    if not os.path.isfile(path):
        return None
    with Image.open(path) as img:
        return utils.heatmap_tiles(np.asarray(img.convert("RGB")))


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------


def _cell(value: str) -> str:
    """A results.csv value as shown in the table: a fraction with four decimals."""
    try:
        number = float(value)
    except ValueError:
        return html.escape(value)
    if math.isnan(number):
        return "nan"
    return f"{number:.4f}"


def format_cell(row: dict, column: str, seeds: bool) -> str:
    """A table cell: the fraction (epochs as they are; blank for a Mean row, whose epochs are means), with
    +- std when there are several seeds."""
    if column.endswith("epoch"):
        if row["Row Names"] == "Mean":
            return ""
        value = float(row[column])
        return f"{value:.1f}" if seeds else f"{value:.0f}"
    text = _cell(row.get(column, "nan"))
    std = row.get(f"{column}_std")
    if seeds and std not in (None, ""):
        text += f" &plusmn; {_cell(std)}"
    return text


def _table(rows: list[dict], columns: tuple[str, ...], table_id: str, anchors: dict[tuple, str]) -> str:
    several = any(len(_seed_of(r).split()) > 1 for r in rows)
    head = "".join(f"<th>{c}</th>" for c in (*GROUP_HEAD, *columns))
    body = []
    for row in rows:
        name = html.escape(row["Row Names"])
        anchor = anchors.get((row["Row Names"], row.get("method"), row.get("setting")))
        cells = [f'<a href="#{anchor}">{name}</a>' if anchor else name, html.escape(row.get("method", "")),
                 html.escape(row.get("setting", "")), html.escape(_seed_of(row))]
        cells += [format_cell(row, c, several) for c in columns]
        css = ' class="mean"' if row["Row Names"] == "Mean" else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def results_table(rows: list[dict], anchors: dict[tuple, str] | None = None) -> str:
    """The releases' columns up front, the other metrics behind a toggle (every column is in results.csv)."""
    anchors = anchors or {}
    more = _table(rows, MORE_COLUMNS, "results-more", anchors)
    return (_table(rows, FRONT_COLUMNS, "results", anchors) +
            f"<details><summary>more columns: {', '.join(MORE_COLUMNS)} (all of them in results.csv)</summary>"
            f"{more}</details>")


def table_notes(rows: list[dict]) -> str:
    """What the table's numbers are, for the methods it holds."""
    methods = {r.get("method", "") for r in rows}
    notes = ["Fractions in [0, 1], as in <code>results.csv</code>. With several seeds: mean &plusmn; standard "
             "deviation over the seeds (<code>seed</code> lists them)."]
    if methods & set(EPOCH_METHODS):
        notes.append("PBAS and CRAS: <code>best_epoch</code> is the epoch selected on the test set, as the releases "
                     "select it, and the metrics are that epoch's; <code>last_*</code> are the final epoch's. Epochs "
                     "count from 0, as in the log.")
    if "segment" in methods:
        notes.append("Segmenter: never selected on test data; tested once, after training (its "
                     "<code>best_epoch</code> and <code>last_epoch</code> are its training steps).")
    notes.append("Mean rows: the mean over the classes above them; their epoch cells are left blank "
                 "(<code>results.csv</code> holds the mean of the classes' epochs there, as the releases write it).")
    return "".join(f"<p class=note>{n}</p>" for n in notes)


def _img(src: str, caption: str = "", css: str = "") -> str:
    tip = f' title="{html.escape(caption)}" alt="{html.escape(caption)}"' if caption else ""
    klass = f' class="{css}"' if css else ""
    return (f'<figure{klass}><img src="{html.escape(src)}"{tip}><figcaption>{html.escape(caption)}</figcaption>'
            "</figure>")


def _class_metrics(row: dict) -> str:
    parts = [f"{label} {_cell(str(row[key]))}" for key, label in (
        ("image_auroc", "I-AUROC"), ("image_ap", "I-AP"), ("pixel_auroc", "P-AUROC"), ("pixel_pro", "PRO"))
        if key in row]
    return ", ".join(parts)


def class_section(results: str, run: JobRun, name: str) -> list[str]:
    """One class of a job: its curves and its gallery."""
    stem = f"{run.stem}_{name}"
    parts = [f'<h3 id="{html.escape(stem)}">{html.escape(name)}</h3>',
             f"<p>{html.escape(_class_metrics(run.rows[name]))}</p>"]
    rows = [r for r in run.scores if r["class"] == name]
    if not rows:
        return parts + ["<p>No scores.csv in this job folder: no curves or test images.</p>"]
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["image_score"]) for r in rows])
    parts.append("<div class=row>")
    parts += [_img(_save(fig, results, f"{stem}_{kind}.png"), caption) for kind, fig, caption in curve_figures(labels, scores)]
    parts.append("</div>")
    threshold, which = gallery_threshold(run.rows[name])
    shown, why = pick(rows, threshold, which)
    readable = [(s, t) for s in shown if (t := _tiles(os.path.join(results, run.folder, s.row["heatmap"]))) is not None]
    parts.append(f"<p>{html.escape(why)}</p>")
    if not readable:
        return parts + ["<p>No heatmap PNGs of these images in the job folder.</p>"]
    titles = [f"{s.kind}\n{os.path.basename(s.row['heatmap'])}\nscore {float(s.row['image_score']):.4g}"
              for s, _ in readable]
    figure = _save(gallery_figure([t for _, t in readable], titles), results, f"{stem}_gallery.png", tight=False)
    parts.append(_img(figure, f"image, ground truth and anomaly map; one colour scale for the class "
                              f"({COLOUR_BAR_LABEL}, 0 to 1)", "gallery"))
    links = ", ".join(f'<a href="{html.escape(os.path.join(run.folder, s.row["heatmap"]))}">'
                      f'{html.escape(os.path.basename(s.row["heatmap"]))}</a>' for s, _ in readable)
    parts.append(f"<p class=note>Full-size heatmaps: {links} (all of them: <code>"
                 f"{html.escape(os.path.join(run.folder, 'heatmaps'))}/</code>).</p>")
    return parts


def gallery_threshold(row: dict) -> tuple[float, str]:
    """The image threshold of a class's galleries and how it was chosen: the one fixed before testing (the
    segmenter's), else the F1-optimal one of the test set (PBAS/CRAS); NaN when the row has neither."""
    fixed = float(row.get("image_f1_threshold", math.nan))
    if not math.isnan(fixed):
        return fixed, "the image threshold fixed before testing"
    return float(row.get("image_f1_threshold_oracle", math.nan)), "the F1-optimal threshold on the test set (oracle)"


def job_section(results: str, run: JobRun) -> str:
    parts = [f'<h2 id="{html.escape(run.stem)}">{html.escape(run.method.upper())} {html.escape(run.setting)} &mdash; '
             f"{html.escape(os.path.basename(os.path.dirname(run.folder)))}, seed {run.seed}</h2>"]
    first = next(iter(run.rows.values()), {})
    selected = float(first.get("best_epoch", math.nan)) if run.method in EPOCH_METHODS else None
    fig, note = epoch_figure(run.log, list(run.rows), selected)
    if fig is not None:
        steps = "step" in run.log[0] and "epoch" not in run.log[0]
        caption = ("training loss per logged step" if steps else
                   "per-epoch training loss" + ("" if note else " and test AUROC"))
        parts.append(_img(_save(fig, results, f"{run.stem}_epochs.png"), caption))
    if note:
        parts.append(f"<p class=note>{html.escape(note)}</p>")
    for name in run.rows:
        parts += class_section(results, run, name)
    return "\n".join(parts)


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;font-size:13px;
margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child,th:first-child{text-align:left}
tr.mean{font-weight:bold}details{margin:0.5em 0}summary{cursor:pointer;color:#333}.note{font-size:13px;color:#444}
figure{display:inline-block;margin:4px;vertical-align:top}figure img{max-width:100%}figcaption{font-size:12px;color:#555}
figure.gallery{display:block}.row figure img{max-width:380px}"""


def write_report(results: str) -> str:
    """Write RESULTS/report.html (and its images); return its path. A UserError when there is nothing to report."""
    results = os.path.abspath(results)
    table = _read_csv(os.path.join(results, "results.csv"))
    runs = collect(results)
    if not table or not runs:
        raise UserError(f"{results} holds no finished jobs (results.csv and models/*/*/seed*/metrics.json); "
                        "train or test into it first")
    runs = table_order(runs, _read_csv(os.path.join(results, "results_seeds.csv")), table)
    anchors: dict[tuple, str] = {}
    for run in runs:
        for name in run.rows:
            anchors.setdefault((name, run.method, run.setting), f"{run.stem}_{name}")
    body = [f"<h1>Results: {html.escape(results)}</h1>", table_notes(table), results_table(table, anchors)]
    body += [job_section(results, run) for run in runs]
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>report</title><style>{STYLE}</style></head>" \
           f"<body>{''.join(body)}</body></html>\n"
    path = os.path.join(results, REPORT_NAME)
    utils.save_text(page, path)
    return path
