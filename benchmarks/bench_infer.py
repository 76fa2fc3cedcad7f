"""Inference speed of PBAS: the PyTorch path (fp32, bf16 autocast) and the exported ONNX graph (onnxruntime).

Times ``inference.PBASInference`` (images -> image scores + anomaly maps: backbone, patch embedding,
projector, discriminator, upsampling, smoothing) on random normalised images already on the device,
so decoding and host-to-device copies are not included. Batch 1 gives the single-image latency, the
larger batch the throughput. Warm-up calls are not timed; on CUDA every call is synchronised. The
ONNX model runs with the CUDA provider when the device is a GPU and onnxruntime has it (inputs and
outputs bound on the GPU), else with the CPU provider.

The projector and discriminator are randomly initialised (their weights do not change the speed).
``--random_weights`` builds the backbone randomly initialised too, for machines without its pretrained
weights; without it a missing weights file is an error (no silent fallback).

    python benchmarks/bench_infer.py --random_weights                                     # wideresnet50, 288 px
    python benchmarks/bench_infer.py --backbone efficientnet_lite0 --output bench.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backbones  # noqa: E402
import inference  # noqa: E402
import pbas  # noqa: E402
import utils  # noqa: E402

DEFAULT_LAYERS = {"efficientnet_lite0": ("blocks.2", "blocks.4")}  # other backbones: the release's layer2, layer3
RELEASE_LAYERS = ("layer2", "layer3")


@dataclass
class Row:
    engine: str
    precision: str
    batch: int
    seconds: list[float]  # per timed call

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.seconds)

    @property
    def images_per_s(self) -> float:
        return self.batch / statistics.median(self.seconds)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="wideresnet50", help="backbone name (default: %(default)s)")
    p.add_argument("--layers", nargs="+", default=None, help="layers (default: blocks.2 blocks.4 for efficientnet_lite0, else layer2 layer3)")
    p.add_argument("--random_weights", action="store_true",
                   help="randomly initialised backbone (timing only; for machines without the pretrained weights)")
    p.add_argument("--imagesize", type=int, default=288, help="square input size S (default: %(default)s)")
    p.add_argument("--embed_dimension", type=int, default=1536, help="pretrain and target embedding size (default: %(default)s)")
    p.add_argument("--dsc_hidden", type=int, default=1024, help="discriminator hidden width (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s: cuda:0 when available)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32], help="batch sizes (default: %(default)s)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="PyTorch precisions (default: %(default)s)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per row (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each row (default: %(default)s)")
    p.add_argument("--no_onnx", action="store_true", help="skip the ONNX export and the onnxruntime rows")
    p.add_argument("--output", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)
    for name in ("imagesize", "embed_dimension", "dsc_hidden", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("--warmup must be non-negative and batch sizes positive")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise utils.UserError(f"--device {name}: not a device name (cpu, cuda, cuda:N, auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise utils.UserError("--device cuda: CUDA is not available")
    return device


def build_model(args: argparse.Namespace, precision: str, device: torch.device) -> pbas.PBAS:
    """A PBAS model of the benchmark's configuration (random heads), in eval mode on ``device``."""
    layers = tuple(args.layers or DEFAULT_LAYERS.get(args.backbone, RELEASE_LAYERS))
    config = pbas.PBASConfig(backbone=args.backbone, layers=layers, pretrain_embed_dimension=args.embed_dimension,
                             target_embed_dimension=args.embed_dimension, dsc_hidden=args.dsc_hidden,
                             imagesize=args.imagesize)
    _, stages = backbones.load_backbone(args.backbone, pretrained=not args.random_weights)
    backbones.check_layers(args.backbone, layers, stages)
    return pbas.PBAS(config, stages, precision).to(device).eval()


def time_calls(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``iters`` calls after ``warmup`` untimed ones (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def torch_rows(args: argparse.Namespace, device: torch.device) -> list[Row]:
    rows = []
    for precision in args.precisions:
        model = inference.PBASInference(build_model(args, precision, device)).eval()
        for batch in args.batch_sizes:
            images = torch.randn(batch, 3, args.imagesize, args.imagesize, device=device)
            with torch.no_grad():
                seconds = time_calls(lambda m=model, x=images: m(x), args.iters, args.warmup, device)
            rows.append(Row("PyTorch", precision, batch, seconds))
            print(f"PyTorch {precision} batch {batch}: {rows[-1].median_ms:.1f} ms", file=sys.stderr)
    return rows


def ort_call(session, images: torch.Tensor) -> Callable[[], object]:
    """One onnxruntime call on ``images``: numpy on the CPU, bound device memory on CUDA."""
    if images.device.type != "cuda":
        feed = {inference.ONNX_INPUTS[0]: images.cpu().numpy()}
        return lambda: session.run(list(inference.ONNX_OUTPUTS), feed)
    binding = session.io_binding()
    binding.bind_input(inference.ONNX_INPUTS[0], "cuda", images.device.index or 0, np.float32, tuple(images.shape),
                       images.data_ptr())
    for name in inference.ONNX_OUTPUTS:
        binding.bind_output(name, "cuda", images.device.index or 0)
    return lambda: session.run_with_iobinding(binding)


def onnx_rows(args: argparse.Namespace, device: torch.device) -> tuple[list[Row], str]:
    import onnxruntime

    data = inference.onnx_bytes(build_model(args, "fp32", torch.device("cpu")))
    cuda = device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if cuda:
        provider = ("CUDAExecutionProvider", {"device_id": device.index or 0})
    else:
        provider = "CPUExecutionProvider"
    session = onnxruntime.InferenceSession(data, providers=[provider])
    engine = f"onnxruntime {'CUDA' if cuda else 'CPU'}"
    run_on = device if cuda else torch.device("cpu")
    rows = []
    for batch in args.batch_sizes:
        images = torch.randn(batch, 3, args.imagesize, args.imagesize, device=run_on)
        rows.append(Row(engine, "fp32", batch, time_calls(ort_call(session, images), args.iters, args.warmup, run_on)))
        print(f"{engine} batch {batch}: {rows[-1].median_ms:.1f} ms", file=sys.stderr)
    note = "" if cuda or device.type != "cuda" else " (onnxruntime has no CUDA provider here: CPU rows)"
    return rows, note


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def markdown(args: argparse.Namespace, device: torch.device, rows: list[Row], note: str) -> str:
    weights = "random" if args.random_weights else "pretrained"
    layers = " ".join(args.layers or DEFAULT_LAYERS.get(args.backbone, RELEASE_LAYERS))
    lines = [
        f"Inference speed: {args.backbone} ({layers}, {weights} weights), {args.imagesize} px, D = {args.embed_dimension}, "
        f"{describe(device)}, torch {torch.__version__}; median of {args.iters} calls after {args.warmup} warm-up{note}.",
        "",
        "| engine | precision | batch | ms / batch | ms / image | images / s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.engine} | {r.precision} | {r.batch} | {r.median_ms:.1f} | {r.median_ms / r.batch:.1f} | {r.images_per_s:.1f} |")
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    utils.configure_precision("fp32")  # fp32 means fp32 (no TF32)
    rows = torch_rows(args, device)
    note = ""
    if not args.no_onnx:
        more, note = onnx_rows(args, device)
        rows += more
    table = markdown(args, device, rows, note)
    print(table)
    if args.output:
        utils.save_text(table, args.output)
    return 0


def cli() -> int:
    try:
        return run()
    except (utils.UserError, backbones.BackboneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
