"""The rotation pass is exact: checked against the original model on random weights."""

import numpy as np
import pytest
import torch
import transformers as T
from hypothesis import given, settings
from hypothesis import strategies as st

import rotaq
from rotaq.errors import RewriteError
from rotaq.linalg.hadamard import random_hadamard
from rotaq.model import max_rel_error
from tests.tiny import _randomize_norms, build, loaded

TOL = 1e-5


def _rotate(family, **options):
    return rotaq.optimize(loaded(family), "rotate", options=options)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
@pytest.mark.parametrize("qk", [False, True])
def test_residual_rotation_exact(family, qk):
    res = _rotate(family, rotate_qk=qk)
    st_ = res.report["passes"][0]["stats"]
    assert st_["mode"] == "residual"
    assert st_["norms_folded"] == 5 and st_["writers"] == 4 and st_["ov_heads_rotated"] == 2
    assert st_["online_hadamards"] == 2 and st_["qk_rotated"] == (2 if qk else 0)
    assert res.report["max_rel_error"] < TOL
    # the weights really changed: the embedding is rotated, the norms hold ones
    a = res.model.analysis()
    e_new = res.model.graph.get_embedding(a.residual.embedding)
    e_old = loaded(family).graph.get_embedding(a.residual.embedding)
    assert np.abs(e_new - e_old).max() > 1e-3
    assert np.allclose(e_new, e_old @ random_hadamard(64, 0), atol=1e-5)
    # online transforms are not linears
    assert len(a.linears) == 15


@pytest.mark.parametrize("ir", ["fx", "onnx"])
def test_online_hadamard_before_o_proj_is_exact(ir):
    """``online_o``: QuaRot's online Hadamard across heads before o_proj, on top of the folded
    per-head one (the o_proj input is then fully rotated); exact, one more online transform per
    block, and the o_proj weight really changed."""
    base = rotaq.optimize(loaded("llama", ir), "rotate", options={"online_o": False})
    res = rotaq.optimize(loaded("llama", ir), "rotate", options={"online_o": True})
    st_, st0 = (r.report["passes"][0]["stats"] for r in (res, base))
    assert st0["online_hadamards"] == 2 and st_["online_hadamards"] == 4
    assert res.report["max_rel_error"] < TOL
    o = base.model.analysis().attention[0].o_proj
    assert np.abs(res.model.graph.get_linear(o)[0] - base.model.graph.get_linear(o)[0]).max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert"])
def test_rotation_exact_onnx(family):
    """Same pass, ONNX IR: runs in ONNX Runtime, exact, online transforms as Kronecker."""
    res = rotaq.optimize(loaded(family, "onnx"), "rotate",
                         options={"rotate_qk": family != "bert"})
    assert res.model.ir == "onnx"
    assert res.report["max_rel_error"] < TOL
    assert res.report["passes"][0]["stats"]["qk_rotated"] == (0 if family == "bert" else 2)
    a = res.model.analysis()
    assert len(a.linears) == (13 if family == "bert" else 15)
    online = [n for n in a.view.nodes if n.op == "online"]
    # two-factor transforms: Reshape, MatMul, MatMul, Reshape; never a dense n x n MatMul
    assert len(online) >= 4
    dense = [n for n in online if n.params.get("target") == "MatMul"
             and any(a.view.is_const(i) and (a.view.shape(i) or (0,))[0] >= 64 for i in n.inputs)]
    assert not dense


def test_rotation_negative_control():
    """Rotating only the embedding (no compensating folds) must break the model: the
    verification can fail."""
    model = loaded("llama")
    ref = model.run()
    work = model.clone()
    key = work.analysis().residual.embedding
    work.graph.set_embedding(key, work.graph.get_embedding(key) @ random_hadamard(64, 0))
    assert max_rel_error(ref, work.run()) > 1e-2


@pytest.mark.parametrize("family", ["bert", "bert-eager", "gpt2"])
def test_online_rotation_exact(family):
    res = _rotate(family, rotate_qk=True)
    st_ = res.report["passes"][0]["stats"]
    assert st_["mode"] == "online"
    assert st_["qk_rotated"] == 2
    assert res.report["max_rel_error"] < TOL
    view = res.model.graph.view()
    assert sum(n.op == "online" for n in view.nodes) > 0
    assert len(res.model.analysis().linears) == (13 if "bert" in family else 9)


def test_layernorm_residual_refused():
    with pytest.raises(RewriteError, match="LayerNorm 'transformer.h.0.ln_1'"):
        _rotate("gpt2", mode="residual")


def test_post_norm_residual_refused():
    with pytest.raises(RewriteError, match="pre-norm residual stream; the model is post-norm"):
        _rotate("bert", mode="residual")


def test_original_untouched_and_pt2_roundtrip(tmp_path):
    m, inputs = build("llama")
    model = rotaq.load(m, inputs)
    before = model.run()
    res = rotaq.optimize(model, "rotate")
    assert max_rel_error(before, model.run()) == 0.0  # optimize works on a copy
    rep = res.save(str(tmp_path / "r.pt2"))
    assert rep["verify"]["written"]["runtime"] == "torch"
    assert rep["verify"]["written"]["max_rel_error"] < TOL
    again = rotaq.load(str(tmp_path / "r.pt2"))
    # the logits (a KV-cache graph's presents hold V rotated per head: the model's own state)
    assert max_rel_error(before[:1], again.run(model.sample_inputs)[:1]) < TOL
    # dynamic sequence length survives the rewrite and the save
    longer = {"input_ids": np.random.default_rng(1).integers(0, 256, (2, 13))}
    ref = m(input_ids=torch.from_numpy(longer["input_ids"])).logits.detach().numpy()
    assert max_rel_error([ref], again.run(longer)[:1]) < TOL


@settings(max_examples=5, deadline=None)
@given(hidden=st.sampled_from([32, 48, 96]), heads=st.sampled_from([2, 4]),
       kv=st.sampled_from([1, 2]), inter=st.sampled_from([64, 96, 192]),
       layers=st.integers(1, 2), seed=st.integers(0, 10))
def test_rotation_exact_property(hidden, heads, kv, inter, layers, seed):
    """Random small Llama-family graphs: the residual rotation is exact (float64 folds)."""
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=128,
                        tie_word_embeddings=bool(seed % 2), head_dim=hidden // heads)
    m = _randomize_norms(T.LlamaForCausalLM(cfg), seed)
    m.config.use_cache = False
    ids = {"input_ids": torch.randint(0, 128, (1, 6))}
    res = rotaq.optimize(rotaq.load(m, ids), "rotate",
                         options={"seed": seed, "rotate_qk": bool(seed % 3 == 0)})
    assert res.report["max_rel_error"] < TOL
