"""Passes and the matcher on tiny hand-built graphs (``tests/graphs.py``), on both IRs: the
expected op structure after a rewrite (Before / Expected), the outputs against the original or
a numpy reference, the "nothing to do" case, and why a candidate was not matched."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

import rotaq
from rotaq.cli import main
from rotaq.linalg.quant import QFormat, quantize_rtn
from tests import graphs
from tests.graphs import assert_ops, check_pass, one_block, one_linear, ops, rel_error

IRS = ["onnx", "fx"]

# one pre-norm decoder block as written in graphs._onnx_block; RMS = x / sqrt(mean(x^2) + eps) g
RMS = ["Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul"]
HEADS = ["MatMul", "Reshape", "Transpose"]
ATTN = [*HEADS * 3, "MatMul", "Mul", "Softmax", "MatMul", "Transpose", "Reshape", "MatMul", "Add"]
MLP_IN = ["MatMul", "Sigmoid", "Mul", "MatMul", "Mul"]
BEFORE = ["Gather", *RMS, *ATTN, *RMS, *MLP_IN, "MatMul", "Add", *RMS, "MatMul"]
# rotate: weights and norm gains change in place; one online Hadamard (Reshape [.., a, b],
# two small MatMuls, Reshape back) enters before the down projection
EXPECTED_ROTATE = ["Gather", *RMS, *ATTN, *RMS, *MLP_IN,
                   "Reshape", "MatMul", "MatMul", "Reshape",
                   "MatMul", "Add", *RMS, "MatMul"]
# the FX capture: what rotate adds to the aten graph (nothing removed)
FX_ROTATE_ADDS = {"aten.matmul": 2, "aten.unflatten.int": 1, "aten.flatten.using_ints": 1}


def test_one_block_before():
    assert_ops(one_block("onnx"), BEFORE)
    fx = one_block("fx")
    assert_ops(fx, {"aten.linear": 8, "aten.scaled_dot_product_attention": 1, "aten.rsqrt": 3,
                    "aten.matmul": 0})


@pytest.mark.parametrize("ir", IRS)
def test_rotate_one_block(ir):
    m = one_block(ir)
    a = m.analysis()
    assert (len(a.linears), len(a.norms), len(a.attention), len(a.residual.blocks)) == (8, 3, 1, 2)
    res, err = check_pass(("rotate", {}), m, max_rel_error=1e-5)
    assert err < 1e-5  # exact in float32
    assert res.stats == {"dim": 64, "norms_folded": 3, "writers": 2, "readers": 6,
                         "ov_heads_rotated": 1, "online_hadamards": 1, "qk_rotated": 0,
                         "mode": "residual", "structure": "pre-norm"}
    if ir == "onnx":
        assert_ops(res.model, EXPECTED_ROTATE)
    else:
        assert Counter(ops(res.model)) - Counter(ops(m)) == Counter(FX_ROTATE_ADDS)
        assert not Counter(ops(m)) - Counter(ops(res.model))
    g = res.model.graph  # the norm gains are folded into the readers: all ones now
    view = g.view()
    for n in res.model.analysis().norms.values():
        node, idx = n.scale
        np.testing.assert_array_equal(g.get_const(view.by_key[node].inputs[idx]), 1.0)


@pytest.mark.parametrize("ir", IRS)
@pytest.mark.parametrize("bits,group,expected,bound", [
    (4, 32, ["com.microsoft.MatMulNBits"], 0.15),
    (8, -1, ["DequantizeLinear", "MatMul", "Add"], 0.01),
])
def test_quantize_rtn_one_linear(ir, bits, group, expected, bound):
    m = one_linear(ir)
    key = next(iter(m.analysis().linears))
    # the only linear reaches the graph output: it is the head, quantized only when asked
    opts = {"w_bits": bits, "w_group": group, "quantize_head": True}
    res, err = check_pass(("quantize", opts), m, max_rel_error=bound)
    assert err > 1e-4  # the weights really were rounded
    assert res.stats["linears"] == 1
    # ONNX: ORT's kernels; FX: the rounded weights stay in the float linear
    assert_ops(res.model, expected if ir == "onnx" else ["aten.linear"])
    w, b = m.graph.get_linear(key)  # the numpy reference: x (deq W)^T + b
    fmt = QFormat(kind="int", bits=bits, symmetric=True, group_size=group)
    deq = quantize_rtn(np.asarray(w, np.float64), fmt).dequantize()
    ref = m.sample_inputs["x"].astype(np.float64) @ deq.T + b
    assert rel_error([ref], res.model.run()) < 1e-5


@pytest.mark.parametrize("ir", IRS)
@pytest.mark.parametrize("case", ["no-linear", "head-only"])
def test_rotate_nothing_to_do(ir, case):
    """No residual stream and no linear to rotate (a computed weight; or only the head, which
    online mode leaves alone): the pass says so and the graph comes back unchanged."""
    m = one_linear(ir, computed=True) if case == "no-linear" else one_linear(ir, d_in=14)
    res, err = check_pass(("rotate", {}), m, modified=False)
    assert err == 0.0
    assert (res.stats["mode"], res.stats["linears_rotated"], res.stats["online_hadamards"]) == (
        "online", 0, 0)


def _unmatched(d, kind):
    return [u for u in d["unmatched"] if u["kind"] == kind]


@pytest.mark.parametrize("ir", IRS)
def test_explain_unplaced_linear(ir):
    """A linear between the gated activation and the down projection: matched as a linear,
    but no block claims it; the matching of everything else is unchanged."""
    plain = rotaq.inspect(one_block(ir), explain=True)
    d = rotaq.inspect(one_block(ir, mid=True), explain=True)
    assert d["num_linears"] == plain["num_linears"] + 1 == 9
    assert d["residual"] == plain["residual"]
    assert plain["unmatched"] == []  # everything in the plain block is matched
    [u] = _unmatched(d, "linear")
    assert u["name"].endswith("mid")
    assert "not a reader or writer of a residual block: input is not the output of a norm " \
           "(reads mul node" in u["reason"]
    assert "its output goes to linear node" in u["reason"]
    assert _unmatched(d, "attention") == _unmatched(d, "norm") == []
    assert "unmatched" not in rotaq.inspect(one_block(ir))  # only when asked


@pytest.mark.parametrize("ir", IRS)
def test_explain_computed_weight(ir):
    d = rotaq.inspect(one_linear(ir, computed=True), explain=True)
    assert d["num_linears"] == 0
    [u] = _unmatched(d, "matmul")
    assert "not a linear: its weight operand is computed (mul node" in u["reason"]
    [r] = _unmatched(d, "residual")
    assert r["reason"].startswith("no residual stream: 0 embeddings, 0 adds")


def test_explain_softmax_and_mean():
    """A softmax no P V matmul reads, and a mean that is not a mean square: not attention, not
    an RMSNorm, each with its reason."""
    b = graphs._Onnx()
    x = graphs._input("x", [graphs.BATCH, graphs.SEQ, 64], graphs.ir.DataType.FLOAT)
    probs = b.op("Softmax", [b.linear(x, np.eye(64, dtype=np.float32), "lin")], "sm", axis=-1)
    mean = b.op("ReduceMean", [x, b.const("axes", np.array([-1]))], "avg", keepdims=1)
    centered = b.op("Sub", [x, mean], "centered")
    m = graphs.Model(b.model([x], [probs, centered]), {}, {"name": "softmax-mean"})
    d = rotaq.inspect(m, explain=True)
    assert [u["reason"] for u in _unmatched(d, "attention")] == [
        "softmax sm: its output is read by 0 matmuls, expected one (P V)"]
    assert [u["reason"] for u in _unmatched(d, "norm")] == [
        "avg (mean): averages graph input x, not x^2 or x*x (no RMSNorm)"]


def test_inspect_explain_cli(tmp_path, capsys):
    """`rotaq inspect --explain` on a file with one deliberately unmatched linear names it and
    says why; --json carries the same reasons."""
    path = tmp_path / "block.onnx"
    one_block("onnx", mid=True).graph.save(path)
    assert main(["inspect", str(path), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "not matched (1):" in out
    assert ("linear    linear mid: not a reader or writer of a residual block: input is not the "
            "output of a norm (reads mul node 'glu'); its output goes to linear node 'down', "
            "not a residual add") in out
    assert main(["inspect", str(path), "--explain", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [(u["key"], u["kind"]) for u in d["unmatched"]] == [("mid", "linear")]
