"""Streaming storage (lazy external data, spilled setters, streamed save) and the streaming
capture of decoder-only HF directories (rotaq.rewriter.onnx_store / stream_export)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rotaq
from rotaq.errors import LoadError
from rotaq.rewriter import kv_capture, onnx_store
from rotaq.rewriter import onnx as onnx_adapter
from rotaq.rewriter.onnx import OnnxGraph
from tests.tiny import build


def _mlp(path: str, dim: int = 64, hidden: int = 128, seed: int = 0, layers: int = 1
         ) -> dict[str, np.ndarray]:
    """(x @ W1 -> Relu -> @ W2) x ``layers``, weights as external data in ``path.data``."""
    rng = np.random.default_rng(seed)
    w, nodes, x = {}, [], "x"
    for i in range(layers):
        s = "" if i == 0 else f"_{i}"
        w[f"w1{s}"] = (rng.standard_normal((dim, hidden)) / dim ** 0.5).astype(np.float32)
        w[f"w2{s}"] = (rng.standard_normal((hidden, dim)) / hidden ** 0.5).astype(np.float32)
        y = "y" if i == layers - 1 else f"y_l{i}"
        nodes += [helper.make_node("MatMul", [x, f"w1{s}"], [f"h{s}"], name=f"mm1{s}"),
                  helper.make_node("Relu", [f"h{s}"], [f"r{s}"], name=f"relu{s}"),
                  helper.make_node("MatMul", [f"r{s}", f"w2{s}"], [y], name=f"mm2{s}")]
        x = y
    g = helper.make_graph(nodes, "mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", dim])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", dim])],
                          [numpy_helper.from_array(a, k) for k, a in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, path, save_as_external_data=True, location=os.path.basename(path) + ".data",
              size_threshold=0)
    return w


def _x(dim: int = 64) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((3, dim)).astype(np.float32)}


def test_lazy_load_reads_nothing_until_used(tmp_path, monkeypatch):
    w = _mlp(str(tmp_path / "m.onnx"))
    reads = []
    real = onnx_store.DataFile.read
    monkeypatch.setattr(onnx_store.DataFile, "read",
                        lambda self, off, n: reads.append(n) or real(self, off, n))
    g = OnnxGraph.load(str(tmp_path / "m.onnx"))
    inits = g.model.graph.initializers
    assert all(onnx_store.is_on_disk(v.const_value) for v in inits.values())
    g.view()  # matching the graph reads no weight either
    assert reads == []
    np.testing.assert_array_equal(g.get_const("w1"), w["w1"].astype(np.float64))
    assert reads == [w["w1"].nbytes]  # exactly the one tensor asked for
    out = g.run(_x())[0]
    np.testing.assert_allclose(out, np.maximum(_x()["x"] @ w["w1"], 0) @ w["w2"], rtol=1e-5,
                               atol=1e-5)


def test_missing_and_truncated_external_data(tmp_path):
    _mlp(str(tmp_path / "m.onnx"))
    data = (tmp_path / "m.onnx.data").read_bytes()
    (tmp_path / "m.onnx.data").write_bytes(data[:-4])
    with pytest.raises(LoadError, match="external data.*short") as info:
        OnnxGraph.load(str(tmp_path / "m.onnx"))
    assert str(tmp_path / "m.onnx") in str(info.value) and "\n" not in str(info.value)
    os.unlink(tmp_path / "m.onnx.data")
    with pytest.raises(LoadError, match="external data is missing"):
        OnnxGraph.load(str(tmp_path / "m.onnx"))


def test_spill_and_save_round_trip_bit_exact(tmp_path, monkeypatch):
    _mlp(str(tmp_path / "m.onnx"))
    src = (tmp_path / "m.onnx.data").read_bytes()
    monkeypatch.setattr(onnx_store, "SPILL_BYTES", 1024)
    monkeypatch.setattr(onnx_adapter, "_EXTERNAL_DATA_BYTES", 0)
    g = OnnxGraph.load(str(tmp_path / "m.onnx"))
    new = np.random.default_rng(5).standard_normal((64, 128))  # [out, in] of mm2
    g.set_linear("mm2", new, None)
    folder = g._store.folder
    assert folder is not None and len(os.listdir(folder)) == 1 and g._store.bytes == new.size * 4
    w2 = next(n for n in g.model.graph if n.name == "mm2").inputs[1].const_value
    assert onnx_store.is_on_disk(w2)
    g.save(str(tmp_path / "out.onnx"))
    g.save(str(tmp_path / "m.onnx"))  # over its own source: the old data is still read right
    for name in ("out.onnx", "m.onnx"):
        h = OnnxGraph.load(str(tmp_path / name))
        got, _ = h.get_linear("mm2")
        np.testing.assert_array_equal(got, new.astype(np.float32).astype(np.float64))
        np.testing.assert_array_equal(h.get_const("w1").astype(np.float32).tobytes(),
                                      src[:64 * 128 * 4])
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []  # no temp left
    g._store.close()
    assert not os.path.exists(folder)


def test_spill_folder_removed_at_exit(tmp_path):
    code = textwrap.dedent(f"""
        import numpy as np
        from rotaq.rewriter.onnx import OnnxGraph
        g = OnnxGraph.load({str(tmp_path / 'm.onnx')!r})
        g.set_linear("mm1", np.ones((1024, 256)) * 2, None)
        print(g._store.folder)
        raise SystemExit(3)  # an error exit still removes it
    """)
    _mlp(str(tmp_path / "m.onnx"), dim=256, hidden=1024)
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 3, r.stderr
    folder = r.stdout.strip().splitlines()[-1]
    assert folder.startswith("/") and "rotaq-spill-" in folder and not os.path.exists(folder)


_RSS = textwrap.dedent("""
    import sys, numpy as np, onnx, onnxruntime  # noqa: imported before the baseline
    from rotaq.rewriter.onnx import OnnxGraph

    def kb(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:  # peak RSS (VmHWM) reset to the current RSS
        f.write("5")
    base = kb("VmRSS:")
    src, out, eager = sys.argv[1:4]
    if eager == "1":  # control: the whole model read into memory must show up
        keep = onnx.load(src)
    else:  # every weight rewritten, as rotate does, then saved
        g = OnnxGraph.load(src)
        for key in [k for k, n in g.view().by_key.items() if n.op == "linear"]:
            w, _ = g.get_linear(key)
            g.set_linear(key, w * 0.5, None)
            del w
        g.save(out)
    print((kb("VmHWM:") - base) * 1024)
""")


def test_rss_grows_far_less_than_the_model(tmp_path):
    """Load + rewrite every weight + save a 128 MB model (32 weights of 4 MB): peak RSS grows
    by well under its size, while reading it whole (the control) grows by at least its size."""
    _mlp(str(tmp_path / "big.onnx"), dim=1024, hidden=1024, layers=16)
    size = os.path.getsize(tmp_path / "big.onnx.data")
    grown = {}
    for eager in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", _RSS, str(tmp_path / "big.onnx"),
                            str(tmp_path / "out.onnx"), eager], check=False,
                           capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert r.returncode == 0, r.stderr
        grown[eager] = int(r.stdout.strip().splitlines()[-1])
    assert grown["1"] >= 0.95 * size, grown  # the measure sees a model read whole
    # a weight in float64 and its rewritten copy (4 x 4 MB) + slack; nothing grows with the model
    assert grown["0"] < 0.25 * size, (grown, size)
    out = OnnxGraph.load(str(tmp_path / "out.onnx"))
    np.testing.assert_allclose(out.run(_x(1024))[0], OnnxGraph.load(
        str(tmp_path / "big.onnx")).run(_x(1024))[0] * 0.5 ** 32, rtol=1e-4)
    assert os.path.getsize(tmp_path / "out.onnx.data") == size


# ------------------------------------------------------------------ streaming capture
@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_dir(request, tmp_path_factory):
    """4 layers: 3 captured, the 4th stamped (rotaq.rewriter.stamp)."""
    m, _ = build(request.param, num_hidden_layers=4)
    d = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(str(d))
    return str(d), m


def test_streamed_capture_matches_hf_and_contract(hf_dir, tmp_path, monkeypatch):
    path, module = hf_dir
    monkeypatch.setenv("ROTAQ_CACHE", str(tmp_path / "cache"))
    model = rotaq.load(path, ir="onnx")
    g = model.graph
    assert g.ir == "onnx" and any("-stream-" in f for f in
                                  os.listdir(tmp_path / "cache" / "exported"))
    n = module.config.num_hidden_layers
    assert g.output_names == kv_capture.output_names(n)
    assert g.input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert g.input_names[3:] == [f"past_key_values.{i}.{w}" for i in range(n)
                                 for w in ("key", "value")]
    kvh = module.config.num_key_value_heads
    hd = module.config.hidden_size // module.config.num_attention_heads
    assert {k: g.metadata[k] for k in kv_capture.metadata(n, kvh, hd)} == \
        kv_capture.metadata(n, kvh, hd)
    ids = np.random.default_rng(3).integers(0, 256, (2, 11))
    with torch.no_grad():
        ref = module(input_ids=torch.as_tensor(ids), use_cache=True)
    out = g.run(kv_capture.token_feeds(g, ids))
    logits = ref.logits.numpy()
    assert np.abs(out[0] - logits).max() <= 1e-5 * np.abs(logits).max()
    cache = getattr(ref, "past_key_values", None) or ref.cache
    for i, layer in enumerate(cache.layers):
        np.testing.assert_allclose(out[1 + 2 * i], layer.keys.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[2 + 2 * i], layer.values.numpy(), rtol=1e-5, atol=1e-5)
    # decode steps fed the presents give the full prefill's logits
    dec = kv_capture.prefill_decode(g, kv_capture.token_feeds(g, ids), steps=3)
    assert np.abs(dec[0] - logits).max() <= 1e-5 * np.abs(logits).max()


def test_rotate_on_streamed_capture_is_exact(hf_dir, tmp_path, monkeypatch):
    path, module = hf_dir
    monkeypatch.setenv("ROTAQ_CACHE", str(tmp_path / "cache"))
    res = rotaq.optimize(rotaq.load(path, ir="onnx"), "rotate")
    assert res.report["ir"] == "onnx"
    rot = res.report["passes"][0]["stats"]
    n = module.config.num_hidden_layers
    assert rot["norms_folded"] == 2 * n + 1  # 2 per layer + the final norm
    assert rot["ov_heads_rotated"] == n and rot["online_hadamards"] == n
    assert res.report["max_rel_error"] <= 1e-4 and res.report["verify"]["passed"]
    out = str(tmp_path / "o" / "rot.onnx")
    rep = res.save(out)
    assert rep["verify"]["written"]["max_rel_error"] <= 1e-4
    # the source capture in the cache was not touched by the rewrite
    again = rotaq.load(path, ir="onnx")
    np.testing.assert_array_equal(again.run()[0], res.reference[0])


def test_rotate_rows_in_blocks_equals_whole():
    """rotate's in-place, block-of-rows ``w @ Q`` (large tables) equals the whole product."""
    from rotaq.linalg.hadamard import random_rotation
    from rotaq.passes.folds import right_rows as _right

    q = random_rotation(48, 0)
    w = np.random.default_rng(2).standard_normal((50, 48))
    want = q.right(w.copy())
    np.testing.assert_allclose(_right(q, w.copy(), chunk=7), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_right(q, np.asfortranarray(w), chunk=7), want, rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_streamed_capture_in_half_precision(dtype, tmp_path, monkeypatch, caplog):
    """A bf16 folder streamed into an fp16 / bf16 graph (stamped, weights in that dtype): same
    outputs as the torch route's capture within the dtype's own rounding noise, and an exact
    rotation verified against the dtype-aware bound."""
    import logging

    from rotaq.dtypes import graph_dtype

    m, _ = build("llama", num_hidden_layers=4)
    path = str(tmp_path / "bf16")
    m.to(torch.bfloat16).save_pretrained(path)
    monkeypatch.setenv("ROTAQ_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="rotaq.rewriter.stream_export"):
        model = rotaq.load(path, ir="onnx", dtype=dtype)
    assert "nodes stamped for the other 1" in caplog.text
    want = {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    assert graph_dtype(model.graph) == want
    assert model.inputs_info["dtype"] == {"source": "bfloat16", "output": want}
    monkeypatch.setenv("ROTAQ_NO_STREAM", "1")
    torch_route = rotaq.load(path, ir="onnx", dtype=dtype)
    monkeypatch.delenv("ROTAQ_NO_STREAM")
    feeds = model.sample_inputs
    a, b = model.run(feeds)[0], torch_route.run(feeds)[0]
    rel = float(np.abs(a.astype(np.float64) - b).max() / np.abs(b.astype(np.float64)).max())
    assert rel <= {"fp16": 1e-3, "bf16": 2e-2}[dtype], rel
    res = rotaq.optimize(model, "rotate")
    rep = res.report
    assert rep["verify"]["passed"] and rep["dtype"]["output"] == want
    assert "rounding noise" in rep["tolerance_basis"]
    assert rep["max_rel_error"] <= rep["tolerance_used"] and rep["tolerance_used"] > 1e-4
