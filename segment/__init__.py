"""Supervised anomaly segmentation trained on synthetic anomalies, tested on real ones (issue 16).

    config.py     SegmentConfig and the option choices, torch-free (the command line's defaults)
    networks.py   smp U-Net (default) / SegFormer on an ImageNet encoder read offline; focal + Dice loss
    synthesis.py  the baseline synthesis: Perlin-noise masks, texture from the image itself or other normal images
    data.py       synthetic folder (MVTec layout) + the class's normal images; the real test set without the
                  anomalies that trained the synthesis (datasets/split.py)
    train.py      the training loop, tensors-only resumable checkpoints
    evaluate.py   per-class metrics, heatmaps, scores.csv
    pipeline.py   one ``main.py segment`` run into a results folder (PBAS/CRAS conventions)
    predict.py    masks and overlays for new images; ONNX export with a parity check
The package imports datasets, utils, metrics, runstate, errors and backbones only (never the PBAS/CRAS engine).
"""
