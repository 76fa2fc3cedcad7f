"""Use a trained checkpoint (PBAS or CRAS): load it, score new images of any size, thresholds, ONNX export.

Reading order:
    load_model, read_checkpoint    a checkpoint written by main.py -> the method in eval mode (one-line errors)
    InferenceGraph                 nn.Module: normalised images [B, 3, S, S] -> (image_scores [B], anomaly_maps [B, S, S])
    auto_thresholds                the default thresholds, from the normal training images (no labelled defects)
    CropGeometry, to_original      where the S x S network input lies in the original image; maps back to it
    load, Scorer, Result           the Python API: ``inference.load(checkpoint)(image)`` -> score, decision, map
    predict                        the ``main.py predict`` tool: files -> predictions.csv, overlays, masks
    export_onnx                    the ``main.py export`` tool: the inference graph as ONNX

CRAS checkpoints are scored with the per-image class vote (each image's own nearest class bank), so a
batch of unrelated images never changes one image's score; the class found is reported per image and
its thresholds are used.

Thresholds (``--threshold auto`` / ``--pixel_threshold auto``), from the checkpoint's ``normal_scores``,
the scores of each class's normal TRAINING images under the selected (best) state:
    image threshold = the largest normal training image score: every normal training image scores at
        or below it, so it is the lowest threshold under which the model calls none of them anomalous;
    pixel threshold = the 0.999 quantile of all normal training anomaly-map pixels (about one normal
        pixel in a thousand lies above it).
An image is 'anomalous' when its score is strictly above the image threshold; a mask pixel is 255 when
its score is strictly above the pixel threshold.

Geometry: the network sees the centre crop ``imagesize`` of the image resized so that its shorter side
is ``resize`` (as in training). Its anomaly map is mapped back to the original pixels through that
geometry (bilinear); original pixels outside the crop are not seen by the network: they get score 0 and
mask 0, and the overlay leaves them uncoloured.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import csv
import io
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from PIL import Image
from tqdm import tqdm

import backbones
import datasets
import engine
import methods
import utils
from choices import EXPORT_PRECISIONS
from common import PRECISIONS, Embedder, Method, autocast
from datasets.base import IMAGE_READ_ERRORS, read_rgb, to_rgb8
from utils import InputImage, UserError

LOG = logging.getLogger("pbas")
NORMAL_PIXEL_QUANTILE = 0.999  # pixel threshold: this quantile of the normal training pixel scores
OVERLAY_ALPHA = 0.5  # weight of the jet colours in the overlay PNGs
PREDICTIONS_NAME = "predictions.csv"
OVERLAY_SUFFIX, MASK_SUFFIX = "_overlay.png", "_mask.png"
PREDICTION_COLUMNS = ("path", "class", "image_score", "decision", "image_threshold", "pixel_threshold", "overlay", "mask")
ANOMALOUS, NORMAL = "anomalous", "normal"
ONNX_OPSET = 18  # the opset the dynamo exporter writes natively
ONNX_INPUTS = ("images",)
ONNX_OUTPUTS = ("image_scores", "anomaly_maps", "classes")  # classes: index into the metadata's class list
ONNX_LOGGERS = ("onnxscript", "onnx_ir")  # quieted to WARNING while exporting
ONNX_TOLERANCE = 1e-4  # largest |ONNX - PyTorch| accepted by the export check
PER_IMAGE_VOTE = "image"  # CRAS's class_vote for predict and export
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"
FLOAT_TYPES = ("float", "float16", "bfloat16", "double")  # onnxruntime profile names of floating tensor types


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def read_checkpoint(path: str, methods: dict[str, type[Method]]) -> dict:
    """A complete checkpoint written by ``main.py`` of one of ``methods``; a one-line UserError for anything else."""
    ckpt = engine.read_checkpoint(path, next(iter(methods)) if len(methods) == 1 else None)
    if ckpt["method"] not in methods:
        raise UserError(f"{path}: unknown method '{ckpt['method']}'; this version knows {', '.join(methods)}")
    config = ckpt["config"]
    if not isinstance(config.get("resize"), int) or not isinstance(ckpt.get("classes"), list):
        raise UserError(f"{path} is not a complete checkpoint: its configuration lacks 'resize' or its class list")
    if not ckpt.get("complete"):
        raise UserError(f"{path} is from an unfinished training run; finish training it first (main.py --test ckpt ...)")
    missing = [key for key in ("center", "best", "backbone_stats") if key not in ckpt]
    if missing or not isinstance(ckpt["best"], dict) or "state" not in ckpt["best"]:
        raise UserError(f"{path} is not a complete checkpoint (missing {', '.join(missing) or 'best state'})")
    return ckpt


def _config_of(ckpt: dict, method: type[Method], path: str):
    """The stored network configuration; a UserError when it cannot be read."""
    try:
        return method.Config.from_dict(ckpt["config"]["net"])
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: unreadable network configuration ({exc})") from exc


@dataclass
class LoadedModel:
    """A checkpoint's method (best state, eval mode) with its encoder, classes and configuration."""

    encoder: engine.Encoder
    method: Method
    classes: list[str]  # results.csv row name of each class bank, e.g. mvtec_carpet
    resize: int

    def graph(self) -> "InferenceGraph":
        return InferenceGraph(self.encoder.embedder, self.method, self.encoder.precision)


def load_model(path: str, device: torch.device, methods: dict[str, type[Method]], precision: str = "fp32"
               ) -> tuple[LoadedModel, dict]:
    """A checkpoint -> (its model with the best state, in eval mode on ``device``; the checkpoint dict).

    Builds the backbone with its pretrained weights (BackboneError when they are missing) and the BatchNorm
    statistics stored with the checkpoint (those it was trained with). CRAS models use the per-image class vote.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    ckpt = read_checkpoint(path, methods)
    method_cls = methods[ckpt["method"]]
    config = _config_of(ckpt, method_cls, path)
    if hasattr(config, "class_vote"):
        config.class_vote = PER_IMAGE_VOTE
    _, stages = backbones.load_backbone(config.backbone)
    backbones.check_layers(config.backbone, config.layers, stages)
    embedder = Embedder(stages, config.layers, config.patchsize, config.pretrain_embed_dimension,
                        config.target_embed_dimension)
    encoder = engine.Encoder(embedder.to(device), precision, config.train_backbone)
    engine.restore_statistics(encoder, ckpt["backbone_stats"], f"checkpoint {path}")  # as trained
    method = method_cls(config, len(ckpt["classes"]), precision).to(device)
    engine.restore(method, encoder, ckpt["best"]["state"], ckpt["center"], f"checkpoint {path}")
    method.eval()
    return LoadedModel(encoder, method, list(ckpt["classes"]), ckpt["config"]["resize"]), ckpt


# ----------------------------------------------------------------------------------------------
# the inference graph
# ----------------------------------------------------------------------------------------------


class InferenceGraph(torch.nn.Module):
    """The scoring path of evaluation from images: embed, then the method's scores, upsampling, smoothing.

    images [B, 3, S, S] (normalised) -> (image_scores [B], anomaly_maps [B, S, S], class per image [B]).
    """

    def __init__(self, embedder: Embedder, method: Method, precision: str = "fp32"):
        super().__init__()
        self.embedder = embedder
        self.method = method
        self.precision = precision

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast(self.precision, images.device.type):
            feats, grid = self.embedder(images)  # [B*H*W, D], (H, W)
        return self.method.score(feats.float(), grid)


class ExportGraph(torch.nn.Module):
    """The fp32 graph that is exported: (image_scores [B], anomaly_maps [B, S, S], classes [B] int64)."""

    def __init__(self, scoring: InferenceGraph):
        super().__init__()
        self.scoring = scoring  # not 'graph': torch.fx reserves that attribute name

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, maps, classes = self.scoring(images)
        return scores, maps, classes.long()


def exportable(model: LoadedModel) -> ExportGraph:
    """The export wrapper around an fp32 CPU copy of the model."""
    graph = copy.deepcopy(model.graph()).cpu()
    graph.precision = "fp32"
    graph.method.precision = "fp32"
    return ExportGraph(graph).eval()


# ----------------------------------------------------------------------------------------------
# thresholds
# ----------------------------------------------------------------------------------------------


def parse_threshold(text: str, option: str) -> float | None:
    """'auto' -> None (use the checkpoint's rule); a finite number -> that number; else a UserError."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError as exc:
        raise UserError(f"{option} must be 'auto' or a number, got '{text}'") from exc
    if not math.isfinite(value):
        raise UserError(f"{option} must be a finite number, got '{text}'")
    return value


def auto_thresholds(normal: dict) -> tuple[float, float]:
    """(image, pixel) thresholds from the normal training score statistics stored in a checkpoint.

    image: max of the normal training image scores (each of them is scored at or below it);
    pixel: NORMAL_PIXEL_QUANTILE (0.999) quantile of all their anomaly-map pixels, interpolated
    linearly in the stored quantiles (0, 0.001, ..., 1).
    """
    image = float(normal["image_scores"].max())
    levels = normal["quantile_levels"].double().numpy()
    quantiles = normal["pixel_quantiles"].double().numpy()
    return image, float(np.interp(NORMAL_PIXEL_QUANTILE, levels, quantiles))


def resolve_thresholds(ckpt: dict, image: float | None, pixel: float | None, path: str) -> dict[str, tuple[float, float]]:
    """(image, pixel) thresholds of each class of the checkpoint. Given numbers override the automatic ones;
    'auto' needs the checkpoint's normal training scores of each class."""
    classes = ckpt["classes"]
    if image is not None and pixel is not None:
        return {name: (image, pixel) for name in classes}
    normal = ckpt.get("normal_scores")
    keys = {"image_scores", "pixel_quantiles", "quantile_levels"}
    if not isinstance(normal, dict) or not all(isinstance(normal.get(n), dict) and keys <= set(normal[n]) for n in classes):
        raise UserError(f"{path} stores no normal training scores of its classes; "
                        "give --threshold and --pixel_threshold as numbers, or train it again")
    out = {}
    for name in classes:
        auto_image, auto_pixel = auto_thresholds(normal[name])
        out[name] = (auto_image if image is None else image), (auto_pixel if pixel is None else pixel)
    return out


# ----------------------------------------------------------------------------------------------
# geometry: the network input inside the original image
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropGeometry:
    """torchvision Resize(resize) then CenterCrop(size) of a width x height image, as in training."""

    width: int
    height: int
    resized_width: int
    resized_height: int
    left: int  # crop offset in resized pixels; negative where CenterCrop padded
    top: int
    size: int

    @classmethod
    def of(cls, width: int, height: int, resize: int, size: int) -> "CropGeometry":
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(resize * long / short)  # torchvision's rule for Resize(int)
        rw, rh = (resize, new_long) if width <= height else (new_long, resize)
        return cls(width, height, rw, rh, _crop_offset(rw, size), _crop_offset(rh, size), size)


def _crop_offset(n: int, size: int) -> int:
    """torchvision CenterCrop's first row/column in an n-pixel axis (pads symmetrically when n < size)."""
    return int(round((n - size) / 2.0)) if n >= size else -((size - n) // 2)


def _axis_weights(n: int, resized: int, offset: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear weights from the crop's ``size`` samples to the ``n`` original pixels of one axis.

    -> (weights [n, size] float32, inside [n] bool: the pixel's center lies in the crop).
    """
    edge = (torch.arange(n, dtype=torch.float64) + 0.5) * (resized / n) - offset  # crop coordinate, edges at 0..size
    inside = (edge >= 0) & (edge < size)
    pos = (edge - 0.5).clamp(0, size - 1)  # crop pixel centers at 0..size-1
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=size - 1)
    frac = pos - lo
    weights = torch.zeros(n, size, dtype=torch.float64)
    rows = torch.arange(n)
    weights.index_put_((rows, lo), 1 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    weights[~inside] = 0
    return weights.float(), inside


def to_original(amap: torch.Tensor, geometry: CropGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """An anomaly map of the crop [S, S] -> (scores [H, W] of the original pixels, inside [H, W] bool).

    Bilinear upsampling to the crop's extent in original pixels; 0 outside the crop.
    """
    g = geometry
    wy, in_y = _axis_weights(g.height, g.resized_height, g.top, g.size)  # [H, S]
    wx, in_x = _axis_weights(g.width, g.resized_width, g.left, g.size)  # [W, S]
    scores = wy @ amap.float().cpu() @ wx.T  # [H, W]
    return scores, in_y[:, None] & in_x[None, :]


def overlay(rgb: np.ndarray, scores: torch.Tensor, inside: torch.Tensor) -> np.ndarray:
    """Jet colours of the scores (in [0, 1], as the training heatmaps) blended over the image, inside the crop.

    rgb uint8 [H, W, 3], scores [H, W], inside [H, W] -> uint8 [H, W, 3]
    """
    colours = utils.jet(scores.numpy()).astype(np.float32)
    blended = (1 - OVERLAY_ALPHA) * rgb.astype(np.float32) + OVERLAY_ALPHA * colours
    out = np.where(inside.numpy()[..., None], blended, rgb.astype(np.float32))
    return (out + 0.5).astype(np.uint8)


def binary_mask(scores: torch.Tensor, inside: torch.Tensor, threshold: float) -> np.ndarray:
    """255 where the score is above the threshold inside the crop, else 0: uint8 [H, W]."""
    return (((scores > threshold) & inside).numpy() * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# input files and output names
# ----------------------------------------------------------------------------------------------


def read_predictions(output: str) -> list[dict]:
    """The rows of an existing OUTPUT/predictions.csv (none when there is none); a UserError if it is not ours."""
    path = os.path.join(output, PREDICTIONS_NAME)
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} cannot be read ({type(exc).__name__}); use another --output") from exc
    if reader.fieldnames != list(PREDICTION_COLUMNS):
        raise UserError(f"{path} is not a predictions file of this version; use another --output")
    return rows


# ----------------------------------------------------------------------------------------------
# the predict tool
# ----------------------------------------------------------------------------------------------


@dataclass
class PredictOptions:
    checkpoint: str | None  # exactly one of checkpoint and model
    inputs: list[str]
    output: str
    threshold: float | None  # None: auto
    pixel_threshold: float | None  # None: auto
    batch_size: int
    gpu: int | None
    precision: str
    model: str | None = None  # a file written by export


@dataclass
class Decoded:
    item: InputImage
    rgb: np.ndarray  # uint8 [H, W, 3], the original pixels
    tensor: torch.Tensor  # [3, S, S] normalised network input


def decode(item: InputImage, transform: Callable[[Image.Image], torch.Tensor]) -> Decoded:
    """Read an image as 8-bit RGB exactly as training does (16-bit scaled, alpha dropped); IMAGE_READ_ERRORS
    (DatasetError included) for unreadable files."""
    rgb = read_rgb(item.path)
    return Decoded(item, np.asarray(rgb), transform(rgb))


def _write_outputs(d: Decoded, classname: str, score: float, amap: torch.Tensor, geometry: CropGeometry,
                   thresholds: tuple[float, float], output: str) -> dict:
    """Overlay and mask PNGs at the original size; the image's predictions.csv row."""
    scores, inside = to_original(amap, geometry)
    overlay_name, mask_name = f"{d.item.name}{OVERLAY_SUFFIX}", f"{d.item.name}{MASK_SUFFIX}"
    utils.save_png(overlay(d.rgb, scores, inside), os.path.join(output, overlay_name))
    utils.save_png(binary_mask(scores, inside, thresholds[1]), os.path.join(output, mask_name))  # [H, W] uint8: mode L
    return {"path": d.item.path, "class": classname, "image_score": repr(score), "decision": ANOMALOUS if score > thresholds[0] else NORMAL,
            "image_threshold": repr(thresholds[0]), "pixel_threshold": repr(thresholds[1]),
            "overlay": overlay_name, "mask": mask_name}


def predictions_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _decode_all(chunk: list[InputImage], transform: Callable[[Image.Image], torch.Tensor]) -> list[Decoded]:
    """The readable images of a chunk; one 'skipped PATH: ...' line on stderr for each other file."""
    decoded = []
    for item in chunk:
        try:
            decoded.append(decode(item, transform))
        except IMAGE_READ_ERRORS as exc:
            tqdm.write(f"skipped {item.path}: cannot read it as an image ({type(exc).__name__})", file=sys.stderr)
    return decoded


def _scorer_of(opts: PredictOptions, methods: dict[str, type[Method]], device: torch.device) -> "Scorer":
    """The Scorer of --checkpoint or of --model (exactly one)."""
    if (opts.checkpoint is None) == (opts.model is None):
        raise UserError("give either --checkpoint (a training checkpoint) or --model (a file written by export)")
    if opts.checkpoint is not None:
        return load(opts.checkpoint, device, opts.precision, opts.threshold, opts.pixel_threshold, methods)
    if opts.precision != "fp32":
        raise UserError(f"--precision {opts.precision} applies to --checkpoint; an exported file has its own precision")
    scorer = load_exported(opts.model, device, opts.threshold, opts.pixel_threshold)
    if scorer.info.method not in methods:
        raise UserError(f"--model {opts.model} is a {scorer.info.method.upper()} model, not {', '.join(methods).upper()}")
    return scorer


def predict(opts: PredictOptions, methods: dict[str, type[Method]]) -> int:
    """Score every input image; write OUTPUT/predictions.csv, overlays and masks. 0: all scored, 1: some skipped.

    Thresholds: see the module docstring (auto: max normal training image score; 0.999 pixel quantile),
    those of the class each image is assigned to (CRAS: its nearest class bank).
    """
    if opts.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {opts.batch_size}")
    utils.collect_inputs(opts.inputs)  # one-line errors for missing inputs before anything is loaded
    device = utils.select_device(opts.gpu)
    utils.configure_precision(opts.precision, device)
    scorer = _scorer_of(opts, methods, device)
    utils.check_writable_folder(opts.output, "--output")
    with utils.locked(opts.output):  # predicts into one folder take turns; rows and files of earlier ones stay
        return _predict_into(opts, scorer, device)


def _predict_into(opts: PredictOptions, scorer: "Scorer", device: torch.device) -> int:
    """predict's work inside the locked output folder: earlier rows are kept, an image predicted again is replaced."""
    earlier = read_predictions(opts.output)
    taken = {os.path.abspath(r["path"]): r["overlay"][: -len(OVERLAY_SUFFIX)] for r in earlier
             if r["overlay"].endswith(OVERLAY_SUFFIX)}
    items = utils.collect_inputs(opts.inputs, taken)
    for name, (image_t, pixel_t) in scorer.thresholds.items():
        LOG.info("%s: image threshold %.6g, pixel threshold %.6g", name, image_t, pixel_t)
    LOG.info("%d image(s); %s", len(items), device)

    rows = []
    bar = utils.progress(None, "predict", total=len(items))
    for chunk in engine.batches_of(items, opts.batch_size):
        decoded = _decode_all(chunk, scorer.transform)
        if decoded:
            with torch.no_grad():
                scores, maps, classes = scorer.backend(torch.stack([d.tensor for d in decoded]).to(scorer.device))
            for d, score, amap, c in zip(decoded, scores.tolist(), maps.cpu(), classes.tolist(), strict=True):
                geometry = CropGeometry.of(d.rgb.shape[1], d.rgb.shape[0], scorer.resize, scorer.imagesize)
                name = scorer.classes[c]
                rows.append(_write_outputs(d, name, score, amap, geometry, scorer.thresholds[name], opts.output))
        bar.update(len(chunk))
    bar.close()
    new = {os.path.abspath(r["path"]) for r in rows}
    kept = [r for r in earlier if os.path.abspath(r["path"]) not in new]
    utils.save_text(predictions_csv(kept + rows), os.path.join(opts.output, PREDICTIONS_NAME))
    skipped = len(items) - len(rows)
    anomalous = sum(row["decision"] == ANOMALOUS for row in rows)
    LOG.info("scored %d image(s) (%d anomalous), skipped %d; results in %s", len(rows), anomalous, skipped,
             os.path.join(opts.output, PREDICTIONS_NAME))
    return 1 if skipped else 0


# ----------------------------------------------------------------------------------------------
# the Python API: inference.load(checkpoint)(image) -> Result
# ----------------------------------------------------------------------------------------------

# A scoring backend: normalised images float32 [B, 3, S, S] -> (image_scores [B], anomaly_maps [B, S, S],
# class index per image [B]); the PyTorch graph of a checkpoint or an exported file's runtime session.
Backend = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def default_methods() -> dict[str, type[Method]]:
    """The method registry by name (``methods.registry``, as ``runner.METHODS``, which this layer may not import)."""
    return methods.registry()


@dataclass(frozen=True)
class Result:
    """One scored image: its score and decision, and its anomaly map at the image's own size."""

    score: float  # image score
    decision: str  # ANOMALOUS (score > image_threshold) or NORMAL
    map: np.ndarray  # float32 [H, W]: anomaly-map scores of the original pixels, 0 outside the center crop
    mask: np.ndarray  # bool [H, W]: map > pixel_threshold inside the crop (the predict tool's *_mask.png)
    inside: np.ndarray  # bool [H, W]: the pixel lies in the center crop that the network sees
    classname: str  # the class that scored it (CRAS multi-class: the image's nearest class bank)
    image_threshold: float
    pixel_threshold: float


def to_rgb_image(image: object) -> Image.Image:
    """A path, a PIL image or a uint8 array [H, W, 3] (or [H, W], grayscale) -> 8-bit RGB PIL image, converted as
    training reads files (datasets.read_rgb / to_rgb8); a one-line UserError for anything else."""
    if isinstance(image, (str, os.PathLike)):
        try:
            return read_rgb(image)
        except IMAGE_READ_ERRORS as exc:
            raise UserError(f"{os.fspath(image)}: cannot read it as an image ({type(exc).__name__})") from exc
    if isinstance(image, Image.Image):
        return to_rgb8(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) \
                or 0 in image.shape:
            raise UserError(f"an image array must be uint8 [H, W, 3] (RGB) or [H, W] (grayscale), "
                            f"got {image.dtype} {list(image.shape)}")
        return to_rgb8(Image.fromarray(np.ascontiguousarray(image)))
    raise UserError(f"cannot score a {type(image).__name__}: give a path, a PIL image or a uint8 array [H, W, 3]")


class Scorer:
    """Scores images as ``main.py predict`` does, one at a time or in batches; built by ``load`` / ``load_exported``.

    ``scorer(image) -> Result``; ``scorer.score_all(images, batch_size) -> list[Result]``.
    """

    def __init__(self, backend: Backend, classes: list[str], thresholds: dict[str, tuple[float, float]],
                 resize: int, imagesize: int, device: torch.device, info: "ExportedInfo | None" = None):
        self.backend = backend
        self.info = info  # an exported file's metadata; None for a checkpoint
        self.classes = classes
        self.thresholds = thresholds  # class -> (image, pixel)
        self.resize, self.imagesize = resize, imagesize
        self.device = device
        self.transform = datasets.image_transform(resize, imagesize)

    def __call__(self, image: object) -> Result:
        return self.score_all([image])[0]

    def score_all(self, images: Sequence[object], batch_size: int = 8) -> list[Result]:
        """Results of ``images`` (each a path, PIL image or uint8 array), scored ``batch_size`` at a time."""
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        results = []
        for start in range(0, len(images), batch_size):
            rgbs = [to_rgb_image(image) for image in images[start:start + batch_size]]
            batch = torch.stack([self.transform(rgb) for rgb in rgbs]).to(self.device)  # [b, 3, S, S]
            with torch.no_grad():
                scores, maps, classes = self.backend(batch)  # [b], [b, S, S], [b]
            for rgb, score, amap, c in zip(rgbs, scores.tolist(), maps.cpu(), classes.tolist(), strict=True):
                results.append(self._result(rgb, score, amap, self.classes[c]))
        return results

    def _result(self, rgb: Image.Image, score: float, amap: torch.Tensor, name: str) -> Result:
        image_t, pixel_t = self.thresholds[name]
        scores, inside = to_original(amap, CropGeometry.of(rgb.width, rgb.height, self.resize, self.imagesize))
        return Result(score=score, decision=ANOMALOUS if score > image_t else NORMAL, map=scores.numpy(),
                      mask=((scores > pixel_t) & inside).numpy(), inside=inside.numpy(), classname=name,
                      image_threshold=image_t, pixel_threshold=pixel_t)


def load(checkpoint: str, device: str | torch.device = "cpu", precision: str = "fp32",
         threshold: float | None = None, pixel_threshold: float | None = None,
         methods: dict[str, type[Method]] | None = None) -> Scorer:
    """A trained PBAS/CRAS checkpoint -> a Scorer giving ``main.py predict``'s scores, decisions and maps.

    ``threshold`` / ``pixel_threshold`` None: the automatic ones (see the module docstring). ``methods``: the
    methods it may be of (default: all). One-line UserErrors for unusable checkpoints.
    """
    device = torch.device(device)
    model, ckpt = load_model(checkpoint, device, methods or default_methods(), precision)
    thresholds = resolve_thresholds(ckpt, threshold, pixel_threshold, checkpoint)
    return Scorer(model.graph().eval(), model.classes, thresholds, model.resize, model.method.config.imagesize, device)


# ----------------------------------------------------------------------------------------------
# exported files: their metadata, inference.load_exported
# ----------------------------------------------------------------------------------------------

METADATA_KEY = "pbas_cras_export"  # the ONNX metadata_props entry (JSON) that export writes
METADATA_VERSION = 1
METADATA_FIELDS = ("version", "method", "classes", "thresholds", "resize", "imagesize", "mean", "std", "format",
                   "precision", "quality", "graph_sha256")


@dataclass(frozen=True)
class ExportedInfo:
    """What an exported file is: its metadata (ONNX ``metadata_props[METADATA_KEY]``, JSON)."""

    method: str  # pbas / cras
    classes: list[str]  # the checkpoint's classes; the graph's 'classes' output indexes them
    thresholds: dict[str, list[float]] | None  # class -> [image, pixel], the automatic ones; None: none stored
    resize: int  # preprocessing: shorter side to resize, center crop imagesize, normalise with mean / std
    imagesize: int
    mean: list[float]
    std: list[float]
    format: str  # choices.EXPORT_FORMATS
    precision: str  # EXPORT_PRECISIONS
    quality: dict  # what export measured against float32 (empty at fp32)
    graph_sha256: str  # of the graph as written: a file changed after export is refused
    version: int = METADATA_VERSION

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name) for name in METADATA_FIELDS}, sort_keys=True)


def graph_digest(proto: onnx.ModelProto) -> str:
    """sha256 of the model's graph (deterministic serialisation), not of its metadata."""
    import hashlib

    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def exported_error(path: str, why: str) -> UserError:
    """The one-line refusal of an exported file ``path`` that is unusable because of ``why``."""
    return UserError(f"--model {path}: {why}; export it again with main.py export")


def check_exported_info(values: object, path: str, file_format: str) -> ExportedInfo:
    """The metadata dict of a ``file_format`` file -> ExportedInfo; a one-line UserError naming the first missing
    or malformed field."""
    if not isinstance(values, dict):
        raise exported_error(path, "its export metadata is not a JSON object")
    missing = [name for name in METADATA_FIELDS if name not in values]
    if missing:
        raise exported_error(path, f"its export metadata lacks {', '.join(missing)}")
    if values["version"] != METADATA_VERSION:
        raise exported_error(path, f"its export metadata is version {values['version']!r}; this version reads {METADATA_VERSION}")
    info = ExportedInfo(**{name: values[name] for name in METADATA_FIELDS})
    classes, thresholds = info.classes, info.thresholds
    checks = [
        (info.method in default_methods(), f"unknown method {info.method!r}"),
        (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes), "no class list"),
        (thresholds is None or (isinstance(thresholds, dict) and set(thresholds) == set(classes or []) and all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in t)
            for t in thresholds.values())), "thresholds that do not match its classes"),
        (isinstance(info.resize, int) and isinstance(info.imagesize, int) and info.resize > 0 and info.imagesize > 0,
         "no image size"),
        (info.mean == list(datasets.IMAGENET_MEAN) and info.std == list(datasets.IMAGENET_STD),
         "a normalisation other than ImageNet's, which this version does not apply"),
        (info.format == file_format, f"format {info.format!r}, but it is an {file_format} file"),
        (info.precision in EXPORT_PRECISIONS, f"unknown precision {info.precision!r}"),
        (isinstance(info.quality, dict), "no quality record"),
    ]
    for ok, why in checks:
        if not ok:
            raise exported_error(path, f"its export metadata has {why}")
    return info


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]


def read_exported(path: str) -> tuple[bytes, ExportedInfo]:
    """An ONNX file written by export -> (its bytes, its metadata). Parsing ONNX runs no code; anything else
    (a pickle, a foreign or older ONNX file, one changed after export, metadata that does not fit the graph)
    is a one-line UserError."""
    if os.path.isdir(path):
        raise UserError(f"--model {path} is a folder, not an exported model file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UserError(f"--model {path} cannot be read ({exc.strerror or type(exc).__name__})") from exc
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise UserError(f"--model {path} is not an ONNX file ({type(exc).__name__})") from exc
    if not proto.graph.node:
        raise UserError(f"--model {path} is not an ONNX model (no graph)")
    props = {entry.key: entry.value for entry in proto.metadata_props}
    if METADATA_KEY not in props:
        raise exported_error(path, "it holds no export metadata of this project (another tool's or an older export)")
    try:
        values = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise exported_error(path, f"its export metadata is not JSON ({exc.msg})") from exc
    info = check_exported_info(values, path, "onnx")
    if graph_digest(proto) != info.graph_sha256:
        raise exported_error(path, "its graph is not the one exported (the file was changed after export)")
    inputs = [(i.name, _dims(i)) for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if len(inputs) != 1 or inputs[0][0] != ONNX_INPUTS[0] or inputs[0][1][1:] != [3, info.imagesize, info.imagesize]:
        raise exported_error(path, f"its input {inputs} is not images [B, 3, {info.imagesize}, {info.imagesize}] as its metadata says")
    if outputs != list(ONNX_OUTPUTS):
        raise exported_error(path, f"its outputs {outputs} are not {list(ONNX_OUTPUTS)}")
    return data, info


def exported_thresholds(info: ExportedInfo, image: float | None, pixel: float | None, path: str
                        ) -> dict[str, tuple[float, float]]:
    """(image, pixel) thresholds per class from the file's metadata; given numbers replace them (as
    resolve_thresholds does for a checkpoint)."""
    if image is not None and pixel is not None:
        return {name: (image, pixel) for name in info.classes}
    if info.thresholds is None:
        raise UserError(f"--model {path} stores no automatic thresholds (its checkpoint had no normal training "
                        "scores); give --threshold and --pixel_threshold as numbers")
    return {name: (float(t[0]) if image is None else image, float(t[1]) if pixel is None else pixel)
            for name, t in info.thresholds.items()}


class OrtBackend:
    """An onnxruntime session as a Scorer backend: images [B, 3, S, S] -> (scores [B], maps [B, S, S], classes [B])."""

    def __init__(self, data: bytes, device: torch.device):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(data, providers=ort_providers(device))

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        got = self.session.run(list(ONNX_OUTPUTS), {ONNX_INPUTS[0]: images.float().cpu().numpy()})
        return tuple(torch.from_numpy(out) for out in got)


def load_exported(path: str, device: str | torch.device = "cpu", threshold: float | None = None,
                  pixel_threshold: float | None = None) -> Scorer:
    """A file written by ``main.py export`` -> the Scorer of ``load``: preprocessing, classes and thresholds from
    its metadata. An ONNX file is scored by onnxruntime (the CUDA provider for a GPU device), an OpenVINO one
    (its .xml) by OpenVINO on the CPU."""
    import openvino_ir  # imports openvino only when it reads a file

    device = torch.device(device)
    if path.endswith((openvino_ir.XML, openvino_ir.BIN)):
        model, info = openvino_ir.read(path)
        if device.type != "cpu":
            LOG.info("%s is an OpenVINO file: it runs on the CPU", path)
        backend: Backend = openvino_ir.OvBackend(model)
    else:
        data, info = read_exported(path)
        backend = OrtBackend(data, device)
    thresholds = exported_thresholds(info, threshold, pixel_threshold, path)
    return Scorer(backend, info.classes, thresholds, info.resize, info.imagesize, torch.device("cpu"), info)


# ----------------------------------------------------------------------------------------------
# the export tool
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet(loggers: Sequence[str], level: int = logging.WARNING) -> Iterator[None]:
    """Raise the named loggers to ``level`` for the duration (the ONNX optimiser logs every rewrite at INFO)."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def onnx_bytes(model: LoadedModel, opset: int = ONNX_OPSET) -> bytes:
    """The inference graph of ``model`` (a CPU fp32 copy) as a serialised ONNX model, dynamic batch axis.

    Exported with the dynamo exporter: the TorchScript one cannot export adaptive_avg_pool1d here.
    """
    wrapper = exportable(model)
    for module in wrapper.modules():  # the same graph; in-place activations cost the exporter ~20% more time
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    size = model.method.config.imagesize
    example = torch.randn(2, 3, size, size)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1)
    with quiet(ONNX_LOGGERS):
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=list(ONNX_INPUTS),
                                    output_names=list(ONNX_OUTPUTS), dynamic_shapes=({0: batch},), opset_version=opset,
                                    verbose=False)
    proto = program.model_proto
    written = {entry.domain: entry.version for entry in proto.opset_import}.get("", None)
    if written != opset:
        raise UserError(f"--opset {opset}: the exporter could not write this graph in that opset (got {written}); "
                        f"use --opset {ONNX_OPSET} or newer")
    return proto.SerializeToString()


def ort_providers(device: torch.device) -> list:
    """onnxruntime providers for ``device``: on a GPU the CUDA provider in true fp32 (``use_tf32=0``: it runs
    float32 MatMul/Conv as TF32 by default), the CPU provider taking what it cannot run; else the CPU."""
    if device.type == "cuda":
        return [(CUDA_PROVIDER, {"device_id": str(device.index or 0), "use_tf32": "0"}), CPU_PROVIDER]
    return [CPU_PROVIDER]


def node_placement(data: bytes, providers: list, images: np.ndarray) -> dict[str, collections.Counter]:
    """Where onnxruntime runs the floating-point nodes of a model, from one profiled run on ``images``
    [B, 3, S, S] float32: {provider: Counter(operator type)}. A session whose first provider is CUDA may still
    run single nodes on the CPU provider, which ``session.get_providers()`` does not show. Nodes with integer
    outputs only (shape arithmetic, which the CUDA provider deliberately leaves to the CPU) are not counted."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "placement")
        session = onnxruntime.InferenceSession(data, options, providers=providers)
        session.run(None, {ONNX_INPUTS[0]: images})
        with open(session.end_profiling()) as f:
            events = json.load(f)
    placed: dict[str, collections.Counter] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time") or "provider" not in args:
            continue
        if any(kind in FLOAT_TYPES for tensor in args.get("output_type_shape", []) for kind in tensor):  # [{type: shape}]
            placed.setdefault(args["provider"], collections.Counter())[args["op_name"]] += 1
    return placed
