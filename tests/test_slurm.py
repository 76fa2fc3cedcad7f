"""shell/slurm without SLURM: the task table, the task script with SLURM_ARRAY_TASK_ID set, the local runner,
signal forwarding and requeueing (main.py replaced by a stub that records its command line)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "shell" / "slurm"

STUB = """#!/usr/bin/env bash
echo "$@" >> "$STUB_LOG"
if [[ -n "${STUB_WAIT:-}" ]]; then
  trap 'echo TERM >> "$STUB_LOG"; exit 143' TERM
  touch "$STUB_WAIT"; while true; do sleep 0.05; done
fi
exit "${STUB_EXIT:-0}"
"""


def stub_env(tmp_path: Path, **extra: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python3", STUB), ("scontrol", '#!/usr/bin/env bash\necho "scontrol $*" >> "$STUB_LOG"\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "calls.log"),
           "RESULTS": str(tmp_path / "results")}
    env.pop("SLURM_JOB_ID", None)
    return {**env, **extra}


def make_table(tmp_path: Path) -> Path:
    table = tmp_path / "sweep.tsv"
    with open(table, "w") as f:
        for args in (["pbas", "single", "mvtec", "/data/mvtec", "0 1", "carpet grid"],
                     ["cras", "multi", "mvtec", "/data/mvtec", "0 1", "carpet grid", "--precision bf16"]):
            subprocess.run(["bash", str(SLURM / "make_table.sh"), *args], stdout=f, check=True)
    return table


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


def test_table_lines(tmp_path: Path):
    lines = [line.split("\t") for line in make_table(tmp_path).read_text().splitlines()]
    assert [(l[0], l[1], l[4], l[5]) for l in lines] == [
        ("pbas", "single", "0", "carpet"), ("pbas", "single", "0", "grid"), ("pbas", "single", "1", "carpet"),
        ("pbas", "single", "1", "grid"), ("cras", "multi", "0", "carpet,grid"), ("cras", "multi", "1", "carpet,grid")]
    assert lines[5][6] == "--precision bf16"
    official = subprocess.run(["bash", str(SLURM / "make_table.sh"), "pbas", "single", "mpdd", "/d", "0"],
                              capture_output=True, text=True, check=True).stdout.splitlines()
    assert [l.split("\t")[5] for l in official] == ["bracket_black", "bracket_brown", "bracket_white", "connector",
                                                    "metal_plate", "tubes"]
    bad = subprocess.run(["bash", str(SLURM / "make_table.sh"), "pbas", "multi", "mvtec", "/d", "0"], capture_output=True)
    assert bad.returncode == 2


def test_task_runs_its_line_with_the_release_configuration(tmp_path: Path):
    table = make_table(tmp_path)
    for task in (3, 5):
        env = stub_env(tmp_path, TABLE=str(table), SLURM_ARRAY_TASK_ID=str(task))
        subprocess.run(["bash", str(SLURM / "task.sh")], env=env, check=True, capture_output=True)
    pbas_call, cras_call = calls(tmp_path)
    # the table's seed replaces the releases' --seed 0 (repeatable: both would run both seeds)
    assert pbas_call.startswith("main.py --gpu 0 --test ckpt") and "--seed 1 net" in pbas_call
    assert pbas_call.count("--seed") == 1 and cras_call.count("--seed") == 1
    assert "--dsc_hidden 1024" in pbas_call and pbas_call.endswith("-d grid mvtec /data/mvtec")
    assert cras_call.startswith("main.py --method cras") and "--seed 1 --precision bf16 net" in cras_call
    assert "--setting multi --batch_size 32" in cras_call and cras_call.endswith("-d carpet -d grid mvtec /data/mvtec")
    missing = subprocess.run(["bash", str(SLURM / "task.sh")], env=stub_env(tmp_path, TABLE=str(table),
                             SLURM_ARRAY_TASK_ID="6"), capture_output=True, text=True)
    assert missing.returncode == 2 and "no line 6" in missing.stderr


def test_stopped_task_is_requeued_under_slurm(tmp_path: Path):
    env = stub_env(tmp_path, TABLE=str(make_table(tmp_path)), SLURM_ARRAY_TASK_ID="0", STUB_EXIT="143",
                   SLURM_JOB_ID="77", SLURM_ARRAY_JOB_ID="70")
    done = subprocess.run(["bash", str(SLURM / "task.sh")], env=env, capture_output=True)
    assert done.returncode == 143
    assert calls(tmp_path)[-1] == "scontrol requeue 70_0"


HANG_LIMIT = 600  # seconds; only guards against a hang: the waits below end on an event, not on a clock


def wait_until(condition, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` ends first, or after HANG_LIMIT (a hang)."""
    deadline = time.monotonic() + HANG_LIMIT
    while not condition():
        assert proc is None or proc.poll() is None, f"the process ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"{what}: nothing after {HANG_LIMIT} s (a hang)"
        time.sleep(0.05)


def test_sigterm_is_passed_on_to_main_py(tmp_path: Path):
    ready = tmp_path / "ready"
    env = stub_env(tmp_path, TABLE=str(make_table(tmp_path)), SLURM_ARRAY_TASK_ID="0", STUB_WAIT=str(ready))
    proc = subprocess.Popen(["bash", str(SLURM / "task.sh")], env=env, stderr=subprocess.DEVNULL)
    wait_until(ready.exists, "the stub waiting", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=HANG_LIMIT) == 143
    assert calls(tmp_path)[-1] == "TERM"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_sigterm_while_main_py_starts_is_passed_on(tmp_path: Path):
    """SIGTERM to task.sh just after it started main.py, before it noted the child's pid (what a loaded machine
    can make of SLURM's signal): task.sh passes it on and exits 143; it does not die of it, leaving main.py
    running. A DEBUG trap (BASH_ENV) sends the signal at that very point, once the stub has started."""
    hook = tmp_path / "hook.sh"
    hook.write_text('set -T\ntrap \'if [[ "$BASH_COMMAND" == "child=\\$!" ]]; then '
                    'while [[ ! -s "$STUB_LOG" ]]; do sleep 0.01; done; kill -TERM $$; fi\' DEBUG\n')
    env = stub_env(tmp_path, TABLE=str(make_table(tmp_path)), SLURM_ARRAY_TASK_ID="0", STUB_WAIT=str(tmp_path / "ready"),
                   BASH_ENV=str(hook))
    proc = subprocess.Popen(["bash", str(SLURM / "task.sh")], env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.wait(timeout=HANG_LIMIT) == 143  # not -15: task.sh itself killed by the signal
        assert calls(tmp_path)[0].startswith("main.py")  # the stub ran, and ended with the signal
        wait_until(lambda: not _group_alive(proc.pid), "the stub ending")
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_local_runner_runs_every_task_in_order(tmp_path: Path):
    env = stub_env(tmp_path)
    subprocess.run(["bash", str(SLURM / "run-local.sh"), str(make_table(tmp_path))], env=env, check=True,
                   capture_output=True)
    runs = calls(tmp_path)
    assert len(runs) == 6 and [("--method cras" in r) for r in runs] == [False] * 4 + [True] * 2
    interrupted = stub_env(tmp_path, STUB_EXIT="143")
    (tmp_path / "calls.log").unlink()
    done = subprocess.run(["bash", str(SLURM / "run-local.sh"), str(tmp_path / "sweep.tsv")], env=interrupted,
                          capture_output=True)
    assert done.returncode == 143 and len(calls(tmp_path)) == 1  # stops at the interrupted task


def test_segmentation_stages(tmp_path: Path):
    """synth perlin and segment SOURCE lines: one per class and seed, run with SYNTH/SOURCE as the synthetic folder."""
    table = tmp_path / "seg.tsv"
    with open(table, "w") as f:
        for args in (["synth", "perlin", "btad", "/data/btad", "0", "01 02"], ["segment", "panda", "btad", "/data/btad", "1", "02"]):
            subprocess.run(["bash", str(SLURM / "make_table.sh"), *args], stdout=f, check=True)
    assert [line.split("\t")[:6] for line in table.read_text().splitlines()] == [
        ["synth", "perlin", "btad", "/data/btad", "0", "01"], ["synth", "perlin", "btad", "/data/btad", "0", "02"],
        ["segment", "panda", "btad", "/data/btad", "1", "02"]]
    for task in (1, 2):
        env = stub_env(tmp_path, TABLE=str(table), SLURM_ARRAY_TASK_ID=str(task), SYNTH="/s")
        subprocess.run(["bash", str(SLURM / "task.sh")], env=env, check=True, capture_output=True)
    synth, segment = calls(tmp_path)
    assert synth == "main.py --gpu 0 --seed 0 synth-baseline btad /data/btad -d 02 --output /s/perlin --count 500"
    assert segment.startswith("main.py --gpu 0 --test ckpt --results_path") and "--seed 1 segment btad /data/btad -d 02" in segment
    assert "--synthetic /s/panda --anomaly_split third --arch unet --encoder resnet34 --steps 4000" in segment
    bad = subprocess.run(["bash", str(SLURM / "make_table.sh"), "segment", "a/b", "btad", "/d", "0"], capture_output=True)
    assert bad.returncode == 2


def test_panda_table_has_every_defect_type_and_its_task_trains_then_generates(tmp_path: Path):
    table = tmp_path / "panda.tsv"
    with open(table, "w") as f:
        subprocess.run(["bash", str(SLURM / "make_table.sh"), "panda", "single", "mvtec", "/data/mvtec", "3407"],
                       stdout=f, check=True)
    lines = [line.split("\t") for line in table.read_text().splitlines()]
    assert len(lines) == 73 and sum(l[5].startswith("pill:") for l in lines) == 7
    task = next(i for i, l in enumerate(lines) if l[5] == "bottle:broken_large")
    env = stub_env(tmp_path, TABLE=str(table), SLURM_ARRAY_TASK_ID=str(task), LDM="/models/ldm", SYNTH="/s")
    subprocess.run(["bash", str(SLURM / "task.sh")], env=env, check=True, capture_output=True)
    train, generate = calls(tmp_path)
    for call, command in ((train, "panda-train"), (generate, "panda-generate")):
        assert call.startswith("main.py --gpu 0") and "--seed 3407" in call
        assert f"{command} --dataset mvtec --ldm /models/ldm -d bottle --defect broken_large" in call
        assert call.endswith("/data/mvtec")
    assert "--anomaly_split third" in train and "--output /s/panda" in generate  # where segment reads source panda
    (tmp_path / "calls.log").unlink()
    stopped = subprocess.run(["bash", str(SLURM / "task.sh")], env={**env, "STUB_EXIT": "143"}, capture_output=True)
    assert stopped.returncode == 143 and len(calls(tmp_path)) == 1  # a stopped training does not generate


def test_panda_table_of_a_wrong_class_is_one_line_and_an_own_mvtec_class_is_read_from_disk(tmp_path: Path):
    """A misspelt class is a one-line message, not a Python traceback; a class in MVTec layout that is not one
    of the 15 official ones gets the defect types panda-train -d CLASS reads (panda.data.defect_types)."""
    from panda import data as panda_data

    root = tmp_path / "data"
    for folder in ("good", "Good", "crack", "scratch", ".cache"):
        (root / "ownclass" / "test" / folder).mkdir(parents=True)
    bad = subprocess.run(["bash", str(SLURM / "make_table.sh"), "panda", "single", "mvtec", str(root), "3407", "bottel"],
                         capture_output=True, text=True)
    err = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and bad.stdout == "" and len(err) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert "'bottel' is not one of MVTec AD's 15 classes" in err[0] and str(root / "bottel" / "test") in err[0]
    own = subprocess.run(["bash", str(SLURM / "make_table.sh"), "panda", "single", "mvtec", str(root), "3407", "ownclass bottle"],
                         capture_output=True, text=True, check=True)
    lines = [line.split("\t") for line in own.stdout.splitlines()]
    listed = [l[5].split(":", 1)[1] for l in lines if l[5].startswith("ownclass:")]
    assert listed == panda_data.defect_types("mvtec", str(root), "ownclass") == ["crack", "scratch"]
    assert len(lines) == 2 + len(panda_data.MVTEC_DEFECTS["bottle"])  # an official class: its table, no disk needed
