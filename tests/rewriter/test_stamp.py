"""The streamed capture's stamped blocks (rotaq.rewriter.stamp): a decoder captured with 3
layers and stamped to L equals the capture of all L layers, op for op and output for output."""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_ir as oir
import pytest
import torch

from rotaq.rewriter import kv_capture, stamp, stream_export
from rotaq.rewriter.onnx import OnnxGraph
from tests.tiny import build


def _ops(g: OnnxGraph) -> collections.Counter:
    return collections.Counter((n.domain, n.op_type) for n in g.model.graph)


def _weights(g: OnnxGraph) -> set[str]:
    return {k for k in g.model.graph.initializers if k.startswith(("model.", "lm_head"))}


def _export(path: str, out: str, stamped: bool) -> OnnxGraph:
    stream_export.export(path, out, stamp=stamped)
    return OnnxGraph.load(out)


@pytest.fixture(scope="module", params=[("llama", 4), ("qwen2", 5), ("mistral", 4)])
def pair(request, tmp_path_factory):
    """(HF module, stamped capture, full capture) of a tiny decoder."""
    family, layers = request.param
    m, _ = build(family, num_hidden_layers=layers)
    d = tmp_path_factory.mktemp(family)
    m.save_pretrained(str(d / "hf"))
    return m, _export(str(d / "hf"), str(d / "st.onnx"), True), \
        _export(str(d / "hf"), str(d / "full.onnx"), False)


def test_stamped_equals_full_export(pair):
    m, st, full = pair
    n = m.config.num_hidden_layers
    assert n > stamp.CAPTURED
    # the same contract: inputs, outputs, metadata
    assert st.input_names == full.input_names and st.output_names == full.output_names
    assert st.output_names == kv_capture.output_names(n)
    assert st.input_names[3:] == [f"past_key_values.{i}.{w}" for i in range(n)
                                  for w in ("key", "value")]
    assert st.metadata == full.metadata and st.metadata["rotaq.num_layers"] == str(n)
    # the same graph: op counts per type, weights by name, node and initializer counts
    assert _ops(st) == _ops(full)
    assert sum(_ops(st).values()) == sum(_ops(full).values())
    assert _weights(st) == _weights(full)
    assert len(st.model.graph.initializers) == len(full.model.graph.initializers)
    per_layer = sum(1 for k in _weights(full) if k.startswith("model.layers.0."))
    assert per_layer >= 9 and sum(1 for k in _weights(st) if ".layers." in k) == per_layer * n
    # stamped layers carry their own module scope (reports name them)
    scopes = {nd.metadata_props.get("pkg.torch.onnx.name_scopes", "") for nd in st.model.graph}
    assert any(f"model.layers.{n - 1}.self_attn" in s for s in scopes)


def test_stamped_outputs_match_full_and_hf(pair):
    m, st, full = pair
    ids = np.random.default_rng(4).integers(0, 256, (2, 9))
    fa, fb = kv_capture.token_feeds(st, ids), kv_capture.token_feeds(full, ids)
    a, b = st.run(fa), full.run(fb)
    assert len(a) == 1 + 2 * m.config.num_hidden_layers
    for x, y in zip(a, b):  # logits and every present
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        ref = m(input_ids=torch.as_tensor(ids), use_cache=True)
    logits = ref.logits.numpy()
    assert np.abs(a[0] - logits).max() <= 1e-5 * np.abs(logits).max()
    cache = getattr(ref, "past_key_values", None) or ref.cache
    for i, layer in enumerate(cache.layers):  # the stamped layers' presents too
        np.testing.assert_allclose(a[1 + 2 * i], layer.keys.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a[2 + 2 * i], layer.values.numpy(), rtol=1e-5, atol=1e-5)
    # with the cache fed back (non-empty past inputs): decode steps give the same logits
    da = kv_capture.prefill_decode(st, fa, steps=3)
    db = kv_capture.prefill_decode(full, fb, steps=3)
    for x, y in zip(da, db):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    assert np.abs(da[0] - logits).max() <= 1e-5 * np.abs(logits).max()


def _tamper(model) -> str:
    """Change one attribute of block 1 (its Softmax axis): the blocks no longer repeat."""
    _, blocks = stamp.find_blocks(model.graph, stamp.CAPTURED)
    node = next(n for n in blocks[1] if n.op_type == "Softmax")
    node.attributes["axis"] = oir.AttrInt64("axis", 0)
    return node.name


def test_blocks_that_differ_are_refused_unchanged(tmp_path):
    m, _ = build("llama", num_hidden_layers=4)
    m.save_pretrained(str(tmp_path / "hf"))
    cfg = stream_export.check(str(tmp_path / "hf"))
    files = stream_export._weights_index(str(tmp_path / "hf"))
    model, sources = stream_export._capture(stream_export._few_layers(cfg, 3), files,
                                            torch.float32)
    before = len(list(model.graph))
    shapes = stream_export._key_shapes(files)
    missing = dict(shapes)
    missing.pop("model.layers.3.mlp.up_proj.weight")
    with pytest.raises(stamp.CannotStamp, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        stamp.stamp(model, 4, sources, missing, lambda *a: None)
    name = _tamper(model)
    with pytest.raises(stamp.CannotStamp, match=f"differ at .*{name}"):
        stamp.stamp(model, 4, sources, shapes, lambda *a: None)
    assert len(list(model.graph)) == before  # nothing stamped
    assert [v.name for v in model.graph.outputs] == kv_capture.output_names(3)


def test_unstampable_blocks_fall_back_to_the_full_export(tmp_path, monkeypatch, caplog):
    m, _ = build("llama", num_hidden_layers=4)
    m.save_pretrained(str(tmp_path / "hf"))
    real = stamp.stamp
    seen = []

    def tampered(model, *args):
        seen.append(_tamper(model))
        return real(model, *args)

    monkeypatch.setattr(stamp, "stamp", tampered)
    with caplog.at_level(logging.WARNING, logger="rotaq.rewriter.stream_export"):
        g = _export(str(tmp_path / "hf"), str(tmp_path / "fb.onnx"), True)
    assert len(seen) == 1
    msg = [r.getMessage() for r in caplog.records if "cannot be stamped" in r.getMessage()]
    assert len(msg) == 1 and seen[0] in msg[0] and "exporting all 4 layers" in msg[0]
    full = _export(str(tmp_path / "hf"), str(tmp_path / "full.onnx"), False)
    assert _ops(g) == _ops(full)  # the full export, untampered
    ids = np.random.default_rng(5).integers(0, 256, (1, 6))
    np.testing.assert_array_equal(g.run(kv_capture.token_feeds(g, ids))[0],
                                  full.run(kv_capture.token_feeds(full, ids))[0])


@pytest.mark.real
def test_smollm2_stamped_capture_matches_hf(tmp_path):
    """SmolLM2-135M (30 layers, 27 stamped): logits and presents match transformers."""
    from transformers import AutoModelForCausalLM

    from rotaq.assets import builtin_model_dir

    path = str(builtin_model_dir("smollm2-135m"))
    g = _export(path, str(tmp_path / "s.onnx"), True)
    assert g.output_names == kv_capture.output_names(30)
    ids = np.random.default_rng(6).integers(0, 49152, (2, 12))
    out = g.run(kv_capture.token_feeds(g, ids))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), use_cache=True)
    logits = ref.logits.numpy()
    assert np.abs(out[0] - logits).max() <= 1e-5 * np.abs(logits).max()
    cache = getattr(ref, "past_key_values", None) or ref.cache
    for i in (0, 2, 3, 29):  # captured and stamped layers
        np.testing.assert_allclose(out[1 + 2 * i], cache.layers[i].keys.numpy(), rtol=1e-4,
                                   atol=1e-4)
