"""Chains: the IR-neutral vocabulary for a linear replaced by a product of structured factors.

A :class:`Chain` maps a linear's input ``x [..., n]`` to ``y [..., m]`` through a short program of
steps on constants. Adapters emit it (ONNX: Reshape / Transpose / MatMul / ReduceSum / Add; FX:
the matching aten ops) and :meth:`Chain.apply` is the numpy reference both are tested against.

When every step works on trailing axes (a 2-D ``matmul``, ``add``, ``mul``, ``gather``, ``split``,
``merge``; a 2-D ``lmatmul`` after a ``split``) the chain runs on ``x`` as it is (the low-rank case: ``x b^T a^T``). Otherwise the adapter first flattens the leading axes, ``x -> X [T, n]``,
runs the steps on the full 2-D-or-more shape (token axis included, so a transpose can move it
and a batched MatMul runs one GEMM per block), and finally restores ``[..., m]``.

Steps (``op``, ``const``, ``arg``):

- ``matmul``: ``x @ C`` (numpy broadcasting over leading axes of ``C``);
- ``lmatmul``: ``C @ x`` (on a 2-D const: the second-to-last axis);
- ``reshape``: to ``arg`` (one ``-1`` allowed, for the token axis);
- ``transpose``: axes permuted by ``arg``;
- ``sum``: sum over axis ``arg[0]`` (dropped);
- ``add``: ``x + C`` (a bias on the last axis);
- ``mul``: ``x * C`` (``C`` broadcast on the last axis: a per-channel scale, a 0/1 mask);
- ``gather``: ``x[..., arg]`` (columns of the last axis; out dim ``len(arg)``);
- ``split``: the last axis into the sizes ``arg`` (``[..., a*b] -> [..., a, b]``);
- ``merge``: the last ``arg[0]`` axes into one (``[..., a, b] -> [..., a*b]``);

and the fake-quant steps, which set or use a per-row scale ``s`` and zero point ``z``:

- ``absmax``: ``s = max(max|x| * C, TINY)`` per row (last axis), ``z = 0`` (``C = clip / qmax``);
- ``minmax``: ``lo, hi = C * min(x_min, 0), C * max(x_max, 0)`` per row,
  ``s = max((hi - lo) / qmax, TINY)``, ``z = clip(round(-lo / s), qmin, qmax)`` (``C = clip``,
  ``arg = (qmin, qmax)``);
- ``grid``: ``x -> (clip(round(x / s) + z, qmin, qmax) - z) * s`` (``arg = (qmin, qmax)``); with
  ``C = [scale, zero]`` a static grid, else the row scale set before. Round ties to even.

A chain of width-preserving steps may take ``in_features = out_features = -1`` (any width).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rotaq.errors import RewriteError

STEP_OPS = ("matmul", "lmatmul", "reshape", "transpose", "sum", "add", "mul", "gather", "split",
            "merge", "absmax", "minmax", "grid")
_CONST_OPS = ("matmul", "lmatmul", "add", "mul", "absmax", "minmax")
TINY = 1e-30  # floor of a dynamic scale (a zero row quantizes to zeros)
_FLAT_OPS = ("reshape", "transpose", "sum")  # steps on absolute axes


@dataclass(frozen=True)
class Step:
    op: str
    const: np.ndarray | None = None
    arg: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.op not in STEP_OPS:
            raise ValueError(f"chain step must be one of {STEP_OPS}, not {self.op!r}")
        needs_const = self.op in _CONST_OPS
        if self.op != "grid" and needs_const != (self.const is not None):
            raise ValueError(f"chain step {self.op!r}: constant "
                             f"{'missing' if needs_const else 'unexpected'}")
        if self.op == "gather" and (not self.arg or min(self.arg) < 0):
            raise ValueError("chain step 'gather': arg must be a non-empty tuple of indices >= 0")
        if self.op == "split" and (len(self.arg) < 2 or min(self.arg) < 1):
            raise ValueError("chain step 'split': arg must be two or more sizes >= 1")
        if self.op == "merge" and (len(self.arg) != 1 or self.arg[0] < 2):
            raise ValueError("chain step 'merge': arg must be (k,), k >= 2 trailing axes")
        if self.op in ("minmax", "grid") and (len(self.arg) != 2 or self.arg[0] >= self.arg[1]):
            raise ValueError(f"chain step {self.op!r}: arg must be (qmin, qmax), qmin < qmax")
        if self.op == "mul" and self.const.ndim > 1:
            raise ValueError(f"chain step 'mul': constant must be a scalar or 1-D, "
                             f"not {self.const.shape}")


@dataclass(frozen=True)
class Chain:
    """``y = chain(x)``: ``in_features -> out_features`` through ``steps``; ``kind`` names the
    structure for reports ("lowrank", "kron", "monarch")."""

    steps: tuple[Step, ...]
    in_features: int
    out_features: int
    kind: str = "chain"

    @property
    def flat(self) -> bool:
        """True if the steps need ``x`` flattened to ``[T, n]`` first."""
        return any(s.op in _FLAT_OPS or (s.op in ("matmul", "lmatmul") and s.const.ndim != 2)
                   for s in self.steps) or (bool(self.steps) and self.steps[0].op == "lmatmul")

    @property
    def needs_rank(self) -> bool:
        """True if emitting the steps needs the input's rank (flattening, split, merge)."""
        return self.flat or any(s.op in ("split", "merge") for s in self.steps)

    @property
    def params(self) -> int:
        return int(sum(s.const.size for s in self.steps if s.const is not None))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Numpy reference semantics."""
        x = np.asarray(x)
        if self.in_features >= 0 and x.shape[-1] != self.in_features:
            raise ValueError(f"chain expects last dim {self.in_features}, got {x.shape}")
        lead = x.shape[:-1]
        y = x.reshape(-1, self.in_features) if self.flat else x
        scale, zero = None, 0.0
        for s in self.steps:
            if s.op == "matmul":
                y = y @ s.const
            elif s.op == "lmatmul":
                y = s.const @ y
            elif s.op == "reshape":
                y = y.reshape(s.arg)
            elif s.op == "transpose":
                y = y.transpose(s.arg)
            elif s.op == "sum":
                y = y.sum(axis=s.arg[0])
            elif s.op == "mul":
                y = y * s.const
            elif s.op == "gather":
                y = y[..., list(s.arg)]
            elif s.op == "split":
                y = y.reshape(*y.shape[:-1], *s.arg)
            elif s.op == "merge":
                y = y.reshape(*y.shape[:-s.arg[0]], -1)
            elif s.op in ("absmax", "minmax"):
                scale, zero = _row_grid(y, s)
            elif s.op == "grid":
                sc, zp = (scale, zero) if s.const is None else (s.const[0], s.const[1])
                y = (np.clip(np.rint(y / sc) + zp, *s.arg) - zp) * sc
            else:
                y = y + s.const
        return y.reshape(*lead, self.out_features)

    def dense(self) -> np.ndarray:  # (of a linear chain)
        """The equivalent weight ``W [out, in]`` (without the bias)."""
        y = self.apply(np.eye(self.in_features))
        return (y - self.apply(np.zeros((1, self.in_features)))).T

    def bias(self) -> np.ndarray | None:
        """``chain(0)`` if the chain adds a constant, else None."""
        if not any(s.op == "add" for s in self.steps):
            return None
        return self.apply(np.zeros((1, self.in_features)))[0]


def _row_grid(y: np.ndarray, s: Step) -> tuple[np.ndarray, np.ndarray | float]:
    """Per-row ``(scale, zero)`` of an ``absmax`` / ``minmax`` step."""
    if s.op == "absmax":
        return np.maximum(np.abs(y).max(-1, keepdims=True) * s.const, TINY), 0.0
    lo = np.minimum(y.min(-1, keepdims=True), 0.0) * s.const
    hi = np.maximum(y.max(-1, keepdims=True), 0.0) * s.const
    scale = np.maximum((hi - lo) / s.arg[1], TINY)
    return scale, np.clip(np.rint(-lo / scale), *s.arg)


def _bias(bias: np.ndarray | None) -> tuple[Step, ...]:
    return () if bias is None else (Step("add", np.asarray(bias, np.float64).reshape(-1)),)


def lowrank_chain(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None) -> Chain:
    """``W ~ a b`` (a [m, r], b [r, n]): ``y = (x b^T) a^T + bias``."""
    (m, r), (r2, n) = a.shape, b.shape
    if r != r2:
        raise ValueError(f"low-rank factors {a.shape} x {b.shape} do not chain")
    steps = (Step("matmul", np.ascontiguousarray(b.T)), Step("matmul", np.ascontiguousarray(a.T)))
    return Chain(steps + _bias(bias), n, m, "lowrank")


def kron_chain(A: np.ndarray, B: np.ndarray, bias: np.ndarray | None = None) -> Chain:
    """``W ~ sum_s A_s (x) B_s`` (A [r, m1, n1], B [r, m2, n2]).

    With ``x = vec(X)``, ``X [n1, n2]`` row-major, ``(A (x) B) x = vec(A X B^T)``. One term:
    ``X -> X B^T -> A (X B^T)``. Several: ``X [T, n1, n2] @ [B_0^T | B_1^T ..] -> [T, n1, r, m2]
    -> [T, r, n1, m2] -> A @ . -> [T, r, m1, m2] -> sum over r``.
    """
    r, m1, n1 = A.shape
    r2, m2, n2 = B.shape
    if r != r2:
        raise ValueError(f"Kronecker terms differ: {r} vs {r2}")
    m, n = m1 * m2, n1 * n2
    if r == 1:
        steps = (Step("reshape", arg=(-1, n1, n2)), Step("matmul", np.ascontiguousarray(B[0].T)),
                 Step("lmatmul", np.ascontiguousarray(A[0])), Step("reshape", arg=(-1, m)))
    else:
        bt = np.concatenate([B[s].T for s in range(r)], axis=1)  # [n2, r*m2]
        steps = (Step("reshape", arg=(-1, n1, n2)), Step("matmul", bt),
                 Step("reshape", arg=(-1, n1, r, m2)), Step("transpose", arg=(0, 2, 1, 3)),
                 Step("lmatmul", np.ascontiguousarray(A)), Step("sum", arg=(1,)),
                 Step("reshape", arg=(-1, m)))
    return Chain(steps + _bias(bias), n, m, "kron")


def monarch_chain(L: np.ndarray, R: np.ndarray, bias: np.ndarray | None = None) -> Chain:
    """Monarch ``W[(i1,i2),(j1,j2)] = sum_s L[i2, i1, j1 r + s] R[j1, i2 r + s, j2]``
    (L [m2, m1, n1 r], R [n1, m2 r, n2]) as two batched GEMMs with the tokens as rows:
    ``X [T, n1, n2] -> [n1, T, n2] @ R^T -> [n1, T, m2, r] -> [m2, T, n1, r]
    -> [m2, T, n1 r] @ L^T -> [m2, T, m1] -> [T, m1, m2]``.
    """
    m2, m1, n1r = L.shape
    n1, m2r, n2 = R.shape
    if n1r % n1 or m2r % m2 or n1r // n1 != m2r // m2:
        raise ValueError(f"Monarch factors {L.shape} and {R.shape} do not fit")
    r = n1r // n1
    m, n = m1 * m2, n1 * n2
    steps = (
        Step("reshape", arg=(-1, n1, n2)), Step("transpose", arg=(1, 0, 2)),
        Step("matmul", np.ascontiguousarray(R.transpose(0, 2, 1))),  # [n1, n2, m2 r]
        Step("reshape", arg=(n1, -1, m2, r)), Step("transpose", arg=(2, 1, 0, 3)),
        Step("reshape", arg=(m2, -1, n1 * r)),
        Step("matmul", np.ascontiguousarray(L.transpose(0, 2, 1))),  # [m2, n1 r, m1]
        Step("transpose", arg=(1, 2, 0)), Step("reshape", arg=(-1, m)),
    )
    return Chain(steps + _bias(bias), n, m, "monarch")


def transform_chain(factors: tuple[np.ndarray, ...], scale: np.ndarray | None = None) -> Chain:
    """The online transform ``x -> (x * scale) @ (F_0 (x) F_1 (x) ...)`` on the last axis
    (:class:`~rotaq.rewriter.sites.Kronecker`). One factor: one matmul; more: the tail grouped
    into ``F_1``, then ``[.., a*b] -> [.., a, b] -> @ F_1 -> F_0^T @ . -> [.., a*b]`` (row-major
    ``x[i*b+j] = X[i, j]`` and ``x (A (x) B) = vec(A^T X B)``), never the dense product."""
    fs = [np.asarray(f, dtype=np.float64) for f in factors]
    if not fs or any(f.ndim != 2 or f.shape[0] != f.shape[1] for f in fs):
        raise RewriteError("insert_transform: factors must be square matrices")
    if len(fs) > 2:
        tail = np.ones((1, 1))
        for f in fs[1:]:
            tail = np.kron(tail, f)
        fs = [fs[0], tail]
    n = int(np.prod([f.shape[0] for f in fs]))
    steps: tuple[Step, ...] = ()
    if scale is not None:
        sc = np.asarray(scale, np.float64).reshape(-1)
        if sc.shape != (n,):
            raise RewriteError(f"insert_transform: scale has {sc.size} entries, not {n}")
        steps = (Step("mul", sc),)
    if len(fs) == 1:
        steps += (Step("matmul", fs[0]),)
    else:
        a, b = fs[0].shape[0], fs[1].shape[0]
        steps += (Step("split", arg=(a, b)), Step("matmul", fs[1]),
                  Step("lmatmul", np.ascontiguousarray(fs[0].T)), Step("merge", arg=(2,)))
    return Chain(steps, n, n, "online")


class ChainAdapter:
    """Adapter methods written once, for both IRs, on top of the adapter's own
    ``insert_chain(value, consumers, chain, role)``."""

    def insert_transform(self, value: str, consumers: Sequence[str], transform: Any) -> str:
        """``x -> (x * scale) @ kron(F0, F1, ..)`` (a :class:`~rotaq.rewriter.sites.Kronecker`) on
        the last axis for ``consumers`` only (:func:`transform_chain`, tagged as an online
        transform); returns the new value's name."""
        chain = transform_chain(transform.factors, transform.scale)
        return self.insert_chain(value, consumers, chain, role="online")  # type: ignore[attr-defined]
