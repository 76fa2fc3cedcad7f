"""CRAS through the command line on tiny generated data (CPU): multi and single settings, --test test round trips,
method defaults and rejected options, other datasets and layouts, the authors' released-weights folders."""
from __future__ import annotations

import contextlib

import csv
import shutil
from pathlib import Path

import pytest
import torch

import cras
import engine
import main
import runner
import utils
from datasets.synthetic import make_dataset

NET = ["net", "-b", "efficientnet_lite0", "-le", "blocks.2", "-le", "blocks.4", "--pretrain_embed_dimension", "64",
       "--target_embed_dimension", "64", "--meta_epochs", "2", "--eval_epochs", "1", "--dsc_layers", "3", "--pre_proj", "1",
       "--noise", "0.015", "--k", "0.3", "--limit", "-1"]
DATA = ["dataset", "--batch_size", "4", "--resize", "64", "--imagesize", "64", "--num_workers", "0"]


def run_cli(results: Path, *args: str, test: str = "ckpt", setting: str = "multi", net: list[str] = NET,
            glob: tuple[str, ...] = ()) -> int:
    return main.cli(["--gpu", "-1", "--method", "cras", "--seed", "0", "--test", test, "--results_path", str(results), *glob, *net,
                     *DATA, "--setting", setting, *args])


def read_results(path: Path) -> dict[str, dict[str, float | None]]:
    """The table's numbers by row and column; an empty (nan) cell is None, so that equal tables compare equal."""
    number = lambda v: None if v == "nan" else float(v)
    with open(path) as f:
        return {row["Row Names"]: {k: number(v) for k, v in row.items() if k not in ("Row Names", *utils.GROUP_COLUMNS, *utils.SEED_GROUP_COLUMNS)}
                for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def multi_run(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("cras_multi")
    assert run_cli(results, "-d", "texture", "-d", "object", "mvtec", str(mvtec_root)) == 0
    return results


def test_multi_trains_one_model_for_both_classes(multi_run: Path):
    table = read_results(multi_run / "results.csv")
    assert list(table) == ["mvtec_texture", "mvtec_object", "Mean"]
    with open(multi_run / "results.csv") as f:
        header = f.readline().strip().split(",")
        assert header[: 1 + len(utils.RESULT_COLUMNS)] == ["Row Names", *utils.RESULT_COLUMNS]  # the same columns as PBAS runs
    ckpt = torch.load(multi_run / "models" / "cras" / "mvtec_dataset" / "seed0" / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "cras" and ckpt["complete"] and ckpt["config"]["setting"] == "multi"
    assert ckpt["classes"] == ["mvtec_texture", "mvtec_object"]
    assert ckpt["center"].shape == (2, 64, 64)  # one bank per class: 8x8 positions at 64 px, D = 64
    assert set(ckpt["best"]["metrics"]) == {"mvtec_texture", "mvtec_object"}
    assert set(ckpt["normal_scores"]) == {"mvtec_texture", "mvtec_object"}
    for name in ("mvtec_texture", "mvtec_object"):
        assert table[name]["best_epoch"] == ckpt["best"]["epoch"] and table[name]["last_epoch"] == 1
        assert ckpt["best"]["metrics"][name]["image_auroc"] == pytest.approx(table[name]["image_auroc"])
        assert len(list((multi_run / "models" / "cras" / "mvtec_dataset" / "seed0" / "heatmaps" / name).iterdir())) == 7
    for key in ("image_auroc", "pixel_auroc", "last_pixel_pro"):
        assert table["Mean"][key] == pytest.approx((table["mvtec_texture"][key] + table["mvtec_object"][key]) / 2)
    log = multi_run / "logs" / "project" / "group" / "test" / "cras_mvtec_dataset_seed0.csv"
    assert log.read_text().splitlines()[0] == ("epoch,loss,true_loss,fake_loss,p_true,p_fake,image_auroc,pixel_auroc,"
                                               "mvtec_texture_image_auroc,mvtec_texture_pixel_auroc,"
                                               "mvtec_object_image_auroc,mvtec_object_pixel_auroc")


def test_multi_test_mode_reproduces_the_metrics_exactly(multi_run: Path, mvtec_root: Path, tmp_path: Path):
    copy = tmp_path / "results"
    shutil.copytree(multi_run, copy)
    (copy / "results.csv").unlink()
    assert run_cli(copy, "-d", "texture", "-d", "object", "mvtec", str(mvtec_root), test="test") == 0
    assert read_results(copy / "results.csv") == read_results(multi_run / "results.csv")


def test_single_setting_trains_a_model_per_class(mvtec_root: Path, tmp_path: Path):
    assert run_cli(tmp_path, "-d", "texture", "-d", "object", "mvtec", str(mvtec_root), setting="single") == 0
    assert list(read_results(tmp_path / "results.csv")) == ["mvtec_texture", "mvtec_object", "Mean"]
    for name in ("mvtec_texture", "mvtec_object"):
        ckpt = torch.load(tmp_path / "models" / "cras" / name / "seed0" / "checkpoint.pt", weights_only=True)
        assert ckpt["center"].shape == (1, 64, 64) and ckpt["classes"] == [name]
        assert ckpt["config"]["setting"] == "single"


def test_single_class_multi_equals_single_setting(mvtec_root: Path, tmp_path: Path):
    """With one class, one model for 'all' classes is the per-class model: same seed, same numbers."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    assert run_cli(multi, "-d", "object", "mvtec", str(mvtec_root)) == 0
    assert run_cli(single, "-d", "object", "mvtec", str(mvtec_root), setting="single") == 0
    assert read_results(multi / "results.csv") == read_results(single / "results.csv")


def test_cache_does_not_change_what_is_computed(mvtec_root: Path, tmp_path: Path):
    cached, uncached = tmp_path / "cached", tmp_path / "uncached"
    assert run_cli(cached, "-d", "texture", "-d", "object", "mvtec", str(mvtec_root), glob=("--cache", "device")) == 0
    assert run_cli(uncached, "-d", "texture", "-d", "object", "mvtec", str(mvtec_root), glob=("--cache", "off")) == 0
    a, b = read_results(cached / "results.csv"), read_results(uncached / "results.csv")
    for name in a:
        for key in a[name]:
            assert b[name][key] == pytest.approx(a[name][key], abs=1e-4), (name, key)


def test_image_vote_is_recorded_and_evaluated(multi_run: Path, mvtec_root: Path, tmp_path: Path):
    net = [*NET, "--class_vote", "image"]
    assert run_cli(tmp_path, "-d", "texture", "-d", "object", "mvtec", str(mvtec_root), net=net) == 0
    ckpt = torch.load(tmp_path / "models" / "cras" / "mvtec_dataset" / "seed0" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["net"]["class_vote"] == "image"
    # the batch vote checkpoint is another configuration: --test test with --class_vote image refuses it
    code = run_cli(multi_run, "-d", "texture", "-d", "object", "mvtec", str(mvtec_root), test="test", net=net)
    assert code == 2


# ----------------------------------------------------------------------------------------------
# options: method defaults, the release's command line, options of the other method
# ----------------------------------------------------------------------------------------------


def parsed(monkeypatch, argv: list[str]) -> runner.RunOptions:
    seen = {}
    monkeypatch.setattr(runner, "run", lambda opts: seen.setdefault("opts", opts) and [])
    assert main.cli(argv) == 0
    return seen["opts"]


def test_cras_defaults_apply_when_options_are_not_given(monkeypatch, tmp_path):
    opts = parsed(monkeypatch, ["--method", "cras", "net", "dataset", "mvtec", str(tmp_path)])
    c = opts.config
    assert isinstance(c, cras.CRASConfig)
    assert (c.meta_epochs, c.dsc_layers, c.noise, c.k, c.limit, c.batch_size) == (100, 3, 0.015, 0.3, -1, 32)
    assert (opts.setting, opts.resize, c.imagesize, c.class_vote, c.noise_device) == ("multi", 329, 288, "batch", "cpu")
    single = parsed(monkeypatch, ["--method", "cras", "net", "dataset", "--setting", "single", "mvtec", str(tmp_path)])
    assert single.config.batch_size == 8 and single.setting == "single"
    pbas_opts = parsed(monkeypatch, ["net", "dataset", "mvtec", str(tmp_path)])
    assert (pbas_opts.config.meta_epochs, pbas_opts.config.k, pbas_opts.config.batch_size, pbas_opts.resize) == (640, 0.25, 8, 288)


@pytest.mark.parametrize("script", ["multi", "single"])
def test_release_cras_command_line_is_accepted_with_method_added(monkeypatch, tmp_path, script):
    """CRAS_SPEC 1.3, the scripts' command line, with --method cras."""
    epochs, batch = ("100", "32") if script == "multi" else ("640", "8")
    argv = ("--method cras --gpu 0 --seed 0 --test ckpt net -b wideresnet50 -le layer2 -le layer3 "
            "--pretrain_embed_dimension 1536 --target_embed_dimension 1536 --patchsize 3 "
            f"--meta_epochs {epochs} --eval_epochs 1 --dsc_layers 3 --pre_proj 1 --noise 0.015 --k 0.3 --limit -1 "
            f"dataset --setting {script} --batch_size {batch} --resize 329 --imagesize 288 -d carpet -d grid mvtec DATA").split()
    opts = parsed(monkeypatch, [str(tmp_path) if a == "DATA" else a for a in argv])
    assert opts.config == cras.CRASConfig(meta_epochs=int(epochs), batch_size=int(batch))
    assert opts.setting == script and opts.resize == 329 and opts.classes == ["carpet", "grid"]
    assert [name for name, _ in runner.job_groups(opts)] == (["mvtec_dataset"] if script == "multi" else ["mvtec_carpet", "mvtec_grid"])


REJECTED = [("cras", "net", option) for option in ("--dsc_hidden 8", "--dsc_margin 0.4", "--center_metric cosine",
                                                    "--dsc_optimizer adam", "--train_backbone")]
REJECTED += [("pbas", "net", option) for option in ("--noise 0.1", "--limit 5", "--class_vote image", "--noise_device cpu")]
REJECTED += [("pbas", "dataset", "--setting single")]


@pytest.mark.parametrize("method,where,option", REJECTED)
def test_an_option_of_the_other_method_is_rejected(mvtec_root: Path, tmp_path: Path, capfd, method, where, option):
    results = tmp_path / "r"
    parts = {"net": ["net"], "dataset": ["dataset"]}
    parts[where] += option.split()
    code = main.cli(["--method", method, "--results_path", str(results), *parts["net"], *parts["dataset"],
                     "-d", "object", "mvtec", str(mvtec_root)])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and option.split()[0] in err[0], err
    assert f"not used by {method.upper()}" in err[0]
    assert not results.exists()


@pytest.mark.parametrize("option,words", [("--limit -2", "--limit"), ("--noise 0", "--noise"),
                                          ("--dsc_layers 40", "--dsc_layers")])
def test_values_that_make_no_sense_are_rejected(mvtec_root: Path, tmp_path: Path, capfd, option, words):
    results = tmp_path / "r"
    code = main.cli(["--method", "cras", "--results_path", str(results), "net", *option.split(), "dataset",
                     "-d", "object", "mvtec", str(mvtec_root)])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not results.exists()


def test_help_shows_both_methods_defaults(capsys):
    assert main.cli(["net", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("pbas: 640; cras: 100", "pbas: 2; cras: 3", "pbas: 0.25; cras: 0.3", "--noise", "--limit", "--class_vote"):
        assert text in out, text
    assert main.cli(["dataset", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("pbas: 288; cras: 329", "cras: 32 multi, 8 single", "--setting"):
        assert text in out, text


def test_a_checkpoint_of_the_other_method_is_a_one_line_error(multi_run: Path, mvtec_root: Path, tmp_path: Path, capfd):
    ckpt = multi_run / "models" / "cras" / "mvtec_dataset" / "seed0" / "checkpoint.pt"
    code = main.cli(["--method", "pbas", "predict", "--checkpoint", str(ckpt), str(mvtec_root / "object" / "test"),
                     "--output", str(tmp_path / "out")])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "CRAS checkpoint" in err[0] and "--method cras" in err[0], err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# the epoch limit
# ----------------------------------------------------------------------------------------------


class _CountingMethod(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.batches = []

    def epoch_draws(self, batch_lengths, positions, device):
        return contextlib.nullcontext()

    def loss(self, feats, labels, positions, noise=None):
        self.batches.append(len(labels))
        loss = (self.w - feats.mean()) ** 2
        return loss, {"loss": loss.detach()}


class _Train:
    """A TrainSet stand-in: batches of 4 images of one position each."""

    class source:
        positions = 1
        batch_size = 4

    labels = torch.zeros(0, dtype=torch.long)

    def batches(self, order, train=False, seed=0):
        for chunk in engine.batches_of(order, 4):
            yield torch.ones(len(chunk), 3), torch.zeros(len(chunk), dtype=torch.long)


@pytest.mark.parametrize("limit,expected", [(-1, [4, 4, 4, 4, 2]), (8, [4, 4, 4]), (0, [4]), (17, [4, 4, 4, 4, 2])])
def test_limit_ends_the_epoch_after_the_batch_that_passes_it(limit, expected):
    """The release: ``if sample_num > limit != -1: break`` after each step."""
    method = _CountingMethod()
    engine.train_epoch(method, [torch.optim.SGD(method.parameters(), lr=0.1)], _Train(), list(range(18)), limit)
    assert method.batches == expected


# ----------------------------------------------------------------------------------------------
# datasets: ITDD, VisA in both layouts
# ----------------------------------------------------------------------------------------------


def test_itdd_multi_class_run(tmp_path: Path):
    root = tmp_path / "itdd"
    classes = ("cotton_fabric", "dyed_fabric")
    make_dataset(root, classes=classes, n_train=4, n_test_good=2, n_test_defect=3, size=64, seed=0)
    assert run_cli(tmp_path / "r", "-d", classes[0], "-d", classes[1], "itdd", str(root)) == 0
    assert list(read_results(tmp_path / "r" / "results.csv")) == ["itdd_cotton_fabric", "itdd_dyed_fabric", "Mean"]
    assert (tmp_path / "r" / "models" / "cras" / "itdd_dataset" / "seed0" / "checkpoint.pt").is_file()


def test_visa_in_both_layouts(mvtec_root: Path, visa_root: Path, tmp_path: Path):
    """VisA as split_csv/1cls.csv (PBAS) and as the MVTec-layout conversion (CRAS), detected from the folder."""
    for name, root in (("csv", visa_root), ("mvtec_layout", mvtec_root)):
        assert run_cli(tmp_path / name, "-d", "object", "visa", str(root)) == 0
        assert list(read_results(tmp_path / name / "results.csv")) == ["visa_object", "Mean"]


# ----------------------------------------------------------------------------------------------
# the authors' released weights (center.pth + ckpt_best_N.pth), written from the golden states
# ----------------------------------------------------------------------------------------------

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_NET = ["net", "-b", "efficientnet_lite0", "-le", "blocks.4", "--pretrain_embed_dimension", "32",
              "--target_embed_dimension", "32", "--meta_epochs", "2", "--dsc_layers", "3"]  # 4x4 patches at 64 px, D = 32


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("three")
    make_dataset(root, classes=("texture", "object", "texture_b"), n_train=4, n_test_good=2, n_test_defect=3, size=64, seed=1)
    return root


def write_release(folder: Path, state: dict, center: torch.Tensor | None, epoch: int) -> None:
    folder.mkdir(parents=True)
    torch.save({"discriminator": state["discriminator"], "pre_projection": state["projection"]}, folder / f"ckpt_best_{epoch}.pth")
    if center is not None:
        torch.save(center, folder / "center.pth")


def test_released_cras_weights_are_evaluated_and_usable_by_predict(three_classes: Path, tmp_path: Path):
    g = torch.load(GOLDEN / "cras_predict.pt", weights_only=False)
    release = tmp_path / "release"
    write_release(release / "mvtec_dataset", g["state"], g["center_bank"], 7)
    results = tmp_path / "r"
    args = ["-d", "texture", "-d", "object", "-d", "texture_b", "mvtec", str(three_classes)]
    assert run_cli(results, *args, test="test", net=GOLDEN_NET, glob=("--release_weights", str(release))) == 0
    table = read_results(results / "results.csv")
    assert list(table) == ["mvtec_texture", "mvtec_object", "mvtec_texture_b", "Mean"]
    assert all(table[n]["best_epoch"] == 7 for n in table)
    ckpt = torch.load(results / "models" / "cras" / "mvtec_dataset" / "seed0" / "checkpoint.pt", weights_only=True)
    assert torch.equal(ckpt["center"], g["center_bank"]) and ckpt["release"] == str(release / "mvtec_dataset")
    for key, value in g["state"]["discriminator"].items():
        assert torch.equal(ckpt["best"]["state"]["discriminator"][key], value)
    # the converted checkpoint is ours: --test test without the release folder gives the same table
    (results / "results.csv").unlink()
    assert run_cli(results, *args, test="test", net=GOLDEN_NET) == 0
    assert read_results(results / "results.csv") == table
    # and predict scores with it (per-image class vote, that class's thresholds)
    out = tmp_path / "pred"
    assert main.cli(["predict", "--checkpoint", str(results / "models" / "cras" / "mvtec_dataset" / "seed0" / "checkpoint.pt"),
                     str(three_classes / "object" / "test"), "--output", str(out)]) == 0
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {r["class"] for r in rows} <= {"mvtec_texture", "mvtec_object", "mvtec_texture_b"}


def test_released_pbas_weights_are_evaluated(three_classes: Path, tmp_path: Path):
    g = torch.load(GOLDEN / "train_step.pt", weights_only=False)
    release = tmp_path / "release"
    write_release(release / "mvtec_object", g["init"], None, 3)  # PBAS scores without its center
    net = ["net", "-b", "efficientnet_lite0", "-le", "blocks.4", "--pretrain_embed_dimension", "64",
           "--target_embed_dimension", "64", "--meta_epochs", "2", "--dsc_hidden", "32"]
    code = main.cli(["--test", "test", "--release_weights", str(release), "--results_path", str(tmp_path / "r"), *net,
                     "dataset", "--batch_size", "4", "--resize", "64", "--imagesize", "64", "--num_workers", "0",
                     "-d", "object", "mvtec", str(three_classes)])
    assert code == 0
    assert read_results(tmp_path / "r" / "results.csv")["mvtec_object"]["best_epoch"] == 3


@pytest.mark.parametrize("damage,words", [
    (lambda f: shutil.rmtree(f), "no released weights"),
    (lambda f: (f / "center.pth").unlink(), "center.pth is missing"),
    (lambda f: shutil.copy(f / "ckpt_best_7.pth", f / "ckpt_best_9.pth"), "exactly one ckpt_best_N.pth"),
])
def test_broken_release_folders_are_one_line_errors(three_classes: Path, tmp_path: Path, capfd, damage, words):
    g = torch.load(GOLDEN / "cras_predict.pt", weights_only=False)
    release = tmp_path / "release"
    write_release(release / "mvtec_dataset", g["state"], g["center_bank"], 7)
    damage(release / "mvtec_dataset")
    results = tmp_path / "r"
    code = run_cli(results, "-d", "texture", "-d", "object", "-d", "texture_b", "mvtec", str(three_classes), test="test",
                   net=GOLDEN_NET, glob=("--release_weights", str(release)))
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not results.exists()


def test_release_weights_need_test_mode(three_classes: Path, tmp_path: Path, capfd):
    code = run_cli(tmp_path / "r", "-d", "object", "mvtec", str(three_classes), glob=("--release_weights", str(tmp_path)))
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and "--test test" in err[0]
