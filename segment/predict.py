"""Use a trained segmenter: segment new images (masks and overlays at their original size) and ONNX export.

Each image is resized (shorter side = the checkpoint's resize) and center-cropped to imagesize, as in training.
The defect map (sigmoid of the logit) is mapped back to the original pixels through that geometry (bilinear);
pixels outside the crop are not seen: score 0, mask 0, uncoloured in the overlay. A pixel is a defect (mask
255) when its probability is above --pixel_threshold (default 0.5, the network's own decision); an image is
'anomalous' when its largest probability is above --threshold (default 0.5).
"""
from __future__ import annotations

import csv
import io
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import utils
from datasets import DatasetError, image_transform, read_rgb
from segment import networks, train
from utils import UserError

LOG = logging.getLogger("pbas")
DEFAULT_THRESHOLD = 0.5
OVERLAY_ALPHA = 0.5
PREDICTION_COLUMNS = ("path", "image_score", "decision", "threshold", "pixel_threshold", "defect_fraction", "overlay", "mask")
ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4
ONNX_INPUTS, ONNX_OUTPUTS = ("images",), ("image_scores", "defect_maps")


def to_original(prob: torch.Tensor, width: int, height: int, resize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The map of the center crop [S, S] at the original size: (scores [H, W], seen [H, W] bool).

    torchvision's Resize(resize) scales the shorter side to ``resize`` (the other by the same ratio, truncated);
    CenterCrop(S) takes offsets round((n - S) / 2)."""
    size = prob.shape[-1]
    if width <= height:
        rw, rh = resize, int(resize * height / width)
    else:
        rh, rw = resize, int(resize * width / height)
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    canvas = torch.zeros(rh, rw)
    seen = torch.zeros(rh, rw)
    canvas[top: top + size, left: left + size] = prob
    seen[top: top + size, left: left + size] = 1
    both = F.interpolate(torch.stack([canvas, seen])[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    inside = both[1] > 0.5
    return both[0] * inside, inside


def overlay(rgb: np.ndarray, scores: torch.Tensor, inside: torch.Tensor) -> np.ndarray:
    """Jet colours of the probabilities blended over the image inside the crop (uint8 [H, W, 3])."""
    colours = utils.jet(scores.numpy()).astype(np.float64)
    blend = (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * colours
    out = np.where(inside.numpy()[..., None], blend, rgb)
    return (out + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class PredictOptions:
    checkpoint: str
    inputs: list[str]
    output: str
    threshold: float
    pixel_threshold: float
    batch_size: int
    gpu: int | None


def load(path: str) -> tuple[networks.ScoreGraph, dict]:
    """The inference graph (CPU, eval) and configuration of a finished segmenter checkpoint."""
    ckpt = train.read(path)
    if not ckpt.get("complete"):
        raise UserError(f"{path} is an unfinished training state; finish the training first (run 'segment' again)")
    return networks.ScoreGraph(train.network_from(ckpt)).eval(), ckpt["config"]


def predict(opts: PredictOptions) -> int:
    """Segment the input images; 0 when all were written, 1 when unreadable images were skipped."""
    for value, option in ((opts.threshold, "--threshold"), (opts.pixel_threshold, "--pixel_threshold")):
        if not 0 <= value <= 1:
            raise UserError(f"{option} is a probability in [0, 1], got {value}")
    if opts.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {opts.batch_size}")
    graph, config = load(opts.checkpoint)
    items = [(item.path, item.name) for item in utils.collect_inputs(opts.inputs)]
    utils.check_writable_folder(opts.output, "--output")
    device = utils.select_device(opts.gpu)
    graph.to(device)
    net = config["net"]
    transform = image_transform(net["resize"], net["imagesize"])
    rows, failed = [], 0
    for start in range(0, len(items), opts.batch_size):
        decoded = []
        for path, stem in items[start: start + opts.batch_size]:
            try:
                decoded.append((path, stem, read_rgb(path)))
            except DatasetError as exc:
                print(f"skipped: {exc}", file=sys.stderr)
                failed += 1
        if not decoded:
            continue
        with torch.no_grad():
            scores, maps = graph(torch.stack([transform(img) for _, _, img in decoded]).to(device))
        for (path, stem, img), s, m in zip(decoded, scores.cpu(), maps.cpu()):
            prob, inside = to_original(m, img.width, img.height, net["resize"])
            mask = ((prob > opts.pixel_threshold) & inside).numpy().astype(np.uint8) * 255
            utils.save_png(overlay(np.asarray(img, dtype=np.float64), prob, inside), os.path.join(opts.output, f"{stem}_overlay.png"))
            utils.save_png(mask, os.path.join(opts.output, f"{stem}_mask.png"))
            rows.append([path, repr(float(s)), "anomalous" if float(s) > opts.threshold else "normal", opts.threshold,
                         opts.pixel_threshold, repr(float((mask > 0).mean())), f"{stem}_overlay.png", f"{stem}_mask.png"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    writer.writerows(rows)
    utils.save_text(out.getvalue(), os.path.join(opts.output, "predictions.csv"))
    LOG.info("segmented %d image(s) into %s%s", len(rows), opts.output, f"; {failed} skipped" if failed else "")
    return 1 if failed else 0


def onnx_bytes(graph: networks.ScoreGraph, imagesize: int, opset: int = ONNX_OPSET) -> bytes:
    """The inference graph as serialised ONNX (dynamo exporter), dynamic batch axis."""
    example = torch.randn(2, 3, imagesize, imagesize)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1)
    quiet = {name: logging.getLogger(name).level for name in ("onnxscript", "onnx_ir")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=list(ONNX_INPUTS),
                                    output_names=list(ONNX_OUTPUTS), dynamic_shapes=({0: batch},),
                                    opset_version=opset, verbose=False)
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    return program.model_proto.SerializeToString()


def export(checkpoint: str, output: str) -> int:
    """Write the checkpoint's graph as ONNX when it agrees with PyTorch within ONNX_TOLERANCE on random images
    (0); otherwise write nothing (1)."""
    if os.path.isdir(output):
        raise UserError(f"--output {output} is a folder; give a file name such as segmenter.onnx")
    utils.check_writable_folder(os.path.dirname(os.path.abspath(output)), "the folder of --output")
    graph, config = load(checkpoint)
    size = config["net"]["imagesize"]
    data = onnx_bytes(graph, size)
    diff = utils.onnx_difference(data, graph, torch.randn(3, 3, size, size))
    if max(diff) > ONNX_TOLERANCE:
        LOG.error("the ONNX graph differs from PyTorch by %.3g (scores) / %.3g (maps); not written", *diff)
        return 1
    utils.save_bytes(data, output)
    LOG.info("wrote %s: images [B, 3, %d, %d] -> image_scores [B], defect_maps [B, %d, %d]; max |ONNX - PyTorch| on "
             "3 random images: %.2g (scores), %.2g (maps)", output, size, size, size, size, *diff)
    return 0
