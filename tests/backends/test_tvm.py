"""TVM backend on tiny random models: parity with ONNX Runtime per recipe, the dequantize-matmul
kernel against numpy, the artefact round trip, padding rules and the missing-TVM message."""

import subprocess
import sys

import numpy as np
import pytest

import rotaq
from rotaq.backends.tvm_matmul import tile
from rotaq.errors import MissingDependencyError, RotaqError
from tests.backends.nbits import act_int8, random_nbits
from tests.tiny import loaded

tvm = pytest.importorskip("tvm", reason="the TVM extra is not installed (pip install rotaq[tvm])")
from rotaq.backends import tvm as tb
from rotaq.backends.tvm_kernels import qmatmul_func, schedule_qmatmul_cpu

SEQ = 8
RECIPES = ["rotate", "w8a8", "w4a16", "lowrank-20"]


@pytest.fixture(scope="module")
def tiny_onnx():
    out = {}
    for fam in ("llama", "bert"):
        # the prefill graph (no KV cache): TVM artefacts are bucketed by token count
        out[fam] = loaded(fam, "onnx", kv_cache=False)
    return out


def _feeds(model, n, seed=0):
    ids = np.random.default_rng(seed).integers(0, 200, (1, n)).astype(np.int64)
    feeds = model.token_feeds(ids)
    return {k: v for k, v in feeds.items() if k in model.graph.input_names}


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("fam", ["llama", "bert"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_parity_with_ort(tiny_onnx, tmp_path, fam, recipe):
    if recipe not in rotaq.recipe.builtin_recipes():
        pytest.skip(f"recipe {recipe} not built in")
    res = rotaq.optimize(tiny_onnx[fam], recipe, verify=False)
    path = str(tmp_path / "m.onnx")
    res.model.save(path)
    meta = tb.compile_tvm(path, str(tmp_path / "art"), tokens=[SEQ], progress=False)
    stats = meta["buckets"][str(SEQ)]["stats"]
    if recipe.startswith("w4"):
        assert stats["qmatmul"] >= 12  # every linear through rotaq's int4 kernel
    if recipe == "rotate" and fam == "llama":
        assert stats["kron"] == 2  # the online Hadamards before the down projections
    assert stats["attention"] == 2  # both layers' attention in the fused kernel
    if recipe == "rotate":  # 4 query heads on 2 KV heads read before repeat_kv (the fold needs
        # ONNX's inferred shape of the chain's source; w4a16 / w8a8 get 0 / 1 of 2 here)
        assert stats["gqa_folded"] == (2 if fam == "llama" else 0)
    ref = rotaq.load(path)
    model = tb.load(str(tmp_path / "art"))
    for seed in (0, 1):
        feeds = _feeds(ref, SEQ, seed)
        for a, b in zip(model.graph.run(feeds), ref.graph.run(feeds)):
            assert _rel(a, b) < 1e-3


def test_padding_and_artifact(tiny_onnx, tmp_path):
    path = str(tmp_path / "llama.onnx")
    rotaq.optimize(tiny_onnx["llama"], "rotate", verify=False).model.save(path)
    meta = tb.compile_tvm(path, str(tmp_path / "art"), tokens=[1, SEQ], progress=False)
    assert sorted(meta["tokens"]) == [1, SEQ] and meta["padding_exact"]
    assert meta["mcpu"] == tb.host_cpu()  # llvm = the host CPU's vector units
    # one library serves every compiled length (entry main_<n>)
    assert {p.name for p in (tmp_path / "art").iterdir()} == {"metadata.json", "params.npz",
                                                               "lib.so"}
    assert [meta["buckets"][str(n)]["function"] for n in (1, SEQ)] == ["main_1", f"main_{SEQ}"]
    ref, model = rotaq.load(path), tb.load(str(tmp_path / "art"))
    for n in (1, 5, SEQ):  # 5 runs padded on the 8-token library (causal: exact)
        feeds = _feeds(ref, n)
        (a,), (b,) = model.graph.run(feeds), ref.graph.run(feeds)
        assert a.shape == b.shape and _rel(a, b) < 1e-4
    with pytest.raises(RotaqError, match="largest compiled length"):
        model.graph.run(_feeds(ref, SEQ + 1))
    # recompiling into the same folder replaces the artefact atomically
    tb.compile_tvm(path, str(tmp_path / "art"), tokens=[1], progress=False)
    assert sorted(tb.load(str(tmp_path / "art")).graph.buckets()) == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rotaq")]


def test_out_of_range_token_ids_are_refused(tiny_onnx, tmp_path):
    """TVM lowers Gather without bounds checks: an id past the embedding crashed the process
    (SIGSEGV). The artefact records the table each integer input indexes and checks it; a
    negative id wraps as in ONNX (and ORT)."""
    path = str(tmp_path / "llama.onnx")
    tiny_onnx["llama"].save(path)
    meta = tb.compile_tvm(path, str(tmp_path / "art"), tokens=[SEQ], progress=False)
    ref, model = rotaq.load(path), tb.load(str(tmp_path / "art"))
    vocab = meta["index_bounds"]["input_ids"]
    assert vocab == ref.graph.get_embedding(ref.analysis().residual.embedding).shape[0]
    feeds = _feeds(ref, SEQ)
    for bad in (vocab, 10**7, -vocab - 1):
        f = dict(feeds, input_ids=np.full((1, SEQ), bad, np.int64))
        with pytest.raises(RotaqError, match=f"holds {bad}, outside the {vocab} rows"):
            model.graph.run(f)
    neg = dict(feeds, input_ids=feeds["input_ids"] - vocab)  # -vocab .. -1: the same rows
    (a,), (b,), (c,) = model.graph.run(neg), model.graph.run(feeds), ref.graph.run(neg)
    assert np.array_equal(a, b) and _rel(a, c) < 1e-4


@pytest.mark.parametrize("bits,block,act,m,avx512", [
    (4, 32, 0, 1, False), (4, 32, 0, 6, False), (2, 16, 0, 3, False), (8, 64, 8, 4, False),
    (4, 128, 0, 2, False), (4, 32, 0, 1, True), (4, 32, 0, 12, True), (8, 64, 8, 6, True)])
def test_qmatmul_kernel(bits, block, act, m, avx512):
    rng = np.random.default_rng(bits + m)
    k, n = 80, 48  # K not a multiple of the block: zero-padded last block
    (w_codes, w_scale, w_shift), w = random_nbits(rng, k, n, bits, block)
    x = rng.standard_normal((m, k)).astype(np.float32)
    xa = act_int8(x, k, block) if act else x
    nt = 16
    f = schedule_qmatmul_cpu(qmatmul_func(m, k, n, bits, block, act, nt=nt), m, n, nt,
                             avx512=avx512)
    lib = tvm.compile(tvm.IRModule({"main": f}), target="llvm")
    args = [tvm.runtime.tensor(a) for a in (x, tile(w_codes, nt), tile(w_scale, nt),
                                            tile(w_shift, nt), np.zeros((m, n), np.float32))]
    lib["main"](*args)
    assert _rel(args[-1].numpy(), xa @ w) < 1e-5


@pytest.mark.parametrize("m,a,b,dense_a", [(3, 16, 8, False), (5, 48, 32, True),
                                            (2, 12, 16, True), (1, 48, 32, True),
                                            (70, 48, 32, True)])  # 70: rows across threads
def test_hadamard_kernel(m, a, b, dense_a):
    from rotaq.backends.tvm_hadamard import kron_func, schedule_kron_cpu, sylvester

    rng = np.random.default_rng(a)
    amat = np.linalg.qr(rng.standard_normal((a, a)))[0] if dense_a else sylvester(a)
    x = rng.standard_normal((m, a * b)).astype(np.float32)
    f = schedule_kron_cpu(kron_func(m, a, b, not dense_a, True), m)
    lib = tvm.compile(tvm.IRModule({"main": f}), target="llvm")
    args = [tvm.runtime.tensor(np.ascontiguousarray(v, np.float32))
            for v in (x, amat.T, sylvester(b), np.zeros_like(x))]
    lib["main"](*args)
    assert _rel(args[-1].numpy(), x @ np.kron(amat, sylvester(b))) < 1e-5


@pytest.mark.parametrize("fwht_a", [False, True])
def test_kron_kernel_dense_b(fwht_a):
    from rotaq.backends.tvm_hadamard import kron_func, schedule_kron_cpu, sylvester

    m, a, b = 3, 16, 12
    rng = np.random.default_rng(7)
    amat = sylvester(a) if fwht_a else np.linalg.qr(rng.standard_normal((a, a)))[0]
    bmat = np.linalg.qr(rng.standard_normal((b, b)))[0]
    x = rng.standard_normal((m, a * b)).astype(np.float32)
    f = schedule_kron_cpu(kron_func(m, a, b, fwht_a, False), m)
    lib = tvm.compile(tvm.IRModule({"main": f}), target="llvm")
    args = [tvm.runtime.tensor(np.ascontiguousarray(v, np.float32))
            for v in (x, amat.T, bmat, np.zeros_like(x))]
    lib["main"](*args)
    assert _rel(args[-1].numpy(), x @ np.kron(amat, bmat)) < 1e-5


def test_llvm_targets(tiny_onnx, tmp_path, monkeypatch):
    assert str(tb.make_target("llvm").attrs.get("mcpu", "")) == tb.host_cpu()
    assert "mcpu" not in tb.make_target("llvm:generic").attrs
    assert not tb.has_avx512(tb.make_target("llvm:generic"))
    from tvm.target import codegen

    if codegen.llvm_get_system_triple().startswith("x86_64"):
        assert tb.has_avx512(tb.make_target("llvm:skylake-avx512"))
        assert not tb.has_avx512(tb.make_target("llvm:haswell"))
    assert tb.missing_cpu_features(tb.host_cpu()) == []
    assert tb.missing_cpu_features("generic") == tb.missing_cpu_features(None) == []
    with pytest.raises(RotaqError, match="not a CPU LLVM knows"):
        tb.make_target("llvm:no-such-cpu")
    path = str(tmp_path / "llama.onnx")
    tiny_onnx["llama"].save(path)
    meta = tb.compile_tvm(path, str(tmp_path / "art"), target="llvm:generic", tokens=[SEQ],
                          progress=False)
    assert meta["mcpu"] is None
    ref, model = rotaq.load(path), tb.load(str(tmp_path / "art"))
    feeds = _feeds(ref, SEQ)
    assert _rel(model.graph.run(feeds)[0], ref.graph.run(feeds)[0]) < 1e-4
    # an artefact built for a CPU with instructions this machine lacks is refused, not run
    monkeypatch.setattr(tb, "missing_cpu_features", lambda cpu: ["avx512f"])
    with pytest.raises(RotaqError, match="avx512f"):
        tb.load(str(tmp_path / "art"))


def test_missing_tvm_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "tvm", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'rotaq\[tvm\]'"):
        tb.require_tvm()


def test_cli_without_tvm(monkeypatch, tmp_path, capsys):
    from rotaq.cli import main

    monkeypatch.setitem(sys.modules, "tvm", None)
    assert main(["compile", "smollm2-135m", "--backend", "tvm", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "apache-tvm" in err and "pip install 'rotaq[tvm]'" in err
    assert not (tmp_path / "o").exists()


def test_import_rotaq_does_not_import_tvm():
    code = ("import sys, rotaq, rotaq.cli, rotaq.backends.tvm, rotaq.cli.compile; "
            "assert 'tvm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bits,level", [(8, 4), (4, 0), (2, 0)])
def test_matmulnbits_node_matches_ort(tmp_path, bits, level):
    """One MatMulNBits node (asymmetric zero points, bias) through the importer: ORT's
    accuracy_level=4 int8 activations are reproduced, not just approximated."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(bits)
    k, n, bs, m = 320, 96, 64, 4
    nb, per = k // bs, 8 // bits
    b = rng.integers(0, 256, (n, nb, bs // per)).astype(np.uint8)
    s = (rng.random((n, nb)) * 0.02).astype(np.float32)
    zp = rng.integers(0, 256, (n, -(-nb // per))).astype(np.uint8)
    bias = rng.standard_normal(n).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["a", "B", "S", "Z", "", "bias"], ["y"],
                            domain="com.microsoft", K=k, N=n, bits=bits, block_size=bs,
                            accuracy_level=level)
    g = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, n])],
        [numpy_helper.from_array(v, name) for v, name in ((b, "B"), (s, "S"), (zp, "Z"),
                                                          (bias, "bias"))])
    path = str(tmp_path / "nbits.onnx")
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20),
                                             helper.make_opsetid("com.microsoft", 1)]), path)
    tb.compile_tvm(path, str(tmp_path / "art"), tokens=[m], progress=False)
    x = (rng.standard_normal((1, m, k)) * np.linspace(0.1, 3, k)).astype(np.float32)
    got = tb.load(str(tmp_path / "art")).graph.run({"a": x})[0]
    ref = rotaq.load(path).graph.run({"a": x})[0]
    assert _rel(got, ref) < 1e-5
