"""all-MiniLM-L6-v2 (post-LN BERT): matching and exact per-linear online rotation."""

import pytest

import rotaq

pytestmark = pytest.mark.real


@pytest.mark.parametrize("ir", ["fx", "onnx"])
def test_inspect(ir, minilm, minilm_onnx):
    d = rotaq.inspect(minilm if ir == "fx" else minilm_onnx)
    assert len(d["attention"]) == 6
    assert {(a["num_heads"], a["num_kv_heads"], a["head_dim"]) for a in d["attention"]} == {(12, 12, 32)}
    assert {n["kind"] for n in d["norms"]} == {"layer"}
    assert d["pre_norm"] is False
    assert d["num_linears"] == 6 * 6 + 1  # q, k, v, o, intermediate, output per layer + pooler
    assert len(d["norms"]) == 13  # embedding LayerNorm + 2 per layer


@pytest.mark.parametrize("ir", ["fx", "onnx"])
def test_rotate_exact(ir, minilm, minilm_onnx):
    res = rotaq.optimize(minilm if ir == "fx" else minilm_onnx, "rotate",
                         options={"rotate_qk": True})
    st = res.report["passes"][0]["stats"]
    assert st["mode"] == "online" and st["qk_rotated"] == 6
    assert res.report["max_rel_error"] <= 1e-4
