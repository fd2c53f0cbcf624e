"""Decode with a KV cache on the TVM backend (tiny random llama with its cache graph): the
compiled one-token steps against ONNX Runtime's loop over the same file, across a move to a
larger context, the full-context error, prefill feeds of a cache-graph artefact and bench."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the TVM extra is not installed (pip install rotaq[tvm])")
import rotaq
from rotaq.backends import tvm as tb
from rotaq.backends.tvm_decode import TvmCacheRunner
from rotaq.decoder_io import CacheRunner
from rotaq.errors import RotaqError
from tests.tiny import loaded


@pytest.fixture(scope="module")
def kv_artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("tvm-kv")
    path = str(d / "llama.onnx")
    model = rotaq.optimize(loaded("llama", "onnx", kv_cache=True), "w4a16-rotated", verify=False)
    model.model.save(path, tokenizer=False)
    meta = tb.compile_tvm(path, str(d / "art"), tokens=[8, 16], decode=[15, 31], progress=False)
    return path, str(d / "art"), meta


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_decode_matches_ort(kv_artifact):
    path, art, meta = kv_artifact
    assert sorted(meta["decode"]) == ["15", "31"]
    for entry in [*meta["decode"].values(), *meta["buckets"].values()]:
        # one token over the cache, fused, reading the 2 KV heads before repeat_kv
        assert entry["stats"]["attention"] == 2 and entry["stats"]["gqa_folded"] == 2
    runner, ref = TvmCacheRunner(tb.load(art).graph), CacheRunner(path)
    ids = np.random.default_rng(0).integers(0, 200, (1, 11))
    a, b = runner.prefill(ids), ref.prefill(ids)
    assert a.shape == b.shape and _rel(a, b) < 1e-4
    contexts = set()
    for _ in range(12):  # 11 -> 23 cached tokens: moves from the 15-slot to the 31-slot cache
        tok = np.array([[int(b[0, -1].argmax())]])
        a, b = runner.run(tok), ref.run(tok)
        contexts.add(runner.ctx)
        assert a.shape == (1, 1, b.shape[-1]) and _rel(a, b) < 1e-4
    assert contexts == {15, 31} and runner.length == 23
    vocab = meta["index_bounds"]["input_ids"]  # a decode step's id is checked too (no crash)
    with pytest.raises(RotaqError, match=f"holds {vocab}, outside"):
        runner.run(np.array([[vocab]]))
    assert runner.length == 23  # the refused step did not advance the cache
    for _ in range(8):  # 32 keys per step here: the tiled path of the attention kernel
        runner.run(np.array([[1]]))
    with pytest.raises(RotaqError, match="context is full"):
        runner.run(np.array([[1]]))


def test_prefill_without_padding_runs_the_rest_as_steps(kv_artifact):
    """An artefact that may not pad (per-tensor dynamic activation scales, e.g. w4a8's int8
    head) prefills a prompt of an uncompiled length as its largest compiled length, then one
    step per remaining token: the same logits for every position as a padded prefill here
    (this model's padding is exact), and the cache continues from there."""
    _, art, _ = kv_artifact
    ids = np.random.default_rng(4).integers(0, 200, (1, 13))
    padded, chunked = TvmCacheRunner(tb.load(art).graph), TvmCacheRunner(tb.load(art).graph)
    chunked.g.meta["padding_exact"] = False
    with pytest.raises(RotaqError, match="padding would change"):
        chunked.g.run(chunked.g.sample_feeds(13))  # what the runner now avoids
    a, b = padded.prefill(ids), chunked.prefill(ids)  # 13 = 8 + 5 steps
    assert a.shape == b.shape == (1, 13, a.shape[-1]) and _rel(b, a) < 1e-4
    assert chunked.length == 13
    tok = np.array([[int(a[0, -1].argmax())]])
    assert _rel(chunked.run(tok), padded.run(tok)) < 1e-4
    with pytest.raises(RotaqError, match="padding would change"):
        chunked.prefill(ids[:, :5])  # shorter than every compiled length: refused as before


def test_cache_artifact_prefill_feeds(kv_artifact):
    """token_feeds (empty pasts, positions) on the artefact itself, as perplexity uses it."""
    path, art, _ = kv_artifact
    model, ref = tb.load(art), rotaq.load(path)
    ids = np.random.default_rng(1).integers(0, 200, (1, 13))
    feeds = model.token_feeds(ids)
    assert feeds["past_key_values.0.key"].shape[2] == 0
    (a, *_), (b, *_) = model.graph.run(feeds), ref.graph.run(ref.token_feeds(ids))
    assert a.shape == b.shape and _rel(a, b) < 1e-4


def test_bench_reports_decode(kv_artifact):
    from rotaq.eval.latency import bench

    _, art, _ = kv_artifact
    res = bench(art, backend="tvm", tokens=[8], repeats=2, warmup=1, contexts=[6, 12],
                progress=False)
    assert set(res["decode"]) == {"6", "12"}
    assert all(r["tokens_per_s"] > 0 for r in res["decode"].values())
    assert res["peak_rss_mib"] > 0


def test_cli_compile_contexts(kv_artifact, tmp_path, capsys):
    """``rotaq compile --contexts``: exactly the contexts asked for; bad lists exit 2."""
    import json

    from rotaq.cli import main

    path, _, _ = kv_artifact
    out = tmp_path / "art"
    assert main(["compile", path, "--backend", "tvm", "--tokens", "4", "--contexts", "7",
                 "-o", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert sorted(meta["decode"]) == ["7"] and meta["tokens"] == [4]
    runner = TvmCacheRunner(tb.load(str(out)).graph)
    assert runner.contexts == [7]
    for bad in ("0", "a,b", ","):
        assert main(["compile", path, "--backend", "tvm", "--contexts", bad,
                     "-o", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert "--contexts expects" in err and "Traceback" not in err
        assert not (tmp_path / "bad").exists()
