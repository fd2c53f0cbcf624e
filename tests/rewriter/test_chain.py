"""Chains: numpy semantics against dense weights, and exact emission on both IRs."""

import os
import tempfile

import numpy as np
import pytest

import rotaq
from rotaq.errors import RewriteError
from rotaq.model import max_rel_error
from rotaq.rewriter.chain import Step, kron_chain, lowrank_chain, monarch_chain
from tests.tiny import build, loaded

RNG = np.random.default_rng(0)


def _monarch_dense(L, R):
    m2, m1, n1r = L.shape
    n1, _, n2 = R.shape
    r = n1r // n1
    Lr = L.reshape(m2, m1, n1, r)
    Rr = R.reshape(n1, m2, r, n2)
    w = np.einsum("bajs,jbsd->abjd", Lr, Rr)  # [i1, i2, j1, j2]
    return w.reshape(m1 * m2, n1 * n2)


def test_lowrank_chain_dense():
    a, b, bias = RNG.normal(size=(6, 3)), RNG.normal(size=(3, 10)), RNG.normal(size=6)
    c = lowrank_chain(a, b, bias)
    assert not c.flat and c.params == 6 * 3 + 3 * 10 + 6
    x = RNG.normal(size=(2, 5, 10))
    np.testing.assert_allclose(c.apply(x), x @ (a @ b).T + bias, atol=1e-12)
    np.testing.assert_allclose(c.dense(), a @ b, atol=1e-12)


@pytest.mark.parametrize("r", [1, 3])
def test_kron_chain_dense(r):
    A, B = RNG.normal(size=(r, 2, 3)), RNG.normal(size=(r, 5, 4))
    w = sum(np.kron(A[s], B[s]) for s in range(r))
    c = kron_chain(A, B)
    assert c.flat and (c.in_features, c.out_features) == (12, 10)
    x = RNG.normal(size=(2, 7, 12))
    np.testing.assert_allclose(c.apply(x), x @ w.T, atol=1e-12)


@pytest.mark.parametrize("r", [1, 2])
def test_monarch_chain_dense(r):
    m1, m2, n1, n2 = 3, 4, 5, 2
    L, R = RNG.normal(size=(m2, m1, n1 * r)), RNG.normal(size=(n1, m2 * r, n2))
    c = monarch_chain(L, R)
    np.testing.assert_allclose(c.dense(), _monarch_dense(L, R), atol=1e-12)
    # the block structure: for fixed (i2, j1) the (i1, j2) block has rank <= r
    w4 = c.dense().reshape(m1, m2, n1, n2)
    for i2 in range(m2):
        for j1 in range(n1):
            assert np.linalg.matrix_rank(w4[:, i2, j1, :]) <= r


def test_step_validation():
    with pytest.raises(ValueError, match="constant missing"):
        Step("matmul")
    with pytest.raises(ValueError, match="must be one of"):
        Step("conv", np.eye(2))


@pytest.mark.parametrize("ir", ["torch", "onnx"])
@pytest.mark.parametrize("how", ["replace", "branch"])
def test_chain_emission_exact(ir, how):
    """Replace every linear of a tiny Llama by an exact chain (low rank at full rank, a
    Kronecker sum at full rank, a Monarch at full block rank): outputs unchanged."""
    m, inputs = build("llama")
    # the prefill graph (no KV cache): the torch check below calls the module as HF does
    ref = loaded("llama", kv_cache=False)
    model = loaded("llama", "onnx" if ir == "onnx" else "fx", kv_cache=False).clone()
    want = ref.run()
    g = model.graph
    a = model.analysis()
    keys = [k for k in a.linears if k not in a.residual.head]
    assert len(keys) == 14
    for i, key in enumerate(keys):
        w, bias = g.get_linear(key)
        m_, n_ = w.shape
        if how == "branch":  # y = Linear_{W - D}(x) + chain_D(x)
            d = RNG.normal(size=w.shape) * 0.01
            u, s, vt = np.linalg.svd(d, full_matrices=False)
            g.set_linear(key, w - d, bias)
            g.add_branch(key, lowrank_chain(u * s, vt))
            continue
        kind = i % 3
        if kind == 0:
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            chain = lowrank_chain(u * s, vt, bias)
        elif kind == 1:  # exact Kronecker sum: full rank of the rearranged matrix
            m1, n1 = 8, 8
            m2, n2 = m_ // m1, n_ // n1
            rr = w.reshape(m1, m2, n1, n2).transpose(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
            u, s, vt = np.linalg.svd(rr, full_matrices=False)
            A = (u * s).T.reshape(-1, m1, n1)
            B = vt.reshape(-1, m2, n2)
            chain = kron_chain(A, B, bias)
        else:  # exact Monarch: block rank min(m1, n2)
            m1, m2, n1, n2 = 8, m_ // 8, 8, n_ // 8
            r = min(m1, n2)
            w4 = w.reshape(m1, m2, n1, n2)
            L = np.zeros((m2, m1, n1 * r))
            R = np.zeros((n1, m2 * r, n2))
            for i2 in range(m2):
                for j1 in range(n1):
                    u, s, vt = np.linalg.svd(w4[:, i2, j1, :], full_matrices=False)
                    L[i2, :, j1 * r:(j1 + 1) * r] = u[:, :r] * s[:r]
                    R[j1, i2 * r:(i2 + 1) * r, :] = vt[:r]
            chain = monarch_chain(L, R, bias)
        np.testing.assert_allclose(chain.dense(), w, atol=1e-9)
        g.replace_linear(key, chain)
    got = model.run()
    assert max_rel_error(want, got) < 1e-5
    a2 = model.analysis()
    assert len(a2.linears) == (15 if how == "branch" else 1)  # chains are not linears
    assert sum(n.op == "chain" for n in a2.view.nodes) > 14
    # the rewritten graph saves and reloads (FX: re-export; ONNX: stock ORT)
    if ir == "onnx":
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.onnx")
            model.save(path)
            back = rotaq.load(path)
            assert max_rel_error(want, back.run(model.sample_inputs)) < 1e-5
    else:
        import torch

        with torch.no_grad():
            out = g.export().module()(**inputs)
        assert max_rel_error(want, [out.logits.numpy()]) < 1e-5


def test_chain_shape_mismatch():
    m, inputs = build("llama")
    model = rotaq.load(m, inputs)
    key = next(iter(model.analysis().linears))
    with pytest.raises(RewriteError, match="does not fit"):
        model.graph.replace_linear(key, lowrank_chain(np.ones((3, 1)), np.ones((1, 5))))
