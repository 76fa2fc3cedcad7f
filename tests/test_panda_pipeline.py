"""PANDA pipeline from the command line (panda-train, panda-generate) on generated textures with a tiny random LDM
folder (save_pretrained): end to end, exact resume after a stop, and bad input (one line, exit 2, nothing
written)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
import runstate
from datasets import mvtec
from datasets.synthetic import make_dataset
from panda import data as panda_data
from panda import generate, train
from panda.ldm import write_tiny_ldm
from segment import data as segdata
from test_resume import assert_same_tensors

SIZE = 32  # images and masks (latents 4 x 4)
CLASS, DEFECT = "texture", "scratch"
TRAIN = ["--steps", "4", "--save_every", "2", "--batch_size", "2", "--imagesize", str(SIZE)]
FAST = ["--batch_size", "2", "--sampler_steps", "2"]  # panda-generate: a 2-step respaced chain
SEGMENT = ["--encoder", "efficientnet_lite0", "--encoder_weights", "none", "--imagesize", str(SIZE), "--resize",
           str(SIZE), "--steps", "1", "--batch_size", "2", "--num_workers", "0"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A texture class: 4 normal training images, 6 anomalies per defect type (2 for training with 'third')."""
    path = tmp_path_factory.mktemp("panda_data")
    make_dataset(path, classes=(CLASS,), n_train=4, n_test_good=1, n_test_defect=18, size=SIZE, seed=0)
    return path


@pytest.fixture(scope="module")
def ldm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_tiny_ldm(str(tmp_path_factory.mktemp("ldm"))))


def cli(results: Path, ldm: Path, root: Path, *args: str, command: str = "panda-train") -> int:
    return main.cli(["--gpu", "-1", "--results_path", str(results), command, "--ldm", str(ldm), "-d", CLASS,
                     "--defect", DEFECT, *args, str(root)])


def job(results: Path) -> Path:
    return results / "panda" / f"mvtec_{CLASS}" / DEFECT / "seed3407"


@pytest.fixture(scope="module")
def trained(root: Path, ldm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("panda_results")
    assert cli(results, ldm, root, *TRAIN) == 0
    return results


def test_train_writes_a_self_describing_tensors_only_checkpoint(trained: Path):
    folder = job(trained)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "losses.csv", "weights-000002.pt",
                                                        "weights-000004.pt"]
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["method"] == "panda"
    config = ckpt["config"]
    assert (config["classname"], config["defect"], config["init_word"], config["seed"]) == (CLASS, DEFECT, "", 3407)
    assert ckpt["init_word"] == "scratch"  # from the defect name
    assert (config["lr"], config["weight_decay"], config["anomaly_split"]) == (1.6e-2, 0.01, "third")
    assert ckpt["files"]["anomalies"] == ["000.png", "001.png"] and ckpt["files"]["held_out"] == 4  # first third
    assert ckpt["losses"].shape == (4, 3) and torch.isfinite(ckpt["losses"]).all()
    assert {"noise", "global"} <= set(ckpt["random"]) and ckpt["optimizer"]["state"]
    first = torch.load(folder / "weights-000002.pt", weights_only=True)
    assert set(first) == {"format", "method", "config", "init_word", "files", "step", "trainable"}
    assert first["step"] == 2
    assert set(first["trainable"]) == set(ckpt["trainable"])
    assert any(not torch.equal(first["trainable"][k], ckpt["trainable"][k]) for k in ckpt["trainable"])  # it learns


def test_stopped_training_resumes_to_the_uninterrupted_checkpoint(trained: Path, root: Path, ldm: Path,
                                                                  tmp_path: Path, monkeypatch):
    indices = train.batch_indices

    def stop_at_step_1(seed, step, n, batch_size):
        if step == 1:
            runstate.request_stop(signal.SIGTERM)  # as the SIGTERM handler does
        return indices(seed, step, n, batch_size)

    monkeypatch.setattr(train, "batch_indices", stop_at_step_1)
    assert cli(tmp_path, ldm, root, *TRAIN) == 128 + signal.SIGTERM
    assert torch.load(job(tmp_path) / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(train, "batch_indices", indices)
    assert cli(tmp_path, ldm, root, *TRAIN) == 0  # the same command resumes
    resumed = torch.load(job(tmp_path) / "checkpoint.pt", weights_only=True)
    uninterrupted = torch.load(job(trained) / "checkpoint.pt", weights_only=True)
    assert_same_tensors(resumed, uninterrupted)


def test_generate_writes_mvtec_layout_pairs_seeded_and_continues(trained: Path, root: Path, ldm: Path, tmp_path: Path):
    out = tmp_path / "synthetic"
    args = ["--output", str(out), "--pairs", "3", "--batch_size", "2", "--sampler_steps", "10"]  # a respaced chain
    assert cli(trained, ldm, root, *args, command="panda-generate") == 0
    images, masks = out / CLASS / "test" / DEFECT, out / CLASS / "ground_truth" / DEFECT
    samples = mvtec.defect_samples(str(images), str(masks), DEFECT)  # the project's MVTec AD reader pairs them
    assert [os.path.basename(s.image_path) for s in samples] == ["0000.png", "0001.png", "0002.png"]
    training_masks = panda_data.load_masks([str(root / CLASS / "ground_truth" / DEFECT / f"00{i}_mask.png")
                                            for i in (0, 1)], SIZE)  # [2, 1, S, S]: the training third
    for sample in samples:
        assert Image.open(sample.image_path).size == (SIZE, SIZE)
        mask = torch.from_numpy(np.asarray(Image.open(sample.mask_path)) / 255.0).float()
        assert any(torch.equal(mask, m[0]) for m in training_masks)
    assert Image.open(out / CLASS / "preview" / f"{DEFECT}.png").size == (3 * SIZE, 3 * SIZE)
    record = json.loads((out / CLASS / f"panda-{DEFECT}.json").read_text())
    assert (record["sampler_steps"], record["seed"], record["step"]) == (10, 3407, 4)
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    os.unlink(images / "0001.png")  # as if stopped while writing the first batch: it is sampled again, identically
    stamp = lambda st: (st.st_ino, st.st_mtime_ns)  # an atomic rewrite is a new inode, even within one clock tick
    kept = stamp((images / "0002.png").stat())
    assert cli(trained, ldm, root, *args, command="panda-generate") == 0
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    assert stamp((images / "0002.png").stat()) == kept  # the written batch is kept, not written again
    err = main.cli(["--gpu", "-1", "--results_path", str(trained), "panda-generate", "--ldm", str(ldm), "-d", CLASS,
                    "--defect", DEFECT, "--output", str(out), "--pairs", "4", str(root)])
    assert err == 2  # pairs of another generation are not mixed in


def one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def copy_data(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "data"))


@pytest.mark.parametrize("damage, message", [
    ("no_masks", "has no masks"),
    ("no_images", "has no anomalous images"),
    ("mask_size", "is 16x16 (width x height) but its image"),
    ("not_binary", "is not binary"),
    ("empty_mask", "marks no defect (every pixel is 0)"),
])
def test_bad_data_is_one_line_and_writes_nothing(root: Path, ldm: Path, tmp_path: Path, capsys, damage: str,
                                                 message: str):
    data = copy_data(root, tmp_path)
    masks, images = data / CLASS / "ground_truth" / DEFECT, data / CLASS / "test" / DEFECT
    if damage == "no_masks":
        shutil.rmtree(masks)
    elif damage == "no_images":
        for path in images.iterdir():
            path.unlink()
    elif damage == "mask_size":
        Image.new("L", (16, 16), 255).save(masks / "001_mask.png")
    elif damage == "empty_mask":  # a mask of the training third that marks nothing
        Image.new("L", (SIZE, SIZE), 0).save(masks / "001_mask.png")
    else:
        grey = np.zeros((SIZE, SIZE), dtype=np.uint8)
        grey[:, :8], grey[:, 8:16] = 128, 255  # an anti-aliased or soft mask
        Image.fromarray(grey).save(masks / "000_mask.png")
    results = tmp_path / "results"
    assert message in one_line_error(capsys, cli(results, ldm, data, *TRAIN))
    assert not results.exists()


def test_a_jpeg_mask_is_binarised_at_half_range_not_refused(tmp_path: Path):
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=60)  # compression noise around the edges
    assert len(np.unique(np.asarray(Image.open(tmp_path / "m.jpg")))) > 2
    panda_data.check_binary(str(tmp_path / "m.jpg"))
    assert torch.equal(panda_data.load_mask(str(tmp_path / "m.jpg"), SIZE)[0], torch.from_numpy(mask / 255.0).float())
    faint = np.zeros((SIZE, SIZE), dtype=np.uint8)
    faint[8:20, 8:20] = 60  # below half range: binarised to nothing
    Image.fromarray(faint).save(tmp_path / "faint.jpg", quality=95)
    with pytest.raises(panda_data.DatasetError, match="marks no defect"):
        panda_data.check_binary(str(tmp_path / "faint.jpg"))


def test_unwritable_output_and_results_are_refused_before_any_work(trained: Path, root: Path, ldm: Path, tmp_path: Path,
                                                                   capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = one_line_error(capsys, cli(trained, ldm, root, "--output", str(blocker / "out"), command="panda-generate"))
    assert "--output" in err and "cannot be written" in err
    err = one_line_error(capsys, cli(blocker, ldm, root, *TRAIN))
    assert "--results_path" in err


def test_a_checkpoint_of_another_defect_or_a_pickled_module_is_refused(trained: Path, root: Path, ldm: Path,
                                                                       tmp_path: Path, capsys):
    ckpt = job(trained) / "checkpoint.pt"
    out = tmp_path / "out"
    args = ["--gpu", "-1", "--results_path", str(trained), "panda-generate", "--ldm", str(ldm), "-d", CLASS,
            "--output", str(out)]
    err = one_line_error(capsys, main.cli([*args, "--defect", "spot", "--checkpoint", str(ckpt), str(root)]))
    assert f"is a PANDA model of mvtec {CLASS}/{DEFECT}, not of mvtec {CLASS}/spot" in err
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Payload(str(marker))))
    err = one_line_error(capsys, main.cli([*args, "--defect", DEFECT, "--checkpoint", str(evil), str(root)]))
    assert "not a readable checkpoint" in err and not marker.exists() and not out.exists()


def test_a_damaged_checkpoint_stops_the_run_unless_set_aside(root: Path, ldm: Path, tmp_path: Path, capsys):
    folder = job(tmp_path)
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"truncated")
    err = one_line_error(capsys, cli(tmp_path, ldm, root, *TRAIN))
    assert str(folder / "checkpoint.pt") in err and "--discard_damaged_state" in err
    assert main.cli(["--gpu", "-1", "--results_path", str(tmp_path), "--discard_damaged_state", "panda-train", "--ldm",
                     str(ldm), "-d", CLASS, "--defect", DEFECT, "--steps", "2", *TRAIN[2:], str(root)]) == 0
    assert (folder / "checkpoint.pt.damaged").read_bytes() == b"truncated"
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["step"] == 2


class Payload:
    """A pickle that would create a file when unpickled (what a pickled module checkpoint can do)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_init_word_from_the_defect_name(ldm: Path):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(ldm / "tokenizer"), local_files_only=True)
    word = lambda defect, given="": train.resolve_init_word(tokenizer, train.TrainConfig("mvtec", "c", defect, given))
    assert word("broken_large") == "large" and word("bent_lead") == "bent"  # 'lead' is not in the tiny vocabulary
    assert word("broken_large", "crack") == "crack"
    with pytest.raises(main.UserError, match="give --init_word"):
        word("zzz")


def test_init_words_of_mvtec_ad_are_the_public_scripts(ldm: Path, tmp_path: Path):
    from transformers import BertTokenizer

    from panda.ldm import TINY_VOCAB

    public = sorted({w for table in panda_data.MVTEC_INIT_WORDS.values() for w in table.values()} | {"case", "type"})
    (tmp_path / "vocab.txt").write_text("\n".join(dict.fromkeys([*TINY_VOCAB, *public])) + "\n")
    tokenizer = BertTokenizer(vocab=str(tmp_path / "vocab.txt"), do_lower_case=True)
    word = lambda dataset, cls, defect: train.resolve_init_word(tokenizer, train.TrainConfig(dataset, cls, defect))
    assert sum(len(table) for table in panda_data.MVTEC_INIT_WORDS.values()) == 67  # the public script's lines
    expected = {("transistor", "damaged_case"): "damage", ("transistor", "misplaced"): "miss",
                ("transistor", "bent_lead"): "bent", ("cable", "missing_wire"): "miss",
                ("cable", "cut_inner_insulation"): "cut", ("cable", "poke_insulation"): "poke",
                ("tile", "gray_stroke"): "gray", ("zipper", "broken_teeth"): "broken",
                ("zipper", "split_teeth"): "split", ("grid", "broken"): "grid", ("pill", "pill_type"): "pill",
                ("bottle", "broken_large"): "large", ("capsule", "faulty_imprint"): "imprint"}
    assert {key: word("mvtec", *key) for key in expected} == expected  # the defect-name rule gives other words
    assert word("mvtec", "pill", "crack") == "crack"  # no public word: the rule
    assert word("folder", "transistor", "damaged_case") == "case"  # another dataset: the rule
    tiny = BertTokenizer.from_pretrained(str(ldm / "tokenizer"), local_files_only=True)  # no 'miss' in it
    with pytest.raises(main.UserError, match="public init word 'miss' of cable/missing_wire is not one token"):
        train.resolve_init_word(tiny, train.TrainConfig("mvtec", "cable", "missing_wire"))


def test_defect_tables_and_batch_order():
    assert sum(len(d) for d in panda_data.MVTEC_DEFECTS.values()) == 73 and len(panda_data.MVTEC_DEFECTS["pill"]) == 7
    n, batch = 3, 8
    per_epoch = [train.batch_indices(0, step, n, batch) for step in range(8)]  # 60 draws: 7 batches + 4
    drawn = torch.cat(per_epoch[:8])
    assert len(drawn) == 60 and torch.bincount(drawn).tolist() == [20, 20, 20]
    assert not torch.equal(train.batch_indices(0, 8, n, batch), train.batch_indices(1, 8, n, batch))
    images, masks = generate.selection(5, 100, 7, 3)
    assert images.max() < 7 and masks.max() < 3 and np.array_equal(images, generate.selection(5, 100, 7, 3)[0])
    draws = [torch.randn(3, generator=generate.batch_generator(5, b, torch.device("cpu"))) for b in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])  # each batch its own stream


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def segment(results: Path, root: Path, synthetic: Path, split: str) -> int:
    return main.cli(["--gpu", "-1", "--results_path", str(results), "segment", "mvtec", str(root), "-d", CLASS,
                     "--synthetic", str(synthetic), "--anomaly_split", split, *SEGMENT])


def test_generate_refuses_an_output_inside_the_dataset(trained: Path, root: Path, ldm: Path, tmp_path: Path, capsys):
    data = copy_data(root, tmp_path)
    before = files(data)
    for out in (data, data / CLASS / "test"):
        err = one_line_error(capsys, cli(trained, ldm, data, "--output", str(out), "--pairs", "2", *FAST,
                                         command="panda-generate"))
        assert err.startswith(f"error: --output {out} is inside DATAPATH {data}")
    assert files(data) == before  # the real test set and its masks untouched


def test_generate_refuses_pairs_without_its_record(trained: Path, root: Path, ldm: Path, tmp_path: Path, capsys):
    out = tmp_path / "synthetic"
    (out / CLASS / "test" / DEFECT).mkdir(parents=True)
    Image.new("RGB", (SIZE, SIZE)).save(out / CLASS / "test" / DEFECT / "0000.png")  # e.g. synth-baseline's
    err = one_line_error(capsys, cli(trained, ldm, root, "--output", str(out), "--pairs", "2", *FAST,
                                     command="panda-generate"))
    assert "holds files that no panda-generate record describes" in err
    assert not (out / CLASS / f"panda-{DEFECT}.json").exists()


def test_segment_refuses_an_unfinished_generation(trained: Path, root: Path, ldm: Path, tmp_path: Path, capsys,
                                                  monkeypatch):
    batch_generator = generate.batch_generator

    def stop_after_batch_0(seed, batch, device):
        if batch == 0:
            runstate.request_stop(signal.SIGTERM)  # as the SIGTERM handler does
        return batch_generator(seed, batch, device)

    out = tmp_path / "synthetic"
    args = ["--output", str(out), "--pairs", "6", *FAST]
    monkeypatch.setattr(generate, "batch_generator", stop_after_batch_0)
    assert cli(trained, ldm, root, *args, command="panda-generate") == 128 + signal.SIGTERM
    assert len(list((out / CLASS / "test" / DEFECT).iterdir())) == 2
    capsys.readouterr()
    err = one_line_error(capsys, segment(tmp_path / "res", root, out, "third"))
    assert f"holds 2 of the 6 {DEFECT} pairs that {out / CLASS / f'panda-{DEFECT}.json'} records" in err
    assert not (tmp_path / "res" / "models").exists()
    monkeypatch.setattr(generate, "batch_generator", batch_generator)
    assert cli(trained, ldm, root, *args, command="panda-generate") == 0  # the same command finishes it
    assert len(segdata.load_class("mvtec", str(root), str(out), CLASS, SIZE, SIZE, "third").synthetic) == 6


def test_segment_refuses_pairs_of_another_anomaly_split(trained: Path, root: Path, ldm: Path, tmp_path: Path, capsys):
    out = tmp_path / "synthetic"
    assert cli(trained, ldm, root, "--output", str(out), "--pairs", "2", *FAST, command="panda-generate") == 0
    capsys.readouterr()
    path = out / CLASS / f"panda-{DEFECT}.json"
    record = json.loads(path.read_text())
    assert record["anomaly_split"] == "third"  # the checkpoint's
    err = one_line_error(capsys, segment(tmp_path / "res", root, out, "all"))
    assert f"{path}: its synthesis was trained with --anomaly_split third, not all" in err
    del record["anomaly_split"]  # a record of an earlier version
    path.write_text(json.dumps(record))
    assert "does not record the anomaly split" in one_line_error(capsys, segment(tmp_path / "res", root, out, "third"))
    assert not (tmp_path / "res" / "models").exists()


def thin_mask(path: Path, row: int = 10) -> None:
    """A 1 px line: it vanishes in the 4 x 4 latent mask of a 32 px image (latent_mask samples rows 3.5 + 8k)."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[row, :] = 255
    Image.fromarray(mask).save(path)


def test_masks_empty_in_the_latent_mask_are_redrawn_unless_kept(tmp_path: Path):
    wide = np.zeros((SIZE, SIZE), dtype=np.uint8)
    wide[8:24, 8:24] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    thin_mask(tmp_path / "thin.png")
    samples = [panda_data.Sample("x.png", str(tmp_path / name), 1, DEFECT) for name in ("wide.png", "thin.png")]
    data = panda_data.DefectData("mvtec", CLASS, DEFECT, ["n0.png", "n1.png"], samples, 0)
    options = lambda policy: generate.GenerateOptions(40, 2, 7, "c.pt", 4, "third", 2, policy)
    assert generate.visible_in_latent(panda_data.load_masks(data.masks, SIZE), SIZE).tolist() == [True, False]
    kept, redrawn = generate.plan_pairs(data, SIZE, options("keep")), generate.plan_pairs(data, SIZE, options("redraw"))
    public = generate.selection(7, 40, 2, 2)[1]
    assert np.array_equal(kept.masks, public) and kept.redraws == 0  # keep: the public draws
    assert kept.unseen == int((public == 1).sum()) > 0 and kept.empty == redrawn.empty == ("thin.png",)
    assert (redrawn.masks == 0).all() and redrawn.unseen == 0  # only the mask the sampler sees
    assert redrawn.redraws >= kept.unseen and np.array_equal(redrawn.images, kept.images)
    thin_mask(tmp_path / "wide.png", row=2)
    with pytest.raises(main.UserError, match="every mask of texture.scratch .2. vanishes in the 4x4 latent mask.*"
                                             "--empty_latent_masks keep"):
        generate.plan_pairs(data, SIZE, options("redraw"))
    assert generate.plan_pairs(data, SIZE, options("keep")).unseen == 40


def test_generate_records_redraws_and_writes_only_masks_the_sampler_saw(trained: Path, root: Path, ldm: Path,
                                                                          tmp_path: Path):
    data = copy_data(root, tmp_path)
    thin_mask(data / CLASS / "ground_truth" / DEFECT / "001_mask.png")  # one of the two training masks
    records = {}
    for policy in ("redraw", "keep"):
        out = tmp_path / policy
        assert cli(trained, ldm, data, "--output", str(out), "--pairs", "2", *FAST, "--empty_latent_masks", policy,
                   command="panda-generate") == 0
        records[policy] = json.loads((out / CLASS / f"panda-{DEFECT}.json").read_text())
        written = panda_data.load_masks(sorted(str(p) for p in (out / CLASS / "ground_truth" / DEFECT).iterdir()), SIZE)
        seen = generate.visible_in_latent(written, SIZE)
        assert seen.all() if policy == "redraw" else not seen.all()
    redraw, keep = records["redraw"], records["keep"]
    assert redraw["empty_latent_masks"] == "redraw" and keep["empty_latent_masks"] == "keep"
    assert redraw["empty_latent_mask_files"] == keep["empty_latent_mask_files"] == ["001_mask.png"]
    assert redraw["mask_redraws"] >= keep["pairs_with_empty_latent_mask"] == 2  # seed 3407 draws the thin one twice
    assert redraw["pairs_with_empty_latent_mask"] == keep["mask_redraws"] == 0
