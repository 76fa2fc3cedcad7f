"""Training one PANDA model per (class, defect) (PANDA_SPEC sections 3 and 8): the loop, its tensors-only
checkpoints and the exact resume.

Only the textual-inversion vectors and the two MGA adapters train (``Panda.trainable_parameters``), with AdamW
(lr 1.6e-2 = 2e-3 x batch 8, weight decay 0.01, no scheduler). Each step draws a batch of the (class, defect)'s
synthesis pairs and minimises ``Panda.loss`` (L = 4 mean|m_t(eps - eps_hat)| + mean|eps' - eps_hat'|).

The job folder RESULTS/panda/DATASET_CLASS/DEFECT/seedN/ holds
    checkpoint.pt        the whole training state, replaced atomically every --save_every steps, at the end and
                         when a stop is requested: format, config, files, step, trainable state (vectors + adapter
                         state incl. BatchNorm buffers), AdamW state, every random stream (the noise generator and
                         the global Python/NumPy/torch streams), the loss of every step
    weights-STEP.pt      the trainable state at every --save_every steps (the public code keeps them all and
                         picks one by hand; panda-generate --step reads one)
    losses.csv           step, loss, loss_simple, loss_mask (rewritten at every save)
Everything is tensors and plain data (loads with weights_only=True). A run given a folder with a checkpoint
resumes from it (same configuration required) and ends exactly as an uninterrupted run: the batch order is a
function of (seed, step), the noise generator's state and the global streams are restored.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

import runstate
import utils
from choices import PRECISIONS
from datasets.split import ANOMALY_SPLITS
from panda.data import (MVTEC_INIT_WORDS, DefectData, collect, default_classes, defect_types, load_images,
                        load_masks)
from panda.diffusion import VAE_FACTOR
from panda.noise import GeneratorNoise
from utils import UserError

LOG = logging.getLogger("pbas")
PANDA_FORMAT = 1
METHOD = "panda"
CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "weights-{:06d}.pt"
LOSSES_NAME = "losses.csv"
DATA_REPEATS = 20  # the public dataset repeats each pair 20 times per epoch (``repeats=20``)
BATCH_STREAM = 1  # the numpy SeedSequence entropy [seed, BATCH_STREAM, epoch] orders each epoch's batches
LOSS_PARTS = ("loss_simple", "loss_mask")  # the masked anomaly-aware term and the anomaly-only term of the loss


@dataclass(frozen=True)
class TrainConfig:
    """What defines a PANDA training run (PANDA_SPEC 3 defaults); stored in its checkpoints."""

    dataset: str
    classname: str
    defect: str
    init_word: str = ""  # "": the public word (MVTec AD), else from the defect name (resolve_init_word)
    anomaly_split: str = "third"
    imagesize: int = 256
    batch_size: int = 8
    lr: float = 1.6e-2  # 2e-3 x batch 8 (scale_lr)
    weight_decay: float = 0.01
    steps: int = 80_000
    save_every: int = 1500
    seed: int = 3407
    precision: str = "fp32"

    def check(self) -> None:
        """UserError (one line) for values that cannot train."""
        for name in ("imagesize", "batch_size", "steps", "save_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.imagesize % VAE_FACTOR:
            raise UserError(f"--imagesize must be a multiple of {VAE_FACTOR} (the VAE's factor), got {self.imagesize}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise UserError(f"--lr must be positive and --weight_decay non-negative, got {self.lr}, "
                            f"{self.weight_decay}")
        if self.anomaly_split not in ANOMALY_SPLITS:
            raise UserError(f"--anomaly_split must be one of {', '.join(ANOMALY_SPLITS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")

    @property
    def name(self) -> str:
        return f"{self.classname}+{self.defect}"


# Fields that may differ between a checkpoint and the run resuming it (they do not change past steps).
RESUMABLE_CHANGES = ("steps", "save_every", "precision")


def _one_token(tokenizer, word: str) -> bool:
    """Whether the tokenizer keeps ``word`` as one known token."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def resolve_init_word(tokenizer, config: TrainConfig) -> str:
    """The word whose embedding initialises the vectors: --init_word as given (Panda checks it is one token);
    by default, for MVTec AD's defect types the public script's word (``MVTEC_INIT_WORDS``: ``damaged_case`` ->
    ``damage``, ``missing_wire`` -> ``miss``), which must be one token of the tokenizer; otherwise (pill's six types
    without a public word, other datasets) the defect name's words from the last (``broken_large`` -> ``large``,
    as the public script mostly picks), the first that the tokenizer keeps as one known token, else the first word
    piece of the last word (``misplaced`` -> ``mis`` if the vocabulary splits it)."""
    if config.init_word:
        return config.init_word
    public = MVTEC_INIT_WORDS.get(config.classname, {}).get(config.defect) if config.dataset == "mvtec" else None
    if public is not None:
        if not _one_token(tokenizer, public):
            raise UserError(f"the public init word '{public}' of {config.classname}/{config.defect} is not one token "
                            "of the LDM's tokenizer; give --init_word")
        return public
    words = [w for w in reversed(config.defect.lower().replace("-", "_").split("_")) if w] or [config.defect.lower()]
    for word in words:
        if _one_token(tokenizer, word):
            return word
    pieces = tokenizer.tokenize(words[0])
    if not pieces or pieces[0] == tokenizer.unk_token:
        raise UserError(f"no word of defect '{config.defect}' is known to the LDM's tokenizer; give --init_word")
    return pieces[0]


def job_folder(results: str, config: TrainConfig) -> str:
    """RESULTS/panda/DATASET_CLASS/DEFECT/seedN."""
    return os.path.join(results, METHOD, f"{config.dataset}_{config.classname}", config.defect, f"seed{config.seed}")


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def file_names(data: DefectData) -> dict:
    """The files a model learnt from, by base name (the checkpoint's record of the split)."""
    return {"normals": len(data.normals), "anomalies": [os.path.basename(s.image_path) for s in data.anomalies],
            "masks": [os.path.basename(path) for path in data.masks], "held_out": data.held_out}


def read_checkpoint(path: str) -> dict:
    """A PANDA checkpoint or weights file (tensors only, weights_only=True); UserError for anything else."""
    ckpt = utils.load_tensors(path)
    if not isinstance(ckpt, dict) or ckpt.get("method") != METHOD or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path} is not a PANDA checkpoint of this program")
    if ckpt.get("format") != PANDA_FORMAT:
        raise UserError(f"{path} has PANDA checkpoint format {ckpt.get('format')!r}, this version reads {PANDA_FORMAT}")
    missing = sorted({"init_word", "files", "step", "trainable"} - set(ckpt))
    if missing:
        raise UserError(f"{path} is not a complete PANDA checkpoint (no {', '.join(missing)})")
    names = {f.name for f in fields(TrainConfig)}
    if set(ckpt["config"]) != names:
        raise UserError(f"{path}: its configuration has fields {sorted(ckpt['config'])}, expected {sorted(names)}")
    return ckpt


def check_job(ckpt: dict, path: str, ours: tuple[str, str, str]) -> None:
    """UserError when the checkpoint belongs to another (dataset, class, defect) than ``ours``."""
    saved = ckpt["config"]
    theirs = (saved["dataset"], saved["classname"], saved["defect"])
    if theirs != ours:
        raise UserError(f"{path} is a PANDA model of {theirs[0]} {theirs[1]}/{theirs[2]}, not of {ours[0]} "
                        f"{ours[1]}/{ours[2]}")


def check_resumable(ckpt: dict, path: str, config: TrainConfig, files: dict) -> None:
    """UserError when the checkpoint was trained with another configuration or other files."""
    check_job(ckpt, path, (config.dataset, config.classname, config.defect))
    ours = asdict(config)
    changed = [k for k, v in ckpt["config"].items() if k not in RESUMABLE_CHANGES and ours[k] != v]
    if changed:
        diff = ", ".join(f"{k} {ckpt['config'][k]!r} -> {ours[k]!r}" for k in changed)
        raise UserError(f"{path} was trained with another configuration ({diff}); use the same options to resume, "
                        "or another --results_path")
    if ckpt["files"] != files:
        raise UserError(f"{path} was trained on other files of {config.classname}/{config.defect} (the data "
                        "changed); use another --results_path to train on the current data")


def training_state(config: TrainConfig, files: dict, step: int, model, optimizer, noise: torch.Generator,
                   losses: torch.Tensor, device: torch.device) -> dict:
    """The whole resumable state, tensors and plain data only."""
    return {"format": PANDA_FORMAT, "method": METHOD, "config": asdict(config), "init_word": model.init_word,
            "files": files, "step": step,
            "trainable": {k: v.detach().cpu() for k, v in model.trainable_state().items()},
            "optimizer": optimizer.state_dict(),
            "random": {"noise": noise.get_state(), "global": runstate.rng_state(device)},
            "losses": losses[:step].clone()}


def weights_state(state: dict) -> dict:
    """What a weights-STEP.pt keeps of a training state: the model, not the optimizer or random streams."""
    return {k: state[k] for k in ("format", "method", "config", "init_word", "files", "step", "trainable")}


def losses_csv(losses: torch.Tensor) -> str:
    """step,loss,loss_simple,loss_mask (steps from 1)."""
    rows = [f"{i + 1},{','.join(repr(float(v)) for v in row)}" for i, row in enumerate(losses.tolist())]
    return "\n".join(["step,loss," + ",".join(LOSS_PARTS), *rows]) + "\n"


def save_state(folder: str, state: dict, snapshot: bool) -> str:
    """checkpoint.pt (+ weights-STEP.pt) and losses.csv, each written atomically; returns the checkpoint path."""
    if snapshot:
        utils.save_torch(weights_state(state), os.path.join(folder, WEIGHTS_NAME.format(state["step"])))
    utils.save_text(losses_csv(state["losses"]), os.path.join(folder, LOSSES_NAME))
    path = os.path.join(folder, CHECKPOINT_NAME)
    utils.save_torch(state, path)
    return path


def read_state(path: str, discard_damaged: bool) -> dict | None:
    """The job's checkpoint.pt (None when there is none); a damaged one stops the run naming the file, or with
    --discard_damaged_state is set aside and the job trains from the start (runstate.load_resumable)."""
    return runstate.load_resumable(path, read_checkpoint, discard_damaged,
                                   f"pass {runstate.DISCARD_DAMAGED_OPTION} to set it aside and train this model "
                                   "from the start")


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> torch.Tensor:
    """Pair indices of step ``step``: epochs of the n pairs repeated DATA_REPEATS times, each shuffled by its
    own seeded permutation and cut into batches (the last one of an epoch may be shorter). [<= batch_size]"""
    per_epoch = n * DATA_REPEATS
    batches = math.ceil(per_epoch / batch_size)
    epoch, index = divmod(step, batches)
    order = np.random.default_rng([seed, BATCH_STREAM, epoch]).permutation(per_epoch) % n
    return torch.from_numpy(order[index * batch_size:(index + 1) * batch_size].astype(np.int64))


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the vectors and adapters (torch defaults besides lr and weight decay, as the public code)."""
    return torch.optim.AdamW(model.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train(model, config: TrainConfig, data: DefectData, folder: str, device: torch.device,
          discard_damaged: bool = False) -> str:
    """Train (or resume) one model into ``folder``; returns the checkpoint path. ``model``: a fresh
    ``panda.Panda`` of the job's name (initialised under the seed). Raises runstate.Interrupted after saving
    when a stop is requested."""
    files = file_names(data)
    path = os.path.join(folder, CHECKPOINT_NAME)
    optimizer = make_optimizer(model, config)
    noise = torch.Generator(device=device).manual_seed(config.seed)
    losses = torch.zeros(config.steps, 1 + len(LOSS_PARTS))
    start = 0
    ckpt = read_state(path, discard_damaged)
    if ckpt is not None:
        check_resumable(ckpt, path, config, files)
        start = resume(ckpt, model, optimizer, noise, losses, device)
        LOG.info("%s: resuming at step %d of %d from %s", config.name, start, config.steps, path)
    if start >= config.steps:
        return path
    images = load_images(data.anomaly_images, config.imagesize).to(device)  # [N, 3, S, S] in [-1, 1]
    masks = load_masks(data.masks, config.imagesize).to(device)  # [N, 1, S, S] in {0, 1}
    source = GeneratorNoise(noise)
    model.train()  # the adapters' BatchNorm layers use batch statistics (the frozen parts stay in eval mode)
    for step in utils.progress(range(start, config.steps), config.name, total=config.steps, initial=start):
        index = batch_indices(config.seed, step, len(images), config.batch_size).to(device)
        loss, parts = model.loss(images[index], masks[index], [config.name] * len(index), source)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = torch.tensor([float(loss.detach()), *(float(parts[k]) for k in LOSS_PARTS)])
        done = step + 1
        snapshot = done % config.save_every == 0
        if snapshot or done == config.steps or runstate.stop_requested():
            state = training_state(config, files, done, model, optimizer, noise, losses, device)
            path = save_state(folder, state, snapshot)
            LOG.info("%s: step %d, loss %.5f, saved %s", config.name, done, float(loss.detach()), path)
        if runstate.stop_requested() and done < config.steps:
            raise runstate.Interrupted(runstate.stop_requested(), path)
    return path


def resume(ckpt: dict, model, optimizer: torch.optim.Optimizer, noise: torch.Generator, losses: torch.Tensor,
           device: torch.device) -> int:
    """Load a training state into the fresh model, optimizer, noise generator and loss history; set the global
    random streams. Returns the step to continue from."""
    step = int(ckpt["step"])
    if step > len(losses):
        return step
    model.load_trainable_state(ckpt["trainable"])
    optimizer.load_state_dict(ckpt["optimizer"])
    noise.set_state(ckpt["random"]["noise"])
    runstate.set_rng_state(ckpt["random"]["global"], device)
    losses[:step] = ckpt["losses"]
    return step


# ----------------------------------------------------------------------------------------------
# jobs: every requested (class, defect), checked before the LDM loads and before anything is written
# ----------------------------------------------------------------------------------------------


def plan(dataset: str, root: str, classes: tuple[str, ...], defects: tuple[str, ...],
         anomaly_split: str) -> list[DefectData]:
    """The checked data of every (class, defect): the given classes (default: the dataset's) times the given
    defects (default: every defect type of each class)."""
    jobs = []
    for classname in classes or default_classes(dataset):
        for defect in defects or defect_types(dataset, root, classname):
            jobs.append(collect(dataset, root, classname, defect, anomaly_split))
    return jobs


def build_model(ldm, name: str, init_word: str, precision: str, device: torch.device):
    """A fresh PANDA model of one (class, defect) on ``device`` (seed the global streams first); ``init_word``
    is kept as ``model.init_word``. tf32 runs the model in fp32 with TF32 matmuls (utils.configure_precision);
    bf16 autocasts the frozen parts."""
    from panda.model import Panda

    model = Panda(ldm, [name], init_word, precision="bf16" if precision == "bf16" else "fp32").to(device)
    model.init_word = init_word
    return model


def run_training(configs: list[TrainConfig], jobs: list[DefectData], ldm_path: str, results: str,
                 device: torch.device, discard_damaged: bool = False) -> list[str]:
    """Train (or resume, or skip when finished) every job in order; returns their checkpoint paths."""
    for config in configs:
        config.check()
    todo = []
    for config, data in zip(configs, jobs):
        path = os.path.join(job_folder(results, config), CHECKPOINT_NAME)
        ckpt = read_state(path, discard_damaged)
        if ckpt is not None:
            check_resumable(ckpt, path, config, file_names(data))
            if ckpt["step"] >= config.steps:
                LOG.info("%s: finished (%s, step %d)", config.name, path, ckpt["step"])
                continue
        todo.append((config, data))
    utils.check_writable_folder(results, "--results_path")
    if not todo:
        return [os.path.join(job_folder(results, c), CHECKPOINT_NAME) for c in configs]
    utils.configure_precision(todo[0][0].precision, device)
    from panda.ldm import load_ldm

    ldm = load_ldm(ldm_path, device)
    words = [resolve_init_word(ldm.tokenizer, config) for config, _ in todo]  # every job's word, before training any
    for (config, data), word in zip(todo, words):
        LOG.info("%s: %d anomalies for training (%d held out), %d normal images", config.name, len(data.anomalies),
                 data.held_out, len(data.normals))
        utils.set_seed(config.seed)
        model = build_model(ldm, config.name, word, config.precision, device)
        train(model, config, data, job_folder(results, config), device, discard_damaged)
    return [os.path.join(job_folder(results, c), CHECKPOINT_NAME) for c in configs]
