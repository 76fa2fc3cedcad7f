"""OpenVINO IR files (``main.py export --format openvino``): write one with its metadata, read one back and
check it, run it on the CPU.

An IR model is a pair of files: NAME.xml (the graph) and NAME.bin (its weights), written from the same ONNX
graph that ``--format onnx`` writes (fp32, or the QDQ graph of ``deploy.quantize_int8``, which OpenVINO reads
as FakeQuantize layers and runs with integer kernels). The export metadata (``inference.ExportedInfo``, JSON)
lies in the xml's ``rt_info`` under ``inference.METADATA_KEY``; its ``graph_sha256`` is ``model_digest``: every
operation in graph order (type, name, attributes, inputs, output types and shapes) and the data of every
constant, so a change to either file after export is found. Reading IR runs no code (no extensions loaded).

Precision: OpenVINO's CPU plugin runs float32 layers in bf16 on CPUs that have bf16 units unless told
otherwise, so a file's numbers would depend on the CPU; every model here is compiled with
``INFERENCE_PRECISION_HINT f32``. An fp16 file stores its weights in float16 (half the size), decompressed
to float32 when it is compiled.

Reading order: model_from_onnx, compile_model, run, model_digest, write, read, OvBackend.
"""
from __future__ import annotations

import functools
import io
import json
import os
import tempfile
from typing import Any

import numpy as np
import torch

import inference
from utils import UserError

XML, BIN = ".xml", ".bin"
DEVICE = "CPU"  # the OpenVINO device every file is compiled for
COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}  # float32 layers in float32 on every CPU (not bf16)
RUN_BATCH = 8


def _ov() -> Any:
    """The openvino module, or a one-line UserError when it is not installed."""
    try:
        import openvino
    except ImportError as exc:
        raise UserError("--format openvino needs the openvino package (pip install -r requirements.txt)") from exc
    return openvino


@functools.lru_cache(maxsize=1)
def core() -> Any:
    """One openvino.Core per process, made on first use."""
    return _ov().Core()


def model_from_onnx(data: bytes, fp16: bool) -> Any:
    """An ONNX graph -> the openvino.Model that ``write`` stores (``fp16``: its weights in float16), read back
    from a temporary IR pair so that it is exactly the graph a file holds."""
    ov = _ov()
    model = ov.convert_model(io.BytesIO(data))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model" + XML)
        ov.save_model(model, path, compress_to_fp16=fp16)
        return core().read_model(path)


def compile_model(model: Any, threads: int | None = None) -> Any:
    """A compiled CPU model in float32 (``threads``: OpenVINO's inference threads; None: its default)."""
    config = dict(COMPILE_CONFIG)
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return core().compile_model(model, DEVICE, config)


def outputs_of(compiled: Any, images: np.ndarray) -> tuple[np.ndarray, ...]:
    """One call: images float32 [B, 3, S, S] -> (image_scores [B], anomaly_maps [B, S, S], classes [B]), copies."""
    got = compiled(images)
    return tuple(np.array(got[compiled.output(name)]) for name in inference.ONNX_OUTPUTS)


@functools.lru_cache(maxsize=2)
def _compiled_from_onnx(data: bytes, fp16: bool) -> Any:
    """The compiled IR of an ONNX graph; export runs the same graph several times (quality, thresholds), and
    converting a graph takes seconds."""
    return compile_model(model_from_onnx(data, fp16))


def run(data: bytes, images: np.ndarray, fp16: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the IR file written from the ONNX graph ``data`` outputs on ``images`` [N, 3, S, S], RUN_BATCH at a time."""
    compiled = _compiled_from_onnx(data, fp16)
    outs = [outputs_of(compiled, images[i:i + RUN_BATCH]) for i in range(0, len(images), RUN_BATCH)]
    return tuple(np.concatenate([o[k] for o in outs]) for k in range(len(inference.ONNX_OUTPUTS)))


def model_digest(model: Any) -> str:
    """sha256 of the graph: per operation in graph order its type, name, attributes, inputs and output types and
    shapes, and each constant's data. The rt_info (where the metadata lies) is not part of it."""
    import hashlib

    digest = hashlib.sha256()
    for op in model.get_ordered_ops():
        sources = [(i.get_source_output().get_node().get_friendly_name(), i.get_source_output().get_index())
                   for i in op.inputs()]
        outputs = [(str(o.get_element_type()), str(o.get_partial_shape())) for o in op.outputs()]
        attributes = sorted((key, repr(value)) for key, value in op.get_attributes().items())
        digest.update(repr((op.get_type_name(), op.get_friendly_name(), attributes, sources, outputs)).encode())
        if op.get_type_name() == "Constant":
            digest.update(np.ascontiguousarray(op.get_data()).tobytes())
    return digest.hexdigest()


def bin_path(xml: str) -> str:
    return xml[: -len(XML)] + BIN


def write(data: bytes, fields: dict, path: str) -> int:
    """Write the ONNX graph ``data`` as the IR pair ``path`` (.xml) + .bin with ``fields`` (ExportedInfo without
    its digest) in its rt_info; fp16 weights when fields' precision is fp16. Both files are written beside the
    target and moved into place, the .bin first: a reader never sees a new graph with old weights (the digest
    would refuse a mix). -> bytes written."""
    ov = _ov()
    model = model_from_onnx(data, fields["precision"] == "fp16")
    info = inference.ExportedInfo(**fields, graph_sha256=model_digest(model))
    model.set_rt_info(info.to_json(), [inference.METADATA_KEY])
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
        staged = os.path.join(tmp, "model" + XML)
        ov.save_model(model, staged, compress_to_fp16=False)  # fp16 weights are already float16 constants
        size = os.path.getsize(staged) + os.path.getsize(bin_path(staged))
        os.replace(bin_path(staged), bin_path(path))
        os.replace(staged, path)
    return size


def read(path: str) -> tuple[Any, inference.ExportedInfo]:
    """An IR file written by export -> (its openvino.Model, its metadata); a one-line UserError for anything else
    (not an .xml, no .bin beside it, not IR, no or bad metadata, a graph or weights changed after export)."""
    if not path.endswith(XML):
        raise UserError(f"--model {path}: an OpenVINO model is given by its {XML} file (with its {BIN} beside it)")
    for part in (path, bin_path(path)):
        if not os.path.isfile(part):
            raise UserError(f"--model {path}: {part} does not exist" + ("" if part == path else
                            " (an OpenVINO model is a pair of files: NAME.xml and NAME.bin)"))
    try:
        model = core().read_model(path)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {path} is not a readable OpenVINO IR file ({first})") from exc
    if not model.has_rt_info([inference.METADATA_KEY]):
        raise inference.exported_error(path, "it holds no export metadata of this project (another tool's or an older export)")
    text = model.get_rt_info([inference.METADATA_KEY]).astype(str)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise inference.exported_error(path, f"its export metadata is not JSON ({exc.msg})") from exc
    info = inference.check_exported_info(values, path, "openvino")
    if model_digest(model) != info.graph_sha256:
        raise inference.exported_error(path, "its graph or weights are not the ones exported (changed after export)")
    inputs = [(i.get_any_name(), str(i.get_partial_shape())) for i in model.inputs]
    want = f"[?,3,{info.imagesize},{info.imagesize}]"
    if len(inputs) != 1 or inputs[0][0] != inference.ONNX_INPUTS[0] or inputs[0][1] != want:
        raise inference.exported_error(path, f"its input {inputs} is not images {want} as its metadata says")
    outputs = [o.get_any_name() for o in model.outputs]
    if outputs != list(inference.ONNX_OUTPUTS):
        raise inference.exported_error(path, f"its outputs {outputs} are not {list(inference.ONNX_OUTPUTS)}")
    return model, info


class OvBackend:
    """A compiled IR model as a Scorer backend: images [B, 3, S, S] -> (scores [B], maps [B, S, S], classes [B])."""

    def __init__(self, model: Any):
        self.compiled = compile_model(model)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.from_numpy(out) for out in outputs_of(self.compiled, images.float().cpu().numpy()))
