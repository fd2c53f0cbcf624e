"""spin (SpinQuant-style learned rotation): Cayley SGD in float64, the differentiable forward
of both IRs against ORT / torch, and the pass on tiny models: exact in float whatever rotation
it learns, the float loss invariant under the rotation, the quantized loss lowered."""

import numpy as np
import pytest
import torch

import rotaq
from rotaq.errors import RewriteError, RotaqError
from rotaq.linalg import spin
from rotaq.linalg.hadamard import random_orthogonal
from rotaq.passes.spin import Spin
from rotaq.rewriter import torch_exec
from rotaq.rewriter.kv_capture import complete_feeds
from tests.graphs import rel_error
from tests.tiny import build, loaded


# ---- math ------------------------------------------------------------------------------------
def test_cayley_step_is_orthogonal_and_descends():
    rng = np.random.default_rng(0)
    r = random_orthogonal(24, 1)
    m = rng.standard_normal((24, 24))
    a = m - m.T
    out = spin.cayley_step(r, a, 0.3)
    assert np.abs(out @ out.T - np.eye(24)).max() < 1e-12
    # first order: (I + a/2 A)^-1 (I - a/2 A) R = R - a A R + O(a^2)
    small = spin.cayley_step(r, a, 1e-6)
    assert np.abs((small - r) / 1e-6 + a @ r).max() < 1e-4


def test_cayley_minimize_finds_a_target_rotation():
    """min ||R - T||_F^2 over orthogonal R has its minimum 0 at R = T (T reachable: the same
    connected component of O(n) as the start, i.e. the same determinant)."""
    start = random_orthogonal(16, 4)
    m = np.random.default_rng(3).standard_normal((16, 16))
    target = torch.tensor(spin.cayley_step(start, m - m.T, 1.0), dtype=torch.float32)

    def objective(rt, step):
        loss = ((rt - target) ** 2).sum()
        loss.backward()
        return float(loss.detach())

    res = spin.cayley_minimize(objective, start, steps=300, lr=0.2)
    assert res.loss_init > 10
    assert res.loss_final < 1e-2 * res.loss_init
    assert np.abs(res.rotation @ res.rotation.T - np.eye(16)).max() < 1e-10
    assert res.history[0] == res.loss_init and len(res.history) == 301


def test_layer_objective_lowers_the_error_of_planted_outliers():
    """Inputs with two huge channels whose weights are small (as in trained LLMs), 4-bit per
    token and per channel: from a random rotation, the learned one cuts the quantization
    error by more than 15%; the loss never rises (full batch)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64))
    x[:, [3, 9]] *= 30
    ws = [rng.standard_normal((32, 64)), rng.standard_normal((16, 64))]
    for w in ws:
        w[:, [3, 9]] /= 30
    block = spin.Block([(x, ws)], [(rng.standard_normal((256, 48)),
                                    rng.standard_normal((64, 48)))])
    q = spin.Quantizers(w_bits=4, w_group=-1, w_symmetric=True, a_bits=4, a_clip=1.0)
    res = spin.cayley_minimize(spin.layer_objective([block], q), random_orthogonal(64, 0),
                               steps=60, lr=0.5)
    assert res.loss_final < 0.85 * res.loss_init, (res.loss_init, res.loss_final)
    assert all(h >= res.loss_final for h in res.history)


def test_outlier_objective_is_the_power_mean_and_flattens_planted_outliers():
    """At R = I the loss is mean_t (mean_j |x_tj|^p)^(2/p) / mean_j x_tj^2 (float64 numpy);
    minimizing it from the identity cuts the real int4 per-token error (clip 1.0) of inputs with
    two huge channels by more than 3x, and the loss never rises (full batch)."""
    from rotaq.linalg.flatquant import fake_quant_tokens

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 64))
    x[:, [3, 9]] *= 30
    xs = [x[:200], x[200:]]  # two readers' inputs, concatenated by the objective
    fn = spin.outlier_objective(xs, p=6.0, tokens=10_000)
    eye = torch.eye(64, requires_grad=True)
    value = fn(eye, 0)
    ref = (np.mean(np.abs(x) ** 6, -1) ** (2 / 6) / np.mean(x ** 2, -1)).mean()
    assert abs(value - ref) < 1e-5 * ref and eye.grad is not None

    def int4_error(r: np.ndarray) -> float:
        y = torch.as_tensor(x @ r, dtype=torch.float32)
        return float(((fake_quant_tokens(y, 4, 1.0) - y) ** 2).sum() / (y ** 2).sum())

    res = spin.cayley_minimize(fn, np.eye(64), steps=60, lr=0.5)
    assert all(h >= res.loss_final for h in res.history)
    assert int4_error(res.rotation) < int4_error(np.eye(64)) / 3, (
        int4_error(np.eye(64)), int4_error(res.rotation))
    # a sample: at most ``tokens`` rows, drawn with the seed (the same rows each time)
    small = [spin.outlier_objective(xs, p=6.0, tokens=50, seed=1) for _ in range(2)]
    assert small[0](torch.eye(64, requires_grad=True), 0) == small[1](
        torch.eye(64, requires_grad=True), 0)


def test_head_outlier_objective_spans_and_flattens_a_planted_head_channel():
    """At R = I: per set, the mean over its groups of (mean_j |x_j|^p)^(2/p) / mean_j x_j^2
    (float64 numpy), a group being the whole row or one head; sets sum. Minimizing from the
    identity a per-head rotation on rows whose heads all share one huge channel cuts the real
    int4 error of the per-token (whole row) and per-head quantizers by more than 3x."""
    from rotaq.linalg.flatquant import fake_quant_tokens

    rng = np.random.default_rng(1)
    hd, heads = 16, 4
    x = rng.standard_normal((600, heads * hd))
    x[:, 5::hd] *= 25  # channel 5 of every head
    v = rng.standard_normal((900, hd))
    v[:, 5] *= 25
    fn = spin.head_outlier_objective([(x, heads * hd), (v, hd)], hd, p=6.0)
    eye = torch.eye(hd, requires_grad=True)

    def ratio(rows):
        return (np.mean(np.abs(rows) ** 6, -1) ** (1 / 3) / np.mean(rows ** 2, -1)).mean()

    ref = ratio(x) + ratio(v)
    assert abs(fn(eye, 0) - ref) < 1e-5 * ref and eye.grad is not None
    per_head = spin.head_outlier_objective([(x, hd)], hd, p=6.0)(torch.eye(hd,
                                                                      requires_grad=True), 0)
    assert abs(per_head - ratio(x.reshape(-1, hd))) < 1e-5 * per_head

    def int4_error(rows: np.ndarray, r: np.ndarray, group: int) -> float:
        y = (rows.reshape(len(rows), -1, hd) @ r).reshape(-1, group)
        y = torch.as_tensor(y, dtype=torch.float32)
        return float(((fake_quant_tokens(y, 4, 1.0) - y) ** 2).sum() / (y ** 2).sum())

    res = spin.cayley_minimize(fn, np.eye(hd), steps=80, lr=0.5)
    assert all(h >= res.loss_final for h in res.history)
    for rows, group in ((x, heads * hd), (v, hd)):
        before, after = int4_error(rows, np.eye(hd), group), int4_error(rows, res.rotation, group)
        assert after < before / 3, (group, before, after)
    # a ragged last group is a group of its own size: 5 heads in groups of 2 heads -> 2 + 2 + 1
    x5 = rng.standard_normal((40, 5 * hd))
    ragged = spin.head_outlier_objective([(x5, 2 * hd)], hd, p=6.0)(
        torch.eye(hd, requires_grad=True), 0)
    groups = [x5[:, :2 * hd], x5[:, 2 * hd:4 * hd], x5[:, 4 * hd:]]
    want = np.mean(np.concatenate([np.mean(np.abs(g) ** 6, -1) ** (1 / 3) / np.mean(g ** 2, -1)
                                   for g in groups]))
    assert abs(ragged - want) < 1e-5 * want
    with pytest.raises(ValueError, match="do not fall on"):
        spin.head_outlier_objective([(x, 24)], hd)


# ---- the differentiable forward --------------------------------------------------------------
@pytest.mark.parametrize("ir,kv", [("fx", False), ("onnx", False), ("onnx", True)])
def test_forward_matches_the_graph(ir, kv):
    model = loaded("llama", ir, kv_cache=kv)
    rotated = rotaq.optimize(model, rotaq.Recipe("r", [{"pass": "rotate", "rotate_qk": True}],
                                                 None)).model
    feeds = complete_feeds(rotated.graph, {"input_ids": np.random.default_rng(0).integers(
        0, 256, (2, 16))})
    ref = rotated.graph.run(feeds)
    with torch.no_grad():
        out = torch_exec.forward(rotated.graph, feeds, {})
    assert rel_error(ref[:1], [out[0].numpy()]) < 1e-5
    # a replaced value: the first linear's output doubled, computed from its input
    a = rotated.analysis()
    key = next(iter(a.linears))
    w, b = rotated.graph.get_linear(key)
    wt = torch.as_tensor(w, dtype=torch.float32)
    out_v = rotated.graph.view().by_key[key].outputs[0]
    seen = {}

    def twice(x):
        seen["x"] = x
        return 2 * (x @ wt.T + (0 if b is None else torch.as_tensor(b, dtype=torch.float32)))

    with torch.no_grad():
        out2 = torch_exec.forward(rotated.graph, feeds, {out_v: (a.linears[key].input, twice)})
    assert "x" in seen and rel_error(ref[:1], [out2[0].numpy()]) > 1e-3


def test_forward_names_an_unsupported_op():
    import onnx
    from onnx import TensorProto, helper

    from rotaq.rewriter.onnx import OnnxGraph

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node("Einsum", ["x"], ["y"], name="the_einsum", equation="ij->ij")
    m = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    g = OnnxGraph.from_proto(onnx.ModelProto.FromString(m.SerializeToString()))
    with pytest.raises(RewriteError, match="Einsum.*the_einsum"):
        torch_exec.forward(g, {"x": np.ones((2, 3), np.float32)}, {})


# ---- the pass ------------------------------------------------------------------------------
def _calibrated(ir: str, kv: bool = False):
    model = loaded("llama", ir, kv_cache=kv).clone()
    model.calibration = {"input_ids": np.random.default_rng(0).integers(0, 256, (4, 32))}
    return model


@pytest.mark.parametrize("ir,kv", [("fx", False), ("onnx", True)])
def test_spin_is_exact_and_lowers_the_quantized_loss(ir, kv):
    model = _calibrated(ir, kv)
    ref = model.run()
    res = Spin(objective="e2e", steps=8, lr=0.05, rotate_qk=True)(model.clone())
    st = res.stats
    assert res.modified and st["objective"] == "e2e" and st["steps"] == 8
    assert st["qk_rotated"] == 2 and st["ov_heads_rotated"] == 2 and st["online_hadamards"] == 2
    assert st["loss_final"] <= st["loss_init"] and len(st["loss_per_step"]) == 9
    # the logits in float, whatever rotation was learned (presents of a cache graph hold
    # rotated values and keys by design)
    assert rel_error(ref[:1], res.model.run()[:1]) < 1e-5
    assert st["calibration_tokens"] == 128


def test_float_loss_is_invariant_under_the_rotation():
    """Without quantizers the e2e objective is the float model's cross-entropy at every R."""
    model = _calibrated("fx")
    a = Spin(objective="e2e", steps=0, w_bits=0, a_bits=0, seed=0)(model.clone())
    b = Spin(objective="e2e", steps=0, w_bits=0, a_bits=0, seed=5)(model.clone())
    a, b = a.stats["loss_init"], b.stats["loss_init"]
    ids = np.asarray(model.calibration["input_ids"])
    logits = torch.as_tensor(model.run({"input_ids": ids})[0])
    ce = float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 torch.as_tensor(ids[:, 1:]).reshape(-1)))
    assert abs(a - ce) < 1e-4 * ce and abs(b - ce) < 1e-4 * ce


def test_minibatches_and_the_layer_objective():
    model = _calibrated("fx")
    ref = model.run()
    # one 32-token row per step
    mb = Spin(objective="e2e", steps=4, batch_tokens=32)(model.clone())
    assert mb.stats["loss_final"] <= mb.stats["loss_init"]
    assert rel_error(ref[:1], mb.model.run()[:1]) < 1e-5
    lay = Spin(steps=4, objective="layer")(model.clone())
    assert lay.stats["objective"] == "layer" and lay.stats["loss_final"] <= lay.stats["loss_init"]
    assert rel_error(ref[:1], lay.model.run()[:1]) < 1e-5
    out = Spin(steps=4, objective="outlier", outlier_tokens=64)(model.clone())
    st = out.stats
    assert st["objective"] == "outlier" and st["loss_final"] < st["loss_init"]
    assert st["calibration_tokens"] == 128  # the text seen; 64 rows of it sampled
    assert rel_error(ref[:1], out.model.run()[:1]) < 1e-5


@pytest.mark.parametrize("ir,kv", [("fx", False), ("onnx", True)])
def test_learned_per_head_rotation_is_folded_exactly(ir, kv):
    """learn_ov: each attention's R2 is learned on its own rows (its outlier loss falls) and
    folded on top of the Hadamard: W_o changes by one orthogonal block per head, the same for
    every head, not the identity; R1 is learned on the same rows as without it; float output
    unchanged."""
    model = _calibrated(ir, kv)
    ref = model.run()
    plain = Spin(steps=10, outlier_tokens=64)(model.clone())
    res = Spin(steps=10, outlier_tokens=64, learn_ov=True)(model.clone())
    st = res.stats
    assert st["ov_learned"] == 2 and st["ov_loss_final"] < st["ov_loss_init"]
    assert st["loss_final"] == plain.stats["loss_final"]  # R1: the same sample, the same result
    assert rel_error(ref[:1], res.model.run()[:1]) < 1e-5
    for site in res.model.analysis().attention:
        hd = site.head_dim
        w0, _ = plain.model.graph.get_linear(site.o_proj)
        w1, _ = res.model.graph.get_linear(site.o_proj)
        x = np.linalg.lstsq(w0, w1, rcond=None)[0]  # W1 = W0 (I (x) R2)
        r2 = x[:hd, :hd]
        assert np.abs(x - np.kron(np.eye(len(x) // hd), r2)).max() < 1e-4
        assert np.abs(r2 @ r2.T - np.eye(hd)).max() < 1e-4 and np.abs(r2 - np.eye(hd)).max() > 0.05


def test_recipe_and_refusals():
    recipe = rotaq.Recipe.load("w4a4-spin")
    assert [p["pass"] for p in recipe.passes] == ["spin", "quantize"]
    assert recipe.passes[0]["objective"] == "outlier"
    with pytest.raises(RotaqError, match="objective"):
        Spin(objective="global")
    with pytest.raises(RewriteError, match="steps"):
        Spin(steps=-1)
    with pytest.raises(RewriteError, match="learn_ov.*online_o=false"):
        Spin(learn_ov=True, online_o=True)
    model = _calibrated("fx")
    rotated = rotaq.optimize(model, rotaq.Recipe("r", [{"pass": "rotate"}], None)).model
    with pytest.raises(RotaqError, match="before rotate"):
        Spin(steps=0)(rotated)
    m, inputs = build("gpt2")
    gpt2 = rotaq.load(m, inputs, ir="fx", kv_cache=False)
    with pytest.raises(RewriteError, match="cannot carry: LayerNorm"):
        Spin(steps=0)(gpt2)


def test_w4a4_spin_recipe_on_a_cache_graph():
    """The recipe end to end (a few steps) on an ONNX decoder with a KV cache: spin, then the
    W4A4 quantizer with its 4-bit cache; verification compares prefill + decode logits."""
    model = _calibrated("onnx", kv=True)
    res = rotaq.optimize(model, "w4a4-spin", options={
        "spin.steps": 2, "spin.calib_window": 32, "spin.batch_tokens": 32,
        "quantize.method": "rtn"})
    spin_stats, quant = (p["stats"] for p in res.report["passes"])
    assert spin_stats["steps"] == 2 and spin_stats["kv_cache"] == "rotated values and keys"
    assert quant["linears"] == 14
    assert res.model.source["passes"] == "spin,quantize"
