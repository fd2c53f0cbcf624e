"""Source dtypes kept (issue 12): fp16 / bf16 HF directories, torch modules and ONNX files are
rewritten in their own dtype and verified against their own measured rounding noise."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

import rotaq
from rotaq import dtypes
from rotaq.cli import main
from rotaq.errors import LoadError
from rotaq.model import max_rel_error
from tests import tiny

F, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny random Llama directories saved in fp16 and bf16 (no tokenizer: synthetic inputs)."""
    d = tmp_path_factory.mktemp("dtypes")
    out = {}
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        m, _ = tiny.build("llama")
        m.to(dt).save_pretrained(str(d / name))
        out[name] = str(d / name)
    return out


def _float_params(gm: torch.nn.Module) -> set[torch.dtype]:
    """Dtypes of the float weights (HF keeps the rotary inv_freq buffers in fp32 by design)."""
    named = [*gm.named_parameters(), *gm.named_buffers()]
    return {p.dtype for k, p in named if p.is_floating_point() and "inv_freq" not in k}


def _initializer_types(path: str) -> dict[int, int]:
    kinds: dict[int, int] = {}
    for t in onnx.load(path).graph.initializer:
        if t.data_type in (F, F16, BF16) and len(t.dims) == 2:
            kinds[t.data_type] = kinds.get(t.data_type, 0) + 1
    return kinds


# ----------------------------------------------------------------------------- policy
def test_source_dtype_policy(dirs, tmp_path):
    assert dtypes.hf_source_dtype(dirs["fp16"]) == "float16"
    assert dtypes.hf_source_dtype(dirs["bf16"]) == "bfloat16"
    # without a dtype in config.json the safetensors headers decide
    with open(os.path.join(dirs["bf16"], "config.json")) as f:
        cfg = json.load(f)
    bare = tmp_path / "bare"
    bare.mkdir()
    for k in ("dtype", "torch_dtype"):
        cfg.pop(k, None)
    (bare / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(dirs["bf16"], "model.safetensors"), bare / "model.safetensors")
    assert dtypes.hf_source_dtype(bare) == "bfloat16"
    m, _ = tiny.build("gpt2")
    assert dtypes.module_dtype(m) == "float32" and dtypes.module_dtype(m.half()) == "float16"
    assert dtypes.output_dtype("bfloat16") == "bfloat16"
    assert dtypes.output_dtype("bfloat16", "fp32") == "float32"
    assert [dtypes.canonical(x) for x in ("fp16", "bf16", torch.float32)] == \
        ["float16", "bfloat16", "float32"]
    with pytest.raises(LoadError, match="expected fp32, fp16 or bf16"):
        dtypes.canonical("int8")
    assert dtypes.capture_bound("bf16") > dtypes.capture_bound("fp16") > \
        dtypes.capture_bound("fp32")


# ----------------------------------------------------------------------------- torch side
def test_fp16_hf_dir_rotated_in_fp16(dirs, tmp_path):
    res = rotaq.optimize(dirs["fp16"], "rotate")
    rep = res.report
    assert rep["dtype"] == {"source": "float16", "output": "float16"}
    assert _float_params(res.model.graph.gm) == {torch.float16}  # folds written back in fp16
    # e0 checked independently: the same directory captured in fp32, on the same inputs
    feeds = res.model.sample_inputs
    wide = rotaq.load(dirs["fp16"], dtype="fp32")
    assert wide.inputs_info["dtype"] == {"source": "float16", "output": "float32"}
    f32 = {k: np.asarray(v, np.float32) if dtypes.is_float(v) else v for k, v in feeds.items()}
    e0 = max_rel_error(wide.graph.run(f32), rotaq.load(dirs["fp16"]).graph.run(feeds))
    noise = rep["rounding_noise"]
    assert noise["dtype"] == "float16" and noise["method"] == "native"
    assert noise["e0"] == pytest.approx(e0, rel=1e-6) and 1e-4 < e0 < 1e-2
    assert rep["tolerance_used"] == pytest.approx(dtypes.NOISE_FACTOR * e0)
    assert rep["tolerance_basis"] == f"float16 rounding noise x 4, measured e0={e0:.3g} (native)"
    assert rep["verify"]["passed"] and rep["max_rel_error"] <= rep["tolerance_used"]
    # the bound still catches a 2% error in one rewritten linear (the head)
    g = res.model.graph.clone()
    key = [n.key for n in g.view().nodes if n.op == "linear"][-1]
    w, b = g.get_linear(key)
    g.set_linear(key, w * 1.02, b)
    assert max_rel_error(res.reference[:1], g.run(feeds)[:1]) > rep["tolerance_used"]
    # written (.pt2: the ONNX export of fp16 graphs is checked by the ONNX tests below), reloaded
    # in fp16 and verified
    out = str(tmp_path / "out.pt2")
    res.save(out)
    assert _float_params(rotaq.load(out).graph.gm) == {torch.float16}
    assert rep["verify"]["written"]["max_rel_error"] <= rep["tolerance_used"]


def test_bf16_module_rotated_in_bf16_caller_module_untouched():
    m, inputs = tiny.build("llama")
    m = m.to(torch.bfloat16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = rotaq.optimize(m, "rotate", example_inputs=inputs)
    rep = res.report
    assert rep["dtype"] == {"source": "bfloat16", "output": "bfloat16"}
    assert _float_params(res.model.graph.gm) == {torch.bfloat16}
    assert rep["rounding_noise"]["dtype"] == "bfloat16"
    assert rep["tolerance_used"] == pytest.approx(4 * rep["rounding_noise"]["e0"])
    assert 1e-4 < rep["max_rel_error"] <= rep["tolerance_used"] < 0.05
    # dtype="fp32": a widened copy, the caller's module keeps its bf16 weights
    res32 = rotaq.optimize(m, "rotate", example_inputs=inputs, dtype="fp32")
    assert res32.report["dtype"] == {"source": "bfloat16", "output": "float32"}
    assert res32.report["tolerance_basis"] == "fp32 recipe tolerance"
    assert res32.report["max_rel_error"] <= 1e-4
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype
               for k, v in m.state_dict().items())


def test_fp32_module_converted_to_fp16():
    m, inputs = tiny.build("qwen2")
    res = rotaq.optimize(m, "rotate", example_inputs=inputs, dtype="fp16")
    assert res.report["dtype"] == {"source": "float32", "output": "float16"}
    assert _float_params(res.model.graph.gm) == {torch.float16}
    assert _float_params(m) == {torch.float32}
    assert res.report["tolerance_basis"].startswith("float16 rounding noise x 4")
    assert res.report["verify"]["passed"]


# ----------------------------------------------------------------------------- ONNX files
@pytest.fixture(scope="module")
def onnx_files(dirs, tmp_path_factory) -> dict[str, str]:
    """fp16 and bf16 ONNX files (with their KV cache) written by rotaq itself."""
    d = tmp_path_factory.mktemp("dtype_onnx")
    out = {}
    for name in ("fp16", "bf16"):
        out[name] = str(d / f"{name}.onnx")
        assert main(["export", dirs[name], "-o", out[name]]) == 0
    return out


def _rotate_file(src: str, stored: int, tmp_path, capsys) -> tuple[dict, str]:
    """``rotaq optimize SRC --recipe rotate`` on a file whose weights are all ``stored``."""
    out = str(tmp_path / "out.onnx")
    assert _initializer_types(src).keys() == {stored}
    capsys.readouterr()
    assert main(["optimize", src, "--recipe", "rotate", "-o", out, "--json"]) == 0
    return json.loads(capsys.readouterr().out), out


def test_fp16_onnx_rotated(onnx_files, tmp_path, capsys):
    rep, out = _rotate_file(onnx_files["fp16"], F16, tmp_path, capsys)
    assert rep["dtype"] == {"source": "float16", "output": "float16"}
    assert rep["tolerance_basis"].startswith("float16 rounding noise x 4, measured e0=")
    e0 = rep["rounding_noise"]["e0"]
    assert rep["tolerance_used"] == pytest.approx(4 * e0) and 1e-4 < e0 < 1e-2
    assert rep["verify"]["passed"]
    assert rep["verify"]["written"]["max_rel_error"] <= rep["tolerance_used"]
    assert rep["passes"][0]["stats"]["writers"] == 4
    kinds = _initializer_types(out)
    assert kinds.get(F16, 0) >= 14 and F not in kinds


def test_bf16_onnx_rewritten_as_bf16(onnx_files, tmp_path, capsys):
    rep, out = _rotate_file(onnx_files["bf16"], BF16, tmp_path, capsys)
    assert rep["dtype"] == {"source": "bfloat16", "output": "bfloat16"}
    assert rep["rounding_noise"]["dtype"] == "bfloat16"
    # ORT has no bf16 kernels here: e0 is emulated (an fp32 copy rounding every op output to
    # bf16), larger than torch's native bf16 noise
    assert rep["rounding_noise"]["method"] == "emulated" and rep["rounding_noise"]["e0"] < 0.05
    assert rep["tolerance_used"] == pytest.approx(4 * rep["rounding_noise"]["e0"])
    assert rep["verify"]["passed"] and rep["max_rel_error"] <= rep["tolerance_used"]
    kinds = _initializer_types(out)
    assert kinds.get(BF16, 0) >= 14 and F not in kinds
    # the written bf16 file runs (as an fp32 copy in ORT) and matches its own report
    g = rotaq.load(out)
    assert g.graph.runs_upcast() is True


def test_narrowing_a_captured_graph_is_one_clear_line(onnx_files, tmp_path, capsys):
    out = str(tmp_path / "out.onnx")
    capsys.readouterr()
    assert main(["optimize", onnx_files["fp16"], "--dtype", "bf16", "-o", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be converted to bfloat16" in err
    assert "Traceback" not in err and not os.path.exists(out)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_rounding_noise_block_by_block(onnx_files, kind, monkeypatch):
    """Above ROTAQ_BLOCKWISE_GIB the rounding noise e0 is measured one block at a time (each
    segment converted to fp32 / rounded only while it runs): the same e0 and method as the
    whole-graph measurement."""
    model = rotaq.load(onnx_files[kind])
    feeds = model.sample_inputs
    whole = dtypes.rounding_noise(model.graph, feeds)
    monkeypatch.setenv("ROTAQ_BLOCKWISE_GIB", "0")
    blocks = dtypes.rounding_noise(rotaq.load(onnx_files[kind]).graph, feeds)
    assert blocks["method"] == whole["method"] == {"fp16": "native", "bf16": "emulated"}[kind]
    assert blocks["e0"] == pytest.approx(whole["e0"], rel=0.05)
    assert 1e-4 < blocks["e0"] < 0.05
