"""TensorBoard event files of a run, read back with TensorBoard's own event reader: the values match the CSV logs."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main


def test_events_match_the_csv_log(mvtec_root: Path, tmp_path: Path):
    args = ["--gpu", "-1", "--method", "cras", "--results_path", str(tmp_path), "net", "-b", "efficientnet_lite0",
            "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "32", "--target_embed_dimension", "32",
            "--meta_epochs", "3", "dataset", "--setting", "multi", "--batch_size", "4", "--resize", "64", "--imagesize",
            "64", "--num_workers", "0", "-d", "texture", "-d", "object", "mvtec", str(mvtec_root)]
    assert main.cli(args) == 0
    with open(tmp_path / "logs" / "project" / "group" / "test" / "cras_mvtec_dataset_seed0.csv") as f:
        log = list(csv.DictReader(f))
    tb = tmp_path / "models" / "cras" / "mvtec_dataset" / "seed0" / "tb"
    events, evaluations = EventAccumulator(str(tb)), EventAccumulator(str(tb / "eval"))
    events.Reload()
    evaluations.Reload()
    assert {"train/loss", "train/true_loss", "train/fake_loss", "train/p_true", "train/p_fake"} <= set(events.Tags()["scalars"])
    assert {"eval/mean/image_auroc", "eval/mvtec_texture/pixel_auroc",
            "eval/mvtec_object/image_auroc"} <= set(evaluations.Tags()["scalars"])
    steps = [e.value for e in events.Scalars("train/loss")]
    assert len(steps) == 3 * 4  # 16 training images, batch 4
    for epoch, row in enumerate(log):
        assert sum(steps[4 * epoch: 4 * epoch + 4]) / 4 == pytest.approx(float(row["loss"]), abs=1e-6)
    for tag, column in (("eval/mean/image_auroc", "image_auroc"), ("eval/mvtec_object/pixel_auroc", "mvtec_object_pixel_auroc")):
        values = [(e.step, e.value) for e in evaluations.Scalars(tag)]
        assert values == [(i, pytest.approx(float(row[column]), abs=1e-6)) for i, row in enumerate(log)]
    assert (tb / "hparams").is_dir()  # hparams run
