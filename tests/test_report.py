"""The HTML run report: it parses, every image and file it links exists (relative links: it opens from disk), its
table matches results.csv, its sections follow the table, every class shows test images with one colour bar (a
perfect class too), curves carry their AUC, and ``main.py report RESULTS`` rebuilds it. The heatmap PNGs and the
console's numbers it shares with the runs."""
from __future__ import annotations

import csv
import html.parser
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine
import main
import report
import runner
import utils


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []  # relative href targets (not #anchors)
        self.ids: list[str] = []
        self.rows: list[list[str]] = []  # table#results
        self.headers: dict[str, list[str]] = {}  # table id -> its th texts
        self.sections: list[tuple[str, str]] = []  # (h2 or h3, text) in page order
        self.galleries: list[tuple[str, str]] = []  # (the h3 it follows, src) of each figure.gallery image
        self.captions: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._text: tuple[str, list[str]] | None = None  # (tag, parts) of an open h2, h3, th or figcaption
        self._figure: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
            if self._figure == "gallery":
                self.galleries.append((self.sections[-1][1], attrs["src"]))
        if tag == "a" and not attrs["href"].startswith("#"):
            self.links.append(attrs["href"])
        if tag == "figure":
            self._figure = attrs.get("class", "")
        if tag == "table":
            self._table = attrs.get("id")
            self.headers[self._table] = []
        if self._table == "results" and tag == "tr":
            self.rows.append([])
        if self._table == "results" and tag == "td":
            self._cell = []
        if tag in ("h2", "h3", "th", "figcaption"):
            self._text = (tag, [])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        if tag == "figure":
            self._figure = None
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        if self._text is not None and tag == self._text[0]:
            text = "".join(self._text[1]).strip()
            if tag == "th":
                self.headers[self._table].append(text)
            elif tag == "figcaption":
                self.captions.append(text)
            else:
                self.sections.append((tag, text))
            self._text = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._text is not None:
            self._text[1].append(data)


@pytest.fixture(scope="module")
def two_seeds(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("report")
    args = ["--gpu", "-1", "--seed", "0", "--seed", "1", "--method", "cras", "--results_path", str(results),
            "net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "32",
            "--target_embed_dimension", "32", "--meta_epochs", "2", "dataset", "--setting", "multi", "--batch_size", "4",
            "--resize", "64", "--imagesize", "64", "--num_workers", "0", "-d", "texture", "-d", "object", "mvtec",
            str(mvtec_root)]
    assert main.cli(args) == 0
    return results


def parse(results: Path) -> _Page:
    page = _Page()
    page.feed((results / report.REPORT_NAME).read_text())
    page.rows = [row for row in page.rows if row]  # the header row has th cells only
    return page


def test_report_links_only_existing_files_and_shows_results_csv(two_seeds: Path):
    page = parse(two_seeds)
    assert page.images
    for src in page.images:
        assert not os.path.isabs(src) and (two_seeds / src).is_file(), src
    # per job (2 seeds) and class (2): ROC + PR, one epoch plot per job, and gallery heatmaps
    assert sum(src.endswith("_roc.png") for src in page.images) == 4
    assert sum(src.endswith("_epochs.png") for src in page.images) == 2
    assert len(page.galleries) == 4  # one per job and class
    assert page.links and all("/heatmaps/" in href and (two_seeds / href).is_file() for href in page.links)
    with open(two_seeds / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [row[0] for row in page.rows] == [r["Row Names"] for r in table]
    for shown, row in zip(page.rows, table):
        auroc = f"{float(row['image_auroc']):.4f} ± {float(row['image_auroc_std']):.4f}"  # fractions, as the csv
        assert shown[4] == auroc and shown[3] == row["seed"] == "0 1"


def test_report_subcommand_rebuilds_it(two_seeds: Path):
    (two_seeds / report.REPORT_NAME).unlink()
    assert main.cli(["report", str(two_seeds)]) == 0
    assert parse(two_seeds).images


def test_worst_errors_at_the_threshold():
    rows = [{"label": l, "image_score": str(s)} for l, s in (("1", 0.1), ("1", 0.4), ("1", 0.9), ("0", 0.8), ("0", 0.2))]
    fn, fp = report.worst(rows, 0.5)
    assert [r["image_score"] for r in fn] == ["0.1", "0.4"] and [r["image_score"] for r in fp] == ["0.8"]


def test_report_of_an_empty_folder_is_a_one_line_error(tmp_path: Path, capfd):
    assert main.cli(["report", str(tmp_path)]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "no finished jobs" in err


# ----------------------------------------------------------------------------------------------
# a results folder written by hand (no training): a perfect class, a class with errors, a segmenter job
# ----------------------------------------------------------------------------------------------

# (label, score) of each test image: texture is perfect (every defective above every normal), object has a false
# negative (0.3) and a false positive (0.7) at its F1 threshold 0.6
SCORES = {"texture": [(1, 0.9), (1, 0.8), (1, 0.6), (0, 0.4), (0, 0.2), (0, 0.1)],
          "object": [(1, 0.9), (1, 0.6), (1, 0.3), (0, 0.7), (0, 0.2), (0, 0.1)]}
THRESHOLD = {"texture": 0.6, "object": 0.6}


def _metrics_row(method: str, classname: str, best_epoch: int, last_epoch: int) -> dict:
    """PBAS/CRAS rows have only the test set's F1-optimal image threshold (an oracle); the segmenter's is fixed."""
    row = {c: 0.5 for c in utils.RESULT_COLUMNS}
    fixed = method == "segment"
    row.update(best_epoch=best_epoch, last_epoch=last_epoch, image_auroc=1.0 if classname == "texture" else 0.8,
               image_f1_threshold=THRESHOLD[classname] if fixed else math.nan,
               image_f1_threshold_oracle=THRESHOLD[classname])
    return row


def _job(results: Path, method: str, setting: str, classname: str, log: str, best_epoch: int, last_epoch: int) -> None:
    """A job folder: metrics.json, scores.csv, a heatmap PNG per test image, the log; recorded in config.json."""
    name = f"mvtec_{classname}"
    folder = results / "models" / (method if method != "segment" else "segment-easy-third") / name / "seed0"
    lines = [",".join(engine.SCORE_COLUMNS)]
    for i, (label, score) in enumerate(SCORES[classname]):
        heatmap = Path("heatmaps") / name / f"{'bad' if label else 'good'}_{i:03d}.png"
        mask = torch.zeros(8, 8)
        mask[2:5, 2:5] = float(label)
        utils.save_png(utils.heatmap_panel(torch.zeros(3, 8, 8), mask, torch.full((8, 8), score)), str(folder / heatmap))
        lines.append(f"{name},/data/{classname}/{i}.png,{'bad' if label else 'good'},{label},{score},{heatmap}")
    utils.save_text("\n".join(lines) + "\n", str(folder / "scores.csv"))
    utils.save_json({"method": method, "setting": setting, "seed": 0, "requested": ["texture", "object"],
                     "rows": {name: _metrics_row(method, classname, best_epoch, last_epoch)}}, str(folder / "metrics.json"))
    log_path = folder / "log.csv"
    utils.save_text(log, str(log_path))
    config = utils.read_json(str(results / "config.json"))
    config.setdefault("runs", {})[os.path.relpath(folder, results)] = {"log": os.path.relpath(log_path, results)}
    utils.save_json(config, str(results / "config.json"))


EPOCH_LOG = "epoch,loss,image_auroc,pixel_auroc\n" + "".join(f"{e},{1 - e / 10},{0.5 + e / 20},{0.6}\n" for e in range(4))
STEP_LOG = "step,loss,focal,dice\n50,0.9,0.2,0.7\n100,0.5,0.1,0.4\n"


@pytest.fixture(scope="module")
def by_hand(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("report_by_hand")
    for classname in ("texture", "object"):  # the folders sort object first, the table (-d order) texture first
        _job(results, "pbas", "single", classname, EPOCH_LOG, best_epoch=2, last_epoch=3)
    _job(results, "segment", "easy:third", "texture", STEP_LOG, best_epoch=100, last_epoch=100)
    runner.rebuild_results(str(results))
    report.write_report(str(results))
    return results


def test_sections_follow_the_table_and_every_class_shows_images(by_hand: Path):
    page = parse(by_hand)
    table = [r["Row Names"] for r in csv.DictReader(open(by_hand / "results.csv"))]
    assert [row[0] for row in page.rows] == table == ["mvtec_texture", "mvtec_object", "Mean", "mvtec_texture", "Mean"]
    classes = [text for tag, text in page.sections if tag == "h3"]
    assert classes == ["mvtec_texture", "mvtec_object", "mvtec_texture"]  # the table's order, not the folders'
    # one gallery per class, the perfect class included, all files present
    assert [h3 for h3, _ in page.galleries] == classes
    for src in page.images + page.links:
        assert not os.path.isabs(src) and (by_hand / src).is_file(), src
    # the class links of the table point at sections of the page
    assert {"models_pbas_mvtec_texture_seed0_mvtec_texture", "models_pbas_mvtec_object_seed0_mvtec_object"} <= set(page.ids)
    html_text = (by_hand / report.REPORT_NAME).read_text()
    assert "(0 shown)" not in html_text and "No error at the F1-optimal threshold on the test set (oracle) 0.6" in html_text
    assert "1 of 1 false negatives" in html_text and "1 of 1 false positives" in html_text
    # the curves' captions carry their area, as their legends do
    assert "ROC, I-AUROC 1.0000" in page.captions and "PR, I-AP 1.0000" in page.captions


def test_table_fits_the_page_and_says_what_its_numbers_are(by_hand: Path):
    page = parse(by_hand)
    assert page.headers["results"] == ["class", "method", "setting", "seed", *report.FRONT_COLUMNS]
    assert page.headers["results-more"] == ["class", "method", "setting", "seed", *report.MORE_COLUMNS]
    assert len(page.headers["results"]) <= 10
    html_text = (by_hand / report.REPORT_NAME).read_text()
    assert '<details><summary>more columns' in html_text
    mean = page.rows[2]
    assert mean[0] == "Mean" and mean[3] == "0" and mean[-1] == ""  # best_epoch: a mean of epochs, not shown
    assert page.rows[0][-1] == "2" and page.rows[0][4] == "1.0000"  # an epoch index; a fraction
    # the segmenter's rows are not said to be selected on the test set
    assert "Segmenter: never selected on test data" in html_text and "PBAS and CRAS: <code>best_epoch</code>" in html_text


def test_the_segmenter_panel_plots_its_step_log(by_hand: Path):
    html_text = (by_hand / report.REPORT_NAME).read_text()
    assert "models_segment-easy-third_mvtec_texture_seed0_epochs.png" in html_text
    assert "the segmenter is tested once, after its last training step" in html_text
    fig, note = report.epoch_figure(list(csv.DictReader(STEP_LOG.splitlines())), ["mvtec_texture"], None)
    (loss_ax,) = fig.axes
    assert loss_ax.get_xlabel() == "training step" and [line.get_label() for line in loss_ax.lines] == ["loss", "focal", "dice"]
    assert list(loss_ax.lines[0].get_xdata()) == [50, 100] and "tested once" in note


def test_epoch_figure_has_integer_ticks_a_readable_legend_and_the_selected_epoch():
    fig, note = report.epoch_figure(list(csv.DictReader(EPOCH_LOG.splitlines())), ["mvtec_texture"], 2.0)
    loss_ax, metric_ax = fig.axes
    assert note == ""
    fig.canvas.draw()  # ticks are placed at draw time
    for ax in (loss_ax, metric_ax):
        ticks = [t for t in ax.get_xticks() if 0 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)
    legend = metric_ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["mean I-AUROC", "mean P-AUROC", "selected epoch 2"]
    assert legend.get_texts()[0].get_fontsize() >= 9


def test_curves_print_their_area_and_stay_inside_the_frame():
    labels, scores = np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1])
    (roc_name, roc, roc_caption), (pr_name, pr, pr_caption) = report.curve_figures(labels, scores)
    assert (roc_name, pr_name) == ("roc", "pr") and roc_caption == "ROC, I-AUROC 1.0000" and pr_caption == "PR, I-AP 1.0000"
    for fig, text in ((roc, "I-AUROC 1.0000"), (pr, "I-AP 1.0000")):
        ax = fig.axes[0]
        assert text in [t.get_text() for t in ax.get_legend().get_texts()]
        assert ax.get_xlim()[0] < 0 < 1 < ax.get_xlim()[1] and ax.get_ylim()[0] < 0 < 1 < ax.get_ylim()[1]
    assert report.curve_figures(np.array([1, 1]), np.array([0.2, 0.3])) == []



@pytest.mark.parametrize("seed", range(4))
def test_curves_are_scikit_learns(seed: int):
    """The report draws its curves without importing scikit-learn (1.4 s per process): the same points and areas."""
    from sklearn import metrics as sk

    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    scores = np.round(rng.random(n), 1)  # ties
    for ours, theirs in ((report.roc_points(labels, scores), sk.roc_curve(labels, scores)[:2]),
                         (report.pr_points(labels, scores), sk.precision_recall_curve(labels, scores)[:2])):
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    auroc, ap = report.curve_areas(labels, scores)
    assert auroc == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)
    assert ap == pytest.approx(sk.average_precision_score(labels, scores), abs=1e-12)

def test_gallery_picks_errors_else_the_extremes():
    rows = lambda scores: [{"label": str(l), "image_score": str(s), "heatmap": f"{i}.png"} for i, (l, s) in enumerate(scores)]
    shown, why = report.pick(rows(SCORES["texture"]), 0.6)
    assert [(s.kind, s.row["image_score"]) for s in shown] == [
        ("highest-scoring defective", "0.9"), ("lowest-scoring defective", "0.6"),
        ("highest-scoring normal", "0.4"), ("lowest-scoring normal", "0.1")] and why.startswith("No error")
    shown, _ = report.pick(rows(SCORES["object"]), 0.6)
    assert [(s.kind, s.row["image_score"]) for s in shown] == [("false negative", "0.3"), ("false positive", "0.7")]
    # many false negatives, one false positive: the free places go to the false negatives
    shown, _ = report.pick(rows([(1, 0.1 * i) for i in range(1, 9)] + [(0, 0.95), (0, 0.05)]), 0.9)
    assert [s.kind for s in shown] == ["false negative"] * 5 + ["false positive"]
    assert [s.row["image_score"] for s in shown[:2]] == ["0.1", "0.2"]  # the worst first
    # no threshold (NaN in the metrics): the extremes; a class with one defective image shows it once
    shown, why = report.pick(rows([(1, 0.5), (0, 0.4), (0, 0.1)]), math.nan)
    assert [s.kind for s in shown] == ["highest-scoring defective", "highest-scoring normal", "lowest-scoring normal"]
    assert why.startswith("No image threshold")


def test_gallery_has_one_colour_bar_for_the_class():
    tiles = [(np.zeros((256, 256, 3), np.uint8),) * 3] * 4
    fig = report.gallery_figure(tiles, ["a", "b", "c", "d"])
    bars = [ax for ax in fig.axes if ax.get_ylabel() == report.COLOUR_BAR_LABEL]
    assert len(bars) == 1 and len(fig.axes) == 2  # the mosaic of the class's images and the one colour bar
    assert bars[0].get_ylim() == (0.0, 1.0)  # the heatmaps' fixed scale
    mosaic = fig.axes[0]
    texts = [t.get_text() for t in mosaic.texts]
    assert texts == ["a", "b", "c", "d", *utils.HEATMAP_LABELS]  # a title per image, a name per row
    # the bar stands beside the map row (the bottom third of the mosaic), not beside the images or masks
    box, bar = mosaic.get_position(), bars[0].get_position()
    assert bar.x0 > box.x1 and bar.y0 == pytest.approx(box.y0) and bar.height == pytest.approx(box.height / 3, rel=0.05)


def test_heatmap_png_names_its_tiles_and_has_a_colour_bar(tmp_path: Path):
    image = torch.zeros(3, 16, 16)
    mask = torch.zeros(16, 16)
    mask[:8] = 1
    amap = torch.linspace(0, 1, 16)[None, :].repeat(16, 1)  # 0 on the left to 1 on the right
    panel = utils.heatmap_panel(image, mask, amap)
    assert (panel.shape[1], panel.shape[0]) == utils.HEATMAP_SIZE
    utils.save_png(panel, str(tmp_path / "h.png"))
    tiles = utils.heatmap_tiles(np.asarray(Image.open(tmp_path / "h.png").convert("RGB")))
    assert tiles is not None
    _, gt, scores = tiles
    assert (gt[:120] == 255).all() and (gt[136:] == 0).all()
    assert (scores[:, 0] == utils.jet(np.zeros(1))[0]).all() and (scores[:, -1] == utils.jet(np.ones(1))[0]).all()
    band = panel[:utils.HEATMAP_LABEL_HEIGHT, :3 * utils.HEATMAP_PANEL]
    for i in range(3):  # each tile's name: dark text in the white band above it
        assert (band[:, i * utils.HEATMAP_PANEL:(i + 1) * utils.HEATMAP_PANEL] < 100).any()
    bar = panel[utils.HEATMAP_LABEL_HEIGHT:, 3 * utils.HEATMAP_PANEL:]
    column = bar[:, 16]  # down the colour bar (8 px margins): 1 (red) at the top to 0 (blue) at the bottom
    assert (column[8] == utils.jet(np.ones(1))[0]).all() and (column[-9] == utils.jet(np.zeros(1))[0]).all()
    # the earlier 768 x 256 layout is still read; other images are not heatmaps
    legacy = panel[utils.HEATMAP_LABEL_HEIGHT:, :3 * utils.HEATMAP_PANEL]
    assert (utils.heatmap_tiles(legacy)[2] == scores).all() and utils.heatmap_tiles(panel[:100]) is None


def test_console_numbers_are_fractions_and_epochs_read_alike():
    text = utils.results_table([("mvtec_a", {c: 0.97636 for c in utils.METRIC_COLUMNS})])
    assert "0.9764" in text and "97.64" not in text
    assert engine.epoch_label(59, 60) == "epoch 59 (60 of 60)"  # the index of the CSV log and plots, then the count
