"""The segmenter's configuration and the choices of its options, in plain Python (no torch, so that parsing and
``--help`` stay fast); ``segment/networks.py``, ``train.py`` and ``synthesis.py`` implement them."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from errors import UserError

ARCHITECTURES = ("unet", "segformer")
ENCODER_NAMES = ("resnet18", "resnet34", "resnet50", "efficientnet_lite0")  # segment.networks.ENCODERS
DEFAULT_ENCODER = "resnet34"  # smp's default encoder; its torchvision file must be in the hub cache
WEIGHTS_IMAGENET, WEIGHTS_NONE = "imagenet", "none"
TEXTURE_SOURCES = ("self", "other")  # synth-baseline --texture


@dataclass(frozen=True)
class SegmentConfig:
    """Everything that defines a trained segmenter (recorded in its checkpoint, compared on resume)."""

    arch: str = "unet"
    encoder: str = DEFAULT_ENCODER
    encoder_weights: str = WEIGHTS_IMAGENET
    imagesize: int = 256
    resize: int = 256
    steps: int = 4000
    batch_size: int = 8
    lr: float = 5e-4
    anomaly_share: float = 0.5
    save_every: int = 500

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """One-line UserErrors for values that make no sense."""
        for key in ("imagesize", "resize", "steps", "batch_size", "save_every"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key} must be at least 1, got {getattr(self, key)}")
        if self.imagesize % 32:
            raise UserError(f"--imagesize must be a multiple of 32 (the encoder's stride), got {self.imagesize}")
        if self.imagesize > self.resize:
            raise UserError(f"--imagesize {self.imagesize} is larger than --resize {self.resize}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 < self.anomaly_share <= 1:
            raise UserError(f"--anomaly_share must be in (0, 1], got {self.anomaly_share}")
