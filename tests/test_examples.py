"""Every script in examples/ runs on a tiny random Llama and does what it says.

Each example is run as a user would (a subprocess from the repository root), with the
repository's rotaq first on the path and the ``rotaq`` command given as ``python -m rotaq.cli``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    sys.path.insert(0, str(EXAMPLES))
    try:
        from tiny_model import make_tiny_llama
    finally:
        sys.path.remove(str(EXAMPLES))
    return make_tiny_llama(str(tmp_path_factory.mktemp("examples") / "tiny-llama"))


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(EXAMPLES)]),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHON": sys.executable,
                "ROTAQ": f"{sys.executable} -m rotaq.cli", "OUT_DIR": str(tmp_path), **env}
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=600, check=False)


def _float(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    return float(m.group(1))


def test_optimize_and_save(tiny_dir, tmp_path):
    out = tmp_path / "m.onnx"
    r = _run([sys.executable, "examples/optimize_and_save.py", tiny_dir, "-o", str(out)],
             tmp_path)
    assert r.returncode == 0, r.stderr
    assert "15 linears, 2 attention sites" in r.stdout
    assert _float(r"written file: max relative error (\S+) \(ort\)", r.stdout) < 1e-4
    assert "within tolerance: True" in r.stdout
    assert out.is_file() and (tmp_path / "m.onnx.tokenizer" / "tokenizer.json").is_file()


def test_torch_module_to_onnx(tmp_path):
    out = tmp_path / "m.onnx"
    r = _run([sys.executable, "examples/torch_module_to_onnx.py", "-o", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert _float(r"module on a \[2, 24\] input: max relative error (\S+)", r.stdout) < 1e-4
    assert out.is_file()


def test_deploy_pipeline_accepts_and_rejects(tiny_dir, tmp_path):
    r = _run(["bash", "examples/deploy_pipeline.sh", tiny_dir, "rotate", "1e-4"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"deploy: accepted {tmp_path}/model.onnx" in r.stdout
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["schema"] == 1 and rep["verify"]["written"]["runtime"] == "ort"
    assert rep["max_rel_error"] < 1e-4
    # the same report against an impossible bound: refused with the script's own exit code
    r = _run([sys.executable, "examples/check_report.py", str(tmp_path / "report.json"),
              "--max-error", "1e-12"], tmp_path)
    assert r.returncode == 4 and "FAIL: max relative error" in r.stdout
    # a bad recipe: rotaq exits 2, the pipeline stops with 2 and writes nothing
    bad = tmp_path / "bad"
    bad.mkdir()
    r = _run(["bash", "examples/deploy_pipeline.sh", tiny_dir, "no-such-recipe"], bad,
             OUT_DIR=str(bad))
    assert r.returncode == 2, r.stderr
    assert "unknown recipe 'no-such-recipe'" in r.stderr and "deploy: rejected" in r.stderr
    assert not (bad / "model.onnx").exists()


def test_custom_recipe(tiny_dir, tmp_path):
    out = tmp_path / "m.onnx"
    r = _run([sys.executable, "examples/custom_recipe.py", tiny_dir, "-o", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "w_group=16" in r.stdout  # the override reached the pass
    # the include filter "mlp": gate, up and down of both layers, nothing else
    assert _float(r"quantize: linears=(\d+),", r.stdout) == 6
    err = _float(r"max relative error (\S+) \(bound", r.stdout)
    assert 0 < err <= 0.2  # lossy but bounded


def test_compile_tvm_and_bench(tiny_dir, tmp_path):
    r = _run(["bash", "examples/compile_tvm_and_bench.sh", tiny_dir], tmp_path, TOKENS="16")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tvm" / "lib.so").is_file()  # one library for every length
    tvm = json.loads((tmp_path / "bench-tvm.json").read_text())
    ort = json.loads((tmp_path / "bench-ort.json").read_text())
    assert tvm["backend"] == "tvm" and ort["backend"] == "ort"
    assert list(tvm["tokens"]) == list(ort["tokens"]) == ["16"]
    # the default decode contexts (128, 1024) need longer prompts than the compiled 16
    assert tvm["decode"] == {} and "[128, 1024]" in tvm["decode_skipped"]
    ratio = _float(r"\n\s+16\s+\S+\s+\S+\s+(\S+)\n", r.stdout)
    assert ratio == pytest.approx(tvm["tokens"]["16"]["median_ms"]
                                  / ort["tokens"]["16"]["median_ms"], rel=0.01)


def test_custom_pass(tiny_dir, tmp_path):
    out = tmp_path / "m.onnx"
    r = _run([sys.executable, "examples/custom_pass.py", tiny_dir, "-o", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    # 2 layers: 2 norms each + the final norm folded; 2 writers per layer; V/O of both layers
    assert "random-orthogonal: modified=True, dim=64, norms_folded=5, writers=4, " \
           "ov_heads_rotated=2" in r.stdout
    assert _float(r"max relative error (\S+) \(bound", r.stdout) < 1e-4
    assert _float(r"written file: (\S+)", r.stdout) < 1e-4
    assert out.is_file()
