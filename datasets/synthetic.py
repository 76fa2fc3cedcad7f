"""Generator of a small synthetic anomaly-detection dataset in MVTec AD (or VisA) layout.

Two looks: "texture" (a woven, grain-like periodic texture) and "object" (a rounded square with a hole
on a plain background). Normal images vary by phase, pose, scale, brightness and pixel noise. Defect
images carry one clearly visible local defect (about 2.5-12 % of the image area) and a 0/255 mask.
Class names are free (e.g. the ITDD names); the look of each class is given by `kinds` (--kinds), else
by kind_of (a name starting with texture/object picks it, otherwise alternating by position).
The MVTec layout also serves as the MVTec-layout conversion of VisA (`dataset visa` without split_csv/).

    python -m datasets.synthetic ROOT [--classes texture object] [--kinds KIND ...] [--n_train 40] [--size 128]
                                      [--seed 0] [--layout mvtec|visa]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

KINDS = ("texture", "object")
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "texture": ("scratch", "spot", "discolor"),
    "object": ("scratch", "missing", "discolor"),
}
GOOD = "good"
IMAGE_NAME = "{:03d}.png"
MASK_NAME = "{:03d}_mask.png"
MARKER_FILE = ".synthetic"  # marks a class folder written here, so that a re-run may replace it
MIN_DEFECT_FRACTION = 0.025
MAX_DEFECT_FRACTION = 0.12
MAX_TRIES = 50
NOISE_STD = 0.02  # per-pixel Gaussian noise, in [0, 1] intensity units
TEXTURE_COLOUR = np.array([0.62, 0.48, 0.34])
OBJECT_COLOUR = np.array([0.30, 0.45, 0.72])
SPOT_COLOURS = np.array([[0.10, 0.09, 0.08], [0.65, 0.12, 0.10], [0.15, 0.40, 0.15]])
SCRATCH_COLOURS = np.array([[0.96, 0.96, 0.92], [0.06, 0.05, 0.05]])
VISA_SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")

Array = np.ndarray


@dataclass
class Scene:
    """A clean normal image as foreground over background with coverage alpha (all [H, W(, 3)])."""

    foreground: Array  # [H, W, 3]
    background: Array  # [H, W, 3]
    alpha: Array  # [H, W] in [0, 1]

    def compose(self, alpha: Array | None = None) -> Array:
        a = (self.alpha if alpha is None else alpha)[..., None]
        return a * self.foreground + (1.0 - a) * self.background  # [H, W, 3]

    @property
    def region(self) -> Array:
        """Where defects may go: fully covered foreground pixels."""
        return self.alpha > 0.99  # [H, W] bool


@dataclass
class Record:
    """One generated image: split (train/test), defect (good or type), uint8 image and optional mask."""

    split: str
    defect: str
    image: Array  # [H, W, 3] uint8
    mask: Array | None  # [H, W] uint8 0/255


# ----------------------------------------------------------------------------- normal images

def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates (yy, xx), each [size, size]."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(coords, coords, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> Array:
    """Periodic Gaussian-filtered white noise with unit std, correlation length ~scale pixels. [size, size]"""
    freq = np.fft.fftfreq(size)
    f2 = freq[:, None] ** 2 + freq[None, :] ** 2
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) * np.exp(-2.0 * (np.pi * scale) ** 2 * f2)
    noise = np.real(np.fft.ifft2(spectrum))
    return (noise - noise.mean()) / (noise.std() + 1e-12)


def _texture_scene(rng: np.random.Generator, size: int) -> Scene:
    """Woven texture with random phase, slight orientation/period jitter and grain."""
    yy, xx = _grid(size)
    theta = rng.uniform(-0.08, 0.08)
    period = size / 9.0 * rng.uniform(0.95, 1.05)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    phase = rng.uniform(0.0, 2.0 * np.pi, size=2)
    weave = np.sin(2 * np.pi * u / period + phase[0]) * np.sin(2 * np.pi * v / period + phase[1])
    value = 1.0 + 0.22 * weave + 0.08 * _smooth_noise(rng, size, size / 16) + 0.05 * _smooth_noise(rng, size, 1.5)
    value *= rng.uniform(0.94, 1.06)
    foreground = value[..., None] * TEXTURE_COLOUR  # [H, W, 3]
    background = np.full_like(foreground, 0.12)  # revealed by a "missing" defect
    return Scene(foreground, background, np.ones((size, size)))


def _rounded_square_sdf(px: Array, py: Array, half: float, corner: float) -> Array:
    """Signed distance (pixels, negative inside) to an axis-aligned rounded square."""
    qx = np.abs(px) - (half - corner)
    qy = np.abs(py) - (half - corner)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - corner


def _object_scene(rng: np.random.Generator, size: int) -> Scene:
    """Shaded rounded square with a round hole, jittered in pose/scale/brightness, on a grey background."""
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-0.03, 0.03, size=2) * size
    half = 0.28 * size * rng.uniform(0.96, 1.04)
    angle = rng.uniform(-np.pi / 12, np.pi / 12)
    dx, dy = xx - cx, yy - cy
    px = dx * np.cos(angle) + dy * np.sin(angle)
    py = -dx * np.sin(angle) + dy * np.cos(angle)
    body = np.clip(0.5 - _rounded_square_sdf(px, py, half, 0.35 * half), 0.0, 1.0)
    hole = np.clip(0.5 + np.hypot(dx, dy) - 0.32 * half, 0.0, 1.0)
    shading = 1.0 - 0.18 * (px + py) / (2 * half) + 0.03 * _smooth_noise(rng, size, size / 20)
    foreground = shading[..., None] * OBJECT_COLOUR * rng.uniform(0.93, 1.07)
    level = rng.uniform(0.78, 0.84) * (1.0 - 0.06 * yy / size)
    background = np.repeat(level[..., None], 3, axis=2)
    return Scene(foreground, background, body * hole)


SCENES: dict[str, Callable[[np.random.Generator, int], Scene]] = {
    "texture": _texture_scene,
    "object": _object_scene,
}


# ----------------------------------------------------------------------------- defects

def _random_point(rng: np.random.Generator, allowed: Array, margin: int) -> Array:
    """A random (y, x) pixel centre of `allowed` at least `margin` pixels from the border."""
    margin = max(1, margin)
    inner = np.zeros_like(allowed)
    inner[margin:-margin, margin:-margin] = allowed[margin:-margin, margin:-margin]
    candidates = np.flatnonzero(inner if inner.any() else allowed)
    flat = candidates[rng.integers(len(candidates))]
    return np.array(np.unravel_index(flat, allowed.shape), dtype=np.float64) + 0.5


def _blob(rng: np.random.Generator, size: int, centre: Array, radius: float) -> Array:
    """Irregular blob: a disc whose radius varies smoothly with the angle. [size, size] bool"""
    yy, xx = _grid(size)
    dy, dx = yy - centre[0], xx - centre[1]
    phi = np.arctan2(dy, dx)
    wobble = sum(rng.uniform(0.0, 0.15) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    return np.hypot(dy, dx) < radius * (1.0 + wobble)


def _segment(size: int, start: Array, end: Array, width: float) -> Array:
    """Pixels within width / 2 of the segment start-end (points as (y, x)). [size, size] bool"""
    yy, xx = _grid(size)
    direction = end - start
    t = ((yy - start[0]) * direction[0] + (xx - start[1]) * direction[1]) / max(direction @ direction, 1e-12)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(yy - start[0] - t * direction[0], xx - start[1] - t * direction[1]) <= width / 2


def _boundary(region: Array) -> Array:
    """Pixels of `region` with a 4-neighbour outside it. [H, W] bool"""
    padded = np.pad(region, 1, constant_values=False)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return region & ~inner


def _next_point(rng: np.random.Generator, region: Array, point: Array, low: float, high: float) -> Array:
    """A random pixel centre of region at distance in [low, high] from point (any region pixel if none)."""
    yy, xx = _grid(region.shape[0])
    distance = np.hypot(yy - point[0], xx - point[1])
    ring = region & (distance >= low) & (distance <= high)
    return _random_point(rng, ring if ring.any() else region, 1)


def _scratch(rng: np.random.Generator, scene: Scene) -> tuple[Array, Array]:
    """A thin bright or dark polyline of three segments whose vertices lie on the foreground."""
    size = scene.alpha.shape[0]
    point = _random_point(rng, scene.region, size // 8)
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(3):
        end = _next_point(rng, scene.region, point, 0.2 * size, 0.3 * size)
        mask |= _segment(size, point, end, max(2.0, size / 20))
        point = end
    mask &= scene.region
    image = scene.compose()
    image[mask] = 0.85 * SCRATCH_COLOURS[rng.integers(len(SCRATCH_COLOURS))] + 0.15 * image[mask]
    return image, mask


def _spot(rng: np.random.Generator, scene: Scene) -> tuple[Array, Array]:
    """A blob of a different colour that keeps a little of the underlying structure."""
    size = scene.alpha.shape[0]
    centre = _random_point(rng, scene.region, size // 8)
    mask = _blob(rng, size, centre, rng.uniform(0.1, 0.15) * size) & scene.region
    image = scene.compose()
    image[mask] = 0.8 * SPOT_COLOURS[rng.integers(len(SPOT_COLOURS))] + 0.2 * image[mask]
    return image, mask


def _missing(rng: np.random.Generator, scene: Scene) -> tuple[Array, Array]:
    """A bite out of the foreground's edge (or interior for textures), showing the background."""
    size = scene.alpha.shape[0]
    edge = _boundary(scene.region)
    centre = _random_point(rng, edge if edge.any() else scene.region, size // 8)
    bite = _blob(rng, size, centre, rng.uniform(0.14, 0.2) * size)
    mask = bite & (scene.alpha > 0.5)
    return scene.compose(np.where(bite, 0.0, scene.alpha)), mask


def _discolor(rng: np.random.Generator, scene: Scene) -> tuple[Array, Array]:
    """A region with shifted hue (channel rotation) or strongly reduced brightness."""
    size = scene.alpha.shape[0]
    centre = _random_point(rng, scene.region, size // 8)
    mask = _blob(rng, size, centre, rng.uniform(0.11, 0.16) * size) & scene.region
    image = scene.compose()
    if rng.random() < 0.5:
        image[mask] = image[mask][:, [1, 2, 0]]
    else:
        image[mask] = image[mask] * 0.5
    return image, mask


DEFECTS: dict[str, Callable[[np.random.Generator, Scene], tuple[Array, Array]]] = {
    "scratch": _scratch,
    "spot": _spot,
    "missing": _missing,
    "discolor": _discolor,
}


def _defective(rng: np.random.Generator, scene: Scene, defect: str) -> tuple[Array, Array]:
    """Draw a defect until its area fraction is in range (keeps the last non-empty one otherwise)."""
    best: tuple[Array, Array] | None = None
    for _ in range(MAX_TRIES):
        image, mask = DEFECTS[defect](rng, scene)
        if mask.any():
            best = (image, mask)
        if MIN_DEFECT_FRACTION <= mask.mean() <= MAX_DEFECT_FRACTION:
            return image, mask
    if best is None:
        raise RuntimeError(f"could not place a '{defect}' defect")
    return best


def _to_uint8(rng: np.random.Generator, image: Array) -> Array:
    """Add pixel noise and quantise to uint8 [H, W, 3]."""
    noisy = image + rng.normal(0.0, NOISE_STD, size=image.shape)
    return np.round(np.clip(noisy, 0.0, 1.0) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- class generation

def kind_of(classname: str, position: int) -> str:
    """Look of a class: a name starting with a kind picks it, otherwise alternate by position."""
    for kind in KINDS:
        if classname.startswith(kind):
            return kind
    return KINDS[position % len(KINDS)]


def _class_rng(seed: int, classname: str) -> np.random.Generator:
    """Independent, reproducible random stream per (seed, class name)."""
    return np.random.default_rng([seed, zlib.crc32(classname.encode("utf-8"))])


def _defect_counts(n_defect: int, defects: Sequence[str]) -> list[int]:
    """Spread n_defect images evenly over the defect types (first types get the remainder)."""
    base, extra = divmod(n_defect, len(defects))
    return [base + (i < extra) for i in range(len(defects))]


def generate_class(
    kind: str, rng: np.random.Generator, n_train: int, n_test_good: int, n_test_defect: int, size: int
) -> list[Record]:
    """All records of one class: train goods, test goods, then test defects type by type."""
    scene_of = SCENES[kind]
    records = [Record("train", GOOD, _to_uint8(rng, scene_of(rng, size).compose()), None) for _ in range(n_train)]
    records += [Record("test", GOOD, _to_uint8(rng, scene_of(rng, size).compose()), None) for _ in range(n_test_good)]
    defects = DEFECT_TYPES[kind]
    for defect, count in zip(defects, _defect_counts(n_test_defect, defects)):
        for _ in range(count):
            image, mask = _defective(rng, scene_of(rng, size), defect)
            records.append(Record("test", defect, _to_uint8(rng, image), mask.astype(np.uint8) * 255))
    return records


def _prepare_class_dir(path: str) -> None:
    """Create an empty class folder; replace it only if a previous run of this generator wrote it."""
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.isfile(os.path.join(path, MARKER_FILE)):
            raise FileExistsError(f"'{path}' exists and was not written by datasets.synthetic; choose an empty ROOT")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MARKER_FILE), "w", encoding="utf-8") as marker:
        marker.write("generated by datasets.synthetic\n")


def _save(array: Array, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def class_kinds(classes: Sequence[str], kinds: Sequence[str] | None = None) -> list[str]:
    """Look of each class: kinds[i] if kinds is given (one per class, each in KINDS), else kind_of()."""
    if kinds is None:
        return [kind_of(name, position) for position, name in enumerate(classes)]
    kinds = list(kinds)
    if len(kinds) != len(classes) or any(kind not in KINDS for kind in kinds):
        raise ValueError(
            f"kinds must give one of {', '.join(KINDS)} per class; got {kinds} for classes {list(classes)}"
        )
    return kinds


def _generated_classes(
    root: str,
    classes: Sequence[str],
    counts: tuple[int, int, int],
    size: int,
    seed: int,
    kinds: Sequence[str] | None = None,
) -> list[tuple[str, list[Record]]]:
    """(class name, records) per class, each class folder freshly prepared under root."""
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct and non-empty, got {list(classes)}")
    looks = class_kinds(classes, kinds)
    result = []
    for name, kind in zip(classes, looks):
        _prepare_class_dir(os.path.join(root, name))
        result.append((name, generate_class(kind, _class_rng(seed, name), *counts, size)))
    return result


def _csv_objects(path: str) -> set[str]:
    """The object names listed in a 1cls.csv file."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {row.get("object", "") for row in csv.DictReader(handle)}


def _drop_stale_split_csv(root: str, classes: Sequence[str]) -> None:
    """Remove ROOT/split_csv/1cls.csv if it lists only classes just rewritten in MVTec layout (their VisA
    files are gone), so that `dataset visa` on ROOT detects the MVTec layout; a CSV listing others stays."""
    path = os.path.join(root, VISA_SPLIT_CSV)
    if not os.path.isfile(path) or not _csv_objects(path) <= set(classes):
        return
    os.remove(path)
    folder = os.path.dirname(path)
    if not os.listdir(folder):
        os.rmdir(folder)


def make_dataset(
    root: str | os.PathLike,
    classes: Sequence[str] = ("texture", "object"),
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    size: int = 128,
    seed: int = 0,
    kinds: Sequence[str] | None = None,
) -> None:
    """Write a synthetic dataset in MVTec AD layout under root (deterministic for a seed).

    kinds: the look ("texture" or "object") of each class, in class order; None: kind_of(). The root also
    works as MVTec-layout VisA (a 1cls.csv this generator left for only these classes is removed).
    """
    root = os.fspath(root)
    generated = _generated_classes(root, classes, (n_train, n_test_good, n_test_defect), size, seed, kinds)
    _drop_stale_split_csv(root, classes)
    for name, records in generated:
        counters: dict[tuple[str, str], int] = {}
        for record in records:
            index = counters.get((record.split, record.defect), 0)
            counters[(record.split, record.defect)] = index + 1
            _save(record.image, os.path.join(root, name, record.split, record.defect, IMAGE_NAME.format(index)))
            if record.mask is not None:
                _save(record.mask, os.path.join(root, name, "ground_truth", record.defect, MASK_NAME.format(index)))


def make_visa_dataset(
    root: str | os.PathLike,
    classes: Sequence[str] = ("texture", "object"),
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    size: int = 128,
    seed: int = 0,
    kinds: Sequence[str] | None = None,
) -> None:
    """Write a synthetic dataset in prepared-VisA layout: CLASS/Data/{Images,Masks}/... and (re)write
    split_csv/1cls.csv listing only these classes (deterministic for a seed); kinds as in make_dataset."""
    root = os.fspath(root)
    rows: list[dict[str, str]] = []
    for name, records in _generated_classes(root, classes, (n_train, n_test_good, n_test_defect), size, seed, kinds):
        counters = {"Normal": 0, "Anomaly": 0}
        for record in records:
            folder = "Normal" if record.mask is None else "Anomaly"
            file_name = IMAGE_NAME.format(counters[folder])
            counters[folder] += 1
            image = f"{name}/Data/Images/{folder}/{file_name}"
            mask = "" if record.mask is None else f"{name}/Data/Masks/{folder}/{file_name}"
            _save(record.image, os.path.join(root, image))
            if record.mask is not None:
                _save(record.mask, os.path.join(root, mask))
            label = "normal" if record.mask is None else "anomaly"
            rows.append({"object": name, "split": record.split, "label": label, "image": image, "mask": mask})
    _write_csv(os.path.join(root, VISA_SPLIT_CSV), rows)


def _write_csv(path: str, rows: list[dict[str, str]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(VISA_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: python -m datasets.synthetic ROOT [options]."""
    parser = argparse.ArgumentParser(description="Write a small synthetic anomaly-detection dataset.")
    parser.add_argument("root", help="output folder (class folders are created inside)")
    parser.add_argument("--classes", nargs="+", default=["texture", "object"],
                        help="class names; a name starting with texture/object picks that look")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=None,
                        help="look of each class, one per --classes name (default: from the name / alternating)")
    parser.add_argument("--n_train", type=int, default=40)
    parser.add_argument("--n_test_good", type=int, default=10)
    parser.add_argument("--n_test_defect", type=int, default=10, help="defect images per class, spread over types")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("mvtec", "visa"), default="mvtec")
    args = parser.parse_args(argv)
    if args.kinds is not None and len(args.kinds) != len(args.classes):
        parser.error(f"--kinds needs one look per class: {len(args.classes)} classes, {len(args.kinds)} kinds")
    writer = make_dataset if args.layout == "mvtec" else make_visa_dataset
    writer(args.root, args.classes, args.n_train, args.n_test_good, args.n_test_defect, args.size, args.seed,
           kinds=args.kinds)
    print(f"wrote {args.layout} layout classes {', '.join(args.classes)} under {args.root}")


if __name__ == "__main__":
    main()
