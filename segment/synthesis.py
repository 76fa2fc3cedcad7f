"""Baseline anomaly synthesis (DRAEM / GLASS style, no external texture dataset), written in the MVTec layout.

Per image i (its own random stream, seeded by (seed, i), so any count and order give the same images):
    a normal training image I (drawn at random);
    a Perlin-noise mask M: 2-D gradient noise (Perlin 1985) at a random lattice scale 2^a x 2^b
    (a, b in [0, 6), as DRAEM), randomly rotated by 90 degree steps, thresholded at PERLIN_THRESHOLD times its
    largest absolute value; redrawn until it covers between MIN_AREA and MAX_AREA of the image;
    a texture T: the image itself (``--texture self``: rolled by a random offset, flipped and rotated) or another
    normal training image (``--texture other``), with a random colour change (inversion, brightness/contrast,
    channel permutation, posterisation or solarisation) so that the pasted region differs from normal texture;
    the anomaly: A = I (1 - M) + ((1 - beta) T + beta I) M with beta ~ U[0, BETA_MAX) (DRAEM's blend).
Written as OUT/CLASS/test/DEFECT/NNNN.png and OUT/CLASS/ground_truth/DEFECT/NNNN_mask.png (0/255), the layout
PANDA's generate writes; DEFECT is ``perlin`` by default. Images keep the normal image's size. Beside them,
OUT/CLASS/synth-baseline-DEFECT.json (written first) records the options and the normal images: a folder written
with other options (or holding files without such a record) is refused, so that one folder holds exactly the
``count`` pairs of one configuration, and 'segment' refuses a folder with fewer pairs than recorded. Its
``anomaly_split`` is null: no real anomaly is used, so the segmentation may test on any split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

import utils
from datasets import read_rgb
from segment.config import TEXTURE_SOURCES
from utils import UserError

DEFAULT_DEFECT = "perlin"
PERLIN_SCALE_EXPONENTS = 6  # lattice 2^a cells per side, a in [0, 6)
PERLIN_THRESHOLD = 0.5
MIN_AREA = 0.005  # the mask covers at least this fraction of the image
MAX_AREA = 0.5  # and at most this fraction (redrawn otherwise)
BETA_MAX = 0.8  # DRAEM: the anomaly keeps a fraction beta < 0.8 of the normal image
MAX_DRAWS = 100
METHOD = "synth-baseline"  # the record's method and the start of its file name


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise [H, W] with ``cells`` lattice cells along (y, x), values about in [-0.7, 0.7]."""
    h, w = shape
    angles = rng.uniform(0, 2 * np.pi, (cells[0] + 1, cells[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # [cy+1, cx+1, 2]
    y = np.linspace(0, cells[0], h, endpoint=False)
    x = np.linspace(0, cells[1], w, endpoint=False)
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]  # [H, 1], [1, W]

    def corner(dy: int, dx: int) -> np.ndarray:  # dot(gradient at the corner, offset to it): [H, W]
        g = gradients[(yi + dy)[:, None], (xi + dx)[None, :]]
        return g[..., 0] * (yf - dy) + g[..., 1] * (xf - dx)

    u, v = _fade(xf), _fade(yf)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return top * (1 - v) + bottom * v


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A binary Perlin mask [H, W] (bool) covering between MIN_AREA and MAX_AREA of the image."""
    for _ in range(MAX_DRAWS):
        cells = tuple(int(2 ** rng.integers(0, PERLIN_SCALE_EXPONENTS)) for _ in range(2))
        k = int(rng.integers(0, 4))
        size = shape if k % 2 == 0 else shape[::-1]
        noise = np.rot90(perlin(size, cells, rng), k)
        mask = noise > PERLIN_THRESHOLD * float(np.abs(noise).max())
        if MIN_AREA <= mask.mean() <= MAX_AREA:
            return mask
    raise RuntimeError(f"no Perlin mask with an area in [{MIN_AREA}, {MAX_AREA}] after {MAX_DRAWS} draws")


def _recolour(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random colour change of a float RGB image [H, W, 3] in [0, 1]."""
    kind = int(rng.integers(0, 5))
    if kind == 0:
        return 1.0 - texture
    if kind == 1:
        return np.clip((texture - 0.5) * rng.uniform(1.5, 3.0) + 0.5 + rng.uniform(-0.3, 0.3), 0, 1)
    if kind == 2:
        return texture[..., rng.permutation(3)] if texture.shape[-1] == 3 else 1.0 - texture
    if kind == 3:
        levels = float(2 ** int(rng.integers(1, 3)))
        return np.floor(texture * levels) / levels
    return np.where(texture > rng.uniform(0.3, 0.7), 1.0 - texture, texture)  # solarise


def _move(texture: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Roll, flip and rotate a texture [h, w, 3], then resize it to ``shape`` [H, W, 3]."""
    texture = np.roll(texture, (int(rng.integers(0, texture.shape[0])), int(rng.integers(0, texture.shape[1]))), (0, 1))
    if rng.random() < 0.5:
        texture = texture[:, ::-1]
    texture = np.rot90(texture, int(rng.integers(0, 4)))
    if texture.shape[:2] != shape:
        pil = Image.fromarray((texture * 255 + 0.5).astype(np.uint8)).resize((shape[1], shape[0]), Image.BILINEAR)
        texture = np.asarray(pil, dtype=np.float64) / 255
    return np.ascontiguousarray(texture)


def synthesize(image: np.ndarray, source: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(anomalous image uint8 [H, W, 3], mask uint8 [H, W] 0/255) from a normal image and a texture source
    (both uint8 RGB)."""
    base = image.astype(np.float64) / 255
    mask = perlin_mask(base.shape[:2], rng)
    texture = _recolour(_move(source.astype(np.float64) / 255, base.shape[:2], rng), rng)
    beta = rng.uniform(0, BETA_MAX)
    m = mask[..., None]
    out = base * (1 - m) + ((1 - beta) * texture + beta * base) * m
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8), mask.astype(np.uint8) * 255


@dataclass(frozen=True)
class SynthesisRequest:
    """One class's baseline synthesis: ``count`` pairs under OUT/CLASS from its normal training images."""

    normals: list[str]  # normal training images of the class
    output: str  # OUT
    classname: str
    count: int
    seed: int
    texture: str = "self"
    defect: str = DEFAULT_DEFECT

    @property
    def class_dir(self) -> str:
        return os.path.join(self.output, self.classname)

    @property
    def folders(self) -> tuple[str, str]:
        """(image folder, mask folder) of the defect."""
        return (os.path.join(self.class_dir, "test", self.defect),
                os.path.join(self.class_dir, "ground_truth", self.defect))

    @property
    def record_path(self) -> str:
        return os.path.join(self.class_dir, f"{METHOD}-{self.defect}.json")

    def record(self) -> dict:
        """What the pairs are made of (compared with the record of a folder written before)."""
        return {"method": METHOD, "class": self.classname, "defect": self.defect, "pairs": self.count,
                "seed": self.seed, "texture": self.texture, "anomaly_split": None, "normals": list(self.normals)}


def check_request(req: SynthesisRequest) -> None:
    """One-line UserErrors for bad options, and for an OUT/CLASS whose defect folders hold pairs of other options
    or files no record describes (nothing is written)."""
    if req.texture not in TEXTURE_SOURCES:
        raise UserError(f"--texture must be one of {', '.join(TEXTURE_SOURCES)}, got {req.texture}")
    if req.count < 1:
        raise UserError(f"--count must be at least 1, got {req.count}")
    if not req.normals:
        raise UserError(f"class {req.classname}: no normal training images to synthesise from")
    if req.texture == "other" and len(req.normals) < 2:
        raise UserError(f"--texture other needs at least two normal images, class {req.classname} has one")
    if os.path.exists(req.record_path):
        saved, record = utils.read_json(req.record_path), req.record()
        if saved != record:
            keys = sorted(k for k in record if saved.get(k) != record[k])
            raise UserError(f"{req.record_path}: {req.class_dir} holds {req.defect} pairs written with other options "
                            f"(different {', '.join(keys) or 'record'}); choose another --output or remove them")
        return
    for folder in req.folders:
        if os.path.isdir(folder) and os.listdir(folder):
            raise UserError(f"{folder} holds files that no {METHOD} record describes; choose another --output or "
                            "remove them")


def write_baseline(req: SynthesisRequest) -> str:
    """Write exactly ``count`` image + mask pairs to OUT/CLASS/{test,ground_truth}/DEFECT/ (after the record);
    the class folder."""
    check_request(req)
    images, masks = req.folders
    for folder in (images, masks):
        utils.check_writable_folder(folder, "--output")
    utils.save_json(req.record(), req.record_path)
    width = max(4, len(str(req.count - 1)))
    for i in utils.progress(range(req.count), f"{req.classname}: synthesis", total=req.count):
        rng = np.random.default_rng([req.seed, i])
        index = int(rng.integers(0, len(req.normals)))
        image = np.asarray(read_rgb(req.normals[index]))
        if req.texture == "other":
            other = (index + 1 + int(rng.integers(0, len(req.normals) - 1))) % len(req.normals)
            source = np.asarray(read_rgb(req.normals[other]))
        else:
            source = image
        anomaly, mask = synthesize(image, source, rng)
        utils.save_png(anomaly, os.path.join(images, f"{i:0{width}d}.png"))
        utils.save_png(mask, os.path.join(masks, f"{i:0{width}d}_mask.png"))
    return req.class_dir
