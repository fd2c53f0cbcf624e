"""Perplexity, agreement and embedding cosine: exact on tiny models, anchored on trained ones."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

import rotaq
from rotaq.cli.eval import add_commands
from rotaq.errors import RotaqError
from rotaq.eval import quality as q
from tests.eval.test_latency import VOCAB, tiny_lm_onnx
from tests.tiny import VOCAB as LLAMA_VOCAB
from tests.tiny import build, loaded

WINDOWS = np.random.default_rng(1).integers(0, LLAMA_VOCAB, (3, 24))


@pytest.fixture(scope="module")
def tiny_llama():
    module, _ = build("llama")  # the same seeded weights as the shared capture
    return module, loaded("llama")


@pytest.fixture(scope="module")
def tiny_bert():
    return loaded("bert")


# ---- perplexity -----------------------------------------------------------------------------
def test_perplexity_matches_torch_cross_entropy(tiny_llama):
    module, model = tiny_llama
    res = q.perplexity_from_windows(model, WINDOWS, progress=False)
    ids = torch.from_numpy(WINDOWS)
    with torch.no_grad():
        logits = module(input_ids=ids).logits.double()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, LLAMA_VOCAB),
                                           ids[:, 1:].reshape(-1))
    assert res["tokens"] == 3 * 23 and res["windows"] == 3 and res["window"] == 24
    assert res["backend"] == "torch"
    assert res["nll"] == pytest.approx(float(ce), rel=1e-6)
    assert res["ppl"] == pytest.approx(float(torch.exp(ce)), rel=1e-6)
    # batching windows does not change the result
    batched = q.perplexity_from_windows(model, WINDOWS, batch=2, progress=False)
    assert batched["ppl"] == pytest.approx(res["ppl"], rel=1e-6)


def test_perplexity_ort_handmade_lm(tmp_path):
    """ORT backend, attention_mask fed because the graph asks for it; numpy reference."""
    path, emb, w = tiny_lm_onnx(str(tmp_path / "lm.onnx"))
    model = rotaq.load(path)
    wins = np.random.default_rng(2).integers(0, VOCAB, (2, 16))
    res = q.perplexity_from_windows(model, wins, progress=False)
    logits = emb[wins].astype(np.float64) @ w.astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.mean(np.take_along_axis(logp[:, :-1], wins[:, 1:, None], -1))
    assert res["backend"] == "ort" and res["tokens"] == 2 * 15
    assert res["ppl"] == pytest.approx(np.exp(nll), rel=1e-5)


def test_log_softmax_is_stable():
    """Huge logits overflow a naive exp; the shifted log-sum-exp does not."""
    logits = np.array([[[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]]], np.float32)
    # only position 0 is scored (it predicts token 1 of the window)
    assert q._nll_sum(logits, np.array([[0, 0]])) == pytest.approx(0.0, abs=1e-9)
    assert q._nll_sum(logits, np.array([[0, 1]])) == pytest.approx(1e4, rel=1e-9)


def test_window_validation(tiny_llama):
    _, model = tiny_llama
    with pytest.raises(RotaqError, match="2\\+ tokens"):
        q.perplexity_from_windows(model, np.zeros((2, 1), np.int64), progress=False)


# ---- agreement and cosine -------------------------------------------------------------------
def test_agreement_with_itself(tiny_llama):
    _, model = tiny_llama
    res = q.agreement_from_windows(model, model, WINDOWS, progress=False)
    assert res["agreement"] == 1.0 and res["max_rel_error"] == 0.0
    assert res["positions"] == WINDOWS.size
    assert res["ppl_model"] == res["ppl_reference"]


def test_agreement_detects_a_change(tiny_llama):
    _, model = tiny_llama
    other = model.clone()
    key = next(iter(other.analysis().linears))
    w, b = other.graph.get_linear(key)
    other.graph.set_linear(key, w * 1.5, b)
    res = q.agreement_from_windows(other, model, WINDOWS, progress=False)
    assert res["max_rel_error"] > 1e-3
    assert 0.0 <= res["agreement"] <= 1.0
    assert res["ppl_model"] != res["ppl_reference"]


def test_cosine_with_itself(tiny_bert):
    rng = np.random.default_rng(3)
    enc = [{"input_ids": rng.integers(0, LLAMA_VOCAB, (1, n))} for n in (5, 7, 6, 9)]
    res = q.cosine_from_encoded(tiny_bert, tiny_bert, enc)
    assert res["cosine_mean"] == pytest.approx(1.0, abs=1e-9)
    assert res["cosine_min"] == pytest.approx(1.0, abs=1e-9)
    assert len(res["pair_cosine_model"]) == 2 and res["pair_cosine_max_diff"] == 0.0
    emb = q.embed(tiny_bert, enc)
    assert emb.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-12)


def test_missing_tokenizer_and_reference(tiny_llama):
    _, model = tiny_llama
    with pytest.raises(RotaqError, match="--tokenizer DIR"):
        q.perplexity(model, n_tokens=64, window=32, progress=False)
    with pytest.raises(RotaqError, match="--reference"):
        q.reference_for(model)


def test_reference_is_not_the_model_itself(tmp_path):
    path, _, _ = tiny_lm_onnx(str(tmp_path / "lm.onnx"))
    model = rotaq.load(path)  # no rotaq metadata: its source is the file itself
    with pytest.raises(RotaqError, match="--reference"):
        q.reference_for(model, path)


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rotaq")
    add_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_errors(tmp_path):
    path, _, _ = tiny_lm_onnx(str(tmp_path / "lm.onnx"))
    with pytest.raises(RotaqError, match="--backend ort"):
        _cli(["eval", path, "--backend", "torch"])
    with pytest.raises(RotaqError, match="--tokenizer DIR"):
        _cli(["eval", path, "--task", "ppl"])
    with pytest.raises(RotaqError, match="--tokens"):
        _cli(["bench", path, "--tokens", "1,x"])


def test_cli_bench_json(tmp_path, capsys):
    path, _, _ = tiny_lm_onnx(str(tmp_path / "lm.onnx"))
    assert _cli(["bench", path, "--tokens", "1,8", "--repeats", "2", "--threads", "1",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["backend"] == "ort" and set(d["tokens"]) == {"1", "8"}


# ---- trained models -------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_perplexity_torch():
    model = rotaq.load("smollm2-135m")
    res = q.perplexity(model, corpus="wiki", n_tokens=1024, window=512, progress=False)
    assert res["windows"] == 2 and res["tokens"] == 2 * 511 and res["backend"] == "torch"
    assert 15 <= res["ppl"] <= 40


@pytest.mark.real
def test_minilm_cosine_with_itself():
    model = rotaq.load("minilm-l6")
    res = q.cosine_to_reference(model, model)
    assert res["sentences"] == 16
    assert res["cosine_min"] == pytest.approx(1.0, abs=1e-9)
    assert res["pair_cosine_model"][0] == pytest.approx(0.755, abs=0.01)
    # similar pairs score above dissimilar ones
    sims = dict(zip(map(tuple, res["pairs"]), res["pair_cosine_model"]))
    assert sims[("A plane is taking off.", "An air plane is taking off.")] > 0.9
    assert sims[("The cat sits outside.", "The new movie is awesome.")] < 0.2


@pytest.mark.real
def test_cli_eval_ppl_json(capsys):
    assert _cli(["eval", "smollm2-135m", "--task", "ppl", "--tokens", "512", "--window", "256",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["task"] == "ppl" and d["backend"] == "torch" and d["windows"] == 2
    assert d["tokens"] == 2 * 255 and d["input_tokens"] == 512
    assert 10 <= d["ppl"] <= 60
