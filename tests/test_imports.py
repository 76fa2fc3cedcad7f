"""The import structure: the command line parses (and prints every --help) without importing torch or any
pipeline, the torch-free constant modules agree with the registries they name, nothing imports main.py, and
the repository's own ``datasets`` package never makes Hugging Face take its ``datasets`` code paths."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import backbones
import choices
import methods
import runner
from segment import config as segment_config
from segment import networks as segment_networks

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "diffusers", "transformers", "segmentation_models_pytorch", "onnx", "onnxruntime",
         "timm", "numpy", "PIL", "pandas", "scipy", "sklearn", "matplotlib")


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter in the repository root, as ``python main.py`` runs; its last stdout line
    as JSON."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_of_every_command_imports_no_heavy_module():
    found = run_python(f"""
import json, runpy, sys
sys.argv = ["main.py", "--help"]
try:
    runpy.run_path("main.py", run_name="__main__")
except SystemExit as exc:
    assert exc.code == 0, exc.code
import main
commands = sorted(main.main.commands)
codes = {{name: main.cli([name, "--help"]) for name in commands}}
print(json.dumps({{"commands": commands, "codes": codes, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
""")
    assert {"net", "dataset", "predict", "export", "report", "segment", "synth-baseline", "segment-predict",
            "segment-export", "panda-train", "panda-generate"} <= set(found["commands"])
    assert set(found["codes"].values()) == {0}, found["codes"]
    assert found["heavy"] == [], f"--help imported {found['heavy']}"


def test_light_constants_name_the_registries():
    """The torch-free lists the command line offers are the registries the pipelines build from."""
    assert choices.BACKBONE_NAMES == tuple(backbones.BACKBONES)
    assert segment_config.ENCODER_NAMES == tuple(segment_networks.ENCODERS)
    assert list(runner.METHODS) == list(methods.CONFIGS)
    for name, method in runner.METHODS.items():
        assert method.name == name and method.Config is methods.CONFIGS[name]
        assert set(methods.NOT_FOR[name]) <= {f for c in methods.CONFIGS.values() for f in c.__dataclass_fields__} | {"setting"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports (anywhere in it, also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imports_run_one_way():
    """Nothing imports main.py; only main.py imports the run machinery and the click plumbing."""
    sources = [p for p in REPO.rglob("*.py") if p.parts[len(REPO.parts)] not in ("tests", "benchmarks")]
    for path in sources:
        imported = imported_modules(path)
        assert "main" not in imported, path
        if path.name != "main.py":
            assert not {"runner", "clitools"} & imported, path
        assert "sklearn" not in imported, path  # a training run writes its report without that 1.4 s import


def test_hugging_face_never_asks_for_its_datasets_package(tmp_path: Path):
    """Inside the repository ``import datasets`` finds ours, so transformers' is_datasets_available() would say
    True; the LDM path we call (loading the four parts, tokenizing, the text encoder) must never ask, nor import
    ``datasets`` from library code."""
    found = run_python(f"""
import importlib.util, json, sys, traceback
asked = []
find_spec = importlib.util.find_spec

def spy(name, package=None):
    if name.split(".")[0] == "datasets":
        asked.append("".join(traceback.format_stack(limit=6)))
    return find_spec(name, package)

importlib.util.find_spec = spy

class ImportWatch:
    def find_spec(self, name, path=None, target=None):
        caller = sys._getframe(1)
        while caller and caller.f_code.co_filename.startswith("<frozen"):
            caller = caller.f_back
        if name == "datasets" and caller and not caller.f_code.co_filename.startswith({str(REPO)!r}):
            asked.append("import datasets from " + caller.f_code.co_filename)
        return None

sys.meta_path.insert(0, ImportWatch())
import torch
from panda.ldm import load_ldm, write_tiny_ldm
from transformers.utils import import_utils
ldm = load_ldm(write_tiny_ldm({str(tmp_path / "ldm")!r}), "cpu")
ids = ldm.tokenizer(["a photo of a * anomaly"], padding="max_length", max_length=77, return_tensors="pt").input_ids
with torch.no_grad():
    ldm.bert(ids)
check = getattr(import_utils, "is_datasets_available", None)
calls = check.cache_info().hits + check.cache_info().misses if hasattr(check, "cache_info") else 0
print(json.dumps({{"asked": asked, "calls": calls}}))
""")
    assert found["calls"] == 0, "transformers asked is_datasets_available()"
    assert found["asked"] == [], found["asked"]


def test_an_older_python_gets_one_line_before_any_import():
    found = run_python("""
import json, runpy, sys
sys.version_info = (3, 9, 18, "final", 0)
try:
    runpy.run_path("main.py", run_name="__main__")
except SystemExit as exc:
    print(json.dumps({"code": str(exc.code), "click": "click" in sys.modules}))
""")
    assert found["code"].startswith("error: this project needs Python 3.10 or newer"), found
    assert found["click"] is False
