"""The chain vocabulary: ``mul`` / ``gather`` steps and ``insert_chain`` on both IRs, the
emitted structure exactly and the values against :meth:`Chain.apply` in float64."""

import os
import tempfile

import numpy as np
import pytest

import rotaq
from rotaq.errors import RewriteError
from rotaq.rewriter.chain import Chain, Step, transform_chain
from rotaq.rewriter.sites import Kronecker
from tests.graphs import assert_ops, one_linear, ops

RNG = np.random.default_rng(3)
D_IN, D_OUT = 64, 32


def _site(model):
    """(linear key, its input value, x [2, 8, 64] in float64, W [32, 64], b [32])."""
    key = next(iter(model.analysis().linears))
    value = model.graph.view().by_key[key].inputs[0]
    w, b = model.graph.get_linear(key)
    return key, value, model.sample_inputs["x"].astype(np.float64), w, b


def test_mul_gather_apply():
    x = RNG.normal(size=(2, 3, 6))
    s = RNG.normal(size=6)
    idx = (4, 0, 0, 5)
    c = Chain((Step("mul", s), Step("gather", arg=idx)), 6, 4)
    assert not c.flat and c.params == 6
    np.testing.assert_array_equal(c.apply(x), (x * s)[..., [4, 0, 0, 5]])
    # dense / bias stay the affine parts when a mul follows an add
    bias = RNG.normal(size=6)
    c2 = Chain((Step("add", bias), Step("mul", s)), 6, 6)
    np.testing.assert_allclose(c2.bias(), bias * s, atol=1e-15)
    np.testing.assert_allclose(c2.dense(), np.diag(s), atol=1e-15)
    assert c.bias() is None


def test_mul_gather_validation():
    with pytest.raises(ValueError, match="constant missing"):
        Step("mul")
    with pytest.raises(ValueError, match="constant unexpected"):
        Step("gather", np.ones(2), (0,))
    with pytest.raises(ValueError, match="non-empty tuple"):
        Step("gather")
    with pytest.raises(ValueError, match="scalar or 1-D"):
        Step("mul", np.ones((2, 2)))


_EXPECT = {  # insert_chain(gather(idx) -> mul(s) -> matmul C) before the linear
    "onnx": ["Gather", "Mul", "MatMul", "MatMul", "Add"],
    "fx": ["aten.index_select", "aten.mul.Tensor", "aten.matmul", "aten.linear"],
}


@pytest.mark.parametrize("ir", ["onnx", "fx"])
def test_insert_chain(ir):
    """``x -> (x[..., idx] * s) @ C`` (12 columns, back to 64) for the linear only: the new value
    equals ``Chain.apply`` and the output ``chain(x) W^T + b``."""
    model = one_linear(ir)
    key, value, x, w, b = _site(model)
    idx = tuple(int(i) for i in RNG.choice(D_IN, 12, replace=False))
    s, cm = RNG.normal(size=12), RNG.normal(size=(12, D_IN)) / 4
    chain = Chain((Step("gather", arg=idx), Step("mul", s), Step("matmul", cm)), D_IN, D_IN)
    g = model.graph
    new = g.insert_chain(value, [key], chain)
    assert new != value
    assert_ops(model, _EXPECT[ir])
    want = chain.apply(x)
    np.testing.assert_allclose(want, (x[..., list(idx)] * s) @ cm, atol=1e-12)
    got = g.capture(model.sample_inputs, [new])[new]
    assert got.shape == (2, 8, D_IN)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.run()[0], want @ w.T + b, rtol=1e-4, atol=1e-5)
    # the chain is not a linear; the linear now reads the chain's output
    a = model.analysis()
    assert list(a.linears) == [key]
    assert g.view().by_key[key].inputs[0] == new
    assert sum(n.op == "chain" for n in a.view.nodes) >= 3


@pytest.mark.parametrize("ir", ["onnx", "fx"])
def test_insert_chain_changes_width(ir):
    """A gather that narrows the value: only the shape-aware consumers see it (here, a mask
    ``mul`` then gather back to full width by repeating columns)."""
    model = one_linear(ir)
    key, value, x, w, b = _site(model)
    mask = (RNG.random(D_IN) > 0.5).astype(np.float64)
    idx = tuple(range(D_IN // 2)) * 2
    chain = Chain((Step("mul", mask), Step("gather", arg=idx)), D_IN, D_IN)
    new = model.graph.insert_chain(value, [key], chain)
    want = chain.apply(x)
    np.testing.assert_array_equal(want, np.concatenate([(x * mask)[..., :32]] * 2, axis=-1))
    np.testing.assert_allclose(model.run()[0], want @ w.T + b, rtol=1e-4, atol=1e-5)
    assert model.graph.capture(model.sample_inputs, [new])[new].shape == (2, 8, D_IN)


@pytest.mark.parametrize("ir", ["onnx", "fx"])
def test_add_branch_gather(ir):
    """LLM.int8()-style split: the outlier columns are zeroed in W and run in a gathered
    branch ``x[..., idx] @ W[:, idx]^T``; the output is the original linear's, exactly."""
    model = one_linear(ir)
    key, _, x, w, b = _site(model)
    idx = (3, 17, 40, 41)
    keep = np.ones(D_IN)
    keep[list(idx)] = 0.0
    g = model.graph
    g.set_linear(key, w * keep, b)
    before = ops(model)
    chain = Chain((Step("gather", arg=idx), Step("matmul", w[:, idx].T.copy())), D_IN, D_OUT)
    np.testing.assert_allclose(chain.dense(), w * (1 - keep), atol=1e-15)
    g.add_branch(key, chain)
    extra = (["Gather", "MatMul", "Add"] if ir == "onnx"
             else ["aten.index_select", "aten.matmul", "aten.add.Tensor"])
    assert sorted(ops(model)) == sorted(before + extra)
    np.testing.assert_allclose(model.run()[0], x @ w.T + b, rtol=1e-4, atol=1e-5)
    assert list(model.analysis().linears) == [key]
    with tempfile.TemporaryDirectory() as d:  # saves and reloads (int64 indices included)
        path = os.path.join(d, "m.onnx" if ir == "onnx" else "m.pt2")
        model.save(path)
        back = rotaq.load(path)
        np.testing.assert_allclose(back.run(model.sample_inputs)[0], model.run()[0], atol=1e-6)


@pytest.mark.parametrize("ir", ["onnx", "fx"])
def test_add_branch_mul(ir):
    """A masked branch ``(x * m) @ D^T`` beside the linear."""
    model = one_linear(ir)
    key, _, x, w, b = _site(model)
    m = (RNG.random(D_IN) > 0.7).astype(np.float64)
    d = RNG.normal(size=(D_OUT, D_IN)) * 0.1
    model.graph.add_branch(key, Chain((Step("mul", m), Step("matmul", d.T.copy())), D_IN, D_OUT))
    np.testing.assert_allclose(model.run()[0], x @ w.T + b + (x * m) @ d.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ir", ["onnx", "fx"])
def test_insert_chain_errors(ir):
    model = one_linear(ir)
    key, value, *_ = _site(model)
    ok = Chain((Step("mul", np.ones(D_IN)),), D_IN, D_IN)
    with pytest.raises(RewriteError, match="last dim|takes last dim"):
        model.graph.insert_chain(value, [key], Chain((Step("mul", np.ones(8)),), 8, 8))
    with pytest.raises(RewriteError, match="no consumers"):
        model.graph.insert_chain(value, [], ok)
    with pytest.raises(RewriteError, match="role must be"):
        model.graph.insert_chain(value, [key], ok, role="linear")
    out = model.graph.insert_chain(value, [key], ok, role="quant")
    assert {n.op for n in model.graph.view().nodes if n.outputs == [out]} == {"quant"}
    with pytest.raises(RewriteError, match="does not read"):
        model.graph.insert_chain(value, [key], ok)  # the linear now reads ``out``
    assert model.graph.view().by_key[key].inputs[0] == out


def test_split_merge_apply():
    x = RNG.normal(size=(2, 3, 12))
    a, b = RNG.normal(size=(3, 3)), RNG.normal(size=(4, 4))
    c = Chain((Step("split", arg=(3, 4)), Step("matmul", b), Step("lmatmul", a.T),
               Step("merge", arg=(2,))), 12, 12)
    assert not c.flat
    np.testing.assert_allclose(c.apply(x), x @ np.kron(a, b), atol=1e-12)
    with pytest.raises(ValueError, match="two or more sizes"):
        Step("split", arg=(4,))
    with pytest.raises(ValueError, match=r"\(k,\)"):
        Step("merge", arg=(1,))


@pytest.mark.parametrize("sizes", [(64,), (4, 16), (2, 4, 8)])
def test_transform_chain_apply(sizes):
    fs = tuple(RNG.normal(size=(s, s)) for s in sizes)
    sc = RNG.normal(size=64)
    x = RNG.normal(size=(2, 5, 64))
    k = Kronecker(fs, sc)
    np.testing.assert_allclose(transform_chain(fs, sc).apply(x), x @ k.dense(), atol=1e-10)
    with pytest.raises(RewriteError, match="square"):
        transform_chain((np.ones((2, 3)),))
    with pytest.raises(RewriteError, match="scale has 3 entries"):
        transform_chain(fs, np.ones(3))


_TRANSFORM = {  # insert_transform(Kronecker((A, B, C), scale)) before the linear
    "onnx": ["Mul", "Reshape", "MatMul", "MatMul", "Reshape", "MatMul", "Add"],
    "fx": ["aten.mul.Tensor", "aten.unflatten.int", "aten.matmul", "aten.matmul",
           "aten.flatten.using_ints", "aten.linear"],
}


@pytest.mark.parametrize("ir", ["onnx", "fx"])
def test_insert_transform_is_the_chain(ir):
    """The online transform with three factors (the tail grouped) and a scale, on both IRs:
    the emitted value is ``x @ Kronecker.dense()``, the structure the TVM lowering matches."""
    model = one_linear(ir)
    key, value, x, w, b = _site(model)
    fs = tuple(RNG.normal(size=(s, s)) for s in (2, 4, 8))
    k = Kronecker(fs, RNG.normal(size=64))
    new = model.graph.insert_transform(value, [key], k)
    assert_ops(model, _TRANSFORM[ir])
    got = model.graph.capture(model.sample_inputs, [new])[new]
    np.testing.assert_allclose(got, x @ k.dense(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.run()[0], x @ k.dense() @ w.T + b, rtol=1e-4, atol=1e-3)
    view = model.graph.view()
    assert sum(n.op == "online" for n in view.nodes) == 5
    if ir == "onnx":  # tagged for the TVM lowering; Reshape targets copy the leading dims
        g = model.graph.model.graph
        nodes = [n for n in g if n.metadata_props.get("rotaq.role") == "online_transform"]
        shapes = [n.inputs[1].const_value.numpy().tolist() for n in nodes
                  if n.op_type == "Reshape"]
        assert shapes == [[0, 0, 2, 32], [0, 0, 64]]
