"""The HTML run report: it parses, every image it links exists (relative links: it opens from disk), its table
matches results.csv, and ``main.py report RESULTS`` rebuilds it."""
from __future__ import annotations

import csv
import html.parser
import os
from pathlib import Path

import pytest

import main
import report


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self._in_table = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table" and attrs.get("id") == "results":
            self._in_table = True
        if self._in_table and tag == "tr":
            self.rows.append([])
        if self._in_table and tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


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
    assert any("/heatmaps/" in src for src in page.images)
    with open(two_seeds / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [row[0] for row in page.rows] == [r["Row Names"] for r in table]
    for shown, row in zip(page.rows, table):
        auroc = f"{100 * float(row['image_auroc']):.2f} ± {100 * float(row['image_auroc_std']):.2f}"
        assert shown[4] == auroc and shown[3] == row["seeds"] == "0 1"


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
