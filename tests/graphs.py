"""Tiny graphs for pass and matcher tests, on both IRs, and the helpers that check a rewrite.

- :func:`one_linear` and :func:`one_block` build the same small networks as a torch module
  (captured with rotaq's FX capture) and as an ONNX graph written op by op with onnx-ir's
  ``Tape``; ``one_block`` is a pre-norm decoder block (embedding, RMSNorm, attention with
  Q/K/V/O projections, RMSNorm, gated MLP, final RMSNorm, head);
- :func:`ops` / :func:`assert_ops`: the op structure of a graph (ONNX op types, or FX targets
  such as ``aten.linear``) against the expected one, written out as in TVM's Before/Expected
  tests;
- :func:`check_pass`: run a pass (or every pass of a recipe) on a copy, check ``modified``
  (False: the graph must come back unchanged, as onnx-ir's pass tests check), and compare the
  outputs with the original's within a bound.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch.nn import functional as F

import rotaq
from rotaq.model import Model
from rotaq.passes.base import PassResult, make_pass
from rotaq.recipe import Recipe
from rotaq.rewriter.onnx import OnnxGraph

D, HEADS, HD, INTER, VOCAB, BATCH, SEQ = 64, 4, 16, 128, 64, 2, 8
_FLOAT = ir.DataType.FLOAT


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _weights(seed: int, d_in: int, d_out: int, bias: bool) -> dict[str, np.ndarray]:
    r = _rng(seed)
    w = {"w": (r.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)}
    if bias:
        w["b"] = (0.1 * r.standard_normal(d_out)).astype(np.float32)
    return w


def _block_weights(seed: int, mid: bool) -> dict[str, np.ndarray]:
    """[out, in] weights of the block's linears, non-trivial norm scales and the embedding."""
    r = _rng(seed)
    shapes = {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "gate": (INTER, D),
              "up": (INTER, D), "down": (D, INTER), "head": (VOCAB, D)}
    if mid:
        shapes["mid"] = (INTER, INTER)
    w = {k: (r.standard_normal(s) / np.sqrt(s[1])).astype(np.float32) for k, s in shapes.items()}
    w["emb"] = r.standard_normal((VOCAB, D)).astype(np.float32)
    for k in ("n1", "n2", "nf"):
        w[k] = (0.5 + r.random(D)).astype(np.float32)
    return w


# ---- torch modules, captured with rotaq's FX capture ---------------------------------------
class _Linear(nn.Module):
    def __init__(self, w: dict[str, np.ndarray], computed: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.from_numpy(w["w"]))
        self.b = nn.Parameter(torch.from_numpy(w["b"])) if "b" in w else None
        self.computed = computed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.computed:  # the weight is computed in the graph: no linear to match
            return x @ (self.w * 2.0).t()
        return F.linear(x, self.w, self.b)


class _Rms(nn.Module):
    def __init__(self, g: np.ndarray) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.from_numpy(g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.g


class _Block(nn.Module):
    def __init__(self, w: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(torch.from_numpy(w["emb"]), freeze=False)
        self.n1, self.n2, self.nf = (_Rms(w[k]) for k in ("n1", "n2", "nf"))
        names = [k for k in ("q", "k", "v", "o", "gate", "up", "mid", "down", "head") if k in w]
        self.lin = nn.ModuleDict({k: nn.Linear(*w[k].shape[::-1], bias=False) for k in names})
        with torch.no_grad():
            for k in names:
                self.lin[k].weight.copy_(torch.from_numpy(w[k]))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        b, s, _ = x.shape
        h = self.n1(x)
        q, k, v = (self.lin[n](h).view(b, s, HEADS, HD).transpose(1, 2) for n in "qkv")
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.lin["o"](a.transpose(1, 2).reshape(b, s, D))
        h = self.n2(x)
        m = F.silu(self.lin["gate"](h)) * self.lin["up"](h)
        if "mid" in self.lin:  # a linear that is neither a reader nor a writer of the stream
            m = self.lin["mid"](m)
        x = x + self.lin["down"](m)
        return self.lin["head"](self.nf(x))


def _fx(module: nn.Module, feeds: dict[str, np.ndarray]) -> Model:
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    return rotaq.load(module.eval(), inputs, kv_cache=False)


# ---- ONNX graphs, written op by op ----------------------------------------------------------
class _Onnx:
    """An onnx-ir ``Tape`` with named constants and nodes (names appear in reasons)."""

    def __init__(self) -> None:
        self.tape = ir.tape.Tape()

    def const(self, name: str, a: Any) -> ir.Value:
        return self.tape.initializer(ir.tensor(np.asarray(a), name=name))

    def op(self, op: str, ins: list[ir.Value], name: str, **attrs: Any) -> ir.Value:
        return self.tape.op(op, ins, attrs or None, name=name)

    def rms(self, x: ir.Value, g: np.ndarray, name: str) -> ir.Value:
        """x * 1/sqrt(mean(x^2) + eps) * g, as exporters decompose RMSNorm."""
        sq = self.op("Pow", [x, self.const(f"{name}.two", np.float32(2))], f"{name}.pow")
        ms = self.op("ReduceMean", [sq, self.const(f"{name}.axes", np.array([-1]))],
                     f"{name}.mean", keepdims=1)
        eps = self.op("Add", [ms, self.const(f"{name}.eps", np.float32(1e-6))], f"{name}.eps")
        inv = self.op("Reciprocal", [self.op("Sqrt", [eps], f"{name}.sqrt")], f"{name}.inv")
        return self.op("Mul", [self.op("Mul", [x, inv], f"{name}.scale"),
                               self.const(f"{name}.g", g)], f"{name}.gain")

    def linear(self, x: ir.Value, w: np.ndarray, name: str) -> ir.Value:
        return self.op("MatMul", [x, self.const(f"{name}.w", w.T.copy())], name)

    def heads(self, x: ir.Value, name: str, perm: list[int]) -> ir.Value:
        split = self.op("Reshape", [x, self.const(f"{name}.shape", [BATCH, SEQ, HEADS, HD])],
                        f"{name}.split")
        return self.op("Transpose", [split], f"{name}.heads", perm=perm)

    def model(self, inputs: list[ir.Value], outputs: list[ir.Value]) -> OnnxGraph:
        g = ir.Graph(inputs, outputs, nodes=self.tape.nodes, initializers=self.tape.initializers,
                     opset_imports={"": 18}, name="tiny")
        return OnnxGraph.from_proto(ir.Model(g, ir_version=10))


def _input(name: str, shape: list[int], dtype: ir.DataType) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))


def _onnx_linear(w: dict[str, np.ndarray], computed: bool) -> OnnxGraph:
    b = _Onnx()
    x = _input("x", [BATCH, SEQ, w["w"].shape[1]], _FLOAT)
    if computed:
        wt = b.op("Mul", [b.const("lin.w", w["w"].T.copy()), b.const("two", np.float32(2))],
                  "lin.double")
        y = b.op("MatMul", [x, wt], "lin")
    else:
        y = b.linear(x, w["w"], "lin")
        if "b" in w:
            y = b.op("Add", [y, b.const("lin.b", w["b"])], "lin.bias")
    return b.model([x], [y])


def _onnx_block(w: dict[str, np.ndarray]) -> OnnxGraph:
    b = _Onnx()
    ids = _input("input_ids", [BATCH, SEQ], ir.DataType.INT64)
    x = b.op("Gather", [b.const("emb", w["emb"]), ids], "embed")
    h = b.rms(x, w["n1"], "n1")
    q = b.heads(b.linear(h, w["q"], "q"), "q", [0, 2, 1, 3])
    kt = b.heads(b.linear(h, w["k"], "k"), "k", [0, 2, 3, 1])  # K^T: [b, heads, hd, s]
    v = b.heads(b.linear(h, w["v"], "v"), "v", [0, 2, 1, 3])
    s = b.op("Mul", [b.op("MatMul", [q, kt], "qk"), b.const("scale", np.float32(HD ** -0.5))],
             "qk.scale")
    a = b.op("MatMul", [b.op("Softmax", [s], "softmax", axis=-1), v], "pv")
    a = b.op("Reshape", [b.op("Transpose", [a], "pv.tokens", perm=[0, 2, 1, 3]),
                         b.const("merge", [BATCH, SEQ, D])], "pv.merge")
    x = b.op("Add", [x, b.linear(a, w["o"], "o")], "add1")
    h = b.rms(x, w["n2"], "n2")
    gate = b.linear(h, w["gate"], "gate")
    m = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate], "silu.sig")], "silu"),
                     b.linear(h, w["up"], "up")], "glu")
    if "mid" in w:
        m = b.linear(m, w["mid"], "mid")
    x = b.op("Add", [x, b.linear(m, w["down"], "down")], "add2")
    logits = b.linear(b.rms(x, w["nf"], "nf"), w["head"], "head")
    return b.model([ids], [logits])


def one_linear(ir_name: str, d_in: int = 64, d_out: int = 32, bias: bool = True,
               computed: bool = False, seed: int = 0) -> Model:
    """``y = x W^T + b`` on x [2, 8, d_in]; ``computed``: ``y = x (2 W)^T``, the weight computed
    in the graph, so that no linear is matched. A fresh copy on each call."""
    return _one_linear(ir_name, d_in, d_out, bias, computed, seed).clone()


@functools.cache
def _one_linear(ir_name: str, d_in: int, d_out: int, bias: bool, computed: bool,
                seed: int) -> Model:
    w = _weights(seed, d_in, d_out, bias and not computed)
    feeds = {"x": _rng(seed + 1).standard_normal((BATCH, SEQ, d_in)).astype(np.float32)}
    if ir_name == "fx":
        return _fx(_Linear(w, computed), feeds)
    return Model(_onnx_linear(w, computed), feeds, {"name": "one-linear"})


def one_block(ir_name: str, mid: bool = False, seed: int = 0) -> Model:
    """One pre-norm decoder block (see the module docstring); ``mid`` puts one more linear
    between the gated activation and the down projection, a linear that no block claims. A
    fresh copy on each call (each graph is captured once per test session)."""
    return _one_block(ir_name, mid, seed).clone()


@functools.cache
def _one_block(ir_name: str, mid: bool, seed: int) -> Model:
    w = _block_weights(seed, mid)
    feeds = {"input_ids": _rng(seed + 1).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int64)}
    if ir_name == "fx":
        return _fx(_Block(w), feeds)
    return Model(_onnx_block(w), feeds, {"name": "one-block"})


# ---- structure -----------------------------------------------------------------------------
def ops(model: Model) -> list[str]:
    """The graph's ops in order: ONNX op types (``com.microsoft.`` prefixed for contrib ops,
    Constant nodes left out), or FX call targets without their overload (``aten.linear``)."""
    g = model.graph
    if g.ir == "onnx":
        return [(f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type
                for n in g.model.graph if n.op_type != "Constant"]
    out = []
    for n in g.gm.graph.nodes:
        if n.op == "call_function":
            name = str(n.target)
            out.append(name.rsplit(".", 1)[0] if name.endswith(".default") else name)
    return out


def assert_ops(after: Model, expected: list[str] | dict[str, int]) -> None:
    """The op structure equals ``expected``: a list is the whole op sequence; a dict the exact
    count of each op it names."""
    got = ops(after)
    if isinstance(expected, dict):
        counts = Counter(got)
        assert {k: counts.get(k, 0) for k in expected} == expected, got
    else:
        assert got == list(expected), f"\nexpected {expected}\ngot      {got}"


# ---- running a pass --------------------------------------------------------------------------
def _passes(pass_or_recipe: Any) -> list:
    if isinstance(pass_or_recipe, Recipe):
        return pass_or_recipe.build()
    if isinstance(pass_or_recipe, str):
        return Recipe.load(pass_or_recipe).build()
    if isinstance(pass_or_recipe, tuple):  # (pass name, options)
        return [make_pass(*pass_or_recipe)]
    return [pass_or_recipe]


def rel_error(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """max |out - ref| / max |ref| over the outputs, in float64."""
    errs = [np.abs(np.asarray(o, np.float64) - np.asarray(r, np.float64)).max()
            / max(np.abs(np.asarray(r, np.float64)).max(), 1e-30) for r, o in zip(ref, out)]
    return float(max(errs))


def check_pass(pass_or_recipe: Any, model: Model, *, modified: bool = True,
               max_rel_error: float = 1e-5) -> tuple[PassResult, float]:
    """Run the pass (a pass object, ``(name, options)``, a recipe name or :class:`Recipe`) on a
    copy of ``model``; returns the last result and the max relative output error against the
    original on its sample inputs. ``modified=False``: nothing to do, so the result must say
    so and the graph's ops and outputs must be those of the original, bit for bit."""
    ref = model.run()
    before = ops(model)
    work = model.clone()
    results = []
    for p in _passes(pass_or_recipe):
        results.append(p(work))
        work = results[-1].model
    res = results[-1]
    assert any(r.modified for r in results) is modified, [r.stats for r in results]
    out = work.run()
    err = rel_error(ref, out)
    if not modified:
        assert ops(work) == before
        assert err == 0.0, err
    assert err <= max_rel_error, f"max relative error {err:.3g} > {max_rel_error:.3g}"
    return PassResult(work, any(r.modified for r in results), res.stats), err
