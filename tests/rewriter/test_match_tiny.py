"""Exact match counts on tiny random models of six families, on both IRs."""

import pytest

import rotaq
from tests.tiny import loaded

# family: (linears, biased linears, attention kind, heads, kv heads, head_dim, norms, norm kind,
#          pre_norm, residual blocks, head linears)
EXPECTED = {
    "llama": (15, 0, "sdpa", 4, 2, 16, 5, "rms", True, 4, 1),
    "qwen2": (15, 6, "sdpa", 4, 2, 16, 5, "rms", True, 4, 1),  # q/k/v carry biases
    "mistral": (15, 0, "sdpa", 4, 2, 16, 5, "rms", True, 4, 1),
    "gemma": (15, 0, "sdpa", 4, 2, 16, 5, "rms", True, 4, 1),
    # GPT-2: Conv1D = addmm with an [in, out] weight; q/k/v fused in one c_attn linear
    "gpt2": (9, 8, "sdpa", 4, 4, 16, 5, "layer", True, 4, 1),
    # BERT: 6 linears per layer + pooler; post-LN (embedding LN + 2 per layer)
    "bert": (13, 13, "sdpa", 4, 4, 16, 5, "layer", False, 4, 1),
    "bert-eager": (13, 13, "explicit", 4, 4, 16, 5, "layer", False, 4, 1),
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_counts_fx(family):
    _check(rotaq.inspect(loaded(family)), family)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_counts_onnx(family):
    _check(rotaq.inspect(loaded(family, "onnx")), family, onnx=True)


def _check(d, family, onnx=False):
    lin, biased, kind, heads, kv, hd, norms, nkind, pre, blocks, head = EXPECTED[family]
    assert d["num_linears"] == lin
    assert sum(x["bias"] for x in d["linears"]) == biased
    assert len(d["attention"]) == 2
    for a in d["attention"]:
        if not onnx:
            assert a["kind"] == kind
        assert (a["num_heads"], a["num_kv_heads"], a["head_dim"]) == (heads, kv, hd)
        assert a["q_proj"] and a["k_proj"] and a["v_proj"] and a["o_proj"]
    assert len(d["norms"]) == norms
    assert {n["kind"] for n in d["norms"]} == {nkind}
    assert d["pre_norm"] is pre
    assert d["residual"]["blocks"] == blocks
    assert len(d["residual"]["head"]) == head
    if family in ("llama", "qwen2", "mistral", "gemma"):
        # tied (llama) or not, the head reads the final norm and the embedding starts the stream
        assert d["residual"]["readers"] == 2 * (3 + 2)
        assert d["residual"]["writers"] == 4
