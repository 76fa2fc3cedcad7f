"""The ``main.py export`` tool: a checkpoint's inference graph as an ONNX or OpenVINO file that says what it is.

Reading order:
    ExportOptions, export          the tool: check the options, export fp32, quantize for int8, write with metadata
    calibration_images             fp16 / int8: a fixed, seeded subset of the checkpoint's own normal training images
    quantize_int8                  onnxruntime's static QDQ quantization of the Conv and Gemm nodes
    validation_sets, validation_quality, within_bound  --validation / --max_drop: image and pixel AUROC against fp32,
                                   for int8 falling back to float32 from the graph's start until the bound is met

Every file carries ``inference.ExportedInfo`` as JSON in its metadata (ONNX ``metadata_props``; OpenVINO: the
xml's ``rt_info``, openvino_ir.py): method, classes, automatic thresholds, preprocessing, format, precision,
what was measured against fp32, the graph's sha256. ``main.py predict --model`` and ``inference.load_exported``
read it and refuse files without it.

Formats: ``onnx`` (onnxruntime) and ``openvino`` (an IR pair NAME.xml + NAME.bin converted from the same ONNX
graph, run by OpenVINO on the CPU in float32; fp16 stores the weights in float16). Everything export measures
(the int8 fallback, thresholds, the quality record) is measured with the runtime of the file's format.

INT8 (``--precision int8``): post-training static quantization (onnxruntime ``quantize_static``, QDQ format,
per-channel 7-bit-range int8 weights, uint8 activations, MinMax calibration) of the Conv (backbone)
and Gemm (projector, discriminator) nodes but the first and the last. Everything else stays float32, in
particular the MatMul of CRAS's nearest-center search, the patch aggregation, the sigmoid, the bilinear
upsampling and the Gaussian smoothing. The file's automatic thresholds are the checkpoint's rule applied to the
int8 graph on the calibration images (its scores move a little), so int8 decisions keep their meaning.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import torch

import datasets
import engine
import inference
import metrics
import utils
from choices import EXPORT_CALIBRATION_SIZE, EXPORT_FORMATS, EXPORT_MAX_DROP, EXPORT_PRECISIONS
from common import Method
from utils import UserError

LOG = logging.getLogger("pbas")
CALIBRATION_SEED = 0  # the subset of the calibration images is drawn with this seed: the same file every time
QUANTIZED_OPS = ("Conv", "Gemm")  # MatMul (CRAS's center search) stays float32
CALIBRATION_BATCH = 8
REDUCED_ONLY = ("calibration", "calibration_size", "max_drop", "validation")  # options refused at fp32
Runtime = Callable[[bytes, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]  # ONNX graph, images -> outputs


@dataclass
class ExportOptions:
    checkpoint: str
    output: str
    opset: int | None = None  # None: inference.ONNX_OPSET
    format: str = "onnx"
    precision: str = "fp32"
    calibration: str | None = None  # folder/files of normal images; None: the checkpoint's training images
    calibration_size: int = EXPORT_CALIBRATION_SIZE
    max_drop: float | None = None  # None: EXPORT_MAX_DROP (int8 with --validation only)
    validation: str | None = None  # a dataset root (the checkpoint's dataset layout) with its classes' test sets


def _check_options(opts: ExportOptions, given: set[str]) -> int:
    """One-line UserErrors for bad options; -> the opset."""
    opset = inference.ONNX_OPSET if opts.opset is None else opts.opset
    if opset < inference.ONNX_OPSET:
        raise UserError(f"--opset {opset}: the exporter writes opset {inference.ONNX_OPSET} and cannot convert this "
                        f"graph to older opsets (no Pad adapter); use --opset {inference.ONNX_OPSET} or newer")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise UserError(f"--opset {opset}: the installed onnx package knows opsets up to {newest}")
    if opts.format not in EXPORT_FORMATS:
        raise UserError(f"--format {opts.format}: this version writes {', '.join(EXPORT_FORMATS)}")
    if opts.precision not in EXPORT_PRECISIONS:
        raise UserError(f"--precision {opts.precision}: valid: {', '.join(EXPORT_PRECISIONS)}")
    if opts.precision == "fp32" and given & set(REDUCED_ONLY):
        raise UserError(f"--{sorted(given & set(REDUCED_ONLY))[0]} applies to --precision fp16 and int8 only")
    if opts.precision == "fp16" and opts.format != "openvino":
        raise UserError("--precision fp16 is written for --format openvino only: onnxruntime's CPU provider has no "
                        "float16 kernels for most of this graph on x86 (it would convert back to float32)")
    if opts.format == "openvino":
        import openvino_ir

        openvino_ir.core()  # a one-line error now when openvino is not installed
        if not opts.output.endswith(openvino_ir.XML):
            raise UserError(f"--output {opts.output}: --format openvino writes a pair of files; give the name of the "
                            f"{openvino_ir.XML} file (its {openvino_ir.BIN} is written beside it)")
    if opts.calibration_size < 1:
        raise UserError(f"--calibration_size must be at least 1, got {opts.calibration_size}")
    if opts.max_drop is not None:
        if opts.validation is None:
            raise UserError("--max_drop needs --validation PATH (a labelled test set to measure the drop on)")
        if not (math.isfinite(opts.max_drop) and opts.max_drop >= 0):
            raise UserError(f"--max_drop must be a finite number >= 0 (points of AUROC), got {opts.max_drop}")
    for option, path in (("--calibration", opts.calibration), ("--validation", opts.validation)):
        if path is not None and not os.path.exists(path):
            raise UserError(f"{option} {path} does not exist")
    if os.path.isdir(opts.output):
        raise UserError(f"--output {opts.output} is a folder; give a file name such as model.onnx or model.xml")
    utils.check_writable_folder(os.path.dirname(os.path.abspath(opts.output)), "the folder of --output")
    return opset


def export(opts: ExportOptions, methods: dict[str, type[Method]], given: frozenset[str] = frozenset()) -> int:
    """Export the checkpoint to ``opts.output`` (atomic write). ``given``: the option names given on the command
    line (fp16/int8-only options are refused at fp32). 0 when written; 1 when the fp32 graph disagrees with
    PyTorch (nothing written); a UserError when --max_drop cannot be met (nothing written)."""
    opset = _check_options(opts, set(given))
    model, ckpt = inference.load_model(opts.checkpoint, torch.device("cpu"), methods, "fp32")
    size = model.method.config.imagesize
    if opts.precision != "fp32":  # the data first: its errors come before the slow part
        images = calibration_images(opts, ckpt, model)
        validation = None if opts.validation is None else validation_sets(opts.validation, ckpt, model)
    data = inference.onnx_bytes(model, opset)
    diff = utils.onnx_difference(data, inference.ExportGraph(model.graph()).eval(), torch.randn(3, 3, size, size))
    if max(diff) > inference.ONNX_TOLERANCE:
        LOG.error("the ONNX graph differs from PyTorch by %.3g (scores) / %.3g (maps) / %g (classes); not written",
                  *diff)
        return 1
    LOG.info("fp32 graph: max |ONNX - PyTorch| on 3 random images: %.2g (scores), %.2g (maps)", *diff[:2])
    fields = metadata_of(ckpt, model, opts)
    if opts.precision != "fp32":
        run = runtime_of(opts.format, opts.precision)
        if opts.precision == "int8":
            data, fields["quality"] = int8_graph(data, images, validation, opts.max_drop, run)
        else:
            fields["quality"] = reduced_quality(data, data, images, validation, opts.max_drop, run, "fp16")
        fields["thresholds"], fields["quality"]["threshold_images"] = calibrated_thresholds(
            run(data, images), model.classes, fields["thresholds"])
    if opts.format == "openvino":
        import openvino_ir

        written = openvino_ir.write(data, fields, opts.output)
    else:
        written = len(onnx_file := with_metadata(data, fields))
        utils.save_bytes(onnx_file, opts.output)
    LOG.info("wrote %s (%.1f MB, %s %s, opset %d): images [B, 3, %d, %d] -> image_scores [B], anomaly_maps [B, %d, %d], "
             "classes [B]", opts.output, written / 1e6, opts.format, opts.precision, opset, size, size, size, size)
    return 0


def runtime_of(file_format: str, precision: str) -> Runtime:
    """How a file of ``file_format`` at ``precision`` runs an ONNX graph: onnxruntime's CPU provider, or
    OpenVINO on the CPU (fp16: with the weights in float16, as written)."""
    if file_format == "openvino":
        import openvino_ir

        return lambda data, images: openvino_ir.run(data, images, fp16=precision == "fp16")
    return run_graph


# ----------------------------------------------------------------------------------------------
# metadata
# ----------------------------------------------------------------------------------------------


def metadata_of(ckpt: dict, model: inference.LoadedModel, opts: ExportOptions) -> dict:
    """The metadata fields except the graph digest (set when written); at fp16 / int8, export replaces the
    thresholds and quality."""
    try:
        thresholds = inference.resolve_thresholds(ckpt, None, None, opts.checkpoint)
    except UserError:
        thresholds = None  # an older checkpoint without normal training scores: predict --model needs numbers
        LOG.warning("%s stores no normal training scores: the file has no automatic thresholds", opts.checkpoint)
    return {
        "version": inference.METADATA_VERSION, "method": ckpt["method"], "classes": list(model.classes),
        "thresholds": thresholds,
        "resize": model.resize, "imagesize": model.method.config.imagesize,
        "mean": list(datasets.IMAGENET_MEAN), "std": list(datasets.IMAGENET_STD),
        "format": opts.format, "precision": opts.precision, "quality": {},
    }


def with_metadata(data: bytes, fields: dict) -> bytes:
    """The ONNX model ``data`` with ``fields`` and its graph's digest as the export metadata entry."""
    proto = onnx.ModelProto.FromString(data)
    thresholds = fields["thresholds"]
    fields = {**fields, "thresholds": None if thresholds is None else {k: list(v) for k, v in thresholds.items()}}
    info = inference.ExportedInfo(**fields, graph_sha256=inference.graph_digest(proto))
    kept = [entry for entry in proto.metadata_props if entry.key != inference.METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=inference.METADATA_KEY, value=info.to_json())
    return proto.SerializeToString()


# ----------------------------------------------------------------------------------------------
# int8
# ----------------------------------------------------------------------------------------------


def calibration_images(opts: ExportOptions, ckpt: dict, model: inference.LoadedModel) -> np.ndarray:
    """fp16 / int8: the calibration batch float32 [N, 3, S, S]: a seeded subset (``--calibration_size``) of --calibration's
    images, or of the checkpoint's normal training images (its recorded DATAPATH), preprocessed as in training."""
    config = ckpt["config"]
    if opts.calibration is not None:
        paths = [item.path for item in utils.collect_inputs([opts.calibration])]
    else:
        root = config.get("datapath")
        if not root or not os.path.isdir(root):
            where = f"its DATAPATH {root} is not there" if root else "it does not record where its training images are"
            raise UserError(f"--precision {opts.precision} calibrates on the checkpoint's normal training images, but {where}; "
                            "give --calibration PATH (a folder of normal images)")
        paths = [s.image_path for train, _ in class_datasets(root, ckpt, model) for s in train.samples]
    rng = np.random.default_rng(CALIBRATION_SEED)
    chosen = sorted(rng.choice(len(paths), size=min(opts.calibration_size, len(paths)), replace=False))
    transform = datasets.image_transform(model.resize, model.method.config.imagesize)
    images = []
    for index in chosen:
        try:
            images.append(transform(datasets.read_rgb(paths[index])).numpy())
        except datasets.IMAGE_READ_ERRORS as exc:
            raise UserError(f"calibration image {paths[index]} cannot be read ({type(exc).__name__})") from exc
    LOG.info("%s calibration on %d of %d normal image(s) (seed %d)", opts.precision, len(images), len(paths),
             CALIBRATION_SEED)
    return np.stack(images)


class _Batches:
    """onnxruntime's CalibrationDataReader over a float32 array [N, 3, S, S], CALIBRATION_BATCH at a time."""

    def __init__(self, images: np.ndarray):
        self.images, self.start = images, 0

    def get_next(self) -> dict | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start:self.start + CALIBRATION_BATCH]
        self.start += CALIBRATION_BATCH
        return {inference.ONNX_INPUTS[0]: batch}


def quantizable_nodes(data: bytes) -> list[str]:
    """Names of the QUANTIZED_OPS nodes, in graph order (quantize_int8 keeps the first and last in float32)."""
    return [node.name for node in onnx.ModelProto.FromString(data).graph.node if node.op_type in QUANTIZED_OPS]


def quantize_int8(data: bytes, images: np.ndarray, exclude: Sequence[str] = ()) -> bytes:
    """Static QDQ quantization of ``data``'s Conv and Gemm nodes, calibrated on ``images``, except the first (the
    stem convolution, which sees the normalised pixels) and the last (the discriminator's output layer, whose
    logit goes straight into the sigmoid), and ``exclude``.

    Activations uint8 (asymmetric MinMax range), weights int8 per output channel with ``reduce_range`` (7 bits):
    onnxruntime runs uint8 x int8 QDQ pairs with its integer kernels (symmetric int8 activations were closer to
    fp32 but barely faster: docs/deployment.md); without VNNI (AVX2, AVX-512 without VNNI) those kernels add
    pairs of products in 16 bits, which saturates with full-range weights, so 7-bit weights keep the file's
    scores the same on every x86 CPU.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    nodes = quantizable_nodes(data)
    with tempfile.TemporaryDirectory() as tmp, inference.quiet(("",), logging.ERROR):
        # the quantizer logs every scale it adjusts, and advice, on the root logger
        source, target = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        with open(source, "wb") as f:
            f.write(data)
        quantize_static(source, target, _Batches(images), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=sorted({*exclude, nodes[0], nodes[-1]}),
                        calibrate_method=CalibrationMethod.MinMax)
        with open(target, "rb") as f:
            return f.read()


def run_graph(data: bytes, images: np.ndarray, batch: int = CALIBRATION_BATCH
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_scores [N], anomaly_maps [N, S, S], classes [N]) of an ONNX graph on ``images`` (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=[inference.CPU_PROVIDER])
    outs = [session.run(list(inference.ONNX_OUTPUTS), {inference.ONNX_INPUTS[0]: images[i:i + batch]})
            for i in range(0, len(images), batch)]
    return tuple(np.concatenate([o[k] for o in outs]) for k in range(len(inference.ONNX_OUTPUTS)))


def calibrated_thresholds(outputs: tuple[np.ndarray, np.ndarray, np.ndarray], classes: list[str],
                          fp32: dict[str, tuple[float, float]] | None
                          ) -> tuple[dict[str, tuple[float, float]] | None, dict]:
    """The automatic-threshold rule applied to the fp16 / int8 file's outputs on the calibration images, per class that
    the graph assigns them to: (image: max score, pixel: 0.999 quantile of the map pixels). A class no calibration
    image falls into keeps its fp32 thresholds. -> (thresholds, {class: images used})."""
    if fp32 is None:
        return None, {}
    scores, maps, assigned = outputs
    out, counts = dict(fp32), {}
    for index, name in enumerate(classes):
        mine = assigned == index
        counts[name] = int(mine.sum())
        if counts[name]:
            out[name] = (float(scores[mine].max()), float(np.quantile(maps[mine], inference.NORMAL_PIXEL_QUANTILE)))
    return out, counts


def output_difference(reference: tuple[np.ndarray, ...], got: tuple[np.ndarray, ...]) -> dict:
    """How far fp16 / int8 outputs lie from fp32's: max |diff| of scores and maps, Spearman correlation of the scores."""
    import scipy.stats

    varies = len(got[0]) > 1 and np.ptp(got[0]) > 0 and np.ptp(reference[0]) > 0
    spearman = float(scipy.stats.spearmanr(reference[0], got[0]).statistic) if varies else float("nan")  # undefined
    return {"max_score_difference": float(np.abs(reference[0] - got[0]).max()),
            "max_map_difference": float(np.abs(reference[1] - got[1]).max()),
            "score_spearman": spearman, "same_class": float(np.mean(reference[2] == got[2]))}


def reduced_quality(data: bytes, graph: bytes, images: np.ndarray, validation: Validation | None,
                    max_drop: float | None, run: Runtime, precision: str,
                    measured: tuple[dict, dict] | None = None) -> dict:
    """The quality record of ``graph`` run by ``run`` (the file's runtime and precision) against the fp32 graph
    ``data`` (onnxruntime): on the calibration images, and with ``validation`` its AUROC drops, which must lie
    within ``max_drop`` (None: EXPORT_MAX_DROP) points (a UserError otherwise: nothing is written). int8_graph
    falls back to float32 layer by layer before it gets here with a failing bound; fp16 has no such fallback.
    ``measured``: (fp32, graph) AUROCs on ``validation`` already measured."""
    quality = {"calibration_images": len(images), "calibration_seed": CALIBRATION_SEED,
               "on_calibration": output_difference(run_graph(data, images), run(graph, images))}
    LOG.info("%s vs fp32 on the calibration images: max |diff| %.3g (scores), %.3g (maps), Spearman %.4f, "
             "same class %.3f", precision, *quality["on_calibration"].values())
    if validation is None:
        return quality
    bound = EXPORT_MAX_DROP if max_drop is None else max_drop
    reference, got = measured or (validation_quality(data, validation, run_graph), validation_quality(graph, validation, run))
    drops = {key: 100 * (reference[key] - got[key]) for key in reference}
    if not within_bound(drops, bound):
        raise UserError(f"{precision} cannot meet --max_drop {bound:g}: image AUROC {100 * reference['image_auroc']:.2f} "
                        f"(fp32) -> {100 * got['image_auroc']:.2f} ({precision}), pixel AUROC "
                        f"{100 * reference['pixel_auroc']:.2f} -> {100 * got['pixel_auroc']:.2f}; nothing written")
    quality.update({"validation_fp32": reference, f"validation_{precision}": got, "drop_points": drops,
                    "max_drop": bound})
    LOG.info("%s on --validation: image AUROC %.4f (fp32 %.4f), pixel AUROC %.4f (fp32 %.4f)", precision,
             got["image_auroc"], reference["image_auroc"], got["pixel_auroc"], reference["pixel_auroc"])
    return quality


def int8_graph(data: bytes, images: np.ndarray, validation: Validation | None, max_drop: float | None,
               run: Runtime) -> tuple[bytes, dict]:
    """The int8 graph and its quality record (run by ``run``, the file's runtime); with ``validation`` the largest
    quantized part that keeps both AUROC drops within ``max_drop`` (None: EXPORT_MAX_DROP) points, falling back
    to float32 from the graph's start; a UserError when only float32 would."""
    quantized = quantize_int8(data, images)
    if validation is None:
        return quantized, reduced_quality(data, quantized, images, None, None, run, "int8")
    bound = EXPORT_MAX_DROP if max_drop is None else max_drop
    reference = validation_quality(data, validation, run_graph)
    nodes = quantizable_nodes(data)[1:-1]  # the first and last are float32 anyway
    excluded = 0  # layers from the graph's start kept in float32 (the early ones were the most sensitive); one stays int8
    while True:
        got = validation_quality(quantized, validation, run)
        drops = {key: 100 * (reference[key] - got[key]) for key in reference}
        if within_bound(drops, bound):
            break
        if excluded >= len(nodes) - 1:
            raise UserError(f"int8 cannot meet --max_drop {bound:g}: image AUROC {100 * reference['image_auroc']:.2f} "
                            f"(fp32) -> {100 * got['image_auroc']:.2f} (int8), pixel AUROC "
                            f"{100 * reference['pixel_auroc']:.2f} -> {100 * got['pixel_auroc']:.2f} with "
                            f"{excluded} of {len(nodes)} layers in float32; nothing written")
        excluded = min(len(nodes) - 1, max(1, 2 * excluded))
        LOG.info("drop %s above %g: %d of %d layers back to float32 (from the graph's start)",
                 {k: round(v, 3) for k, v in drops.items()}, bound, excluded, len(nodes))
        quantized = quantize_int8(data, images, nodes[:excluded])
    quality = reduced_quality(data, quantized, images, validation, bound, run, "int8", (reference, got))
    quality.update({"float32_layers": excluded, "quantizable_layers": len(nodes)})
    LOG.info("int8: %d of %d layers kept in float32", excluded, len(nodes))
    return quantized, quality


def within_bound(drops: dict[str, float], bound: float) -> bool:
    """Both AUROC drops (points) at most ``bound``."""
    return all(drop <= bound + 1e-9 for drop in drops.values())


def class_datasets(root: str, ckpt: dict, model: inference.LoadedModel
                   ) -> list[tuple[datasets.AnomalyDataset, datasets.AnomalyDataset]]:
    """(train, test) of each of the checkpoint's classes under ``root`` (its dataset's layout and preprocessing)."""
    config = ckpt["config"]
    method = inference.default_methods()[ckpt["method"]]
    return [datasets.build_datasets(config["dataset"], root, classname, config["requested_resize"],
                                    model.method.config.imagesize, class_resize_rule=method.class_resize_rule)
            for classname in config["classes"]]


@dataclass(frozen=True)
class Validation:
    """--validation: the test sets of the checkpoint's classes and the mask rule (--mask_binarize) it was tested with."""

    sets: list[datasets.AnomalyDataset]
    mask_rule: str


def validation_sets(root: str, ckpt: dict, model: inference.LoadedModel) -> Validation:
    """The test sets of the checkpoint's classes under --validation ``root``, evaluated with its mask rule."""
    rule = ckpt["config"].get("mask_binarize", engine.CONFIG_DEFAULTS["mask_binarize"])
    return Validation([test for _, test in class_datasets(root, ckpt, model)], rule)


def validation_quality(data: bytes, validation: Validation, run: Runtime) -> dict[str, float]:
    """Mean over the classes of image and pixel AUROC of an ONNX graph run by ``run`` on the test sets (masks
    binarised by the checkpoint's rule, as training evaluated them)."""
    image, pixel = [], []
    for test in validation.sets:
        items = [test[i] for i in range(len(test))]
        scores, maps, _ = run(data, np.stack([item["image"].numpy() for item in items]))
        labels = torch.tensor([item["is_anomaly"] for item in items])
        masks = metrics.binarize_masks(torch.stack([item["mask"][0] for item in items]), validation.mask_rule)  # [N, S, S]
        image.append(metrics.image_metrics(torch.from_numpy(scores), labels)["image_auroc"])
        pixel.append(metrics.pixel_metrics(torch.from_numpy(maps), masks)["pixel_auroc"])
    return {"image_auroc": float(np.mean(image)), "pixel_auroc": float(np.mean(pixel))}
