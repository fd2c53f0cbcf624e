"""Quantize pass on the FX IR (simulated quantization in plain torch)."""

import numpy as np
import pytest

import rotaq
from rotaq.errors import RewriteError, RotaqError
from rotaq.linalg.quant import QFormat, fake_quantize
from rotaq.model import max_rel_error
from tests.tiny import build, loaded


@pytest.fixture(scope="module")
def llama():
    model = loaded("llama").clone()  # its calibration set is replaced below
    rng = np.random.default_rng(0)
    model.calibration = {"input_ids": rng.integers(0, 256, (4, 32))}  # calibration set
    heldout = {"input_ids": rng.integers(0, 256, (2, 32))}
    return model, heldout


def _q(model, **opts):
    return rotaq.optimize(model, rotaq.Recipe("q", [{"pass": "quantize", **opts}], None))


def test_rtn_weights_are_exactly_fake_quantized(llama):
    model, _ = llama
    res = _q(model, w_bits=8)
    a = model.analysis()
    head = set(a.residual.head)
    for key in a.linears:
        w0, _ = model.graph.get_linear(key)
        w1, _ = res.model.graph.get_linear(key)
        if key in head:  # the head stays in float by default
            assert np.array_equal(w0, w1)
        else:
            assert np.allclose(w1, fake_quantize(w0, QFormat(bits=8)), atol=1e-6)
    assert res.report["passes"][0]["stats"]["linears"] == 14
    assert res.report["max_rel_error"] < 0.02


def test_activation_fake_quant_inserted(llama):
    model, _ = llama
    res = _q(model, w_bits=8, a_bits=8)
    view = res.model.graph.view()
    quant = [n for n in view.nodes if n.op == "quant"]
    assert len(quant) > 0
    # every quantized linear reads a fake-quantized input
    a = res.model.analysis()
    for key in a.linears:
        if key in a.residual.head:
            continue
        assert view.producer[view.by_key[key].inputs[0]].op == "quant"
    assert 0 < res.report["max_rel_error"] < 0.05


def test_gptq_beats_rtn(llama):
    """GPTQ minimizes the layer output error on its calibration inputs; on held-out inputs it
    must not be worse than RTN."""
    model, heldout = llama
    rtn = _q(model, w_bits=3, w_group=32, method="rtn").model
    gq = _q(model, w_bits=3, w_group=32, method="gptq").model
    for feeds, factor in [(model.calibration, 0.8), (heldout, 1.1)]:
        ref = model.run(feeds)
        e_rtn = max_rel_error(ref, rtn.run(feeds))
        e_gptq = max_rel_error(ref, gq.run(feeds))
        assert e_gptq < factor * e_rtn


def test_ragged_groups_and_formats():
    m, inputs = build("llama", hidden_size=48, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2)
    model = rotaq.load(m, inputs)
    errs = {}
    for fmt, bits in [("int", 4), ("fp8_e4m3", 8), ("mxfp4", 4), ("nvfp4", 4)]:
        res = _q(model, w_format=fmt, w_bits=bits, w_group=32 if fmt == "int" else -1)
        errs[fmt] = res.report["passes"][0]["stats"]["weight_rel_error_mean"]
    assert errs["fp8_e4m3"] < errs["nvfp4"] < errs["mxfp4"]
    assert errs["int"] < 0.2


def test_static_activations_kv_and_filters(llama):
    model, _ = llama
    res = _q(model, w_bits=8, a_bits=8, a_mode="static", a_calib="percentile", kv_bits=8)
    st = res.report["passes"][0]["stats"]
    assert st["kv_quantized"] == 2 and st["calibration_tokens"] == 128
    assert res.report["max_rel_error"] < 0.05
    only_mlp = _q(model, w_bits=8, include=r"\.mlp\.")
    assert only_mlp.report["passes"][0]["stats"]["linears"] == 6
    with_head = _q(model, w_bits=8, quantize_head=True)
    assert with_head.report["passes"][0]["stats"]["linears"] == 15


def test_bad_options():
    with pytest.raises(RotaqError, match="w_format expects one of int, fp8_e4m3, mxfp4, nvfp4"):
        rotaq.Recipe("q", [{"pass": "quantize", "w_format": "int5x"}], None).build()
    with pytest.raises(RotaqError, match="method expects one of rtn, gptq, got 'awq'"):
        rotaq.Recipe("q", [{"pass": "quantize", "method": "awq"}], None).build()
    with pytest.raises(RewriteError, match="a_bits / kv_bits / head_bits"):
        rotaq.Recipe("q", [{"pass": "quantize", "a_bits": 5}], None).build()


def test_head_bits(llama):
    model, _ = llama
    res = _q(model, w_bits=4, w_group=32, head_bits=8)
    st = res.report["passes"][0]["stats"]
    assert st["linears"] == 15 and st["head_quantized"] == 1
    head = model.analysis().residual.head[0]
    w0, _ = model.graph.get_linear(head)
    w1, _ = res.model.graph.get_linear(head)
    assert np.allclose(w1, fake_quantize(w0, QFormat(bits=8)), atol=1e-6)


def test_w4a4_rotated_recipe_onnx():
    """The full w4a4-rotated recipe on the ONNX IR: rotation + Q/K rotation, GPTQ int4 weights,
    int4 per-token activations and KV cache as QDQ / fake quant, runs in ORT."""
    res = rotaq.optimize(loaded("llama", "onnx"), "w4a4-rotated")
    rot, quant = (p["stats"] for p in res.report["passes"])
    assert rot["qk_rotated"] == 2
    assert quant["linears"] == 14 and quant["kv_quantized"] == 2 and quant["method"] == "gptq"
    assert res.report["verify"]["rewrite"]["runtime"] == "ort"
    assert 0 < res.report["verify"]["rewrite"]["max_rel_error"] < 0.5
    assert sum(n.op == "quant" for n in res.model.graph.view().nodes) > 14


def test_activation_clip_search_and_asymmetric_options(llama):
    """``a_clip_search``: one clip per input tensor, shared by the linears reading it, recorded
    per linear and used by the emitted quantizer (a one-value grid equals that fixed clip, bit
    for bit); ``a_symmetric`` / ``kv_symmetric`` / ``kv_clip`` reach the emitted quantizers."""
    model, heldout = llama
    res = _q(model, w_bits=8, a_bits=4, a_clip_search=(0.6, 0.7, 0.8, 0.9, 1.0))
    st = res.report["passes"][0]["stats"]
    per = st["a_clip_per_linear"]
    assert len(per) == 14 and set(per.values()) <= {0.6, 0.7, 0.8, 0.9, 1.0}
    for i in range(2):
        p = f"model.layers.{i}."
        assert len({per[p + f"self_attn.{n}_proj"] for n in "qkv"}) == 1
        assert per[p + "mlp.gate_proj"] == per[p + "mlp.up_proj"]
    assert sum(int(part.split(" x ")[1]) for part in st["a_clip_chosen"].split(", ")) == 14
    one = _q(model, w_bits=8, a_bits=4, a_clip_search=(0.8,)).model.run(heldout)
    fixed = _q(model, w_bits=8, a_bits=4, a_clip=0.8).model.run(heldout)
    other = _q(model, w_bits=8, a_bits=4, a_clip=0.9).model.run(heldout)
    assert np.array_equal(one[0], fixed[0]) and not np.array_equal(one[0], other[0])

    def chains(**opts):  # (asymmetric, symmetric) fake-quant chains: amin / abs first steps
        r = _q(model, w_bits=8, a_bits=4, kv_bits=4, **opts)
        first = [n.key.split("_")[0] for n in r.model.graph.view().nodes if n.op == "quant"]
        return r, (first.count("amin"), first.count("abs"))

    assert chains()[1] == (0, 14 + 4)  # 14 linear inputs, K and V of 2 layers
    assert chains(a_symmetric=False)[1] == (14, 4)
    asym, counted = chains(a_symmetric=False, kv_symmetric=False, kv_clip=0.95)
    assert counted == (18, 0)
    assert asym.report["passes"][0]["stats"]["format"].endswith("a4 dynamic asym, kv4 asym")
    assert 0 < asym.report["max_rel_error"] < 0.2
    with pytest.raises(RewriteError, match="clip ratio 1.5"):
        rotaq.Recipe("q", [{"pass": "quantize", "a_clip_search": (0.8, 1.5)}], None).build()
