"""Shared fixtures: tiny generated datasets in MVTec AD and prepared-VisA layout.

The session-scoped roots must not be modified; tests that need broken data use the
`mvtec_copy` / `visa_copy` fixtures (or shutil.copytree into tmp_path themselves).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import engine
import main
from datasets import DatasetError
from datasets.synthetic import make_dataset, make_visa_dataset

FIXTURE_CLASSES = ("texture", "object")
FIXTURE_COUNTS = {"n_train": 8, "n_test_good": 3, "n_test_defect": 4}
FIXTURE_SIZE = 64
FIXTURE_SEED = 0


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec-layout root with classes texture and object (8 train, 3 good + 4 defect test, 64 px)."""
    root = tmp_path_factory.mktemp("mvtec")
    make_dataset(root, classes=FIXTURE_CLASSES, size=FIXTURE_SIZE, seed=FIXTURE_SEED, **FIXTURE_COUNTS)
    return root


@pytest.fixture(scope="session")
def visa_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared-VisA-layout root (split_csv/1cls.csv) with objects texture and object."""
    root = tmp_path_factory.mktemp("visa")
    make_visa_dataset(root, classes=FIXTURE_CLASSES, size=FIXTURE_SIZE, seed=FIXTURE_SEED, **FIXTURE_COUNTS)
    return root


@pytest.fixture
def mvtec_copy(mvtec_root: Path, tmp_path: Path) -> Path:
    """A private, modifiable copy of mvtec_root."""
    return Path(shutil.copytree(mvtec_root, tmp_path / "mvtec"))


@pytest.fixture
def visa_copy(visa_root: Path, tmp_path: Path) -> Path:
    """A private, modifiable copy of visa_root."""
    return Path(shutil.copytree(visa_root, tmp_path / "visa"))


# A tiny PBAS model trained through the command line on mvtec_root (CPU, seconds); used by predict/export tests.
TRAINED_CLASS = "texture"
TRAINED_IMAGESIZE = 64
TRAIN_ARGS = ("net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "64",
              "--target_embed_dimension", "64", "--dsc_hidden", "32", "--meta_epochs", "2",
              "dataset", "--batch_size", "4", "--resize", "64", "--imagesize", str(TRAINED_IMAGESIZE), "--num_workers", "0",
              "-d", TRAINED_CLASS)


@pytest.fixture(scope="session")
def trained_checkpoint(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoint.pt of class 'texture' trained for 2 epochs (do not modify; copy it first)."""
    results = tmp_path_factory.mktemp("trained")
    assert main.cli(["--gpu", "-1", "--results_path", str(results), *TRAIN_ARGS, "mvtec", str(mvtec_root)]) == 0
    path = results / "models" / "pbas" / f"mvtec_{TRAINED_CLASS}" / "seed0" / engine.CHECKPOINT_NAME
    assert path.is_file()
    return path


# A tiny CRAS multi-class model (one model, banks of both classes) for predict/export/inference tests.
CRAS_TRAIN_ARGS = ("net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "64",
                   "--target_embed_dimension", "64", "--meta_epochs", "1", "dataset", "--batch_size", "4", "--resize", "64",
                   "--imagesize", str(TRAINED_IMAGESIZE), "--num_workers", "0", "--setting", "multi",
                   "-d", "texture", "-d", "object")


@pytest.fixture(scope="session")
def cras_checkpoint(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoint.pt of a CRAS multi-class model of 'texture' and 'object', 1 epoch (do not modify; copy it first)."""
    results = tmp_path_factory.mktemp("trained_cras")
    assert main.cli(["--gpu", "-1", "--method", "cras", "--results_path", str(results), *CRAS_TRAIN_ARGS, "mvtec",
                     str(mvtec_root)]) == 0
    path = results / "models" / "cras" / "mvtec_dataset" / "seed0" / engine.CHECKPOINT_NAME
    assert path.is_file()
    return path


def dataset_error(call, *args) -> str:
    """Run call(*args), expect a DatasetError and return its (one-line) message."""
    with pytest.raises(DatasetError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message and message.strip()
    return message


# Every training run ends by writing RESULTS/report.html; rasterising its matplotlib figures took about half of a tiny
# run's time. Only the files that check the report (REPORT_CHECKED) get its figures drawn; elsewhere the report is
# still built in full (results read, table, sections, every figure laid out) and written, with its figures' PNGs left
# out. Runs in child processes (tests/test_resume.py, tests/test_results_folder.py, ...) write complete reports.
REPORT_CHECKED = ("test_report.py", "test_segment.py")
_DRAW_FIGURES = {"on": False}


@pytest.fixture(scope="session", autouse=True)
def _report_figures_drawn_where_checked():
    """report._save draws and writes a figure only while a REPORT_CHECKED file runs."""
    import os

    import report

    real = report._save

    def save(fig, results: str, name: str, tight: bool = True) -> str:
        if _DRAW_FIGURES["on"]:
            return real(fig, results, name, tight)
        return os.path.join(report.IMAGES_DIR, name)  # the link report.html carries; no PNG

    patch = pytest.MonkeyPatch()
    patch.setattr(report, "_save", save)
    yield
    patch.undo()


@pytest.fixture(scope="module", autouse=True)
def _draw_report_figures(request: pytest.FixtureRequest):
    """Before the module's own fixtures (autouse first): figures on for the REPORT_CHECKED files."""
    _DRAW_FIGURES["on"] = request.path.name in REPORT_CHECKED
    yield
    _DRAW_FIGURES["on"] = False


# Under -n 2 --dist loadfile a file runs on one worker, and xdist hands the files out in the order they were collected
# (by default it first sorts them by their number of tests, --loadscope-reorder). The slowest files go first, slowest
# first (measured: docs/tests.md), so that the two workers finish together; the others follow by number of tests.
SLOW_FILES = ("test_export.py", "test_resume.py", "test_cli.py", "test_quality.py", "test_cras.py", "test_segment.py",
              "test_results_folder.py", "test_panda_golden.py", "test_imports.py")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (-n 2) every worker process gets one torch thread: two workers share the two cores; the
    scheduler keeps the file order of pytest_collection_modifyitems."""
    import os

    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    if getattr(config.option, "loadscopereorder", None):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """SLOW_FILES first, in that order, then the other files by number of tests (most first); each file's tests keep
    their order."""
    import collections

    counts = collections.Counter(item.path for item in items)
    rank = lambda item: (SLOW_FILES.index(item.path.name) if item.path.name in SLOW_FILES else len(SLOW_FILES),
                         -counts[item.path], str(item.path))
    items.sort(key=rank)


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark(name: str):
    """A script of benchmarks/ as a module."""
    import importlib
    import sys

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)
