"""ONNX files as found in the wild: no value_info, version-converted, external data, fp16 / bf16
graphs, fp16 weights behind a Cast, custom-domain ops. Every rewrite is checked against the
original in an independent ORT run (outside rotaq)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as oir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rotaq
from rotaq.api import NOISE_FACTOR
from rotaq.cli import main
from rotaq.errors import RewriteError, RotaqError
from rotaq.rewriter.onnx import OnnxGraph
from tests import tiny

F, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
IDS = tiny._ids()["input_ids"].numpy()


# ----------------------------------------------------------------------------- helpers
def _np_dtype(dtype: int):
    import ml_dtypes

    return {F: np.float32, F16: np.float16, BF16: ml_dtypes.bfloat16}[dtype]


def _conv_tensor(t: onnx.TensorProto, dtype: int) -> onnx.TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float32)
    return numpy_helper.from_array(np.clip(arr, -6e4, 6e4).astype(_np_dtype(dtype)), t.name)


def _retype(proto: onnx.ModelProto, src: int, dst: int) -> onnx.ModelProto:
    """Every ``src`` tensor, Cast target and graph input/output in ``dst``; value_info dropped.
    Written here at the proto level, apart from rotaq's own fp32 copy."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    for t in g.initializer:
        if t.data_type == src:
            t.CopyFrom(_conv_tensor(t, dst))
    for n in g.node:
        for a in n.attribute:
            if a.name == "to" and a.i == src:
                a.i = dst
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == src:
                a.t.CopyFrom(_conv_tensor(a.t, dst))
    for v in [*g.input, *g.output]:
        if v.type.tensor_type.elem_type == src:
            v.type.tensor_type.elem_type = dst
    del g.value_info[:]
    return m


def _cast_fed(proto: onnx.ModelProto, dtype: int) -> onnx.ModelProto:
    """Every fp32 initializer stored in ``dtype`` and read through ``Cast(to=FLOAT)``."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    casts = []
    for t in m.graph.initializer:
        if t.data_type == F:
            name = t.name
            t.CopyFrom(_conv_tensor(t, dtype))
            t.name = name + "_stored"
            casts.append(helper.make_node("Cast", [t.name], [name], to=F, name=name + "_cast"))
    nodes = casts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _strip(src: str, dst: str, **save) -> str:
    p = onnx.load(src)
    del p.graph.value_info[:]
    onnx.save(p, dst, **save)
    return dst


def _run(model: str | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def _rel(ref: list, out: list) -> float:
    return max(float(np.abs(np.float64(o) - np.float64(r)).max() / np.abs(np.float64(r)).max())
               for r, o in zip(ref, out, strict=True))


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _optimize_cli(src: str, out: str, capsys, *extra: str) -> tuple[int, dict | str]:
    rc = main(["optimize", src, "--recipe", "rotate", "-o", out, "--json", *extra])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else cap.err.strip())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("realworld")
    out = {}
    for fam in ("llama", "bert"):
        m, inputs = tiny.build(fam)
        out[fam] = str(d / f"{fam}.onnx")
        rotaq.load(m, inputs, ir="onnx", kv_cache=False).save(out[fam])
    m, inputs = tiny.build("llama")  # a bf16 model as torch's exporter writes it
    with torch.no_grad():
        torch.onnx.export(m.to(torch.bfloat16), (), str(d / "llama_bf16.onnx"),
                          kwargs=dict(inputs), dynamo=True, verbose=False)
    out["llama_bf16"] = str(d / "llama_bf16.onnx")
    return out


# ----------------------------------------------------------------------------- no value_info
def test_no_value_info_shape_inference(files, tmp_path, monkeypatch):
    src = _strip(files["llama"], str(tmp_path / "novi.onnx"))
    assert len(onnx.load(src).graph.value_info) == 0
    digest = _sha(src)
    g = OnnxGraph.load(src)
    shapes = [o.shape for n in g.model.graph for o in n.outputs if n.op_type != "Constant"]
    assert sum(s is None for s in shapes) == 0  # every node output typed after inference
    # the input's symbolic dims survive into the intermediates
    syms = {str(d) for d in g.model.graph.inputs[0].shape if not isinstance(d, int)}
    assert syms and syms <= {str(d) for s in shapes for d in s if not isinstance(d, int)}
    res = rotaq.optimize(src, "rotate")
    rep = res.save(str(tmp_path / "out.onnx"))
    assert rep["passes"][0]["stats"]["writers"] == 4
    assert rep["verify"]["written"]["max_rel_error"] <= 1e-4
    assert rep["tolerance_used"] == 1e-4 and rep["tolerance_basis"] == "fp32 recipe tolerance"
    # independent: the rewritten file vs the original file (with its value_info) in ORT
    assert _rel(_run(files["llama"], {"input_ids": IDS}),
                _run(str(tmp_path / "out.onnx"), {"input_ids": IDS})) <= 1e-4
    assert _sha(src) == digest  # the input file is never written
    # without the inference the same file fails as before
    monkeypatch.setattr(OnnxGraph, "_infer_shapes", lambda self: None)
    with pytest.raises(RewriteError, match="rank of .* is unknown"):
        rotaq.optimize(src, "rotate")


def test_version_converted_bert_cli(files, tmp_path, capsys):
    p = onnx.version_converter.convert_version(onnx.load(files["bert"]), 21)
    del p.graph.value_info[:]
    src, out = str(tmp_path / "bert21.onnx"), str(tmp_path / "out.onnx")
    onnx.save(p, src)
    rc, rep = _optimize_cli(src, out, capsys)
    assert rc == 0 and rep["passes"][0]["stats"]["linears_rotated"] == 12
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}
    err = _rel(_run(files["bert"], feeds), _run(out, feeds))
    assert err <= 1e-4 and rep["verify"]["written"]["max_rel_error"] <= 1e-4
    assert onnx.load(out).opset_import[0].version == 21


def test_external_data_without_value_info(files, tmp_path):
    src = _strip(files["llama"], str(tmp_path / "ext.onnx"), save_as_external_data=True,
                 location="ext.onnx.data", size_threshold=0)
    assert os.path.getsize(src + ".data") > 100_000
    digests = (_sha(src), _sha(src + ".data"))
    res = rotaq.optimize(src, "rotate")
    res.save(str(tmp_path / "out.onnx"))
    assert res.report["verify"]["written"]["max_rel_error"] <= 1e-4
    assert _rel(_run(files["llama"], {"input_ids": IDS}),
                _run(str(tmp_path / "out.onnx"), {"input_ids": IDS})) <= 1e-4
    assert (_sha(src), _sha(src + ".data")) == digests


# ----------------------------------------------------------------------------- fp16 / bf16
def test_fp16_graph_dtype_bound(files, tmp_path):
    src = str(tmp_path / "fp16.onnx")
    onnx.save(_retype(onnx.load(files["llama"]), F, F16), src)
    res = rotaq.optimize(src, "rotate")
    rep = res.report
    noise = rep["rounding_noise"]
    assert noise["dtype"] == "float16" and noise["method"] == "native"
    # e0 checked independently: the fp16 file vs its fp32 copy (made here), both in ORT
    feeds = res.model.sample_inputs
    e0 = _rel(_run(_retype(onnx.load(src), F16, F), feeds), _run(src, feeds))
    assert noise["e0"] == pytest.approx(e0, rel=1e-6) and 1e-4 < e0 < 1e-2
    assert rep["tolerance_used"] == pytest.approx(NOISE_FACTOR * e0)
    assert rep["tolerance_basis"] == (f"float16 rounding noise x 4, measured e0={e0:.3g} "
                                      "(native)")
    out = str(tmp_path / "out.onnx")
    res.save(out)
    err = _rel(_run(src, feeds), _run(out, feeds))
    assert err == pytest.approx(rep["verify"]["written"]["max_rel_error"], rel=1e-6)
    assert 1e-4 < err <= rep["tolerance_used"]  # the fp32 bound alone would have failed
    kinds = {t.data_type for t in onnx.load(out).graph.initializer}
    assert F16 in kinds and F not in kinds  # written back in fp16
    # the bound still catches a 1% error in the final norm's scale
    g = OnnxGraph.load(out)
    i, norm = [(i, n) for n in g.view().nodes if n.op == "mul" for i, v in enumerate(n.inputs)
               if g._is_const(g._value(v)) and g.get_const(v).shape == (64,)][-1]
    g.set_const(norm.key, i, g.get_const(norm.inputs[i]) * 1.01)
    assert _rel(res.reference, g.run(feeds)) > 2 * rep["tolerance_used"]


def test_cast_fed_fp16_weights_rewritten(files, tmp_path, capsys):
    src, out = str(tmp_path / "castfed.onnx"), str(tmp_path / "out.onnx")
    onnx.save(_cast_fed(onnx.load(files["llama"]), F16), src)
    rc, rep = _optimize_cli(src, out, capsys)
    assert rc == 0
    st = rep["passes"][0]["stats"]
    assert (st["writers"], st["readers"], st["norms_folded"]) == (4, 11, 5)
    assert rep["rounding_noise"]["method"] == "emulated"  # fp32 compute: rounding emulated
    assert rep["tolerance_basis"].startswith("float16 rounding noise x 4, measured e0=")
    feeds = rotaq.load(src).sample_inputs  # the inputs rotaq verified on
    err = _rel(_run(src, feeds), _run(out, feeds))
    assert err == pytest.approx(rep["verify"]["written"]["max_rel_error"], rel=1e-6)
    assert err <= rep["tolerance_used"] < 1e-2
    # every linear's weight changed and is still stored fp16 behind a Cast to fp32
    before, after = OnnxGraph.load(src), OnnxGraph.load(out)
    lins = [n.key for n in before.view().nodes if n.op == "linear"]
    assert len(lins) == 15 and lins == [n.key for n in after.view().nodes if n.op == "linear"]
    for key in lins:
        lin = after._linear(key)
        cast = after._const_cast(lin.weight)
        assert cast is not None and lin.weight.dtype == oir.DataType.FLOAT
        assert after._const(lin.weight).dtype == oir.DataType.FLOAT16
        w0, w1 = before.get_linear(key)[0], after.get_linear(key)[0]
        assert np.abs(w1 - w0).max() > 1e-2 * np.abs(w0).max()


def test_bf16_graph_rewritten_verified_on_fp32_copy(files, tmp_path, capsys):
    src, out = files["llama_bf16"], str(tmp_path / "out.onnx")
    feeds = rotaq.load(src).sample_inputs
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):  # ORT has no bf16 kernels here
        _run(src, feeds)
    rc, rep = _optimize_cli(src, out, capsys)
    assert rc == 0 and rep["passes"][0]["stats"]["writers"] == 4
    assert rep["rounding_noise"]["dtype"] == "bfloat16"
    assert rep["rounding_noise"]["method"] == "emulated"
    assert rep["tolerance_basis"].startswith("bfloat16 rounding noise x 4, measured e0=")
    # written as bf16; verified here on fp32 copies (made at the proto level) of both files
    w = onnx.load(out)
    assert sum(t.data_type == BF16 for t in w.graph.initializer) >= 15
    assert not any(t.data_type == F and len(t.dims) == 2 for t in w.graph.initializer)
    err = _rel(_run(_retype(onnx.load(src), BF16, F), feeds), _run(_retype(w, BF16, F), feeds))
    assert err == pytest.approx(rep["verify"]["written"]["max_rel_error"], rel=1e-5)
    assert err <= rep["tolerance_used"] < 0.05


# ----------------------------------------------------------------------------- custom ops
def _with_custom(src: str, dst: str, after: str | None) -> str:
    """A com.example op (identity semantics) after node ``after`` (None: on the graph output)."""
    p = onnx.load(src)
    y = p.graph.output[0].name if after is None else next(
        n for n in p.graph.node if n.name == after).output[0]
    for n in p.graph.node:
        n.input[:] = [x + "_pre" if x == y else x for x in n.input]
        n.output[:] = [x + "_pre" if x == y and after is None else x for x in n.output]
    y_in, y_out = (y + "_pre", y) if after is None else (y, y + "_pre")
    p.graph.node.append(helper.make_node("Foo", [y_in], [y_out], domain="com.example",
                                         name="custom_foo"))
    p.opset_import.append(helper.make_opsetid("com.example", 1))
    del p.graph.value_info[:]
    onnx.save(p, dst)
    return dst


def _as_identity(path: str) -> onnx.ModelProto:
    p = onnx.load(path)
    for n in p.graph.node:
        if n.domain == "com.example":
            n.op_type, n.domain = "Identity", ""
    return p


def test_custom_op_refused_or_rewritten_unverified(files, tmp_path, capsys):
    src, out = _with_custom(files["llama"], str(tmp_path / "c.onnx"), None), str(tmp_path / "o.onnx")
    msg = ("ONNX Runtime cannot run op Foo (domain 'com.example') (node 'custom_foo'), so rotaq "
           "cannot verify a rewrite of this model; pass --no-verify (verify=False) to rewrite it "
           "unverified (refused if the op lies between rewritten layers)")
    with pytest.raises(RotaqError) as err:
        rotaq.optimize(src, "rotate")
    assert str(err.value) == msg
    rc, text = _optimize_cli(src, out, capsys)
    assert (rc, text) == (2, f"rotaq: error: {msg}") and not os.path.exists(out)
    # after the head, outside every rewritten layer: rewritten with --no-verify, exact
    rc, rep = _optimize_cli(src, out, capsys, "--no-verify")
    assert rc == 0 and rep["passes"][0]["stats"]["writers"] == 4
    feeds = {"input_ids": IDS}
    assert _rel(_run(_as_identity(src), feeds), _run(_as_identity(out), feeds)) <= 1e-4
    # on the residual stream between layers: refused even with --no-verify
    residual = next(n.name for n in onnx.load(files["llama"]).graph.node
                    if n.op_type == "Add" and "layers.0" in str(n.metadata_props)
                    and "self_attn" not in str(n.metadata_props)
                    and "layernorm" not in str(n.metadata_props))
    mid = _with_custom(files["llama"], str(tmp_path / "mid.onnx"), residual)
    rc, text = _optimize_cli(mid, str(tmp_path / "o2.onnx"), capsys, "--no-verify")
    assert rc == 2 and text == (
        "rotaq: error: op Foo (domain 'com.example', node 'custom_foo') lies between layers "
        "rotaq rewrites and ONNX Runtime cannot run it: rotaq can neither verify nor safely "
        "rewrite around it")
    assert not os.path.exists(str(tmp_path / "o2.onnx"))
