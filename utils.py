"""Run-folder helpers: atomic writes, seeding, devices, heatmap images, the results table."""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import math
import os
import pickle
import random
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from datasets import IMAGENET_MEAN, IMAGENET_STD, split_job_name
from datasets.base import IMAGE_EXTENSIONS
from errors import UserError

LOG = logging.getLogger("pbas")
CHECKPOINT_FORMAT = 3  # 2: a 'method' field, per-class metrics and centers [C, H*W, D] for multi-class jobs;
# 3: the backbone's BatchNorm statistics ('backbone_stats') and the random stream of the releases
# What torch.load raises on a file that is not a checkpoint of ours (random bytes, truncated, foreign pickle).
CHECKPOINT_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, AttributeError, ImportError, KeyError, IndexError,
                          pickle.UnpicklingError, OverflowError, MemoryError)

LOCK_NAME = ".lock"
HEATMAP_PANEL = 256  # each tile of a heatmap PNG is 256 x 256: image | ground truth | anomaly map
HEATMAP_LABELS = ("image", "ground truth", "anomaly map")  # the tiles, left to right, named in a band above them
HEATMAP_LABEL_HEIGHT = 24  # the band of tile names above the tiles
HEATMAP_BAR_WIDTH = 64  # right of the tiles: the colour bar of the anomaly map (scores 0 at the bottom to 1 at the top)
HEATMAP_SIZE = (3 * HEATMAP_PANEL + HEATMAP_BAR_WIDTH, HEATMAP_LABEL_HEIGHT + HEATMAP_PANEL)  # (width, height): 832 x 280
LEGACY_HEATMAP_SIZE = (3 * HEATMAP_PANEL, HEATMAP_PANEL)  # earlier versions: the three tiles only, 768 x 256
METRIC_COLUMNS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_pro")
RESULT_COLUMNS = (
    *METRIC_COLUMNS, "best_epoch",  # the release's columns, values of the selected (best) epoch
    *(f"last_{m}" for m in METRIC_COLUMNS), "last_epoch",  # the last epoch, never selected on test data
    "pixel_aupro", "last_pixel_aupro",  # standard MVTec AUPRO (FPR <= 0.3, no dilation)
    "pixel_aupro_05", "last_pixel_aupro_05",  # the same up to FPR 0.05 (MVTec AD 2's AU-PRO_0.05)
    # at a threshold fixed before testing (segment: its 0.5); empty (NaN) for PBAS/CRAS, whose scores have none
    "image_f1_threshold", "image_f1",  # the image threshold and the F1 of its decisions
    "pixel_f1", "pixel_iou", "pixel_f1_threshold",  # the defect class's F1 and IoU (pooled pixels) at the pixel threshold
    # oracles: the same at the F1-optimal threshold of the test set itself (best epoch), never a headline
    "image_f1_threshold_oracle", "image_f1_oracle",
    "pixel_f1_oracle", "pixel_iou_oracle", "pixel_f1_threshold_oracle",
)
ORACLE_RENAMED = ("image_f1_threshold", "image_f1", "pixel_f1", "pixel_iou", "pixel_f1_threshold")


def upgrade_metrics_row(row: dict) -> dict:
    """A metrics.json row as this version names it: rows written before the ``*_oracle`` columns held the
    test-set-optimal F1 figures under the plain names; they move to the oracle names (the plain ones: NaN)."""
    if "pixel_f1" not in row or "pixel_f1_oracle" in row:
        return row
    upgraded = {k: v for k, v in row.items() if k not in ORACLE_RENAMED}
    upgraded.update({f"{k}_oracle": row[k] for k in ORACLE_RENAMED if k in row})
    return upgraded


# ----------------------------------------------------------------------------------------------
# atomic writes: a temporary file in the same folder, then os.replace
# ----------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable_folder(path: str, option: str) -> None:
    """Create ``path`` if needed and check that files can be written there; a one-line UserError otherwise
    (before any long work starts)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {path} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{option} {path} cannot be written ({exc.strerror or type(exc).__name__})") from exc


def check_outside(path: str, root: str, option: str, root_name: str) -> None:
    """A one-line UserError when ``path`` is ``root`` or lies inside it (symbolic links resolved): generated
    files written there would mix with the files of ``root`` (e.g. the real dataset)."""
    out, base = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([out, base]) == base:
        raise UserError(f"{option} {path} is inside {root_name} {root}; the generated files would mix with its own "
                        "files: choose a folder outside it")


def read_json(path: str) -> dict:
    """A JSON object from ``path``; {} when the file is missing or unreadable (a warning says which)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        LOG.warning("ignoring unreadable %s (%s)", path, type(exc).__name__)
        return {}
    return data if isinstance(data, dict) else {}


def save_torch(obj, path: str) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def save_text(text: str, path: str) -> None:
    save_bytes(text.encode(), path)


def save_bytes(data: bytes, path: str) -> None:
    _atomic_write(path, lambda f: f.write(data))


def save_json(obj, path: str) -> None:
    save_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", path)


def save_png(image: np.ndarray | Image.Image, path: str) -> None:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    save_bytes(buf.getvalue(), path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_tensors(path: str):
    """torch.load of tensors and plain data only (no code runs); a one-line UserError for anything else."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise UserError(f"no checkpoint at {path}") from exc
    except CHECKPOINT_LOAD_ERRORS as exc:
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from exc


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by this program (tensors and plain data only); a one-line UserError otherwise."""
    ckpt = load_tensors(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path} is not a checkpoint of this program")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt.get('format')!r}, this version reads format "
                        f"{CHECKPOINT_FORMAT}; train it again with this version")
    return ckpt


# ----------------------------------------------------------------------------------------------
# seeds, devices, numerics, progress
# ----------------------------------------------------------------------------------------------


BF16_MIN_CAPABILITY = (8, 0)  # --precision bf16: Ampere or newer (native bf16 tensor cores)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device), as the release does before each class."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(gpu: int | None) -> torch.device:
    """cuda:<gpu> when CUDA is there and a GPU was asked for, else the CPU."""
    if gpu is not None and gpu >= 0 and torch.cuda.is_available():
        if gpu >= torch.cuda.device_count():
            raise UserError(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device(f"cuda:{gpu}")
    return torch.device("cpu")


def select_device(gpu: int | None) -> torch.device:
    """``pick_device``, made the current CUDA device when it is a GPU: otherwise code that uses the current
    device (a stream context left, pinned memory, ``torch.cuda`` queries without a device) opens a context on
    GPU 0 and works there."""
    device = pick_device(gpu)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def available_host_memory() -> int:
    """Bytes of host memory available to new allocations (Linux MemAvailable; else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def configure_precision(precision: str, device: torch.device) -> None:
    """fp32 means fp32: TF32 off for CUDA matmuls and cuDNN convolutions (PyTorch enables it for cuDNN by
    default); tf32 turns it on; bf16 autocast is applied by the model code (common.autocast), after checking
    that the GPU supports bf16. Matmuls through set_float32_matmul_precision; convolutions through cuDNN's
    allow_tf32 (its per-operator ``fp32_precision`` switches cannot be used: torch.export, used by the ONNX
    export, then fails reading the legacy flag)."""
    tf32 = precision == "tf32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "bf16" and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < BF16_MIN_CAPABILITY:  # is_bf16_supported() also says yes where bf16 is only emulated
            raise UserError(f"--precision bf16 needs a GPU of compute capability {'.'.join(map(str, BF16_MIN_CAPABILITY))} "
                            f"or newer; {torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]} (bf16 "
                            "would be emulated, slower than fp32): use --precision fp32")
    if precision == "bf16" and device.type == "cpu":
        LOG.warning("--precision bf16 on the CPU: without AVX-512 BF16 or AMX it is emulated and slower than fp32")


def progress(iterable, desc: str, total: int | None = None, initial: int = 0):
    """A tqdm bar on stderr when it is a terminal; silent otherwise (logs and CI stay readable)."""
    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True, file=sys.stderr,
                disable=None if sys.stderr.isatty() else True)


# ----------------------------------------------------------------------------------------------
# heatmaps
# ----------------------------------------------------------------------------------------------


def jet(values: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map: values in [0, 1] [H, W] -> uint8 RGB [H, W, 3]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centers = np.array([0.75, 0.5, 0.25])  # red, green, blue peak positions
    rgb = np.clip(1.5 - np.abs(4.0 * v - 4.0 * centers), 0.0, 1.0)
    return (rgb * 255 + 0.5).astype(np.uint8)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised image tensor [3, S, S] -> uint8 RGB [S, S, 3]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.cpu().float() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _panel(array: np.ndarray) -> np.ndarray:
    img = Image.fromarray(array)
    if img.size != (HEATMAP_PANEL, HEATMAP_PANEL):
        img = img.resize((HEATMAP_PANEL, HEATMAP_PANEL), Image.BILINEAR)
    return np.asarray(img.convert("RGB"))


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font, centered: bool) -> None:
    """Black text centred on ``xy`` (``centered``) or starting at it, vertically centred on it either way (no
    anchor argument: the bitmap font Pillow falls back to without FreeType has none)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - (left + right) / 2 if centered else xy[0] - left
    draw.text((x, xy[1] - (top + bottom) / 2), text, fill="black", font=font)


@lru_cache(maxsize=1)
def _heatmap_frame() -> np.ndarray:
    """The fixed part of every heatmap PNG, uint8 [280, 832, 3]: white, the tile names above the tiles and, right of
    them, the jet colour bar of the anomaly map with ticks 0, 0.5, 1 (drawn once, then copied)."""
    width, height = HEATMAP_SIZE
    frame = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(frame)
    font = ImageFont.load_default(size=15)
    for i, label in enumerate(HEATMAP_LABELS):
        _text(draw, (i * HEATMAP_PANEL + HEATMAP_PANEL // 2, HEATMAP_LABEL_HEIGHT // 2), label, font, True)
    x0, top, bottom = 3 * HEATMAP_PANEL + 8, HEATMAP_LABEL_HEIGHT + 8, height - 8  # the bar: 16 px wide
    bar = jet(np.linspace(1.0, 0.0, bottom - top))[:, None, :].repeat(16, axis=1)  # [bottom - top, 16, 3], 1 on top
    frame.paste(Image.fromarray(bar), (x0, top))
    draw.rectangle((x0 - 1, top - 1, x0 + 16, bottom), outline="black")
    for value in (0.0, 0.5, 1.0):
        y = round(bottom - 1 - value * (bottom - top - 1))
        draw.line((x0 + 16, y, x0 + 20, y), fill="black")
        _text(draw, (x0 + 22, y), f"{value:g}", font, False)
    _text(draw, (x0 + 16, HEATMAP_LABEL_HEIGHT // 2), "score", font, True)
    return np.asarray(frame)


def heatmap_panel(image: torch.Tensor, mask: torch.Tensor, amap: torch.Tensor) -> np.ndarray:
    """A heatmap PNG as uint8 [280, 832, 3]: the tiles image | ground truth | jet colour map of the raw scores
    (fixed scale: 0 blue to 1 red, clipped), each 256 x 256, named in a band above them, with the colour bar of the
    scale on the right."""
    gt = (mask.squeeze().cpu().float().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    scores = jet(amap.cpu().float().numpy())
    tiles = np.concatenate([_panel(denormalize(image)), _panel(gt), _panel(scores)], axis=1)  # [256, 768, 3]
    out = _heatmap_frame().copy()
    out[HEATMAP_LABEL_HEIGHT:, :3 * HEATMAP_PANEL] = tiles
    return out


def heatmap_tiles(panel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The (image, ground truth, anomaly map) tiles, each [256, 256, 3], of a heatmap PNG read as an RGB array
    (this version's layout or the earlier 768 x 256 one); None for an image of another size."""
    size = (panel.shape[1], panel.shape[0])
    if size not in (HEATMAP_SIZE, LEGACY_HEATMAP_SIZE):
        return None
    top = HEATMAP_LABEL_HEIGHT if size == HEATMAP_SIZE else 0
    image, gt, amap = (panel[top:top + HEATMAP_PANEL, i * HEATMAP_PANEL:(i + 1) * HEATMAP_PANEL] for i in range(3))
    return image, gt, amap


# ----------------------------------------------------------------------------------------------
# results table
# ----------------------------------------------------------------------------------------------


def format_value(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return repr(value) if isinstance(value, float) else str(value)


GROUP_COLUMNS = ("method", "setting", "seed")  # a Mean row per dataset and group: runs of other methods are not averaged in


def results_csv(rows: Sequence[tuple[str, dict, dict]]) -> str:
    """The release's table: 'Row Names' then one row per class, each group of rows followed by its Mean row;
    fractions in [0, 1]. ``rows``: (DATASET_CLASS, metrics, group {method, setting, seed}), in table order.
    Rows of one group are consecutive; the Mean row of a group averages only its rows."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Row Names", *RESULT_COLUMNS, *GROUP_COLUMNS])
    groups: dict[tuple, list[dict]] = {}
    for name, values, group in rows:
        groups.setdefault((split_job_name(name)[0], *(group[c] for c in GROUP_COLUMNS)), []).append((name, values, group))
    for members in groups.values():
        for name, values, group in members:
            writer.writerow([name, *(format_value(values.get(c, math.nan)) for c in RESULT_COLUMNS),
                             *(group[c] for c in GROUP_COLUMNS)])
        mean = {c: float(np.mean([float(v.get(c, math.nan)) for _, v, _ in members])) for c in RESULT_COLUMNS}
        writer.writerow(["Mean", *(format_value(mean[c]) for c in RESULT_COLUMNS), *(members[0][2][c] for c in GROUP_COLUMNS)])
    return out.getvalue()


SEED_METRICS = (*METRIC_COLUMNS, "pixel_aupro", "pixel_aupro_05", "pixel_f1", "pixel_iou", "image_f1",
                "pixel_f1_oracle", "pixel_iou_oracle", "image_f1_oracle",
                *(f"last_{m}" for m in METRIC_COLUMNS), "last_pixel_aupro", "last_pixel_aupro_05")
SEED_GROUP_COLUMNS = ("method", "setting", "seed")  # seed: the seeds of the row, space-separated ("0", "0 1 2")


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and (population, NumPy's default) standard deviation; NaN values make both NaN."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std())


def seeds_csv(rows: Sequence[tuple[str, dict, dict]]) -> str:
    """The table over seeds: per class (and a Mean row per dataset, method and setting) the mean over the seeds
    in the release's columns, then ``<metric>_mean`` and ``<metric>_std`` (population std over the seeds) of the
    selected and last-epoch metrics, and the seeds used. ``rows`` as for ``results_csv``, one per class and seed.
    The Mean row's std is the std over seeds of each seed's mean over classes."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Row Names", *RESULT_COLUMNS, *(f"{m}_{s}" for m in SEED_METRICS for s in ("mean", "std")),
                     *SEED_GROUP_COLUMNS])
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for name, values, group in rows:
        key = (split_job_name(name)[0], group["method"], group["setting"])
        groups.setdefault(key, {}).setdefault(name, {})[int(group["seed"])] = values
    for (_, method, setting), classes in groups.items():
        per_seed_means: dict[int, dict[str, float]] = {}
        for seed in sorted({seed for by_seed in classes.values() for seed in by_seed}):
            members = [by_seed[seed] for by_seed in classes.values() if seed in by_seed]
            per_seed_means[seed] = {c: float(np.mean([float(v.get(c, math.nan)) for v in members])) for c in RESULT_COLUMNS}
        for name, by_seed in [*classes.items(), ("Mean", per_seed_means)]:
            seeds = sorted(by_seed)
            column = lambda c: [float(by_seed[s].get(c, math.nan)) for s in seeds]
            stats = [x for m in SEED_METRICS for x in _mean_std(column(m))]
            writer.writerow([name, *(format_value(_mean_std(column(c))[0]) for c in RESULT_COLUMNS),
                             *(format_value(x) for x in stats), method, setting, " ".join(map(str, seeds))])
    return out.getvalue()


@contextlib.contextmanager
def locked(folder: str) -> Iterator[None]:
    """An exclusive lock on ``folder`` (a lock file inside it), held for the duration: concurrent runs into one
    results folder (two GPUs by hand, a job array) take turns rebuilding its tables."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_NAME), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def results_table(rows: Sequence[tuple[str, dict]], columns: Iterable[str] = METRIC_COLUMNS) -> str:
    """A console table of fractions in [0, 1] (as results.csv; the releases print percent), four decimals."""
    columns = list(columns)
    width = max([len("Mean")] + [len(n) for n, _ in rows]) + 2
    lines = ["".ljust(width) + "".join(c.rjust(13) for c in columns)]
    for name, values in rows:
        lines.append(name.ljust(width) + "".join(f"{values[c]:13.4f}" for c in columns))
    if rows:
        means = [float(np.mean([v[c] for _, v in rows])) for c in columns]
        lines.append("Mean".ljust(width) + "".join(f"{m:13.4f}" for m in means))
    return "\n".join(lines)


def onnx_difference(data: bytes, model: torch.nn.Module, images: torch.Tensor) -> tuple[float, ...]:
    """Largest |ONNX - PyTorch| of each output of a one-input graph on ``images`` (onnxruntime, CPU); the
    ONNX outputs are read in the graph's output order, which is the order of the module's returned tuple."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        want = model(images)
    return tuple(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want, strict=True))


# ----------------------------------------------------------------------------------------------
# the images given to predict (PBAS/CRAS and the segmenter)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputImage:
    path: str  # as found: the given file, or the given folder joined with the relative path
    name: str  # unique output name stem


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, hidden entries skipped), relative paths in sorted order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files if _is_image_name(f)]
    return sorted(found)


def _output_stem(relative: str) -> str:
    """'good/000.png' -> 'good__000_png': separators and the extension dot replaced, so names stay apart."""
    stem, ext = os.path.splitext(relative)
    parts = [p for p in stem.replace("\\", "/").split("/") if p not in ("", ".")]
    return "__".join(parts) + ("_" + ext[1:].lower() if ext else "")


def collect_inputs(paths: Sequence[str], taken: dict[str, str] | None = None) -> list[InputImage]:
    """Files as given (any extension) and image files of folders (recursive); unique output names.

    A missing path is a UserError; so is finding no image at all. ``taken``: output stems already used in the
    output folder, by the absolute path of the image they belong to (that image keeps its stem; others avoid it).
    """
    found: list[tuple[str, str]] = []
    for given in paths:
        if os.path.isdir(given):
            found += [(os.path.join(given, rel), rel) for rel in _folder_images(given)]
        elif os.path.isfile(given):
            found.append((given, os.path.basename(given)))
        else:
            raise UserError(f"no such file or folder: {given}")
    if not found:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(paths)}")
    taken = taken or {}
    used: set[str] = {stem.lower() for stem in taken.values()}
    inputs = []
    for path, relative in found:
        if os.path.abspath(path) in taken:  # predicted into this folder before: its outputs are replaced
            inputs.append(InputImage(path, taken[os.path.abspath(path)]))
            continue
        stem = base = _output_stem(relative)
        count = 1
        while stem.lower() in used:  # same relative path under two given folders or runs (case-insensitive too)
            count += 1
            stem = f"{base}-{count}"
        used.add(stem.lower())
        inputs.append(InputImage(path, stem))
    return inputs
