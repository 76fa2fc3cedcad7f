"""The two methods as the command line and the run machinery configure them, in plain Python (no torch, so that
parsing and ``--help`` stay fast): their configurations with the released defaults, the choices of their
options, the options each one does not have, and the method-dependent defaults of the dataset options.

The methods themselves (``pbas.PBAS``, ``cras.CRAS``, behind ``common.Method``) need torch; their registry,
name -> class, is ``registry()``, which imports them when called. A new method adds its configuration to
``CONFIGS`` (and its entries to ``NOT_FOR`` and ``RESIZE_DEFAULTS``) and its class to ``registry`` here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

BACKBONE_STATS = ("release", "imagenet")  # BatchNorm statistics of the frozen backbone (see common.release_statistics)
CENTER_METRICS = ("cosine", "euclidean")  # PBAS's nearest-center search
DSC_OPTIMIZERS = ("adamw", "adam")  # PBAS's discriminator optimizer
CLASS_VOTES = ("batch", "image")  # CRAS's test-time class bank
NOISE_DEVICES = ("cpu", "device")  # where CRAS draws its noise
SETTINGS = ("multi", "single")  # CRAS: one model for all classes, or one per class
RESIZE_DEFAULTS = {"pbas": 288, "cras": 329}  # the releases' --resize (CRAS center-crops 288 from 329 for every class)
CRAS_SINGLE_BATCH_SIZE = 8  # CRAS scripts: 32 for the multi-class setting, 8 for single


@dataclass
class MethodConfig:
    """Settings every method has (the engine reads these); a method's config adds its own."""

    backbone: str = "wideresnet50"
    layers: tuple[str, ...] = ("layer2", "layer3")
    pretrain_embed_dimension: int = 1536
    target_embed_dimension: int = 1536
    patchsize: int = 3
    meta_epochs: int = 640
    eval_epochs: int = 1
    pre_proj: int = 1
    lr: float = 1e-4
    k: float = 0.25
    train_backbone: bool = False
    limit: int = -1  # an epoch ends after the first batch that takes the sample count above this (-1: no limit)
    backbone_stats: str = "release"  # BatchNorm statistics: the releases' (one train-mode forward) or ImageNet's
    reseed: int | None = None  # the releases' '.seed-N' backbone suffix: reseed with N once the model is built
    imagesize: int = 288
    batch_size: int = 8

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "MethodConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        if "layers" in values:
            values["layers"] = tuple(values["layers"])
        return cls(**values)


@dataclass
class PBASConfig(MethodConfig):
    """PBAS's configuration; defaults are the released ones (spec section 8)."""

    dsc_layers: int = 2
    dsc_hidden: int = 1024
    dsc_margin: float = 0.5  # only for the p_true / p_fake progress figures
    center_metric: str = "cosine"  # the paper says Euclidean 1-NN
    dsc_optimizer: str = "adamw"  # the paper says Adam


@dataclass
class CRASConfig(MethodConfig):
    """CRAS's configuration; defaults are the released scripts' (spec 1.2-1.3)."""

    meta_epochs: int = 100
    k: float = 0.3
    batch_size: int = 32  # multi-class; the single setting's 8 is CRAS_SINGLE_BATCH_SIZE
    dsc_layers: int = 3
    noise: float = 0.015  # std of the Gaussian residual noise
    class_vote: str = "batch"  # test-time class: majority of the batch (release) or each image's own
    noise_device: str = "cpu"  # where the noise is drawn: the CPU generator (release) or the compute device


CONFIGS: dict[str, type[MethodConfig]] = {"pbas": PBASConfig, "cras": CRASConfig}  # --method NAME -> its configuration

# Options one method does not have: given with the other method, they stop the run with this reason.
NOT_FOR = {
    "cras": {
        "dsc_hidden": "CRAS's discriminator halves its width at every layer (3072 -> 1536 -> 768 -> 1 at D = 1536)",
        "dsc_margin": "CRAS logs p_true/p_fake at the fixed threshold 0.5",
        "center_metric": "CRAS searches centers by cosine similarity only",
        "dsc_optimizer": "CRAS trains D with Adam (weight decay 1e-5) as released",
        "train_backbone": "the CRAS release creates a backbone optimizer but never steps it, so the backbone stays frozen",
    },
    "pbas": {
        "noise": "PBAS synthesises anomalies deterministically along the center direction (--k)",
        "limit": "PBAS always trains on the whole training set each epoch",
        "class_vote": "PBAS trains one model per class and scores without class banks",
        "noise_device": "PBAS draws no noise",
        "setting": "PBAS trains one model per class (CRAS has --setting multi|single)",
    },
}


def registry() -> dict:
    """--method NAME -> the method class (``common.Method`` subclasses), in CONFIGS' order; imported when called,
    as they need torch (``runner.METHODS`` and ``inference.default_methods`` are this)."""
    import cras
    import pbas

    return {pbas.PBAS.name: pbas.PBAS, cras.CRAS.name: cras.CRAS}
