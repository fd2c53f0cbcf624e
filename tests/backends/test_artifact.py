"""The compiled-artefact folder (rotaq.backends.artifact) with the ORT backend: layout, metadata,
atomic replacement, and the model it loads back computes what the original computes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rotaq.backends import artifact
from rotaq.backends.ort import ORT_SETTINGS, compile_ort
from rotaq.errors import RotaqError
from tests.graphs import one_linear


def test_ort_artifact_layout_and_outputs(tmp_path):
    model = one_linear("onnx", d_in=64, d_out=32)
    out = tmp_path / "art"
    meta = compile_ort(model, str(out))
    # weights over 1 KiB in the side file
    assert sorted(os.listdir(out)) == ["metadata.json", "model.onnx", "model.onnx.data"]
    on_disk = artifact.read_metadata(str(out))
    assert on_disk == json.loads(json.dumps(meta))
    assert {k: meta[k] for k in ("format", "version", "backend", "target", "target_kind")} == {
        "format": "rotaq-artifact", "version": 1, "backend": "ort", "target": "cpu",
        "target_kind": "cpu"}
    assert meta["session"] == ORT_SETTINGS and meta["model_file"] == "model.onnx"
    assert artifact.is_artifact(str(out)) and artifact.check_artifact_backend(str(out), "ort")
    loaded = artifact.load_artifact(str(out))
    feeds = model.sample_inputs
    want, got = model.graph.run(feeds), loaded.graph.run(feeds)
    assert len(got) == len(want) == 1
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    # compiling again replaces the folder; nothing is left beside it
    compile_ort(model, str(out))
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_artifact_refusals(tmp_path):
    other = tmp_path / "not-an-artefact"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(RotaqError, match="not a rotaq artefact"):
        artifact.read_metadata(str(other))
    assert artifact.check_artifact_backend(str(other), "tvm") is None  # no metadata.json
    with pytest.raises(RotaqError, match="refusing to replace"):
        compile_ort(one_linear("onnx"), str(other))
    assert sorted(os.listdir(tmp_path)) == ["not-an-artefact"]  # the work folder went away
    assert (other / "keep.txt").read_text() == "x"
    (other / "metadata.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RotaqError, match="is not a rotaq artefact"):
        artifact.read_metadata(str(other))
    art = tmp_path / "art"
    compile_ort(one_linear("onnx"), str(art))
    with pytest.raises(RotaqError, match="is a ort artefact: use --backend ort"):
        artifact.check_artifact_backend(str(art), "tvm")
