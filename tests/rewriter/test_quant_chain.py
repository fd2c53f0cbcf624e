"""Fake quantization as one chain: numpy semantics against rotaq.linalg.quant, the same values
and the expected ops from both IR emitters, and one activation-quantizer validation."""

import numpy as np
import pytest

from rotaq.errors import RewriteError
from rotaq.linalg.quant import quantize_per_tensor, quantize_per_token
from rotaq.rewriter.quant_chain import check_act, fake_quant_chain
from rotaq.rewriter.sites import ActQuant
from tests.graphs import assert_ops, one_linear

DYNAMIC = [(8, True, 1.0), (4, True, 0.9), (4, False, 1.0), (6, False, 0.95)]


@pytest.mark.parametrize(("bits", "symmetric", "clip"), DYNAMIC)
def test_dynamic_chain_is_per_token(bits, symmetric, clip):
    x = np.random.default_rng(1).standard_normal((3, 7, 40)) * 3
    x[0, 0] = 0.0
    got = fake_quant_chain(ActQuant(bits, "dynamic", symmetric, clip_ratio=clip)).apply(x)
    np.testing.assert_allclose(got, quantize_per_token(x, bits, symmetric, clip), atol=1e-12)
    assert not got[0, 0].any()


@pytest.mark.parametrize(("bits", "symmetric", "zp"), [(8, False, 100), (6, True, 0), (4, False, 7)])
def test_static_chain_is_per_tensor(bits, symmetric, zp):
    x = np.random.default_rng(2).standard_normal((2, 5, 16))
    c = fake_quant_chain(ActQuant(bits, "static", symmetric, 0.03, zp))
    np.testing.assert_allclose(c.apply(x), quantize_per_tensor(x, 0.03, zp, bits, symmetric),
                               atol=1e-12)
    assert [s.op for s in c.steps] == ["grid"]


_OPS = {  # the expected emission in front of the linear, per IR and quantizer
    ("onnx", True): ["Abs", "ReduceMax", "Mul", "Max", "Div", "Round", "Clip", "Mul",
                     "MatMul", "Add"],
    ("onnx", False): ["ReduceMin", "ReduceMax", "Min", "Mul", "Max", "Mul", "Sub", "Div", "Max",
                      "Neg", "Div", "Round", "Clip", "Div", "Round", "Add", "Clip", "Sub", "Mul",
                      "MatMul", "Add"],
    ("fx", True): ["aten.abs", "aten.amax", "aten.mul.Tensor", "aten.clamp_min", "aten.div.Tensor",
                   "aten.round", "aten.clamp", "aten.mul.Tensor", "aten.linear"],
    ("fx", False): ["aten.amin", "aten.clamp_max", "aten.mul.Tensor", "aten.amax", "aten.clamp_min",
                    "aten.mul.Tensor", "aten.sub.Tensor", "aten.div.Tensor", "aten.clamp_min",
                    "aten.neg", "aten.div.Tensor", "aten.round", "aten.clamp", "aten.div.Tensor",
                    "aten.round", "aten.add.Tensor", "aten.clamp", "aten.sub.Tensor",
                    "aten.mul.Tensor", "aten.linear"],
}


def _fq(ir, act):
    model = one_linear(ir)
    key = next(iter(model.analysis().linears))
    value = model.graph.view().by_key[key].inputs[0]
    new = model.graph.insert_fake_quant(value, [key], act)
    return model, key, new


@pytest.mark.parametrize(("bits", "symmetric", "clip"), DYNAMIC)
def test_fake_quant_both_irs(bits, symmetric, clip):
    """Both emitters compute the chain (FX asymmetric included): the quantized value equals
    ``Chain.apply`` on the float32 input up to float32 rounding, and FX equals ONNX."""
    act = ActQuant(bits, "dynamic", symmetric, clip_ratio=clip)
    ref = None
    for ir in ("onnx", "fx"):
        model, key, new = _fq(ir, act)
        assert_ops(model, _OPS[(ir, symmetric)])
        x = model.sample_inputs["x"]
        got = model.graph.capture(model.sample_inputs, [new])[new]
        want = fake_quant_chain(act).apply(x.astype(np.float64))
        step = np.abs(want).max() / (2 ** (bits - 1))
        assert np.abs(got - want).max() <= 1e-5 * step + 1e-6 * np.abs(want).max()
        w, b = model.graph.get_linear(key)
        np.testing.assert_allclose(model.run()[0], want @ w.T + b, rtol=1e-4, atol=1e-4)
        assert {n.op for n in model.graph.view().nodes if n.outputs == [new]} == {"quant"}
        if ref is None:
            ref = got
        else:
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ir", ["onnx", "fx"])
@pytest.mark.parametrize(("act", "match"), [
    (ActQuant(9, "dynamic"), "bits must be in 2..8"),
    (ActQuant(8, "percentile"), "mode must be"),
    (ActQuant(8, "dynamic", clip_ratio=1.5), "clip_ratio"),
    (ActQuant(8, "static"), "positive scale"),
    (ActQuant(8, "static", False, 0.1, None), "needs a zero_point"),
    (ActQuant(4, "static", True, 0.1, 9), "outside the 4-bit code range"),
])
def test_one_validation(ir, act, match):
    with pytest.raises(RewriteError, match=match):
        check_act(act)
    with pytest.raises(RewriteError, match=match):
        _fq(ir, act)
