"""bench: warm latencies, size on disk (external data included), ORT's optimized op counts."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rotaq
from rotaq.errors import RotaqError
from rotaq.eval.latency import bench, onnx_files

VOCAB, HIDDEN = 64, 32


def tiny_lm_onnx(path: str, external: bool = False, seed: int = 0) -> tuple[str, np.ndarray,
                                                                           np.ndarray]:
    """logits = (E[input_ids] * attention_mask[..., None]) @ W, written to ``path``.

    Returns the path, E [VOCAB, HIDDEN] and W [HIDDEN, VOCAB]."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    w = rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["h"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("MatMul", ["hm", "W"], ["logits"]),
    ]
    dims = ["batch", "seq"]
    graph = helper.make_graph(
        nodes, "tiny_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*dims, VOCAB])],
        [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(w, "W"),
         numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, path)
    return path, emb, w


@pytest.mark.parametrize("external", [False, True])
def test_bench_onnx_file(tmp_path, external):
    path, _, _ = tiny_lm_onnx(str(tmp_path / "lm.onnx"), external=external)
    files = onnx_files(path)
    assert len(files) == (2 if external else 1)
    res = bench(path, tokens=(1, 16), repeats=3, warmup=1, threads=1, progress=False)
    assert res["backend"] == "ort" and res["threads"] == 1
    assert set(res["tokens"]) == {"1", "16"}
    for t in res["tokens"].values():
        assert 0 < t["min_ms"] <= t["median_ms"] <= t["p90_ms"]
    assert res["size_bytes"] == sum(os.path.getsize(f) for f in files)
    assert res["size_bytes"] > 2 * VOCAB * HIDDEN * 4  # both weight tables are counted
    assert res["size_mib"] == round(res["size_bytes"] / 2**20, 2)
    ops = res["optimized_ops"]
    assert ops is not None and ops.get("Gather") == 1
    assert ops.get("MatMul", 0) + ops.get("FusedMatMul", 0) == 1


def test_bench_in_memory_model(tmp_path):
    path, _, _ = tiny_lm_onnx(str(tmp_path / "lm.onnx"))
    model = rotaq.load(path)
    res = bench(model, tokens=(4,), repeats=2, warmup=0, threads=1, progress=False)
    assert res["tokens"]["4"]["median_ms"] > 0
    assert res["size_bytes"] > 2 * VOCAB * HIDDEN * 4


def test_bench_errors(tmp_path):
    path, _, _ = tiny_lm_onnx(str(tmp_path / "lm.onnx"))
    with pytest.raises(RotaqError, match="--backend ort"):
        bench(path, backend="torch")
    with pytest.raises(RotaqError, match="positive"):
        bench(path, tokens=(0, 16))
    with pytest.raises(RotaqError, match="backend"):
        bench(path, backend="tvm")


def test_bench_torch_tiny_llama():
    from tests.tiny import build

    module, inputs = build("llama")
    model = rotaq.load(module, inputs)
    res = bench(model, backend="torch", tokens=(1, 16), repeats=3, warmup=1, threads=1,
                progress=False)
    assert res["backend"] == "torch" and res["optimized_ops"] is None
    assert all(t["median_ms"] > 0 for t in res["tokens"].values())
    n_params = sum(p.numel() for p in module.parameters())  # tied: embedding counted once
    assert res["size_source"] == "weights"
    assert n_params * 4 <= res["size_bytes"] <= n_params * 4 * 1.5
