"""SmolLM2-135M: matching counts on both IRs, exact rotation in torch and ORT, outliers drop."""

import json

import numpy as np
import pytest

import rotaq
from rotaq.cli import main
from rotaq.eval.stats import activation_stats, calibration_feeds

pytestmark = pytest.mark.real


def _check_inspect(d):
    assert d["num_linears"] == 211  # 30 x 7 in the blocks + lm_head
    assert len(d["attention"]) == 30
    assert {(a["num_heads"], a["num_kv_heads"], a["head_dim"]) for a in d["attention"]} == {(9, 3, 64)}
    assert len(d["norms"]) == 61 and {n["kind"] for n in d["norms"]} == {"rms"}
    assert d["pre_norm"] is True
    assert d["residual"]["blocks"] == 60 and d["residual"]["readers"] == 150
    assert len(d["residual"]["head"]) == 1
    head = [x for x in d["linears"] if x["out_features"] == 49152]
    assert len(head) == 1 and head[0]["weight_shared"]  # lm_head tied to the embedding


@pytest.fixture(scope="module")
def rotated(smollm2):
    """One `rotate` rewrite of the captured SmolLM2 (verified in torch), shared by the tests
    that save it and measure its activations."""
    return rotaq.optimize(smollm2, "rotate")


def test_inspect_fx(smollm2):
    _check_inspect(rotaq.inspect(smollm2))


def test_inspect_onnx(smollm2_onnx):
    _check_inspect(rotaq.inspect(smollm2_onnx))


def test_rotate_onnx_cli(tmp_path, capsys, smollm2_onnx, loaded_by_cli):
    """The CLI rotates the streamed ONNX capture (exact recipe; README, Large models) and
    writes ONNX, verified in ORT. ``smollm2_onnx`` comes first: the capture exists before the
    CLI's load is redirected to it."""
    out = tmp_path / "rot.onnx"
    assert main(["optimize", "smollm2-135m", "--recipe", "rotate", "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    v = rep["verify"]
    assert (v["rewrite"]["runtime"], v["written"]["runtime"]) == ("ort", "ort")
    assert v["rewrite"]["max_rel_error"] <= 1e-4 and v["written"]["max_rel_error"] <= 1e-4
    assert rep["max_rel_error"] <= 1e-4
    st = rep["passes"][0]["stats"]
    assert st["norms_folded"] == 61 and st["online_hadamards"] == 30 and st["ov_heads_rotated"] == 30
    assert out.exists()
    assert loaded_by_cli == [("smollm2-135m", "onnx")]  # the session's capture, as asked


def test_rotate_pt2_and_onnx_ir(tmp_path, rotated, smollm2_onnx):
    assert rotated.report["verify"]["rewrite"]["max_rel_error"] <= 1e-4
    rep = rotated.save(str(tmp_path / "rot.pt2"))
    assert rep["verify"]["written"]["max_rel_error"] <= 1e-4
    # the same recipe applied directly on the ONNX graph, run in ORT
    res2 = rotaq.optimize(smollm2_onnx, "rotate", options={"rotate_qk": True})
    assert res2.report["verify"]["rewrite"]["max_rel_error"] <= 1e-4
    assert res2.report["passes"][0]["stats"]["qk_rotated"] == 30


def test_outliers_drop(smollm2, rotated):
    feeds = calibration_feeds(smollm2, "lee", 256, 128)
    before = activation_stats(smollm2, feeds)
    after = activation_stats(rotated.model, feeds)
    a = smollm2.analysis()
    qkv = {s.q_proj for s in a.attention}
    o_projs = {s.o_proj for s in a.attention}
    down = {w for b in a.residual.blocks for w in b.writers} - o_projs

    def worst(st, keys):
        return max(st[k]["max_rms"] for k in keys)

    assert worst(before, down) > 5 * worst(after, down)
    assert worst(before, qkv) > 3 * worst(after, qkv)
    assert max(after[k]["kurtosis"] for k in down) < 0.1 * max(before[k]["kurtosis"] for k in down)
    assert np.isfinite([v["max_rms"] for v in after.values()]).all()
