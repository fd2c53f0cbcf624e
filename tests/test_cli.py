"""The rotaq command: outputs, exit codes, clear errors, inputs never modified."""

import hashlib
import json

import pytest

import rotaq
from rotaq.cli import main
from tests.tiny import loaded


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    loaded("llama").save(str(d / "llama.pt2"))
    loaded("llama", "onnx").save(str(d / "llama.onnx"))
    loaded("bert", "onnx").save(str(d / "bert.onnx"))
    return d


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_optimize_onnx_json(tiny_files, tmp_path, capsys):
    src = tiny_files / "llama.onnx"
    before = _digest(src)
    out = tmp_path / "rot.onnx"
    assert main(["optimize", str(src), "--recipe", "rotate", "-o", str(out), "--json",
                 "--set", "rotate_qk=true"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ir"] == "onnx" and rep["exact"] is True
    assert rep["verify"]["written"]["runtime"] == "ort"
    assert rep["verify"]["written"]["max_rel_error"] < 1e-5 and rep["max_rel_error"] < 1e-5
    assert rep["passes"][0]["stats"]["qk_rotated"] == 2
    assert out.exists() and _digest(src) == before
    # the written file is a model rotaq reads back with the same structure
    assert rotaq.inspect(str(out))["num_linears"] == 15
    assert not list(tmp_path.glob(".rotaq-*"))  # no temporary leftovers


def test_optimize_pt2_and_recipe_file(tiny_files, tmp_path, capsys):
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps({"name": "mine", "tolerance": 1e-4, "passes": [
        {"pass": "rotate", "seed": 7, "online_down": False}]}))
    out = tmp_path / "r.pt2"
    assert main(["optimize", str(tiny_files / "llama.pt2"), "--recipe", str(recipe), "-o",
                 str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["recipe"]["name"] == "mine"
    assert rep["passes"][0]["stats"]["online_hadamards"] == 0
    assert rep["verify"]["written"]["runtime"] == "torch"
    assert rep["verify"]["written"]["max_rel_error"] < 1e-5


def test_inspect_human_and_stats_plot(tiny_files, tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["inspect", str(tiny_files / "llama.pt2"), "--stats", "--recipe", "rotate",
                 "--plot", str(png), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["stats"]) == len(d["stats_after"]) == 15
    assert all(r["max_rms"] > 0 and r["kurtosis"] > 0 for r in d["stats"])
    roles = {r["role"]: r["linears"] for r in d["stats_summary"]}
    assert roles == {"q/k/v": 6, "o_proj": 2, "gate/up": 4, "down_proj": 2, "head": 1}
    assert png.stat().st_size > 10_000
    assert main(["inspect", str(tiny_files / "bert.onnx")]) == 0
    text = capsys.readouterr().out
    assert "linears: 13" in text and "residual stream: post-norm" in text and "LayerNorm" in text


@pytest.mark.parametrize("args, message", [
    (["inspect", "missing.onnx"], "no such file"),
    (["inspect", "no-such-model"], "no such file, directory or built-in"),
    (["optimize", "{llama}", "--recipe", "nope", "-o", "{tmp}/o.onnx"], "unknown recipe 'nope'"),
    (["optimize", "{llama}", "--set", "bogus=1", "-o", "{tmp}/o.onnx"], "matches no pass"),
    (["optimize", "{llama}", "--set", "seed=abc", "-o", "{tmp}/o.onnx"], "expects int"),
    (["optimize", "{llama}", "-o", "{llama}"], "refusing to overwrite the input"),
    (["optimize", "{llama}", "-o", "{tmp}/o.txt"], "must end in .onnx or .pt2"),
    (["optimize", "{bert}", "--set", "mode=residual", "-o", "{tmp}/o.onnx"], "is post-norm"),
])
def test_errors_one_line_exit_2(tiny_files, tmp_path, capsys, args, message):
    args = [a.format(llama=tiny_files / "llama.onnx", bert=tiny_files / "bert.onnx", tmp=tmp_path)
            for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rotaq: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_corrupt_and_truncated_inputs(tiny_files, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file at all")
    assert main(["inspect", str(bad)]) == 2
    assert "bad.onnx" in capsys.readouterr().err
    data = (tiny_files / "llama.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert main(["inspect", str(cut)]) == 2
    assert "cut.onnx" in capsys.readouterr().err
    pt2 = tmp_path / "bad.pt2"
    pt2.write_bytes(b"garbage")
    assert main(["inspect", str(pt2)]) == 2
    assert "bad.pt2" in capsys.readouterr().err


def test_verification_failure_exit_3_writes_nothing(tiny_files, tmp_path, capsys):
    recipe = tmp_path / "strict.json"
    recipe.write_text(json.dumps({"name": "strict", "tolerance": 1e-15,
                                  "passes": [{"pass": "rotate"}]}))
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(tiny_files / "llama.onnx"), "--recipe", str(recipe), "-o",
                 str(out)]) == 3
    assert "verification failed" in capsys.readouterr().err
    assert not out.exists()


def test_recipes_list(capsys):
    assert main(["recipes", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"rotate", "rotate-qk"} <= set(d)


def test_quantized_recipe_to_onnx_runs_ort_kernels(tiny_files, tmp_path, capsys):
    """A lossy recipe written as .onnx runs on the ONNX form: MatMulNBits, not simulation."""
    from rotaq.backends.ort import ort_kernel_report

    out = tmp_path / "q.onnx"
    assert main(["optimize", str(tiny_files / "llama.pt2"), "--recipe", "w4a16", "-o", str(out),
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ir"] == "onnx" and rep["exact"] is False
    assert 0 < rep["max_rel_error"] < 0.2
    assert ort_kernel_report(str(out)).get("com.microsoft.MatMulNBits") == 14
    assert main(["bench", str(out), "--tokens", "1,8", "--repeats", "2", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert b["tokens"]["1"]["median_ms"] > 0 and b["size_bytes"] == out.stat().st_size
