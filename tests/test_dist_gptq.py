"""GPTQ across 2 gloo processes (``rotaq optimize --workers 2``) gives the weights of 1 process;
only one output is written."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import rotaq
from tests.tiny import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ARGS = ["--recipe", "quantize", "--set", "method=gptq", "--set", "w_bits=4",
         "--set", "w_group=32", "--set", "quantize_head=true", "--set", "calib_tokens=96",
         "--set", "calib_window=16", "--no-verify"]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    m, inputs = build("llama")
    path = tmp_path_factory.mktemp("src") / "tiny.onnx"
    rotaq.load(m, inputs, ir="onnx").save(str(path), tokenizer=False)
    return path


def _optimize(src, out, *extra):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rotaq", "optimize", str(src), "-o", str(out),
                           *_ARGS, *extra], check=False, env=env, capture_output=True,
                          text=True,
                          timeout=600)


def _quantized(path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    used = {i for n in m.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:]}
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name in used}


def test_two_workers_equal_one(tiny_onnx, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    r1 = _optimize(tiny_onnx, one / "q.onnx")
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _optimize(tiny_onnx, two / "q.onnx", "--workers", "2")
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert os.listdir(two) == ["q.onnx"]  # rank 0 alone wrote
    assert r2.stdout.count("q.onnx") == r1.stdout.count("q.onnx") > 0  # one report printed
    a, b = _quantized(one / "q.onnx"), _quantized(two / "q.onnx")
    assert len(a) == len(b) == 30  # 15 linears (head included): packed weights + scales
    assert sorted(a) == sorted(b)
    for k, x in a.items():
        if x.dtype == np.uint8:  # packed 4-bit codes: the same levels
            assert np.mean(x != b[k]) <= 1e-3, k
        else:
            np.testing.assert_allclose(b[k], x, rtol=1e-5, atol=1e-7)
