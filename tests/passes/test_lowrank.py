"""Low-rank, structured (Kronecker / Monarch) and learned Kronecker-transform passes on tiny
random models, both IRs: exact at full rank, error bounds and parameter counts below it."""

import numpy as np
import pytest

import rotaq
from rotaq.errors import RotaqError
from tests.tiny import loaded

TOL = 1e-5


def _opt(ir, recipe, family="llama", calibrate_on_sample=False, **options):
    model = loaded(family, ir)
    if calibrate_on_sample:  # in-sample on purpose (the report flags the shared rows)
        model = rotaq.load(model, inputs=model.sample_inputs, verify_inputs=model.sample_inputs)
    res = rotaq.optimize(model, recipe, options=options)
    return res, [p["stats"] for p in res.report["passes"]]


@pytest.mark.parametrize("ir", ["fx", "onnx"])
def test_full_rank_reproduces(ir):
    """At full rank every factorization is exact: SVD, ASVD, whitened SVD, Kronecker sum,
    Monarch; the graph's linears become chains (14 of them, the head stays)."""
    for recipe, opts in [("lowrank", {"method": "svd", "rank": 64, "force": True}),
                         ("lowrank", {"method": "asvd", "rank": 64, "force": True}),
                         ("lowrank", {"method": "whiten", "rank": 64, "force": True}),
                         ("structured", {"kind": "kron", "rank": 64}),
                         ("structured", {"kind": "monarch", "rank": 8})]:
        res, (st,) = _opt(ir, recipe, **opts)
        assert st["replaced"] == 14, (recipe, opts)
        assert res.report["max_rel_error"] < 1e-4, (recipe, opts, res.report["max_rel_error"])
        assert len(res.model.analysis().linears) == 1


@pytest.mark.parametrize("ir", ["fx", "onnx"])
def test_whitened_beats_plain_at_equal_rank(ir):
    """Calibrated (on purpose) on its 8 verification tokens: the Gram matrix has rank 8 (not
    positive definite) and the whitened rank-16 solution is exact on those tokens, while plain
    and activation-aware SVD lose most of the signal."""
    errs = {}
    for method in ("svd", "asvd", "whiten"):
        res, (st,) = _opt(ir, "lowrank", method=method, rank=16, calibrate_on_sample=True)
        assert st["replaced"] == 14 and st["params_removed_ratio"] == pytest.approx(0.5556, 1e-3)
        errs[method] = res.report["max_rel_error"]
    assert errs["whiten"] < 1e-4
    assert errs["svd"] > 0.1 and errs["asvd"] > 0.1


def test_budget_allocation_meets_the_ratio():
    res, (st,) = _opt("fx", "lowrank", method="whiten", rank_by="budget", ratio=0.2, step=8)
    assert 0.2 <= st["params_removed_ratio"] < 0.3
    assert st["params_after"] <= 0.8 * st["params_before"]
    ranks = [r for r in st["ranks"].values() if r is not None]
    assert ranks and all(r % 8 == 0 for r in ranks)
    assert st["replaced"] + st["kept_dense"] == 14
    _, (st,) = _opt("fx", "lowrank", method="svd", rank_by="ratio", ratio=0.2)
    assert st["replaced"] == 14 and 0.2 <= st["params_removed_ratio"] < 0.25


def test_energy_and_no_saving():
    _, (st,) = _opt("fx", "lowrank", method="svd", rank_by="energy", energy=0.5)
    assert st["replaced"] > 0 and st["rel_error_mean"] <= 0.5 + 1e-9
    # rank 40 of a 64 x 64 layer costs 40 * 128 > 4096: such layers stay dense; only the
    # 64 x 128 / 128 x 64 MLP linears (40 * 192 < 8192) are replaced, 3 per layer
    _, (st,) = _opt("fx", "lowrank", method="svd", rank=40)
    assert st["replaced"] == 6 and st["kept_dense"] == 8


def test_bad_options():
    model = loaded("llama")
    with pytest.raises(RotaqError, match="method expects one of svd, asvd, whiten"):
        rotaq.optimize(model, "lowrank", options={"method": "qr"})
    with pytest.raises(RotaqError, match="ratio must be"):
        rotaq.optimize(model, "lowrank", options={"ratio": 1.5})
    with pytest.raises(RotaqError, match="no linear matches"):
        rotaq.optimize(model, "structured", options={"include": "nothing"})


@pytest.mark.parametrize("ir", ["fx", "onnx"])
def test_monarch_half_parameters(ir):
    res, (st,) = _opt(ir, "monarch")
    assert st["replaced"] == 14
    assert 0.5 <= st["params_removed_ratio"] < 0.6
    assert 0 < st["weight_rel_error_mean"] < 1.0
    assert res.report["max_rel_error"] < 1.0


@pytest.mark.parametrize("ir", ["fx", "onnx"])
def test_kron_transform_exact_in_float_and_lowers_loss(ir):
    res, (st,) = _opt(ir, "kron-transform", iters=20)
    assert st["groups"] == 8 and st["transformed"] + st["skipped"] == 8
    assert st["transformed"] >= 6 and st["loss_ratio_min"] > 1.0
    assert res.report["exact"] and res.report["max_rel_error"] < TOL
    online = [n for n in res.model.analysis().view.nodes if n.op == "online"]
    assert online  # Mul + Reshape + MatMul + MatMul + Reshape per transformed group


def test_kron_w4a4_recipe_onnx():
    """The full recipe (rotate, learned transforms, GPTQ w4a4 + int4 KV) on the ONNX IR runs in
    ORT; on 256 held-out tokens (not the calibration ones) the learned transforms make the
    quantized output closer (relative RMS) than Hadamard-only."""
    from rotaq.inputs import synthetic

    src = loaded("llama", "onnx")
    src = rotaq.load(src, verify_inputs=synthetic(src.graph, seed=2, rows=8, seq_len=32))
    opts = {"kron-transform.iters": 30}
    kron = rotaq.optimize(src, "kron-w4a4", options=opts)
    had = rotaq.optimize(src, "w4a4-rotated")
    assert kron.report["passes"][1]["stats"]["transformed"] > 0
    assert kron.report["rel_rms_error"] < had.report["rel_rms_error"]


@pytest.mark.parametrize("ir", ["fx", "onnx"])
@pytest.mark.parametrize("mode", ["eora", "lq"])
def test_lowrank_plus_quantized(ir, mode):
    """W ~ Q + ab: both corrections cut the int4 error; EoRA at rank 8 >= the 8 calibration
    tokens fits the quantization error exactly on them (calibrated on the verification tokens
    on purpose)."""
    base, (bst,) = _opt(ir, "w4a16", calibrate_on_sample=True)
    res, (st,) = _opt(ir, "w4a16", lowrank_rank=8, lowrank_mode=mode, calibrate_on_sample=True)
    assert st["lowrank"] == f"{mode} rank 8"
    if mode == "lq":
        assert st["weight_rel_error_mean"] < 0.8 * bst["weight_rel_error_mean"]
        assert res.report["max_rel_error"] < 0.8 * base.report["max_rel_error"]
    else:
        assert res.report["max_rel_error"] < 1e-4 < base.report["max_rel_error"]
    chains = [n for n in res.model.analysis().view.nodes if n.op == "chain"]
    assert len(chains) >= 14 * 3  # two MatMuls and the Add per linear


def test_pass_name_as_recipe():
    model = loaded("llama")
    with pytest.raises(RotaqError, match="a pass name"):
        rotaq.optimize(model, "no-such-recipe")
    res = rotaq.optimize(model, "structured", options={"kind": "kron"})
    assert res.report["tolerance"] is None and res.report["recipe"]["name"] == "structured"
    assert np.isfinite(res.report["max_rel_error"])
