"""Training/evaluation speed of PBAS, uncached vs feature-cached, on data shaped like MVTec AD carpet.

One run generates the data (280 train, 28 good + 89 defective test images, 1024x1024 PNGs) unless
--data points to it, then for each path (uncached: backbone every pass; cached: every set embedded
once) measures the embedding of the sets (time to first epoch), the center-initialization pass, a
training epoch, a per-epoch evaluation (I-AUROC + P-AUROC), the final evaluation (AP, PRO, AUPRO) and
peak GPU memory, and projects the release protocol (640 epochs, evaluation after every epoch) for this
class and for all of MVTec AD (3629 train / 1725 test images). It checks that both paths give the
same metrics after the measured epochs (same seed). Extra --precision values time the cached path in
that precision and report the metric differences from fp32.

    python benchmarks/bench_train.py --random_weights                       # the full-size benchmark (GPU)
    python benchmarks/bench_train.py --random_weights --n_train 16 --n_test_good 4 --n_test_defect 8 \\
        --image_size 256 --imagesize 128 --resize 128 --epochs 2             # a quick CPU check
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backbones  # noqa: E402
import datasets  # noqa: E402
import main  # noqa: E402
import pbas  # noqa: E402
import utils  # noqa: E402

MVTEC_TRAIN, MVTEC_TEST = 3629, 1725  # images in all of MVTec AD
PROTOCOL_EPOCHS = 640


def make_carpet_like(root: str, n_train: int, n_good: int, n_defect: int, size: int, seed: int = 0) -> None:
    """A woven-looking texture class in MVTec layout; defects are dark blobs with masks. Fast (numpy + PIL)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size

    def texture() -> np.ndarray:
        fx, fy, phase = rng.uniform(40, 44), rng.uniform(40, 44), rng.uniform(0, 2 * np.pi, 2)
        weave = 0.5 + 0.25 * np.sin(2 * np.pi * fx * x + phase[0]) * np.sin(2 * np.pi * fy * y + phase[1])
        base = np.stack([weave * c for c in rng.uniform(0.5, 0.9, 3)], -1)
        return np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1)

    def save(img: np.ndarray, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray((img * 255).astype(np.uint8)).save(path, compress_level=1)

    for i in range(n_train):
        save(texture(), f"{root}/carpet/train/good/{i:03d}.png")
    for i in range(n_good):
        save(texture(), f"{root}/carpet/test/good/{i:03d}.png")
    for i in range(n_defect):
        img = texture()
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.04, 0.1)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        img[mask] *= 0.3
        save(img, f"{root}/carpet/test/hole/{i:03d}.png")
        save(np.repeat(mask[..., None], 3, -1).astype(np.float64), f"{root}/carpet/ground_truth/hole/{i:03d}_mask.png")


@dataclass
class PathTiming:
    name: str
    embed_s: float  # embedding train + test sets (cached) / 0 (uncached: done in every pass)
    center_s: float
    epoch_s: float
    eval_s: float
    final_eval_s: float
    peak_gib: float
    metrics: dict
    n_train: int
    n_test: int

    def first_epoch_s(self) -> float:
        return self.embed_s + self.center_s

    def protocol_s(self, n_train: int, n_test: int) -> float:
        """Release protocol scaled to n_train / n_test images from the measured per-image rates."""
        rt, re = n_train / self.n_train, n_test / self.n_test
        embed_train = self.embed_s * self.n_train / (self.n_train + self.n_test)
        embed_test = self.embed_s - embed_train
        return (embed_train * rt + embed_test * re + self.center_s * rt
                + PROTOCOL_EPOCHS * (self.epoch_s * rt + self.eval_s * re) + self.final_eval_s * re)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def measure(args, stages, train_ds, test_ds, device, cache: str, precision: str) -> PathTiming:
    utils.set_seed(args.seed)
    utils.configure_precision(precision)
    config = pbas.PBASConfig(backbone=args.backbone, imagesize=args.imagesize, batch_size=args.batch_size)
    model = pbas.PBAS(config, stages, precision).to(device)
    source = lambda ds: pbas.FeatureSource(model, ds, args.batch_size, args.num_workers, device, cache)
    train, test = source(train_ds), source(test_ds)
    test_set = main.load_test_set(test_ds, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    embed_s, _ = timed(device, lambda: (train.prepare(), test.prepare()))
    center_s, _ = timed(device, lambda: pbas.initialize(model, train, args.seed))
    epoch_times, eval_times, result = [], [], {}
    for epoch in range(args.epochs):
        t, _ = timed(device, lambda: pbas.train_epoch(model, train, pbas.epoch_order(len(train), args.seed, epoch + 1)))
        epoch_times.append(t)
        t, (result, _, _) = timed(device, lambda: pbas.evaluate(model, test, test_set, full=False))
        eval_times.append(t)
    final_s, (final, _, _) = timed(device, lambda: pbas.evaluate(model, test, test_set, full=True))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    # the first epoch/evaluation include warm-up (cuDNN autotuning, allocator growth): drop it when we can
    steady = lambda ts: float(np.mean(ts[1:] if len(ts) > 1 else ts))
    return PathTiming(f"{cache if cache == 'off' else 'cached'} {precision}", embed_s, center_s, steady(epoch_times),
                      steady(eval_times), final_s, peak, final, len(train_ds), len(test_ds))


def fmt_s(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def table(rows: list[PathTiming]) -> str:
    head = ("| path | embed sets (first epoch) | center init | train epoch | eval / epoch | final eval | peak GPU mem "
            "| protocol, this class | protocol, MVTec AD | I-AUROC | P-AUROC |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        lines.append(f"| {r.name} | {fmt_s(r.first_epoch_s())} | {fmt_s(r.center_s)} | {fmt_s(r.epoch_s)} | {fmt_s(r.eval_s)} "
                     f"| {fmt_s(r.final_eval_s)} | {'n/a' if math.isnan(r.peak_gib) else f'{r.peak_gib:.1f} GiB'} "
                     f"| {fmt_s(r.protocol_s(r.n_train, r.n_test))} | {fmt_s(r.protocol_s(MVTEC_TRAIN, MVTEC_TEST))} "
                     f"| {100 * r.metrics['image_auroc']:.2f} | {100 * r.metrics['pixel_auroc']:.2f} |")
    return "\n".join(lines)


def main_cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="existing data root with a 'carpet' class (default: generate into --workdir)")
    ap.add_argument("--workdir", default="/tmp/pbas_bench", help="where generated data goes")
    ap.add_argument("--n_train", type=int, default=280)
    ap.add_argument("--n_test_good", type=int, default=28)
    ap.add_argument("--n_test_defect", type=int, default=89)
    ap.add_argument("--image_size", type=int, default=1024, help="side of the generated PNGs")
    ap.add_argument("--imagesize", type=int, default=288)
    ap.add_argument("--resize", type=int, default=288)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--num_workers", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3, help="epochs measured per path (the first is warm-up when > 1)")
    ap.add_argument("--backbone", default="wideresnet50", choices=list(backbones.BACKBONES))
    ap.add_argument("--random_weights", action="store_true", help="random-initialised backbone (timing only)")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=list(pbas.PRECISIONS),
                    help="precisions for the cached path (fp32 first: the others are compared with it)")
    ap.add_argument("--skip_uncached", action="store_true")
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", help="also write the markdown table to this file")
    args = ap.parse_args()

    device = utils.pick_device(args.gpu)
    root = args.data or os.path.join(args.workdir, f"carpet_{args.n_train}_{args.n_test_good}_{args.n_test_defect}_{args.image_size}")
    if not args.data and not os.path.isdir(os.path.join(root, "carpet")):
        t, _ = timed(device, lambda: make_carpet_like(root, args.n_train, args.n_test_good, args.n_test_defect, args.image_size))
        print(f"generated {root} in {t:.1f} s", file=sys.stderr)
    train_ds, test_ds = datasets.build_datasets("mvtec", root, "carpet", args.resize, args.imagesize)
    _, stages = backbones.load_backbone(args.backbone, pretrained=not args.random_weights)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; {len(train_ds)} train / {len(test_ds)} test images of {args.image_size} px -> {args.imagesize} px; "
          f"backbone {args.backbone}{' (random weights)' if args.random_weights else ''}; {args.epochs} epochs per path", file=sys.stderr)

    rows = []
    if not args.skip_uncached:
        rows.append(measure(args, stages, train_ds, test_ds, device, "off", "fp32"))
    for precision in args.precision:
        rows.append(measure(args, stages, train_ds, test_ds, device, "device", precision))
    report = [f"device: {name}, torch {torch.__version__}", "", table(rows), ""]
    cached = next(r for r in rows if r.name == "cached fp32") if "fp32" in args.precision else None
    if cached is not None and not args.skip_uncached:
        uncached = rows[0]
        report.append(f"cached/uncached: train epoch x{uncached.epoch_s / cached.epoch_s:.1f} faster, eval x{uncached.eval_s / cached.eval_s:.1f} "
                      f"faster, protocol x{uncached.protocol_s(uncached.n_train, uncached.n_test) / cached.protocol_s(cached.n_train, cached.n_test):.1f} faster")
        diffs = {k: abs(uncached.metrics[k] - cached.metrics[k]) for k in ("image_auroc", "pixel_auroc", "image_ap", "pixel_ap", "pixel_pro")}
        same = all(d <= 1e-4 for d in diffs.values())
        report.append(f"same metrics (fp32, seed {args.seed}, {args.epochs} epochs): {'yes' if same else 'NO'}; "
                      f"max |difference| {max(diffs.values()):.2e}")
    if cached is not None:
        for r in rows:
            if r.name.startswith("cached") and r is not cached:
                d = max(abs(r.metrics[k] - cached.metrics[k]) for k in ("image_auroc", "pixel_auroc"))
                report.append(f"{r.name}: max metric difference from fp32 {100 * d:.2f} points")
    text = "\n".join(report)
    print(text)
    if args.output:
        utils.save_text(text + "\n", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
