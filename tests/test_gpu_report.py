"""benchmarks/gpu_report.py: --help works everywhere; without a GPU it says so in one line and exits 1."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_report.py"
HANG_LIMIT = 600  # seconds; only guards against a hang (a loaded machine may take long to start Python and torch)


def test_help():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=HANG_LIMIT)
    assert done.returncode == 0 and "--quick" in done.stdout and "pytest -m cuda" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the report would run")
def test_without_a_gpu_it_says_so_and_exits_1(tmp_path: Path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--output", str(tmp_path / "r.md")], capture_output=True,
                          text=True, timeout=HANG_LIMIT)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("gpu_report: no CUDA GPU") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.md").exists()
