"""End to end through the command line on tiny generated datasets (CPU)."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import main
import utils

# A tiny but complete configuration: offline backbone, small sizes, two epochs.
NET = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "64",
       "--target_embed_dimension", "64", "--dsc_hidden", "32", "--meta_epochs", "3"]
DATA = ["dataset", "--batch_size", "4", "--resize", "64", "--imagesize", "64", "--num_workers", "0"]


def run_cli(results: Path, *args: str, test: str = "ckpt", net: list[str] = NET, data_opts: tuple[str, ...] = (),
            glob: tuple[str, ...] = ()) -> int:
    return main.cli(["--gpu", "-1", "--seed", "0", "--test", test, "--results_path", str(results), *glob, *net, *DATA, *data_opts, *args])


def read_results(path: Path) -> dict[str, dict[str, float | None]]:
    """The table's numbers by row and column; an empty (nan) cell is None, so that equal tables compare equal."""
    number = lambda v: None if v == "nan" else float(v)
    with open(path) as f:
        return {row["Row Names"]: {k: number(v) for k, v in row.items() if k not in ("Row Names", *utils.GROUP_COLUMNS, *utils.SEED_GROUP_COLUMNS)}
                for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def mvtec_run(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("mvtec_results")
    assert run_cli(results, "-d", "texture", "-d", "object", "mvtec", str(mvtec_root)) == 0
    return results


def test_train_writes_every_output(mvtec_run: Path):
    table = read_results(mvtec_run / "results.csv")
    assert list(table) == ["mvtec_texture", "mvtec_object", "Mean"]
    with open(mvtec_run / "results.csv") as f:
        header = f.readline().strip().split(",")
    assert header[:7] == ["Row Names", "image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_pro", "best_epoch"]
    assert {"last_image_auroc", "last_epoch", "pixel_aupro", "last_pixel_aupro"} <= set(header)
    for name in ("mvtec_texture", "mvtec_object"):
        row = table[name]
        for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_pro", "pixel_aupro"):
            assert 0.0 <= row[key] <= 1.0
        assert row["last_epoch"] == 2 and 0 <= row["best_epoch"] <= 2
        ckpt = torch.load(mvtec_run / "models" / "pbas" / name / "seed0" / "checkpoint.pt", weights_only=False)
        assert ckpt["complete"] and ckpt["method"] == "pbas" and ckpt["config"]["classes"] == [name.split("_", 1)[1]]
        assert ckpt["center"].shape == (64, 64)  # 8x8 grid at 64 px, D = 64
        assert ckpt["best"]["metrics"][name]["image_auroc"] == pytest.approx(row["image_auroc"])
        assert set(ckpt["best"]["state"]) == {"projector", "discriminator"}
        folder = mvtec_run / "models" / "pbas" / name / "seed0" / "heatmaps" / name
        heatmaps = sorted(os.listdir(folder))
        assert len(heatmaps) == 7  # 3 good + 4 defective test images
        assert Image.open(folder / heatmaps[0]).size == utils.HEATMAP_SIZE  # tiles, their names, the colour bar
    mean = table["Mean"]
    assert mean["image_auroc"] == pytest.approx((table["mvtec_texture"]["image_auroc"] + table["mvtec_object"]["image_auroc"]) / 2)
    assert (mvtec_run / "config.json").is_file()
    assert (mvtec_run / "logs" / "project" / "group" / "test" / "pbas_mvtec_texture_seed0.csv").is_file()


def test_test_mode_reproduces_the_metrics(mvtec_run: Path, mvtec_root: Path, tmp_path: Path):
    copy = tmp_path / "results"
    shutil.copytree(mvtec_run, copy)
    os.remove(copy / "results.csv")
    assert run_cli(copy, "-d", "texture", "-d", "object", "mvtec", str(mvtec_root), test="test") == 0
    trained, tested = read_results(mvtec_run / "results.csv"), read_results(copy / "results.csv")
    for name in ("mvtec_texture", "mvtec_object", "Mean"):
        for key, value in trained[name].items():
            assert tested[name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_rerun_with_finished_checkpoint_skips_training(mvtec_run: Path, mvtec_root: Path, tmp_path: Path):
    copy = tmp_path / "results"
    shutil.copytree(mvtec_run, copy)
    ckpt = copy / "models" / "pbas" / "mvtec_texture" / "seed0" / "checkpoint.pt"
    before = os.path.getmtime(ckpt)
    assert run_cli(copy, "-d", "texture", "mvtec", str(mvtec_root)) == 0
    assert os.path.getmtime(ckpt) == before  # tested, not retrained
    assert read_results(copy / "results.csv")["mvtec_texture"]["image_auroc"] == pytest.approx(
        read_results(mvtec_run / "results.csv")["mvtec_texture"]["image_auroc"])


def test_visa_layout_end_to_end(visa_root: Path, tmp_path: Path):
    assert run_cli(tmp_path, "-d", "object", "visa", str(visa_root)) == 0
    first = read_results(tmp_path / "results.csv")
    assert list(first) == ["visa_object", "Mean"]
    assert run_cli(tmp_path, "-d", "object", "visa", str(visa_root), test="test") == 0
    second = read_results(tmp_path / "results.csv")
    for key, value in first["visa_object"].items():
        assert second["visa_object"][key] == pytest.approx(value, abs=1e-6)


def test_cached_and_uncached_paths_give_the_same_metrics(mvtec_root: Path, tmp_path: Path):
    """The feature cache must not change what is computed: same seed, same metrics."""
    cached, uncached = tmp_path / "cached", tmp_path / "uncached"
    assert run_cli(cached, "-d", "object", "mvtec", str(mvtec_root), glob=("--cache", "device")) == 0
    assert run_cli(uncached, "-d", "object", "mvtec", str(mvtec_root), glob=("--cache", "off")) == 0
    a, b = read_results(cached / "results.csv")["mvtec_object"], read_results(uncached / "results.csv")["mvtec_object"]
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-4), key


def test_a_failing_class_keeps_the_others(mvtec_copy: Path, tmp_path: Path, caplog):
    """An image whose header reads but whose data is truncated fails its class at run time only."""
    victim = sorted((mvtec_copy / "object" / "test" / "good").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    code = run_cli(tmp_path, "-d", "texture", "-d", "object", "mvtec", str(mvtec_copy))
    assert code == 1
    assert list(read_results(tmp_path / "results.csv")) == ["mvtec_texture", "Mean"]
    assert "mvtec_object failed" in caplog.text and "truncated" in caplog.text


def test_train_backbone_runs_uncached(mvtec_root: Path, tmp_path: Path):
    net = [*NET[:-1], "1", "--train_backbone"]
    assert run_cli(tmp_path, "-d", "texture", "mvtec", str(mvtec_root), net=net) == 0
    ckpt = torch.load(tmp_path / "models" / "pbas" / "mvtec_texture" / "seed0" / "checkpoint.pt", weights_only=False)
    assert "backbone" in ckpt["best"]["state"]


def test_help_documents_every_option(capsys):
    for args, expected in ((["--help"], ["--gpu", "--seed", "--test", "--results_path", "--log_group", "--log_project",
                                          "--run_name", "--precision", "--cache"]),
                           (["net", "--help"], ["--backbone_names", "--layers_to_extract_from", "--pretrain_embed_dimension",
                                                "--target_embed_dimension", "--patchsize", "--meta_epochs", "--eval_epochs",
                                                "--dsc_layers", "--dsc_hidden", "--dsc_margin", "--pre_proj", "--k",
                                                "--train_backbone", "--center_metric", "--dsc_optimizer"]),
                           (["dataset", "--help"], ["--subdatasets", "--batch_size", "--resize", "--imagesize", "--num_workers",
                                                    "--mask_binarize"])):
        assert main.cli(args) == 0
        out = capsys.readouterr().out
        for option in expected:
            assert option in out, option
        assert "default:" in out


# ----------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, nothing written
# ----------------------------------------------------------------------------------------------


def expect_one_line_error(capfd, results: Path, code: int, *fragments: str) -> None:
    err = capfd.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert not results.exists()  # nothing written


def test_error_nonexistent_datapath(tmp_path: Path, capfd):
    results = tmp_path / "r"
    expect_one_line_error(capfd, results, run_cli(results, "-d", "texture", "mvtec", str(tmp_path / "nope")), "nope")


def test_error_unknown_dataset(mvtec_root: Path, tmp_path: Path, capfd):
    results = tmp_path / "r"
    expect_one_line_error(capfd, results, run_cli(results, "-d", "texture", "kolektor", str(mvtec_root)), "kolektor", "mvtec")


def test_error_unknown_class(mvtec_root: Path, tmp_path: Path, capfd):
    results = tmp_path / "r"
    expect_one_line_error(capfd, results, run_cli(results, "-d", "texture", "-d", "carpett", "mvtec", str(mvtec_root)), "carpett")


def test_error_class_without_train_good(mvtec_copy: Path, tmp_path: Path, capfd):
    shutil.rmtree(mvtec_copy / "object" / "train" / "good")
    results = tmp_path / "r"
    expect_one_line_error(capfd, results, run_cli(results, "-d", "object", "mvtec", str(mvtec_copy)), "train")


def test_error_missing_ground_truth(mvtec_copy: Path, tmp_path: Path, capfd):
    defect = sorted(p.name for p in (mvtec_copy / "object" / "ground_truth").iterdir())[0]
    shutil.rmtree(mvtec_copy / "object" / "ground_truth" / defect)
    results = tmp_path / "r"
    expect_one_line_error(capfd, results, run_cli(results, "-d", "object", "mvtec", str(mvtec_copy)), defect)


def test_error_mask_count_mismatch(mvtec_copy: Path, tmp_path: Path, capfd):
    folder = sorted((mvtec_copy / "object" / "ground_truth").iterdir())[0]
    os.remove(sorted(folder.iterdir())[0])
    results = tmp_path / "r"
    expect_one_line_error(capfd, results, run_cli(results, "-d", "object", "mvtec", str(mvtec_copy)), folder.name)


def test_error_unreadable_image(mvtec_copy: Path, tmp_path: Path, capfd):
    victim = sorted((mvtec_copy / "object" / "train" / "good").iterdir())[0]
    victim.write_bytes(b"this is not an image")
    results = tmp_path / "r"
    expect_one_line_error(capfd, results, run_cli(results, "-d", "object", "mvtec", str(mvtec_copy)), victim.name)


def test_error_unknown_backbone(mvtec_root: Path, tmp_path: Path, capfd):
    results = tmp_path / "r"
    net = ["net", "-b", "vgg11", "-le", "layer2"]
    expect_one_line_error(capfd, results, run_cli(results, "-d", "object", "mvtec", str(mvtec_root), net=net), "vgg11", "wideresnet50")


def test_error_unknown_layer(mvtec_root: Path, tmp_path: Path, capfd):
    results = tmp_path / "r"
    net = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "layer3"]
    expect_one_line_error(capfd, results, run_cli(results, "-d", "object", "mvtec", str(mvtec_root), net=net), "layer3", "blocks.4")


def test_error_test_mode_without_checkpoint(mvtec_root: Path, tmp_path: Path, capfd):
    results = tmp_path / "r"
    expect_one_line_error(capfd, results, run_cli(results, "-d", "object", "mvtec", str(mvtec_root), test="test"), "checkpoint")


def test_error_checkpoint_from_another_configuration(mvtec_run: Path, mvtec_root: Path, tmp_path: Path, capfd):
    copy = tmp_path / "results"
    shutil.copytree(mvtec_run, copy)
    before = (copy / "results.csv").read_bytes()
    net = [*NET[:-1], "7"]  # other meta_epochs
    code = run_cli(copy, "-d", "texture", "mvtec", str(mvtec_root), test="test", net=net)
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "meta_epochs" in err[0]
    assert (copy / "results.csv").read_bytes() == before  # nothing lost


def test_error_bad_option_value_is_one_line(mvtec_root: Path, tmp_path: Path, capfd):
    results = tmp_path / "r"
    code = main.cli(["--test", "train", "--results_path", str(results), *NET, *DATA, "mvtec", str(mvtec_root)])
    expect_one_line_error(capfd, results, code, "--test")


def test_two_worker_processes_give_a_whole_table_in_class_order(mvtec_run: Path, mvtec_root: Path, tmp_path: Path):
    """--gpu -1 --gpu -2 runs one process per id (CPU processes: negative ids); results.csv comes out whole, in class order,
    with the same metrics as the single-process run under the same number of threads (each worker gets
    cpu_count // 2: another thread count rounds the maps differently, and the released PRO's thresholds can
    turn that into a 1e-3 difference)."""
    code = main.cli(["--seed", "0", "--results_path", str(tmp_path), "--gpu", "-1", "--gpu", "-2", *NET, *DATA[:-2],
                     "--num_workers", "1",  # each worker process starts a data-loading process of its own
                     "-d", "texture", "-d", "object", "mvtec", str(mvtec_root)])
    assert code == 0
    threads, before = max(1, (os.cpu_count() or 1) // 2), torch.get_num_threads()
    reference = mvtec_run
    if threads != before:  # the shared single-process run used other threads: one with the workers' number
        reference = tmp_path / "single"
        torch.set_num_threads(threads)
        try:
            assert run_cli(reference, "-d", "texture", "-d", "object", "mvtec", str(mvtec_root)) == 0
        finally:
            torch.set_num_threads(before)
    parallel, single = read_results(tmp_path / "results.csv"), read_results(reference / "results.csv")
    assert list(parallel) == ["mvtec_texture", "mvtec_object", "Mean"]
    for name in parallel:
        for key, value in single[name].items():
            assert parallel[name][key] == pytest.approx(value, abs=1e-4), (name, key)


def test_host_cache_gives_the_same_metrics(mvtec_run: Path, mvtec_root: Path, tmp_path: Path):
    assert run_cli(tmp_path, "-d", "texture", "mvtec", str(mvtec_root), glob=("--cache", "host")) == 0
    host, device = read_results(tmp_path / "results.csv")["mvtec_texture"], read_results(mvtec_run / "results.csv")["mvtec_texture"]
    for key in host:
        assert host[key] == pytest.approx(device[key], abs=1e-6), key


@pytest.mark.parametrize("glob,net,data,words", [
    (("--seed", "-1"), (), (), "--seed"),
    ((), ("--k", "-0.1"), (), "--k"),
    ((), ("--dsc_margin", "1.5"), (), "--dsc_margin"),
    ((), (), ("--imagesize", "96"), "larger than --resize"),
    ((), (), ("--batch_size", "0"), "--batch_size"),
])
def test_option_values_that_make_no_sense_are_one_line_errors(mvtec_root: Path, tmp_path: Path, capfd, glob, net, data,
                                                              words):
    results = tmp_path / "r"
    code = main.cli(["--results_path", str(results), *glob, *NET, *net, *DATA, *data, "-d", "object", "mvtec",
                     str(mvtec_root)])
    expect_one_line_error(capfd, results, code, words)


def test_results_path_that_cannot_be_written_is_a_one_line_error(mvtec_root: Path, tmp_path: Path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for results, words in ((blocker, "not a folder"), (blocker / "sub", "cannot be written")):
        code = run_cli(results, "-d", "object", "mvtec", str(mvtec_root))
        err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(err) == 1 and "--results_path" in err[0] and words in err[0], err
    assert blocker.read_text() == "x"
