"""Generating anomaly image + mask pairs with a trained PANDA model (PANDA_SPEC section 4), written in the
MVTec AD layout so that every dataset reader of the project reads them:

    OUT/CLASS/test/DEFECT/NNNN.png               synthetic anomalous image (S x S)
    OUT/CLASS/ground_truth/DEFECT/NNNN_mask.png  its mask, 0/255 (the binarised S x S mask the model was given)
    OUT/CLASS/preview/DEFECT.png                 the first pairs as rows [normal | mask | synthetic]
    OUT/CLASS/panda-DEFECT.json                  where they come from: checkpoint, step, anomaly split, seed,
                                                 pairs, batch size, sampler steps, the empty-latent-mask policy
                                                 and its counts (written before the pairs: 'segment' refuses a
                                                 folder with fewer pairs, or another split)

Each pair takes a random normal training image and a random mask of the defect's synthesis part (both drawn
with replacement, as the public code, but seeded: NumPy SeedSequence [seed, SELECT_STREAM]); batch b samples
with a torch generator seeded by [seed, SAMPLE_STREAM, b]. The sampler edits the S/8 x S/8 latent mask (a
point-sampled bilinear resize, ``latent_mask``), in which a thin or small defect may vanish: the pair would be a
normal image labelled with a defect mask. By default (``--empty_latent_masks redraw``) such a mask is redrawn
(from [seed, REDRAW_STREAM]) until one the sampler sees; ``keep`` writes it as the public code does. A stopped
generation run again continues with the first batch not written, and writes the same pairs as an uninterrupted
one (each file is written atomically).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

import runstate
import utils
from choices import EMPTY_LATENT_MASKS
from panda.data import DefectData, collect, load_image, load_mask, load_masks
from panda.diffusion import VAE_FACTOR, latent_mask
from panda.noise import GeneratorNoise
from panda.schedule import NUM_TIMESTEPS
from panda.train import (CHECKPOINT_NAME, WEIGHTS_NAME, TrainConfig, build_model, check_job, file_names, job_folder,
                         read_checkpoint)
from utils import UserError

LOG = logging.getLogger("pbas")
SELECT_STREAM = 2  # SeedSequence entropy [seed, SELECT_STREAM]: the (normal image, mask) of every pair
SAMPLE_STREAM = 3  # [seed, SAMPLE_STREAM, batch]: the sampler's noise of each batch
REDRAW_STREAM = 4  # [seed, REDRAW_STREAM]: the masks that replace those empty in the latent mask
PREVIEW_PAIRS = 4
MIN_SAMPLER_STEPS = 2  # a respaced chain keeps the first and the last timestep
MIN_DIGITS = 4  # NNNN


@dataclass(frozen=True)
class GenerateOptions:
    """How many pairs, in which batches, under which seed, from which checkpoint (its step and the anomaly split
    it was trained with), with how many sampler steps (NUM_TIMESTEPS: the public sampler; fewer: a respaced chain,
    faster and not the public one), and what becomes of a drawn mask that is empty in the latent mask (redraw:
    another is drawn; keep: the public code's pair, labelled with a mask the sampler never saw)."""

    pairs: int
    batch_size: int
    seed: int
    checkpoint: str
    step: int
    anomaly_split: str
    sampler_steps: int = NUM_TIMESTEPS
    empty_latent_masks: str = "redraw"

    def check(self) -> None:
        if self.pairs <= 0 or self.batch_size <= 0:
            raise UserError(f"--pairs and --batch_size must be positive, got {self.pairs} and {self.batch_size}")
        if not MIN_SAMPLER_STEPS <= self.sampler_steps <= NUM_TIMESTEPS:
            raise UserError(f"--sampler_steps must be in [{MIN_SAMPLER_STEPS}, {NUM_TIMESTEPS}], "
                            f"got {self.sampler_steps}")
        if self.empty_latent_masks not in EMPTY_LATENT_MASKS:
            raise UserError(f"--empty_latent_masks must be one of {', '.join(EMPTY_LATENT_MASKS)}")


@dataclass(frozen=True)
class Layout:
    """Where the pairs of one (class, defect) go under OUT."""

    out: str
    classname: str
    defect: str
    pairs: int

    @property
    def class_dir(self) -> str:
        return os.path.join(self.out, self.classname)

    def image(self, i: int) -> str:
        return os.path.join(self.class_dir, "test", self.defect, f"{i:0{self.digits}d}.png")

    def mask(self, i: int) -> str:
        return os.path.join(self.class_dir, "ground_truth", self.defect, f"{i:0{self.digits}d}_mask.png")

    @property
    def preview(self) -> str:
        return os.path.join(self.class_dir, "preview", f"{self.defect}.png")

    @property
    def record(self) -> str:
        return os.path.join(self.class_dir, f"panda-{self.defect}.json")

    @property
    def digits(self) -> int:
        return max(MIN_DIGITS, len(str(self.pairs - 1)))


def selection(seed: int, pairs: int, normals: int, masks: int) -> tuple[np.ndarray, np.ndarray]:
    """(normal image index [pairs], mask index [pairs]), drawn with replacement."""
    rng = np.random.default_rng([seed, SELECT_STREAM])
    return rng.integers(normals, size=pairs), rng.integers(masks, size=pairs)


@dataclass(frozen=True)
class PairPlan:
    """The (normal image, mask) of every pair, after the empty-latent-mask policy: ``images``, ``masks`` [pairs]
    indices; ``redraws``: masks drawn again because the latent mask was empty; ``unseen``: pairs written with a
    mask whose latent mask is empty (``keep`` only); ``empty``: names of the masks that vanish."""

    images: np.ndarray
    masks: np.ndarray
    redraws: int
    unseen: int
    empty: tuple[str, ...]


def visible_in_latent(masks: torch.Tensor, imagesize: int) -> np.ndarray:
    """[M] bool: whether each mask [M, 1, S, S] in {0, 1} keeps a pixel in the S/8 x S/8 latent mask the sampler
    edits (latent_mask, as Panda.sample)."""
    size = imagesize // VAE_FACTOR
    return latent_mask(masks, (size, size)).flatten(1).any(1).numpy()


def plan_pairs(data: DefectData, imagesize: int, options: GenerateOptions) -> PairPlan:
    """Draw every pair (selection); with ``redraw``, each mask empty in the latent mask is replaced by draws
    from [seed, REDRAW_STREAM] until a visible one (pairs with visible masks are those of ``keep``). UserError
    when every mask vanishes and the policy is redraw."""
    chosen_images, chosen_masks = selection(options.seed, options.pairs, len(data.normals), len(data.masks))
    visible = visible_in_latent(load_masks(data.masks, imagesize), imagesize)  # [M]
    empty = tuple(os.path.basename(path) for path, seen in zip(data.masks, visible) if not seen)
    if options.empty_latent_masks == "keep":
        return PairPlan(chosen_images, chosen_masks, 0, int((~visible[chosen_masks]).sum()), empty)
    if not visible.any():
        size = imagesize // VAE_FACTOR
        raise UserError(f"every mask of {data.name} ({len(data.masks)}) vanishes in the {size}x{size} latent mask "
                        "the sampler edits, so no pair would show its defect; pass --empty_latent_masks keep to write "
                        "them anyway (the public code's pairs)")
    rng = np.random.default_rng([options.seed, REDRAW_STREAM])
    masks, redraws = chosen_masks.copy(), 0
    for i in range(len(masks)):
        while not visible[masks[i]]:
            masks[i] = rng.integers(len(visible))
            redraws += 1
    return PairPlan(chosen_images, masks, redraws, 0, empty)


def batch_generator(seed: int, batch: int, device: torch.device) -> torch.Generator:
    """The sampler's noise generator of batch ``batch``."""
    state = np.random.SeedSequence([seed, SAMPLE_STREAM, batch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, S, S] in [-1, 1] -> uint8 [B, S, S, 3]."""
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.permute(0, 2, 3, 1).to(torch.uint8).numpy()


def check_record(layout: Layout, record: dict) -> None:
    """UserError when OUT already holds pairs of this defect from another generation (checkpoint, step, split,
    seed, count or batch size), or files without a record (another program's), which a continued run would mix
    with these."""
    if not os.path.exists(layout.record):
        for folder in (os.path.dirname(layout.image(0)), os.path.dirname(layout.mask(0))):
            if os.path.isdir(folder) and os.listdir(folder):
                raise UserError(f"{folder} holds files that no panda-generate record describes; choose another "
                                "--output or remove them")
        return
    saved = utils.read_json(layout.record)
    if saved != record:
        keys = sorted(k for k in record if saved.get(k) != record[k])
        raise UserError(f"{layout.record}: {layout.class_dir} holds pairs of {layout.defect} from another generation "
                        f"(different {', '.join(keys) or 'record'}); choose another --output or remove them")


def generation_record(data: DefectData, imagesize: int, options: GenerateOptions, plan: PairPlan) -> dict:
    """OUT/CLASS/panda-DEFECT.json: where the pairs come from (read by check_record and by 'segment'), with the
    masks that vanish in the latent mask, how many draws were redone (redraw) or how many pairs carry such a
    mask (keep)."""
    return {"method": "panda", "dataset": data.dataset, "class": data.classname, "defect": data.defect,
            **{k: v for k, v in asdict(options).items() if k != "checkpoint"},
            "checkpoint": os.path.abspath(options.checkpoint), "imagesize": imagesize,
            "masks": [os.path.basename(path) for path in data.masks],
            "empty_latent_mask_files": list(plan.empty), "mask_redraws": plan.redraws,
            "pairs_with_empty_latent_mask": plan.unseen}


def generate(model, data: DefectData, imagesize: int, out: str, options: GenerateOptions,
             device: torch.device) -> Layout:
    """Write ``options.pairs`` pairs of ``data``'s (class, defect) under ``out``; batches already written are
    kept. Raises runstate.Interrupted when a stop is
    requested between batches."""
    layout = Layout(out, data.classname, data.defect, options.pairs)
    plan = plan_pairs(data, imagesize, options)
    record = generation_record(data, imagesize, options, plan)
    check_record(layout, record)
    utils.save_json(record, layout.record)
    chosen_images, chosen_masks = plan.images, plan.masks
    masks = torch.stack([load_mask(path, imagesize) for path in data.masks])  # [M, 1, S, S] in {0, 1}
    starts = range(0, options.pairs, options.batch_size)
    for batch, start in enumerate(utils.progress(starts, data.name, total=len(starts))):
        index = list(range(start, min(start + options.batch_size, options.pairs)))
        if all(os.path.exists(layout.image(i)) and os.path.exists(layout.mask(i)) for i in index):
            continue
        clean = torch.stack([load_image(data.normals[chosen_images[i]], imagesize) for i in index])  # [B, 3, S, S]
        mask = masks[torch.as_tensor(chosen_masks[index])]  # [B, 1, S, S]
        with torch.no_grad():
            synthetic = model.sample(clean.to(device), mask.to(device), [data.name] * len(index),
                                     GeneratorNoise(batch_generator(options.seed, batch, device)),
                                     steps=options.sampler_steps)
        for i, image, m in zip(index, to_uint8(synthetic), mask):
            utils.save_png(image, layout.image(i))
            utils.save_png((m[0].numpy() * 255).astype(np.uint8), layout.mask(i))
        if runstate.stop_requested() and start + options.batch_size < options.pairs:
            raise runstate.Interrupted(runstate.stop_requested())
    write_preview(layout, data, chosen_images, imagesize)
    return layout


def write_preview(layout: Layout, data: DefectData, chosen_images: np.ndarray, imagesize: int) -> None:
    """OUT/CLASS/preview/DEFECT.png: one row [normal | mask | synthetic] per pair of the first PREVIEW_PAIRS."""
    rows = []
    for i in range(min(PREVIEW_PAIRS, layout.pairs)):
        normal = to_uint8(load_image(data.normals[chosen_images[i]], imagesize)[None])[0]
        mask = Image.open(layout.mask(i)).convert("RGB")
        synthetic = Image.open(layout.image(i)).convert("RGB")
        rows.append(np.concatenate([normal, np.asarray(mask), np.asarray(synthetic)], axis=1))
    utils.save_png(np.concatenate(rows, axis=0), layout.preview)


def source_checkpoint(results: str, dataset: str, classname: str, defect: str, seed: int, step: int | None) -> str:
    """The default checkpoint of a job: RESULTS/panda/DATASET_CLASS/DEFECT/seedN/checkpoint.pt, or its
    weights-STEP.pt with --step."""
    config = TrainConfig(dataset, classname, defect, init_word="", seed=seed)
    name = CHECKPOINT_NAME if step is None else WEIGHTS_NAME.format(step)
    return os.path.join(job_folder(results, config), name)


def run_generation(dataset: str, root: str, jobs: list[tuple[str, str]], checkpoint: str | None, step: int | None,
                   results: str, out: str, pairs: int, batch_size: int, seed: int, ldm_path: str, precision: str,
                   device: torch.device, sampler_steps: int = NUM_TIMESTEPS,
                   empty_latent_masks: str = "redraw") -> list[Layout]:
    """Generate the pairs of every (class, defect) of ``jobs``; each model, its data and OUT are checked before
    the LDM loads; OUT may not be the dataset or lie inside it."""
    utils.check_outside(out, root, "--output", "DATAPATH")
    if checkpoint is not None and step is not None:
        raise UserError("--checkpoint and --step name the model two ways; give one of them")
    if checkpoint is not None and len(jobs) != 1:
        raise UserError(f"--checkpoint names one model, but {len(jobs)} (class, defect) pairs were requested; "
                        "give one class (-d) and one --defect")
    planned = []
    for classname, defect in jobs:
        path = checkpoint or source_checkpoint(results, dataset, classname, defect, seed, step)
        ckpt = read_checkpoint(path)
        check_job(ckpt, path, (dataset, classname, defect))
        config = TrainConfig(**ckpt["config"])
        data = collect(dataset, root, classname, defect, config.anomaly_split)
        if ckpt["files"]["masks"] != file_names(data)["masks"]:
            LOG.warning("%s: the masks of %s/%s differ from those it was trained with", path, classname, defect)
        if ckpt["step"] < config.steps:
            LOG.warning("%s: generating from step %d of %d (training not finished)", path, ckpt["step"], config.steps)
        options = GenerateOptions(pairs, batch_size, seed, path, int(ckpt["step"]), config.anomaly_split, sampler_steps,
                                  empty_latent_masks)
        options.check()
        plan = plan_pairs(data, config.imagesize, options)
        if plan.empty:
            size = config.imagesize // VAE_FACTOR
            outcome = (f"{plan.redraws} draws redone" if empty_latent_masks == "redraw"
                       else f"{plan.unseen} pairs carry one (--empty_latent_masks keep)")
            LOG.warning("%s/%s: %d of %d masks vanish in the %dx%d latent mask (e.g. %s); %s", classname, defect,
                        len(plan.empty), len(data.masks), size, size, plan.empty[0], outcome)
        check_record(Layout(out, classname, defect, pairs), generation_record(data, config.imagesize, options, plan))
        planned.append((ckpt, config, data, options))
    utils.check_writable_folder(out, "--output")
    utils.configure_precision(precision, device)
    from panda.ldm import load_ldm

    ldm = load_ldm(ldm_path, device)
    layouts = []
    for ckpt, config, data, options in planned:
        model = build_model(ldm, config.name, ckpt["init_word"], precision, device)
        model.load_trainable_state(ckpt["trainable"])
        model.eval()
        layouts.append(generate(model, data, config.imagesize, out, options, device))
        LOG.info("%s: %d pairs in %s (preview %s)", config.name, pairs, layouts[-1].class_dir, layouts[-1].preview)
    return layouts
