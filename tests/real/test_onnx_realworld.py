"""Trained models as ONNX files from other tools: SmolLM2 without value_info (external data),
MiniLM through onnx's version converter; `rotate` checked against the original in ORT."""

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
import pytest

import rotaq

pytestmark = pytest.mark.real


def _rel(ref: list, out: list) -> float:
    return max(float(np.abs(np.float64(o) - np.float64(r)).max() / np.abs(np.float64(r)).max())
               for r, o in zip(ref, out, strict=True))


def _check(original: str, src: str, out: str) -> dict:
    res = rotaq.optimize(src, "rotate")
    rep = res.save(out)
    # the inputs optimize loaded from src (real text: the tokenizer is named in the metadata)
    feeds = res.model.sample_inputs
    assert rep["verify_inputs"]["source"] == "text"

    def run(p: str) -> list:  # all outputs but a KV cache's presents (V/O rotation rotates
        # what the cache stores; the logits that read it back are checked by verification)
        sess = ort.InferenceSession(p, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs() if not o.name.startswith("present.")]
        return sess.run(names, feeds)

    assert _rel(run(original), run(out)) <= 1e-4
    assert rep["verify"]["written"]["max_rel_error"] <= 1e-4
    assert rep["tolerance_basis"] == "fp32 recipe tolerance"
    return rep


def test_smollm2_without_value_info(smollm2_onnx, tmp_path):
    p = onnx.load(smollm2_onnx.graph.source)
    assert len(p.graph.value_info) > 1000
    del p.graph.value_info[:]
    src = str(tmp_path / "smol.onnx")
    onnx.save(p, src, save_as_external_data=True, location="smol.onnx.data")
    del p
    rep = _check(smollm2_onnx.graph.source, src, str(tmp_path / "out.onnx"))
    assert rep["passes"][0]["stats"]["writers"] == 60


def test_minilm_version_converted(minilm_onnx, tmp_path):
    p = onnx.version_converter.convert_version(onnx.load(minilm_onnx.graph.source), 21)
    del p.graph.value_info[:]
    src = str(tmp_path / "minilm21.onnx")
    onnx.save(p, src)
    rep = _check(minilm_onnx.graph.source, src, str(tmp_path / "out.onnx"))
    assert rep["passes"][0]["stats"]["linears_rotated"] == 36
