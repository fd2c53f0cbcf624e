"""rotaq.rewriter.blocks: segment-by-segment execution equals the whole-graph run; a hook's
rewrite reaches the next segment; block-wise GPTQ equals the whole-graph sequential GPTQ."""

import numpy as np
import pytest

import rotaq
from rotaq.passes.calib import capture, input_stats
from rotaq.passes.quantize import Quantize
from rotaq.passes.quantize_calib import CALIB_BATCH
from rotaq.rewriter.blocks import BlockRunner, run_blockwise, segments
from rotaq.rewriter.kv_capture import complete_feeds
from tests.tiny import loaded


@pytest.fixture(scope="module")
def llama():
    return {ir: loaded("llama", ir) for ir in ("onnx", "fx")}


def _feeds(rows=3, seq=12, seed=0):
    return {"input_ids": np.random.default_rng(seed).integers(0, 256, (rows, seq))}


@pytest.mark.parametrize("ir", ["onnx", "fx"])
def test_segments_and_blockwise_run(llama, ir):
    g = llama[ir].graph
    segs = segments(g)
    a = llama[ir].analysis()
    # a prelude (embedding), one segment per residual block (2 layers x 2 sublayers), a tail
    assert [s.kind for s in segs] == ["prelude"] + ["block"] * 4 + ["tail"]
    assert [len(s.linears) for s in segs] == [0, 4, 3, 4, 3, 1]
    assert segs[-1].linears == a.residual.head
    feeds = _feeds()
    ref = g.run(complete_feeds(g, feeds))
    for batch, spill in ((None, False), (1, True)):
        out = run_blockwise(g, feeds, batch=batch, spill=spill)
        assert len(out) == len(ref) == 5  # logits + 2 layers x (key, value)
        for r, o in zip(ref, out):
            assert r.shape == o.shape
            np.testing.assert_allclose(o, r, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ir", ["onnx", "fx"])
def test_hook_rewrite_reaches_next_segment(llama, ir):
    """A hook that rewrites block 2's first linear: the outputs are those of the graph as
    rewritten, and the hook's captures after the edit see the new weight."""
    model = llama[ir].clone()
    g = model.graph
    feeds = _feeds()
    seen = {}

    def hook(sr):
        if sr.segment.index != 2:
            return False
        key = sr.segment.linears[0]
        out = g.view().by_key[key].outputs[0]
        before = sr.capture([out])[out]
        w, b = g.get_linear(key)
        g.set_linear(key, 2.0 * w, None if b is None else 2.0 * b)
        seen["ratio"] = sr.capture([out])[out] / np.where(before == 0, 1, before)
        return True

    out = run_blockwise(g, feeds, hook)
    np.testing.assert_allclose(seen["ratio"], 2.0, rtol=1e-4)
    ref = g.run(complete_feeds(g, feeds))  # the rewritten graph, whole
    np.testing.assert_allclose(out[0], ref[0], rtol=0, atol=1e-5)
    orig = llama[ir].graph.run(complete_feeds(g, feeds))
    assert np.abs(out[0] - orig[0]).max() > 1e-3  # the rewrite did change the logits


def test_input_stats_blockwise_equals_capture(llama):
    model = llama["onnx"]
    a = model.analysis()
    values = sorted({model.graph.view().by_key[k].inputs[0] for k in a.linears})
    feeds = _feeds(rows=4)
    st = input_stats(model, values, feeds)
    caught = capture(model, complete_feeds(model.graph, feeds), values)
    for v in values:
        x = caught[v].astype(np.float64).reshape(-1, caught[v].shape[-1])
        assert st[v].count == x.shape[0] == 4 * 12
        np.testing.assert_allclose(st[v].gram, x.T @ x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(st[v].abs_mean, np.abs(x).mean(0), rtol=1e-5, atol=1e-7)


def _recorded(monkeypatch):
    got = {}
    orig = Quantize._apply

    def apply(self, g, key, sol):
        got[key] = sol[0].dequantize()
        return orig(self, g, key, sol)

    monkeypatch.setattr(Quantize, "_apply", apply)
    return got


def _whole_graph_gptq(q, model, feeds):
    """The previous algorithm: per group (readers, writers of each block), capture the inputs on
    the whole graph as quantized so far, then quantize the group."""
    a = model.analysis()
    keys = q._select(a)
    view = model.graph.view()
    for group in q._blocks(a, keys):
        values = sorted({view.by_key[k].inputs[0] for k in group})
        caught = capture(model, feeds, values, batch=CALIB_BATCH)
        for key in group:
            q._quantize_one(model, a, key, caught)


@pytest.mark.parametrize("ir", ["onnx", "fx"])
def test_blockwise_gptq_equals_whole_graph_gptq(llama, ir, monkeypatch):
    q = Quantize(w_bits=4, w_group=32, method="gptq", quantize_head=True)
    feeds = _feeds(rows=4, seq=16, seed=1)
    got = _recorded(monkeypatch)
    old = llama[ir].clone()
    _whole_graph_gptq(q, old, complete_feeds(old.graph, feeds))
    ref = dict(got)
    got.clear()
    new = llama[ir].clone()
    new.calibration = feeds
    res = q(new)
    assert res.stats["calibration_tokens"] == 4 * 16
    assert len(ref) == len(got) == 15 and list(ref) == list(got)  # same linears, same order
    for k, w in ref.items():
        np.testing.assert_allclose(got[k], w, rtol=0, atol=1e-6)
    f = complete_feeds(old.graph, _feeds(rows=2, seed=3))
    np.testing.assert_allclose(new.graph.run(f)[0], old.graph.run(f)[0], rtol=0, atol=1e-4)


def test_runner_keeps_only_what_later_segments_read(llama):
    g = llama["onnx"].graph
    with BlockRunner(g, _feeds(), keep_outputs=False) as r:
        stores = []
        r.run(lambda sr: stores.append(set(r.store.data[0])), until=3)
        assert len(stores) == 4  # stopped after segment 3
        emb = r.segments[0].end  # read by block 0 (norm, add) only
        assert emb in stores[1] and emb not in stores[2]
        for k, st in enumerate(stores):
            assert st <= set().union(*r._inputs[k:])


def test_external_data_segments(llama, tmp_path):
    """Initializers left in an external file (memory-mapped) are read into each segment's
    session: same outputs."""
    import onnx_ir as oir

    from rotaq.rewriter.onnx import OnnxGraph

    path = str(tmp_path / "x.onnx")
    oir.save(llama["onnx"].graph.model, path, external_data="x.onnx.data",
             size_threshold_bytes=16)
    lazy = oir.load(path)
    assert any(isinstance(v.const_value, oir.ExternalTensor)
               for v in lazy.graph.initializers.values())
    feeds = _feeds(rows=2)
    out = run_blockwise(OnnxGraph(lazy, source=path), feeds)
    ref = llama["onnx"].graph.run(complete_feeds(llama["onnx"].graph, feeds))
    for r, o in zip(ref, out):
        np.testing.assert_allclose(o, r, rtol=0, atol=1e-5)


def test_big_models_verified_block_by_block(llama, monkeypatch):
    """Past ROTAQ_BLOCKWISE_GIB of weights, Model.run (what verification and the reference
    run use) goes block by block: same outputs as one session, and rotate still verifies."""
    import rotaq.rewriter.blocks as blocks

    model = llama["onnx"]
    whole = model.run()
    calls = []
    real = blocks.run_blockwise
    monkeypatch.setattr(blocks, "run_blockwise", lambda g, f, **k: calls.append(1) or real(g, f))
    monkeypatch.setenv("ROTAQ_BLOCKWISE_GIB", "0")
    split = model.run()
    assert calls and len(split) == len(whole)
    for a, b in zip(whole, split):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    res = rotaq.optimize(model, "rotate")
    assert res.report["verify"]["passed"] and res.report["max_rel_error"] < 1e-4
