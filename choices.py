"""The value sets of command-line options shared by several pipelines, defined once here in plain Python (no
torch, so that parsing and ``--help`` stay fast) and imported from here by the modules that implement them."""
from __future__ import annotations

PRECISIONS = ("fp32", "tf32", "bf16")  # --precision (utils.configure_precision, common.autocast)
CACHE_MODES = ("auto", "device", "host", "off")  # --cache: the feature cache of engine.py
BACKBONE_NAMES = ("wideresnet50", "wideresnet101", "resnet18", "resnet50", "efficientnet_lite0")  # backbones.BACKBONES
ANOMALY_SPLITS = ("third", "all")  # real anomalies held out for the synthesis (datasets/split.py)
PANDA_DATASETS = ("mvtec", "btad", "folder")  # the datasets PANDA reads (panda/data.py)
EXPORT_FORMATS = ("onnx", "openvino")  # export --format (deploy.py writes them; inference.py, openvino_ir.py read them)
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")  # export --precision (fp16: --format openvino only)
EXPORT_CALIBRATION_SIZE = 300  # export --calibration_size: images, as NNCF's default subset
EXPORT_MAX_DROP = 0.5  # export --max_drop: points of AUROC
# panda-generate --empty_latent_masks: a drawn mask that vanishes in the latent mask is redrawn, or kept (public)
EMPTY_LATENT_MASKS = ("redraw", "keep")
MASK_BINARIZE = ("release", "half")  # --mask_binarize: the test masks' ground truth rule (metrics.binarize_masks)
