"""Inference speed of PBAS or CRAS: the PyTorch path (per --precisions), the exported ONNX graph (onnxruntime)
and its OpenVINO IR (OpenVINO, CPU).

Times ``inference.InferenceGraph`` (images -> image scores + anomaly maps: backbone, patch embedding,
projector, discriminator, upsampling, smoothing; CRAS also the class vote and the nearest-center search in
the voted bank) on random normalised images already on the device, so decoding and host-to-device copies
are not included. Batch 1 gives the single-image latency, the larger batch the throughput. Warm-up calls
are not timed; on CUDA every call is synchronised. The ONNX model is ``inference.onnx_bytes`` of the same
method (``ExportGraph``: fp32, CPU export); it runs with the CUDA provider when the device is a GPU and
onnxruntime offers it (true fp32: ``use_tf32=0``; inputs and outputs bound on the GPU), else with the CPU
provider. Each onnxruntime row is labelled by the provider the session actually uses (its first active
provider); a GPU run whose session fell back to the CPU says so, and floating-point nodes that a CUDA session
placed on the CPU provider (found by a profiled run) are named in the table's note.
The int8 rows (``--onnx_precisions``) time ``deploy.quantize_int8`` of the same fp32 graph (what ``main.py export
--precision int8`` writes), calibrated on ``--calibration_images`` random images, on the CPU provider; the header
names the CPU's integer ISA (AMX, AVX-512 VNNI, AVX-VNNI, AVX-512, AVX2), on which int8 speed depends.
The OpenVINO rows (``--openvino_precisions``) run what ``export --format openvino`` writes from the same graphs
(fp32; fp16 weights; int8: the QDQ graph above), compiled as ``predict --model NAME.xml`` compiles them
(float32 inference precision, openvino_ir.py) with as many threads as PyTorch uses.

The method is built as ``inference.load_model`` builds a checkpoint's, with randomly initialised projector
and discriminator (their weights do not change the speed). CRAS scores with the per-image class vote
(``class_vote`` "image", as predict and export) and a random center bank [C, H*W, D] of --n_classes classes
(default 15, MVTec AD's multi-class model). ``--random_weights`` builds the backbone randomly initialised
too, for machines without its pretrained weights; without it a missing weights file is an error (no silent
fallback).

    python benchmarks/bench_infer.py --random_weights                                     # PBAS, wideresnet50, 288 px
    python benchmarks/bench_infer.py --random_weights --method cras                       # CRAS, 15 class banks
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
import deploy  # noqa: E402
import engine  # noqa: E402
import inference  # noqa: E402
import pbas  # noqa: E402
import runner  # noqa: E402
import utils  # noqa: E402
from choices import EXPORT_PRECISIONS, PRECISIONS  # noqa: E402
from common import Embedder  # noqa: E402

METHODS = runner.METHODS
DEFAULT_LAYERS = {"efficientnet_lite0": ("blocks.2", "blocks.4")}  # other backbones: the release's layer2, layer3
RELEASE_LAYERS = ("layer2", "layer3")
CRAS_CLASSES = 15  # MVTec AD's classes: the bank count of CRAS's multi-class model
CUDA_PROVIDER, CPU_PROVIDER = inference.CUDA_PROVIDER, inference.CPU_PROVIDER


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
    p.add_argument("--method", choices=list(METHODS), default="pbas", help="pbas or cras (default: %(default)s)")
    p.add_argument("--n_classes", type=int, default=None,
                   help=f"CRAS: class banks in the center (default: {CRAS_CLASSES}); PBAS: always 1")
    p.add_argument("--backbone", default="wideresnet50", help="backbone name (default: %(default)s)")
    p.add_argument("--layers", nargs="+", default=None, help="layers (default: blocks.2 blocks.4 for efficientnet_lite0, else layer2 layer3)")
    p.add_argument("--random_weights", action="store_true",
                   help="randomly initialised backbone (timing only; for machines without the pretrained weights)")
    p.add_argument("--imagesize", type=int, default=288, help="square input size S (default: %(default)s)")
    p.add_argument("--embed_dimension", type=int, default=1536, help="pretrain and target embedding size D (default: %(default)s)")
    p.add_argument("--dsc_layers", type=int, default=None, help="discriminator depth (default: the method's, pbas 2, cras 3)")
    p.add_argument("--dsc_hidden", type=int, default=None, help="PBAS: discriminator hidden width (default: 1024)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s: cuda:0 when available)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32], help="batch sizes (default: %(default)s)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS),
                   help="PyTorch precisions (default: %(default)s)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per row (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each row (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, centers and images (default: %(default)s)")
    p.add_argument("--no_onnx", action="store_true", help="skip the ONNX export, the onnxruntime and the OpenVINO rows")
    p.add_argument("--onnx_precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"],
                   help="onnxruntime rows: the fp32 export and/or its int8 quantization as export writes it, "
                        "always on the CPU provider (default: %(default)s)")
    p.add_argument("--openvino_precisions", nargs="*", default=["fp32", "fp16", "int8"], choices=list(EXPORT_PRECISIONS),
                   help="OpenVINO rows (CPU), as export --format openvino writes them; none: no OpenVINO rows "
                        "(default: %(default)s)")
    p.add_argument("--calibration_images", type=int, default=8,
                   help="int8: random images to calibrate on (the speed does not depend on them; default: %(default)s)")
    p.add_argument("--output", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.method == "pbas" and args.dsc_hidden is None:
        args.dsc_hidden = pbas.PBASConfig.dsc_hidden
    if args.method == "cras" and args.dsc_hidden is not None:
        p.error("--dsc_hidden is PBAS's: CRAS's discriminator halves its width at every layer")
    if args.method == "pbas" and args.n_classes not in (None, 1):
        p.error("--n_classes: PBAS models have one class")
    args.n_classes = args.n_classes or (CRAS_CLASSES if args.method == "cras" else 1)
    args.dsc_layers = args.dsc_layers or METHODS[args.method].Config.dsc_layers
    for name in ("imagesize", "embed_dimension", "dsc_layers", "iters", "n_classes"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.dsc_hidden is not None and args.dsc_hidden < 1:
        p.error("--dsc_hidden must be at least 1")
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
    if device.type == "cuda":
        device = utils.select_device(device.index or 0)  # the current device: nothing opens a context on GPU 0
    return device


def layers_of(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.layers or DEFAULT_LAYERS.get(args.backbone, RELEASE_LAYERS))


def build_model(args: argparse.Namespace, precision: str, device: torch.device) -> inference.LoadedModel:
    """The benchmark's method with random heads (and for CRAS a random center bank), in eval mode on ``device``,
    as inference.load_model builds a checkpoint's: Embedder + Encoder + the method, CRAS with the per-image vote."""
    method_cls = METHODS[args.method]
    values = dict(backbone=args.backbone, layers=layers_of(args), pretrain_embed_dimension=args.embed_dimension,
                  target_embed_dimension=args.embed_dimension, imagesize=args.imagesize, dsc_layers=args.dsc_layers)
    if args.method == "pbas":
        values["dsc_hidden"] = args.dsc_hidden
    else:
        values["class_vote"] = inference.PER_IMAGE_VOTE
    config = method_cls.Config(**values)
    utils.set_seed(args.seed)  # the same random weights for every precision
    _, stages = backbones.load_backbone(args.backbone, pretrained=not args.random_weights)
    backbones.check_layers(args.backbone, config.layers, stages)
    embedder = Embedder(stages, config.layers, config.patchsize, config.pretrain_embed_dimension,
                        config.target_embed_dimension)
    encoder = engine.Encoder(embedder.to(device), precision, config.train_backbone)
    method = method_cls(config, args.n_classes, precision).to(device)
    if method.needs_center_to_score:  # CRAS: one random bank [H*W, D] per class
        h, w = encoder.grid(args.imagesize, device)
        method.center = torch.randn(args.n_classes, h * w, args.embed_dimension, device=device)
    method.eval()
    classes = [f"class{c}" for c in range(args.n_classes)]
    return inference.LoadedModel(encoder, method, classes, args.imagesize)


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
        utils.configure_precision(precision, device)  # fp32 means fp32 (no TF32); tf32 turns it on
        graph = build_model(args, precision, device).graph().eval()
        for batch in args.batch_sizes:
            images = torch.randn(batch, 3, args.imagesize, args.imagesize, device=device)
            with torch.no_grad():
                seconds = time_calls(lambda g=graph, x=images: g(x), args.iters, args.warmup, device)
            rows.append(Row("PyTorch", precision, batch, seconds))
            print(f"PyTorch {precision} batch {batch}: {rows[-1].median_ms:.1f} ms", file=sys.stderr)
    utils.configure_precision("fp32", device)
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


def cpu_nodes_note(data: bytes, providers: list, imagesize: int) -> str:
    """'' when every floating-point node runs on the CUDA provider; else a note naming those on the CPU provider."""
    images = np.random.default_rng(0).standard_normal((1, 3, imagesize, imagesize), dtype=np.float32)
    on_cpu = inference.node_placement(data, providers, images).get(CPU_PROVIDER)
    if not on_cpu:
        return ""
    return (f"; {sum(on_cpu.values())} floating-point node(s) ran on the CPU provider "
            f"({', '.join(f'{op} x{n}' for op, n in sorted(on_cpu.items()))}): the CUDA rows include their copies")


def onnx_session(data: bytes, device: torch.device, imagesize: int):
    """An onnxruntime session of the model: the CUDA provider (true fp32, ``use_tf32=0``) on a GPU when
    onnxruntime offers it, else the CPU. Nodes the CUDA session places on the CPU provider are named in the note.

    -> (session, row label naming the provider the session actually uses, note for the table header)
    """
    import onnxruntime

    available = onnxruntime.get_available_providers()
    want_cuda = device.type == "cuda"
    providers = inference.ort_providers(device if want_cuda and CUDA_PROVIDER in available else torch.device("cpu"))
    session = onnxruntime.InferenceSession(data, providers=providers)
    active = session.get_providers()
    label = f"onnxruntime {active[0]}"
    note = cpu_nodes_note(data, providers, imagesize) if active[0] == CUDA_PROVIDER else ""
    if want_cuda and active[0] != CUDA_PROVIDER:
        if CUDA_PROVIDER in available:
            reason = f"{CUDA_PROVIDER} requested but not active (session providers: {', '.join(active)})"
        else:
            reason = f"onnxruntime offers no {CUDA_PROVIDER} here (available: {', '.join(available)})"
        label += f" (CUDA requested, {CUDA_PROVIDER} not active)"
        note = f"; the onnxruntime rows ran on the CPU: {reason}"
    return session, label, note


def onnx_rows(args: argparse.Namespace, device: torch.device) -> tuple[list[Row], str]:
    data = inference.onnx_bytes(build_model(args, "fp32", torch.device("cpu")))
    rows, note = [], ""
    if "fp32" in args.onnx_precisions:
        session, label, note = onnx_session(data, device, args.imagesize)
        run_on = device if session.get_providers()[0] == CUDA_PROVIDER else torch.device("cpu")
        for batch in args.batch_sizes:
            images = torch.randn(batch, 3, args.imagesize, args.imagesize, device=run_on)
            rows.append(Row(label, "fp32", batch, time_calls(ort_call(session, images), args.iters, args.warmup, run_on)))
            print(f"{label} batch {batch}: {rows[-1].median_ms:.1f} ms", file=sys.stderr)
    int8 = None
    if "int8" in args.onnx_precisions or "int8" in args.openvino_precisions:
        generator = torch.Generator().manual_seed(args.seed)
        calibration = torch.randn(args.calibration_images, 3, args.imagesize, args.imagesize, generator=generator)
        int8 = deploy.quantize_int8(data, calibration.numpy())
    if "int8" in args.onnx_precisions:
        session, label, _ = onnx_session(int8, torch.device("cpu"), args.imagesize)
        for batch in args.batch_sizes:
            images = torch.randn(batch, 3, args.imagesize, args.imagesize)
            rows.append(Row(label, "int8 (QDQ)", batch, time_calls(ort_call(session, images), args.iters, args.warmup,
                                                                   torch.device("cpu"))))
            print(f"{label} int8 batch {batch}: {rows[-1].median_ms:.1f} ms", file=sys.stderr)
    for precision in args.openvino_precisions:
        rows += openvino_rows(args, int8 if precision == "int8" else data, precision)
    return rows, note


def openvino_rows(args: argparse.Namespace, data: bytes, precision: str) -> list[Row]:
    """The IR that export --format openvino writes from ``data`` at ``precision``, compiled as predict compiles it."""
    import openvino_ir

    compiled = openvino_ir.compile_model(openvino_ir.model_from_onnx(data, precision == "fp16"), torch.get_num_threads())
    rows = []
    for batch in args.batch_sizes:
        images = np.random.default_rng(args.seed).standard_normal((batch, 3, args.imagesize, args.imagesize),
                                                                  dtype=np.float32)
        seconds = time_calls(lambda x=images: openvino_ir.outputs_of(compiled, x), args.iters, args.warmup,
                             torch.device("cpu"))
        rows.append(Row("OpenVINO CPU", precision + (" (QDQ)" if precision == "int8" else ""), batch, seconds))
        print(f"OpenVINO {precision} batch {batch}: {rows[-1].median_ms:.1f} ms", file=sys.stderr)
    return rows


def cpu_isa() -> str:
    """The widest integer-matrix ISA of this CPU (Linux /proc/cpuinfo flags): AMX, AVX-512 VNNI, AVX-VNNI,
    AVX-512, AVX2, or 'unknown ISA'."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown ISA"
    for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                       ("avx512f", "AVX-512 (no VNNI)"), ("avx2", "AVX2 (no VNNI)")):
        if flag in flags:
            return name
    return "unknown ISA"


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (int8 rows: CPU, {cpu_isa()})"
    return f"CPU ({cpu_isa()}), {torch.get_num_threads()} threads"


def markdown(args: argparse.Namespace, device: torch.device, rows: list[Row], note: str) -> str:
    weights = "random" if args.random_weights else "pretrained"
    layers = " ".join(layers_of(args))
    if args.method == "cras":
        heads = f"CRAS, dsc_layers {args.dsc_layers}, {args.n_classes} class banks, per-image class vote"
    else:
        heads = f"PBAS, dsc_layers {args.dsc_layers}, dsc_hidden {args.dsc_hidden}"
    lines = [
        f"Inference speed: {heads}; {args.backbone} ({layers}, {weights} weights), {args.imagesize} px, "
        f"D = {args.embed_dimension}, {describe(device)}, torch {torch.__version__}; median of {args.iters} calls "
        f"after {args.warmup} warm-up{note}.",
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
