"""Run for run with the releases (RNG_REPLAY_SPEC section 8): whole runs of the PBAS and CRAS releases,
recorded with their data, replayed through our command line with the recorded options.

Bit for bit: the generator state after the backbone's constructor, the initial P and D, every data pass's
order and CRAS's noise. To the spec's tolerances: the centers, the states after each epoch and every
evaluation's metrics (float results depend on threads and kernels)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import backbones
import cras
import engine
import main
from common import Embedder

GOLDEN = Path(__file__).parent / "golden"
CENTER_ATOL = 1e-4
STATE_TOL = 1e-5  # atol and rtol of Linear weights, BatchNorm weight, bias and running_var
ZERO_GRADIENT_ATOL = 2e-3  # parameters with a true gradient of zero (pre-BatchNorm biases) and what carries them
METRIC_ATOL = 1e-4


def write_files(files: dict[str, torch.Tensor], root: Path) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.numpy().tobytes())


def our_argv(recorded: list[str], method: str, results: Path, data: Path) -> list[str]:
    """The recorded command line with R and DATA substituted, on the CPU (where the runs were recorded);
    CRAS names its method (our one program runs both)."""
    argv = [str(results) if a == "R" else str(data) if a == "DATA" else a for a in recorded]
    argv[argv.index("--gpu") + 1] = "-1"
    return (["--method", "cras"] if method == "cras" else []) + argv


class Recorder:
    """What a run draws and computes, captured at the engine's seams."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.rng_after_backbone: list[torch.Tensor] = []
        self.passes: list[tuple[bool, list[int]]] = []
        self.init: list[dict] = []
        self.center: list[torch.Tensor] = []
        self.epochs: list[dict] = []
        self.evaluations: list[dict] = []
        self.noise: list[torch.Tensor] = []
        self._wrap(monkeypatch)

    def _wrap(self, mp: pytest.MonkeyPatch) -> None:
        fresh_copy, data_pass, initialize = backbones.fresh_copy, engine.data_pass, engine.initialize
        train_epoch, evaluate, next_noise = engine.train_epoch, engine.evaluate, cras.NoiseStream.next

        def copy_hook(*args, **kwargs):
            out = fresh_copy(*args, **kwargs)
            self.rng_after_backbone.append(torch.get_rng_state())
            return out

        def pass_hook(n, shuffle):
            order = data_pass(n, shuffle)
            self.passes.append((shuffle, list(order)))
            return order

        def init_hook(method, train):
            self.init.append(method.trained_state())
            initialize(method, train)
            self.center.append(method.center.detach().clone())

        def epoch_hook(method, *args, **kwargs):
            out = train_epoch(method, *args, **kwargs)
            self.epochs.append(method.trained_state())
            return out

        def evaluate_hook(method, tests, full, scores_out=None, draw=True):
            out = evaluate(method, tests, full, scores_out, draw)
            if not full:
                self.evaluations.append(out[0])
            return out

        def noise_hook(stream):
            eps = next_noise(stream)
            self.noise.append(eps.clone())
            return eps

        mp.setattr(backbones, "fresh_copy", copy_hook)
        mp.setattr(engine, "data_pass", pass_hook)
        mp.setattr(engine, "initialize", init_hook)
        mp.setattr(engine, "train_epoch", epoch_hook)
        mp.setattr(engine, "evaluate", evaluate_hook)
        mp.setattr(cras.NoiseStream, "next", noise_hook)


def replay(method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, Recorder, dict]:
    """Run the recorded command line; (recorded run, what ours drew and computed, our metrics.json rows)."""
    g = torch.load(GOLDEN / f"{method}_run.pt", weights_only=True)
    write_files(g["files"], tmp_path / "data")
    recorder = Recorder(monkeypatch)
    with torch.random.fork_rng():
        assert main.cli(our_argv(g["argv"], method, tmp_path / "r", tmp_path / "data")) == 0
    job = "mvtec_carpet" if method == "pbas" else "mvtec_dataset"
    rows = json.loads((tmp_path / "r" / "models" / method / job / "seed0" / engine.METRICS_NAME).read_text())["rows"]
    return g, recorder, rows


def assert_same_stream(g: dict, rec: Recorder) -> None:
    """The pure random products, bit for bit (spec 8.2)."""
    assert len(rec.rng_after_backbone) == 1 and torch.equal(rec.rng_after_backbone[0], g["rng_after_backbone"])
    assert len(rec.init) == 1
    for module, key in (("projector", "projection"), ("discriminator", "discriminator")):
        ours, theirs = rec.init[0][module], g["init"][key]
        assert set(ours) == set(theirs)
        for name in theirs:
            assert torch.equal(ours[name], theirs[name]), f"initial {key}.{name}"
    assert [shuffle for shuffle, _ in rec.passes] == [p["shuffle"] for p in g["passes"]]
    for i, ((_, order), recorded) in enumerate(zip(rec.passes, g["passes"], strict=True)):
        assert engine.batches_of(order, recorded["batch_size"]) == recorded["batches"], f"pass {i} ({recorded['dataset']})"


def zero_gradient(module: str, name: str, method: str) -> bool:
    """Parameters whose true gradient is zero (spec 8.4): pre-BatchNorm Linear biases, the running_mean that
    carries them and, in CRAS, the projector bias."""
    if module == "projector":
        return method == "cras" and name.endswith("bias")
    return (name.startswith("body.") and name.endswith(".0.bias")) or name.endswith("running_mean")


def assert_epoch_states(g: dict, rec: Recorder, method: str) -> None:
    assert len(rec.epochs) == len(g["epochs"])
    for k, (ours, theirs) in enumerate(zip(rec.epochs, g["epochs"])):
        for module, key in (("projector", "projection"), ("discriminator", "discriminator")):
            assert set(ours[module]) == set(theirs[key])
            for name, expected in theirs[key].items():
                value, where = ours[module][name], f"epoch {k} {key}.{name}"
                if not expected.is_floating_point():
                    assert torch.equal(value, expected), where
                elif zero_gradient(module, name, method):
                    torch.testing.assert_close(value, expected, atol=ZERO_GRADIENT_ATOL, rtol=0, msg=where)
                else:
                    torch.testing.assert_close(value, expected, atol=STATE_TOL, rtol=STATE_TOL, msg=where)


def assert_metrics(ours: dict, theirs: tuple, full: bool, where: str) -> None:
    """A release tuple (image AUROC, image AP, pixel AUROC, pixel AP, PRO): AP only in the tester's, PRO never."""
    keys = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap") if full else ("image_auroc", None, "pixel_auroc")
    for key, value in zip(keys, theirs):
        if key is not None:
            assert ours[key] == pytest.approx(value, abs=METRIC_ATOL), f"{where} {key}"


def test_pbas_release_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    g, rec, rows = replay("pbas", tmp_path, monkeypatch)
    assert_same_stream(g, rec)
    torch.testing.assert_close(rec.center[0], g["center"], atol=CENTER_ATOL, rtol=0)
    assert_epoch_states(g, rec, "pbas")
    assert len(rec.evaluations) == len(g["epochs"])
    for k, (ours, recorded) in enumerate(zip(rec.evaluations, g["epochs"])):
        assert_metrics(ours["mvtec_carpet"], recorded["metrics"][0], False, f"epoch {k}")
    tester = g["epochs"][-1]["metrics"][1]
    assert rows["mvtec_carpet"]["best_epoch"] == 0
    assert_metrics(rows["mvtec_carpet"], tester, True, "tester")


def test_cras_release_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    g, rec, rows = replay("cras", tmp_path, monkeypatch)
    assert_same_stream(g, rec)
    assert len(rec.noise) == 3 * len(g["noise"])  # every epoch: 12 training images in batches of 2
    for i, expected in enumerate(g["noise"]):
        assert torch.equal(rec.noise[i], expected), f"noise of step {i}"
    torch.testing.assert_close(torch.stack(rec.center).squeeze(0), g["center"], atol=CENTER_ATOL, rtol=0)
    assert_epoch_states(g, rec, "cras")
    assert len(rec.evaluations) == len(g["epochs"])
    for k, (ours, recorded) in enumerate(zip(rec.evaluations, g["epochs"])):
        for name, values in recorded["eval"].items():
            assert_metrics(ours[name], values, False, f"epoch {k} {name}")
    for name, values in g["final"].items():
        assert rows[name]["best_epoch"] == g["best_epoch"]
        assert_metrics(rows[name], values, True, f"tester {name}")


def test_the_stream_is_the_same_without_the_cache_and_loader_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The draws are the engine's, not the loader's: --cache off with 0 workers draws exactly the same."""
    g = torch.load(GOLDEN / "cras_run.pt", weights_only=True)
    write_files(g["files"], tmp_path / "data")
    argv = our_argv(g["argv"], "cras", tmp_path / "r", tmp_path / "data")
    argv[argv.index("--num_workers") + 1] = "0"
    argv[argv.index("--meta_epochs") + 1] = "1"
    rec = Recorder(monkeypatch)
    with torch.random.fork_rng():
        assert main.cli(["--cache", "off", *argv]) == 0
    assert torch.equal(rec.rng_after_backbone[0], g["rng_after_backbone"])
    recorded = [*g["passes"][:5], *g["passes"][-2:]]  # centers, epoch 0 (train, tests), tester
    assert [engine.batches_of(order, 2) for _, order in rec.passes] == [p["batches"] for p in recorded]
    assert len(rec.noise) == len(g["noise"]) and all(torch.equal(a, b) for a, b in zip(rec.noise, g["noise"]))
    for name, values in g["epochs"][0]["eval"].items():
        assert_metrics(rec.evaluations[0][name], values, False, f"epoch 0 {name}")


def test_seed_suffix_reseeds_after_the_model_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """'-b NAME.seed-N': the initial weights still come from --seed, the data order from N."""
    g = torch.load(GOLDEN / "pbas_run.pt", weights_only=True)
    write_files(g["files"], tmp_path / "data")
    argv = our_argv(g["argv"], "pbas", tmp_path / "r", tmp_path / "data")
    argv[argv.index("efficientnet_lite0")] = "efficientnet_lite0.seed-5"
    argv[argv.index("--meta_epochs") + 1] = "1"
    rec = Recorder(monkeypatch)
    with torch.random.fork_rng():
        assert main.cli(argv) == 0
        torch.manual_seed(5)
        expected = engine.data_pass(6, shuffle=True)
    for name, value in g["init"]["discriminator"].items():
        assert torch.equal(rec.init[0]["discriminator"][name], value)
    assert rec.passes[0] == (True, expected) and engine.batches_of(expected, 2) != g["passes"][0]["batches"]
    assert main.cli(["net", "-b", "efficientnet_lite0.seed-x", "dataset", "mvtec", str(tmp_path / "data")]) == 2


def test_noise_stream_draws_what_the_release_draws():
    """Drawn one step ahead from a private generator, the noise and the global generator's state are those of
    the release's in-place draws, also when an epoch stops early (--limit) or something else draws."""
    shapes = [(6, 4), (6, 4), (2, 4)]
    cpu = torch.device("cpu")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        plain = [torch.normal(0.0, 0.5, s) for s in shapes]
        states = [torch.get_rng_state()]
        torch.manual_seed(3)
        assert all(torch.equal(a, b) for a, b in zip(cras.noise_draws(shapes, 0.5, cpu), plain, strict=True))
        assert torch.equal(torch.get_rng_state(), states[0])
        torch.manual_seed(3)
        stream = cras.NoiseStream(shapes, 0.5, cpu)
        assert torch.equal(stream.next(), plain[0])
        stream.close()  # the epoch ends after one step: the draw made ahead is not the global generator's
        torch.manual_seed(3)
        torch.normal(0.0, 0.5, shapes[0])
        states.append(torch.get_rng_state())
        torch.manual_seed(3)
        stream = cras.NoiseStream(shapes, 0.5, cpu)
        stream.next()
        assert torch.equal(torch.get_rng_state(), states[1])
        torch.rand(1)  # a foreign draw in the middle of an epoch would shift the release's stream
        with pytest.raises(RuntimeError, match="drawn from during the epoch"):
            stream.next()
        stream.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: pinned staging needs a GPU")
def test_pinned_noise_equals_the_plain_draw():
    shapes = [(4096, 64)] * 5 + [(1024, 64)]
    with torch.random.fork_rng():
        torch.manual_seed(7)
        plain = [torch.normal(0.0, 1.0, s) for s in shapes]
        torch.manual_seed(7)
        drawn = [eps.cpu() for eps in cras.noise_draws(shapes, 1.0, torch.device("cuda"))]
    assert all(torch.equal(a, b) for a, b in zip(drawn, plain, strict=True))


def test_release_layer_names_and_fresh_statistics_per_job(mvtec_root: Path, tmp_path: Path):
    """'-le 2.blocks' is blocks.2; every job of a process starts from the pretrained backbone and runs the
    releases' one train-mode forward: each checkpoint holds statistics updated exactly once, the same for
    every class at one image size, and --backbone_stats imagenet keeps the pretrained ones."""
    assert [backbones.canonical_layer(n) for n in ("2.blocks", "blocks.4", "layer2", "10.blocks")] == \
        ["blocks.2", "blocks.4", "layer2", "blocks.10"]
    net = ["net", "-b", "efficientnet_lite0", "-le", "2.blocks", "-le", "blocks.4", "--pretrain_embed_dimension", "16",
           "--target_embed_dimension", "16", "--dsc_hidden", "8", "--meta_epochs", "1"]
    data = ["dataset", "--batch_size", "4", "--resize", "64", "--imagesize", "64", "--num_workers", "0",
            "-d", "texture", "-d", "object", "mvtec", str(mvtec_root)]
    assert main.cli(["--gpu", "-1", "--results_path", str(tmp_path / "r"), *net, *data]) == 0
    stats = [torch.load(tmp_path / "r" / "models" / "pbas" / f"mvtec_{c}" / "seed0" / engine.CHECKPOINT_NAME,
                        weights_only=True)["backbone_stats"] for c in ("texture", "object")]
    _, stages = backbones.load_backbone("efficientnet_lite0")
    pretrained = Embedder(stages, ("blocks.2", "blocks.4"), 3, 16, 16).statistics()
    assert set(stats[0]) == set(pretrained)
    for name, value in stats[0].items():
        if name.endswith("num_batches_tracked"):
            assert int(value) == int(pretrained[name]) + 1 == 1, name  # once, never accumulated
        assert torch.equal(value, stats[1][name]), name
    assert all(not torch.equal(stats[0][k], pretrained[k]) for k in stats[0] if k.endswith("running_var"))
    assert main.cli(["--gpu", "-1", "--results_path", str(tmp_path / "i"), *net, "--backbone_stats", "imagenet",
                     *data[:-4], "-d", "texture", "mvtec", str(mvtec_root)]) == 0
    kept = torch.load(tmp_path / "i" / "models" / "pbas" / "mvtec_texture" / "seed0" / engine.CHECKPOINT_NAME,
                      weights_only=True)["backbone_stats"]
    assert all(torch.equal(kept[k], pretrained[k]) for k in pretrained)
