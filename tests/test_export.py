"""``main.py export``: the ONNX graph gives PyTorch's image scores and anomaly maps, any batch size (CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import inference
import main
import runner
from conftest import TRAINED_IMAGESIZE as IMAGESIZE

ONNX_ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main.cli(["export", "--checkpoint", str(trained_checkpoint), "--output", str(path)]) == 0
    return path


def test_onnx_matches_pytorch(exported: Path, trained_checkpoint: Path):
    model, _ = inference.load_model(str(trained_checkpoint), torch.device("cpu"), runner.METHODS)
    reference = inference.ExportGraph(model.graph()).eval()
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inference.ONNX_INPUTS)
    assert [o.name for o in session.get_outputs()] == list(inference.ONNX_OUTPUTS)
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3, 5):  # the batch axis is dynamic
        images = torch.randn(batch, 3, IMAGESIZE, IMAGESIZE, generator=generator)
        scores, maps = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            want_scores, want_maps = reference(images)
        assert scores.shape == (batch,) and maps.shape == (batch, IMAGESIZE, IMAGESIZE)
        np.testing.assert_allclose(scores, want_scores.numpy(), atol=ONNX_ATOL, rtol=0)
        np.testing.assert_allclose(maps, want_maps.numpy(), atol=ONNX_ATOL, rtol=0)


def test_onnx_file_declares_a_dynamic_batch(exported: Path):
    graph = onnx.load(str(exported)).graph
    dims = [d for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[0].dim_param and not dims[0].dim_value
    assert [d.dim_value for d in dims[1:]] == [3, IMAGESIZE, IMAGESIZE]
    assert not list(exported.parent.glob(".tmp-*"))  # written atomically: no temporary file left


@pytest.mark.parametrize("args,words", [
    (("--opset", "17"), ("--opset 17",)),
    (("--opset", "999"), ("--opset 999",)),
])
def test_bad_export_arguments(trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args, words):
    capsys.readouterr()
    assert main.cli(["export", "--checkpoint", str(trained_checkpoint), "--output", str(tmp_path / "m.onnx"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and all(w in err for w in words), err
    assert not (tmp_path / "m.onnx").exists()


def test_export_rejects_a_corrupt_checkpoint_and_a_folder(trained_checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02not a checkpoint")
    capsys.readouterr()
    assert main.cli(["export", "--checkpoint", str(bad), "--output", str(tmp_path / "m.onnx")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert main.cli(["export", "--checkpoint", str(trained_checkpoint), "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_export_to_a_folder_that_cannot_be_written_fails_before_exporting(trained_checkpoint: Path, tmp_path: Path,
                                                                          capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(inference, "onnx_bytes", lambda *a, **k: pytest.fail("exported before checking the output"))
    capsys.readouterr()
    assert main.cli(["export", "--checkpoint", str(trained_checkpoint), "--output", str(blocker / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "not a folder" in err
