"""One command for anyone with a GPU: the CUDA test tier, the training and inference benchmarks, the targets.

    python benchmarks/gpu_report.py                      # writes results/gpu_report.md
    python benchmarks/gpu_report.py --quick              # smaller data (a functional check, not the targets)

Runs, each in its own process (a crash or a timeout is reported, the rest goes on):
  1. ``pytest -m cuda`` (tests/test_cuda.py and the bf16 quality test);
  2. ``bench_train.py``: PBAS on a carpet-sized class (fp32, tf32, bf16; uncached and cached), CRAS multi-class
     (fp32, bf16) with the noise drawn on the CPU (the release) and again drawn on the GPU (--noise_device
     device), and a VisA-sized class (cached fp32: peak GPU memory of the largest VisA class);
  3. ``bench_infer.py``: PyTorch fp32/bf16 and onnxruntime (the provider actually used is named) at batch 1 and 32;
  4. ``bench_panda.py --size full``: PANDA's full-size architecture (random weights), fp32 and bf16: ms per
     training step, ms per sampler step per image, peak memory, and the projected GPU-hours;
and writes the device (name, memory, driver), the versions, every table, the CRAS training step time with
CPU-drawn and device-drawn noise, and each target with pass/fail:
  PBAS carpet-sized class, release protocol: <= 60 s fast (bf16) and <= 4 min fp32; all of MVTec AD <= 15 min (bf16);
  inference >= 1000 images/s at batch 32 and <= 10 ms for one image; largest VisA class <= 20 GB peak GPU memory
  (bench_train's peak: the allocator's peak reservation plus the CUDA context, not only allocated tensors).
Backbones use random weights (timing only), so no weights file is needed. Without a CUDA GPU it says so and
exits with 1. docs/gpu_report.md says how to read the report it writes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {  # name: (limit, unit, "max" | "min")
    "PBAS carpet-sized class, 640 epochs, bf16": (60.0, "s", "max"),
    "PBAS carpet-sized class, 640 epochs, fp32": (240.0, "s", "max"),
    "PBAS all of MVTec AD, 640 epochs, bf16": (900.0, "s", "max"),
    "inference, batch 32, best engine": (1000.0, "images/s", "min"),
    "inference, one image, best engine": (10.0, "ms", "max"),
    "largest VisA class, peak GPU memory (reserved + context)": (20.0, "GiB", "max"),
}


@dataclass
class Step:
    title: str
    command: list[str]
    timeout: int
    output: str = ""  # the markdown a benchmark wrote (--output), or the test summary
    code: int | None = None
    seconds: float = 0.0


def run(step: Step, output_file: str | None) -> Step:
    """Run a step; keep its exit code, duration and markdown (or the tail of its output when it failed)."""
    started = time.time()
    try:
        done = subprocess.run(step.command, cwd=REPO, capture_output=True, text=True, timeout=step.timeout)
        step.code = done.returncode
        text = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        step.code = -1
        text = f"timed out after {step.timeout} s\n{(exc.stdout or b'')[-2000:]!r}"
    step.seconds = time.time() - started
    if output_file and os.path.isfile(output_file) and step.code == 0:
        with open(output_file) as f:
            step.output = f.read()
    else:
        step.output = "\n".join(text.strip().splitlines()[-40:])
    print(f"[{'ok' if step.code == 0 else 'FAILED'}] {step.title} ({step.seconds:.0f} s)", file=sys.stderr)
    return step


def seconds(text: str) -> float:
    """'93.89 s', '2.7 min', '19.42 h' -> seconds."""
    value, unit = text.split()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def table_rows(markdown: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``markdown``, each as {column header: cell}."""
    lines = [line.strip() for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]
    return [dict(zip(cells[0], row)) for row in cells[1:]] if cells else []


def train_measures(markdown: str) -> dict[str, dict[str, str]]:
    """bench_train rows by path name ('cached (device) bf16', ...)."""
    return {row["path"]: row for row in table_rows(markdown)}


def column(row: dict[str, str], start: str) -> str:
    """The cell of the first column whose header starts with ``start`` (headers carry the epoch count)."""
    return next(v for k, v in row.items() if k.startswith(start))


def noise_table(steps: dict[str, "Step"]) -> list[str]:
    """CRAS's training step with the noise drawn on the CPU and copied (the release) vs drawn on the GPU."""
    runs = {where: train_measures(steps[key].output) if steps[key].code == 0 else {}
            for where, key in (("cpu", "cras"), ("device", "cras_noise_device"))}
    lines = ["| CRAS path | train step, noise on the CPU | train step, noise on the GPU |", "|---|---|---|"]
    for path in sorted(set(runs["cpu"]) | set(runs["device"])):
        cells = [runs[w][path]["train step"] if path in runs[w] else "not measured" for w in ("cpu", "device")]
        lines.append(f"| {path} | {cells[0]} | {cells[1]} |")
    return lines


def versions() -> list[str]:
    import torch

    lines = [f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        lines.append(f"- nvidia-smi: {smi}")
    except (OSError, subprocess.TimeoutExpired):
        lines.append("- nvidia-smi: not available")
    try:
        import onnxruntime

        lines.append(f"- onnxruntime {onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}")
    except ImportError:
        lines.append("- onnxruntime: not installed")
    return lines


def check_targets(steps: dict[str, Step]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each target that the runs allow to judge."""
    measured: dict[str, float] = {}
    pbas = train_measures(steps["pbas"].output) if steps["pbas"].code == 0 else {}
    for precision in ("bf16", "fp32"):
        row = next((r for name, r in pbas.items() if name.startswith("cached") and name.endswith(precision)), None)
        if row:
            measured[f"PBAS carpet-sized class, 640 epochs, {precision}"] = seconds(column(row, "protocol (640 ep.), this job"))
            if precision == "bf16":
                measured["PBAS all of MVTec AD, 640 epochs, bf16"] = seconds(column(row, "protocol (640 ep.), MVTec AD"))
    visa = train_measures(steps["visa"].output) if steps["visa"].code == 0 else {}
    row = next((r for name, r in visa.items() if name.startswith("cached")), None)
    if row and column(row, "peak GPU mem").endswith("GiB"):
        measured["largest VisA class, peak GPU memory (reserved + context)"] = float(column(row, "peak GPU mem").split()[0])
    if steps["infer"].code == 0:
        rows = table_rows(steps["infer"].output)
        batch32 = [float(r["images / s"]) for r in rows if r["batch"] == "32"]
        single = [float(r["ms / batch"]) for r in rows if r["batch"] == "1"]
        if batch32:
            measured["inference, batch 32, best engine"] = max(batch32)
        if single:
            measured["inference, one image, best engine"] = min(single)
    out = []
    for name, (limit, unit, kind) in TARGETS.items():
        if name not in measured:
            out.append((f"{name}: {'<=' if kind == 'max' else '>='} {limit:g} {unit}", "not measured", "n/a"))
            continue
        value = measured[name]
        ok = value <= limit if kind == "max" else value >= limit
        out.append((f"{name}: {'<=' if kind == 'max' else '>='} {limit:g} {unit}", f"{value:.4g} {unit}",
                    "pass" if ok else "FAIL"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=os.path.join(REPO, "results", "gpu_report.md"), help="report file (markdown)")
    ap.add_argument("--quick", action="store_true", help="small data and few epochs: checks the GPU paths run, "
                                                         "not the targets")
    ap.add_argument("--gpu", type=int, default=0, help="GPU id for the benchmarks")
    ap.add_argument("--skip_tests", action="store_true", help="skip the CUDA test tier")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_report: no CUDA GPU is visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "run it on a machine with a GPU", file=sys.stderr)
        return 1
    if args.gpu >= torch.cuda.device_count():
        print(f"gpu_report: --gpu {args.gpu}: only {torch.cuda.device_count()} GPU(s) visible", file=sys.stderr)
        return 2
    python = sys.executable
    gpu = ["--gpu", str(args.gpu)]
    size = ["--n_train", "40", "--n_test_good", "8", "--n_test_defect", "16", "--image_size", "512", "--epochs", "2"] \
        if args.quick else []
    visa = ["--n_train", "120", "--n_test_good", "20", "--n_test_defect", "20"] if args.quick else \
        ["--n_train", "905", "--n_test_good", "100", "--n_test_defect", "101"]
    with tempfile.TemporaryDirectory() as tmp:
        out = {k: os.path.join(tmp, f"{k}.md") for k in ("pbas", "cras", "cras_noise_device", "visa", "infer",
                                                               "panda")}
        cras = [python, "benchmarks/bench_train.py", "--random_weights", *gpu, *size, "--method", "cras", "--setting",
                "multi", "--n_classes", "3", "--precision", "fp32", "bf16"]
        steps = {
            "tests": Step("CUDA test tier (pytest -m cuda)", [python, "-m", "pytest", "-q", "-m", "cuda", "-rs"], 3600),
            "pbas": Step("bench_train PBAS, carpet-sized class", [python, "benchmarks/bench_train.py", "--random_weights",
                         *gpu, *size, "--precision", "fp32", "tf32", "bf16", "--output", out["pbas"]], 3600),
            "cras": Step("bench_train CRAS multi-class (3 classes), noise drawn on the CPU",
                         [*cras, "--noise_device", "cpu", "--output", out["cras"]], 3600),
            "cras_noise_device": Step("bench_train CRAS multi-class (3 classes), noise drawn on the GPU",
                                      [*cras, "--noise_device", "device", "--skip_uncached",
                                       "--output", out["cras_noise_device"]], 3600),
            "visa": Step("bench_train PBAS, largest VisA class (memory)", [python, "benchmarks/bench_train.py",
                         "--random_weights", *gpu, *visa, "--image_size", "512", "--epochs", "1", "--skip_uncached",
                         "--workdir", os.path.join(tmp, "visa"), "--output", out["visa"]], 3600),
            "infer": Step("bench_infer", [python, "benchmarks/bench_infer.py", "--random_weights", "--device",
                          f"cuda:{args.gpu}", "--output", out["infer"]], 1800),
            "panda": Step("bench_panda, full-size PANDA", [python, "benchmarks/bench_panda.py", "--size", "full",
                          "--device", f"cuda:{args.gpu}", "--precision", "fp32", "bf16",
                          *(["--train_steps", "3", "--sample_steps", "10"] if args.quick else []),
                          "--output", out["panda"]], 1800),
        }
        if args.skip_tests:
            steps["tests"].code, steps["tests"].output = 0, "skipped (--skip_tests)"
        for key, step in steps.items():
            if not (key == "tests" and args.skip_tests):
                run(step, out.get(key))
    lines = [f"# GPU report ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"- device: {torch.cuda.get_device_name(args.gpu)}, "
             f"{torch.cuda.get_device_properties(args.gpu).total_memory / 2**30:.0f} GiB", *versions(),
             f"- mode: {'quick (functional check)' if args.quick else 'full'}", "", "## Targets", "",
             "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in check_targets(steps)]
    lines += ["", "## CRAS noise: drawn on the CPU and copied (release) vs drawn on the GPU", "", *noise_table(steps)]
    lines += ["", "## Steps", "", "| step | result | time |", "|---|---|---|"]
    lines += [f"| {s.title} | {'ok' if s.code == 0 else f'FAILED (exit {s.code})'} | {s.seconds:.0f} s |"
              for s in steps.values()]
    for step in steps.values():
        lines += ["", f"## {step.title}", "", f"`{' '.join(step.command[1:])}`", "", step.output.strip()]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0 if all(s.code == 0 for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
