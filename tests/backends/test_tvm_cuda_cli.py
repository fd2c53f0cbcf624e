"""CUDA code generation (sm_80, sm_90; compiled with nvcc, no GPU needed) and the compile /
eval / bench commands on compiled folders (tvm and ort)."""

import json
import shutil
import subprocess

import numpy as np
import pytest

import rotaq
from rotaq.cli import main
from tests.tiny import loaded

tvm = pytest.importorskip("tvm", reason="the TVM extra is not installed (pip install rotaq[tvm])")
from rotaq.backends import tvm as tb


@pytest.fixture(scope="module")
def w4_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda")
    path = str(d / "w4.onnx")
    # TVM artefacts serve graphs without a KV cache (decode on TVM: issue 14)
    rotaq.optimize(loaded("llama", "onnx", kv_cache=False), "w4a16-rotated", verify=False).model.save(
        path)
    return path


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_codegen_compiles_with_nvcc(w4_llama, tmp_path, arch):
    meta = tb.compile_tvm(w4_llama, str(tmp_path / "art"), target=f"cuda:{arch}",
                          tokens=[1, 8], progress=False)
    assert meta["target_kind"] == "cuda" and arch in meta["target"]
    for n in (1, 8):
        src = tmp_path / "art" / meta["buckets"][str(n)]["cuda_source"]
        text = src.read_text()
        assert "__global__" in text and "qmatmul_int4" in text  # rotaq's kernel is in there
        out = subprocess.run(["nvcc", f"-arch={arch}", "-c", str(src), "-o",
                              str(tmp_path / f"k{n}.o")], capture_output=True, text=True,
                             check=False)
        assert out.returncode == 0, out.stderr[-2000:]
    with pytest.raises(rotaq.RotaqError, match="only llvm artefacts run here"):
        tb.load(str(tmp_path / "art"))


def test_cli_compile_bench_eval(w4_llama, tmp_path, capsys):
    out = tmp_path / "tvm"
    assert main(["compile", w4_llama, "--backend", "tvm", "--tokens", "1,4", "-o", str(out),
                 "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["backend"] == "tvm" and meta["tokens"] == [1, 4]
    # --recipe rewrites first (here: an int4 RTN recipe on the plain tiny model)
    plain = str(tmp_path / "plain.onnx")
    loaded("llama", "onnx", kv_cache=False).save(plain)
    assert main(["compile", plain, "--recipe", "w4a16", "--backend", "tvm", "--tokens", "4",
                 "-o", str(tmp_path / "rec"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["buckets"]["4"]["stats"]
    assert stats["qmatmul"] == 14
    assert main(["bench", str(out), "--backend", "tvm", "--tokens", "1,4", "--repeats", "2",
                 "--warmup", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["backend"] == "tvm" and set(rep["tokens"]) == {"1", "4"}
    assert rep["tokens"]["4"]["median_ms"] > 0
    # the ORT artefact: optimized ONNX + session settings, same interface
    ort_dir = tmp_path / "ort"
    assert main(["compile", w4_llama, "--backend", "ort", "-o", str(ort_dir), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["backend"] == "ort" and (ort_dir / "model.onnx").exists()
    assert main(["bench", str(ort_dir), "--tokens", "4", "--repeats", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "ort"
    # both artefacts compute the same logits
    from rotaq.backends.artifact import load_artifact

    ids = np.arange(4, dtype=np.int64)[None]
    a = load_artifact(str(out)).graph.run({"input_ids": ids})[0]
    b = load_artifact(str(ort_dir)).graph.run({"input_ids": ids})[0]
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-3
    # wrong backend for a folder, and tvm on a plain model: one clear line, exit 2
    assert main(["bench", str(ort_dir), "--backend", "tvm"]) == 2
    assert main(["eval", w4_llama, "--backend", "tvm"]) == 2
    err = capsys.readouterr().err
    assert "is a ort artefact" in err and "rotaq compile" in err
