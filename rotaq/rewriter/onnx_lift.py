"""Lifting of an ONNX graph (through onnx-ir) into the IR-neutral :class:`GraphView`: the
:class:`OnnxLift` mixin of :class:`~rotaq.rewriter.onnx.OnnxGraph` and its scope helpers.

Matching is structural (never by name):

- ``linear``: ``MatMul(x, W)`` with ``W`` a 2-D constant ``[in, out]`` or ``Transpose(perm=[1, 0])``
  of a constant ``[out, in]`` (torch's tied ``lm_head``), or ``Gemm(x, B[, C])`` with constant
  ``B``/``C``; plus an optional ``Add`` of a 1-D constant of length ``out`` that is the only
  consumer of the product (absorbed: the GNode's output is the Add's output).
- ``embedding``: ``Gather(E, ids, axis=0)`` with ``E`` a 2-D constant.
- ``layer_norm`` (LayerNormalization), ``rms_norm`` (RMSNormalization, SimplifiedLayerNormalization),
  ``sdpa`` (opset-23 Attention) and the primitive vocabulary of :mod:`rotaq.rewriter.sites`.

A float ``Cast`` of a constant counts as that constant (fp16/bf16 weights stored, fp32 computed).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import onnx_ir as oir

from rotaq import tags
from rotaq.errors import RewriteError
from rotaq.rewriter import onnx_chain, onnx_contrib
from rotaq.rewriter.sites import GNode, GraphView

_DEFAULT_DOMAINS = ("", "ai.onnx")
_PRIMITIVES = {
    "Add": "add",
    "Sub": "sub",
    "Mul": "mul",
    "Div": "div",
    "Pow": "pow",
    "Sqrt": "sqrt",
    "Reciprocal": "reciprocal",
    "Neg": "neg",
    "ReduceMean": "mean",
    "MatMul": "matmul",
    "Softmax": "softmax",
    "Transpose": "transpose",
    "Reshape": "reshape",
    "Cast": "cast",
    "Identity": "identity",
    "Dropout": "identity",
    "Slice": "slice",
    "Concat": "concat",
    "Expand": "expand",
}
_ROLE = tags.ROLE
_TRANSFORM_ROLE = onnx_chain.TRANSFORM_ROLE
_SCOPE_KEY = "pkg.torch.onnx.name_scopes"


@dataclass
class _Linear:
    node: oir.Node  # the MatMul / Gemm (its name is the view key)
    weight: oir.Value  # constant holding the weight as stored
    layout: str  # "io": stored [in, out]; "oi": stored [out, in]
    transpose: oir.Node | None  # Transpose(weight) feeding the MatMul, if any
    bias: oir.Value | None  # constant bias (Gemm C or the absorbed Add's operand)
    bias_add: oir.Node | None  # absorbed Add node
    in_features: int
    out_features: int
    alpha: float = 1.0
    beta: float = 1.0


_CONTROL_FLOW = ("If", "Loop", "Scan")
_PASS_THROUGH = ("Transpose", "Cast", "Identity", "Reshape", "DequantizeLinear")


def _constant_operand(v: oir.Value | None) -> bool:
    """A constant (initializer of this or an outer graph, Constant node) or one seen through
    Transpose / Cast / Identity / Reshape / DequantizeLinear."""
    if v is None:
        return False
    if v.const_value is not None:
        return True
    prod = v.producer()
    if prod is None:
        return False
    return prod.op_type == "Constant" or (prod.op_type in _PASS_THROUGH
                                          and _constant_operand(prod.inputs[0]))


def refuse_hidden_linears(graph: oir.Graph) -> None:
    """Raise :class:`RewriteError` when a control-flow subgraph (``If`` / ``Loop`` / ``Scan``
    bodies, at any depth) holds a linear (``MatMul`` / ``Gemm`` with a constant weight):
    rotaq sees only the main graph, so a recipe would leave those linears unchanged while
    reporting the model rewritten. Subgraphs without linears are fine."""
    for node in graph:
        if node.op_type not in _CONTROL_FLOW or not _is_default(node):
            continue
        for attr in node.attributes.values():
            if attr.type == oir.AttributeType.GRAPH:
                bodies = [attr.value]
            elif attr.type == oir.AttributeType.GRAPHS:
                bodies = list(attr.value)
            else:
                continue
            for body in bodies:
                for inner in oir.traversal.RecursiveGraphIterator(body):
                    ins = list(inner.inputs)
                    if inner.op_type in ("MatMul", "Gemm") and len(ins) > 1 and \
                            any(_constant_operand(v) for v in ins[:2]):
                        raise RewriteError(
                            f"{node.op_type} node {node.name!r} holds a linear in its "
                            f"'{attr.name}' subgraph ({inner.op_type} {inner.name!r} with a "
                            "constant weight): rotaq does not rewrite linears inside "
                            "If/Loop/Scan bodies, so it refuses this model rather than leave "
                            "them unchanged")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _is_default(node: oir.Node) -> bool:
    return node.domain in _DEFAULT_DOMAINS


def _attr(node: oir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    if a is None:
        return default
    v = a.value
    return list(v) if isinstance(v, (tuple, list)) else v


def _scope(node: oir.Node) -> str:
    """Module path from torch's ``name_scopes`` metadata: a repr'd list of cumulative qualified
    names, root first and the fx node name last, e.g. ``['', 'model', 'model.layers.0', ...,
    'model.layers.0.self_attn.q_proj', 'linear']``."""
    raw = node.metadata_props.get(_SCOPE_KEY)
    return _scope_of(raw) if raw else ""


def node_scopes(node: oir.Node) -> tuple[str, ...]:
    """The exporter's ``name_scopes`` of ``node`` as a tuple (empty when absent or unreadable)."""
    raw = node.metadata_props.get(_SCOPE_KEY)
    return _parse_scopes(raw) if raw else ()


@functools.lru_cache(maxsize=1 << 17)
def _parse_scopes(raw: str) -> tuple[str, ...]:
    # parsed once per string: the view is lifted again after each edit, and parsing every
    # node's scope each time cost seconds on a 30-layer decoder
    try:
        return tuple(str(p) for p in ast.literal_eval(raw))
    except (ValueError, SyntaxError):
        return ()


@functools.lru_cache(maxsize=1 << 17)
def _scope_of(raw: str) -> str:
    """:func:`_scope` of one metadata string."""
    parts = _parse_scopes(raw)
    mods = [p for p in parts[:-1] if p]  # drop the root '' and the node's own name
    if not mods:
        return ""
    cumulative = all(b.startswith(a + ".") for a, b in pairwise(mods))
    return mods[-1] if cumulative else ".".join(mods)


def _dims(value: oir.Value, const: oir.TensorProtocol | None) -> tuple[int, ...] | None:
    if value.shape is None:
        return None if const is None else tuple(int(d) for d in const.shape)
    return tuple(d if isinstance(d, int) else -1 for d in value.shape)



class OnnxLift:
    """The lifting half of :class:`~rotaq.rewriter.onnx.OnnxGraph`: the view, constants seen
    through float casts, and the structural matching of linears, norms and attention."""

    # ------------------------------------------------------------------ lifting
    def view(self) -> GraphView:
        if self._view is None:
            self._view = self._lift()
        return self._view

    def _const_cast(self, v: oir.Value | None) -> oir.Node | None:
        """The float ``Cast`` node producing ``v`` from a float constant, if any."""
        prod = v.producer() if v is not None else None
        if (prod is None or prod.op_type != "Cast" or not _is_default(prod) or not prod.inputs
                or prod.inputs[0] is None):
            return None
        to = _attr(prod, "to")
        if to is None or not oir.DataType(to).is_floating_point():
            return None
        src = self._const(prod.inputs[0])
        return prod if src is not None and src.dtype.is_floating_point() else None

    def _const(self, v: oir.Value | None) -> oir.TensorProtocol | None:
        """The tensor behind ``v`` as stored (an initializer, a Constant, or what a float Cast
        of one of those reads), or None."""
        if v is None or v.is_graph_input():
            return None
        if v.const_value is not None:
            return v.const_value
        cast = self._const_cast(v)
        if cast is not None:
            return self._const(cast.inputs[0])
        prod = v.producer()
        if prod is not None and prod.op_type == "Constant" and _is_default(prod):
            try:
                return oir.convenience.get_const_tensor(v)
            except ValueError:
                return None
        return None

    def _is_const(self, v: oir.Value | None) -> bool:
        return self._const(v) is not None

    def _weight2d(self, v: oir.Value | None) -> bool:
        t = self._const(v)
        return t is not None and len(t.shape) == 2 and t.dtype.is_floating_point()

    def _match_linear(self, node: oir.Node) -> _Linear | None:
        if not _is_default(node) or node.op_type not in ("MatMul", "Gemm"):
            return None
        ins = list(node.inputs)
        if len(ins) < 2 or ins[0] is None or self._is_const(ins[0]):
            return None
        w, transpose, alpha, beta, bias = ins[1], None, 1.0, 1.0, None
        if node.op_type == "MatMul":
            if self._weight2d(w):
                layout = "io"
            else:
                prod = w.producer() if w is not None else None
                if (
                    prod is None
                    or prod.op_type != "Transpose"
                    or not _is_default(prod)
                    or _attr(prod, "perm", [1, 0]) != [1, 0]
                    or not self._weight2d(prod.inputs[0])
                ):
                    return None
                transpose, w, layout = prod, prod.inputs[0], "oi"
        else:  # Gemm
            if _attr(node, "transA", 0) != 0 or not self._weight2d(w):
                return None
            layout = "oi" if _attr(node, "transB", 0) else "io"
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        shape = tuple(self._const(w).shape)
        n_in, n_out = (shape[0], shape[1]) if layout == "io" else (shape[1], shape[0])
        bias_add = None
        if len(ins) > 2 and ins[2] is not None:
            c = self._const(ins[2])
            if c is None or c.size not in (1, n_out) or len(c.shape) > 2:
                return None
            if len(c.shape) and c.shape[-1] not in (1, n_out):
                return None
            bias = ins[2]
        else:
            y = node.outputs[0]
            uses = list(y.uses())
            if len(uses) == 1 and not y.is_graph_output():
                user, idx = uses[0].node, uses[0].idx
                if user.op_type == "Add" and _is_default(user) and len(user.inputs) == 2:
                    other = user.inputs[1 - idx]
                    t = self._const(other)
                    if t is not None and tuple(t.shape) == (n_out,) and other is not y:
                        bias, bias_add = other, user
        return _Linear(node, w, layout, transpose, bias, bias_add, n_in, n_out, alpha, beta)

    def _shared(self, value: oir.Value, owners: Sequence[oir.Node]) -> bool:
        own = {id(n) for n in owners}
        if value.is_graph_output() or any(id(u.node) not in own for u in value.uses()):
            return True
        cast = self._const_cast(value)  # Cast(W): W read by another node too?
        return cast is not None and self._shared(cast.inputs[0], [cast])

    def _lift(self) -> GraphView:
        g = self.model.graph
        refuse_hidden_linears(g)
        nodes = list(g)
        values: dict[str, oir.Value] = {v.name: v for v in g.inputs}
        values.update({v.name: v for v in g.initializers.values()})
        for n in nodes:
            values.update({o.name: o for o in n.outputs if o.name})
        self._values = values
        self._nodes = {n.name: n for n in nodes}
        consts = {
            name for name, v in values.items() if self._is_const(v) and not v.is_graph_input()
        }

        linears: dict[str, _Linear] = {}
        absorbed: set[int] = set()
        for n in nodes:
            if tags.is_emitted(n.metadata_props):
                continue  # online transforms, quantized linears and chains we emitted
            lin = self._match_linear(n)
            if lin is not None:
                linears[n.name] = lin
                if lin.bias_add is not None:
                    absorbed.add(id(lin.bias_add))
        feeding: dict[int, list[str]] = {}
        for key, lin in linears.items():
            if lin.transpose is not None:
                feeding.setdefault(id(lin.transpose), []).append(key)
        for n in nodes:
            if id(n) in feeding:
                out = n.outputs[0]
                if not self._shared(out, [linears[k].node for k in feeding[id(n)]]):
                    absorbed.add(id(n))
        self._linears = linears

        gnodes = []
        for n in nodes:
            if id(n) in absorbed or (n.op_type == "Constant" and _is_default(n)):
                continue
            if self._const_cast(n.outputs[0]) is n:  # a stored weight cast up: a constant
                continue
            contrib = onnx_contrib.lift(self, n, _scope(n))
            gnodes.extend(contrib or [self._gnode(n, linears.get(n.name))])
        shapes = {name: _dims(v, self._const(v)) for name, v in values.items()}
        return GraphView(gnodes, consts, shapes, self.input_names, self.output_names)

    def _gnode(self, n: oir.Node, lin: _Linear | None) -> GNode:
        scope = _scope(n)
        ins = [v.name if v is not None else "" for v in n.inputs]
        outs = [o.name or "" for o in n.outputs]
        if lin is not None:
            if lin.transpose is None:
                shared = self._shared(lin.weight, [n])
            else:  # the stored tensor is read by the Transpose; its output by this MatMul
                shared = self._shared(lin.weight, [lin.transpose]) or self._shared(
                    lin.transpose.outputs[0], [n]
                )
            out = lin.bias_add.outputs[0].name if lin.bias_add is not None else outs[0]
            params = {
                "in_features": lin.in_features,
                "out_features": lin.out_features,
                "has_bias": lin.bias is not None,
                "weight_shared": shared,
            }
            return GNode(n.name, "linear", [ins[0]], [out], params, scope)
        t = n.op_type
        if n.metadata_props.get(_ROLE) in (tags.ROLE_QUANT, tags.ROLE_CHAIN):  # quantized linears, chains we emitted
            role = n.metadata_props[_ROLE]
            return GNode(n.name, role, ins, outs, {"target": t, "domain": n.domain}, scope)
        if not _is_default(n) and (t, n.domain) != (
            "SimplifiedLayerNormalization",
            "com.microsoft",
        ):
            return GNode(n.name, "other", ins, outs, {"target": t, "domain": n.domain}, scope)
        if n.metadata_props.get(_ROLE) == _TRANSFORM_ROLE:
            return GNode(n.name, "online", ins, outs, {"target": t}, scope)
        if t == "Gather" and self._weight2d(n.inputs[0]) and _attr(n, "axis", 0) in (0, -2):
            e = tuple(self._const(n.inputs[0]).shape)
            shared = self._shared(n.inputs[0], [n])
            params = {"num_embeddings": e[0], "dim": e[1], "weight_shared": shared}
            return GNode(n.name, "embedding", [ins[1]], outs, params, scope)
        if t in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"):
            norm = self._norm(n, ins, outs, scope)
            if norm is not None:
                return norm
        if t == "Attention" and len(ins) >= 3:
            return self._sdpa(n, ins, outs, scope)
        if t in _PRIMITIVES:
            return GNode(n.name, _PRIMITIVES[t], ins, outs, self._prim_params(n), scope)
        return GNode(n.name, "other", ins, outs, {"target": t}, scope)

    def _norm(self, n: oir.Node, ins: list[str], outs: list[str], scope: str) -> GNode | None:
        x = n.inputs[0]
        scale = n.inputs[1] if len(n.inputs) > 1 else None
        bias = n.inputs[2] if len(n.inputs) > 2 else None
        axis = _attr(n, "axis", -1)
        rank = len(x.shape) if x is not None and x.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return None
        if not self._is_const(scale) or (bias is not None and not self._is_const(bias)):
            return None
        dim = int(self._const(scale).shape[-1]) if len(self._const(scale).shape) else -1
        if dim in (-1, 1) and x is not None and x.shape is not None:
            last = x.shape[-1]
            dim = last if isinstance(last, int) else dim
        op = "layer_norm" if n.op_type == "LayerNormalization" else "rms_norm"
        inputs = [ins[0], ins[1], ins[2] if len(ins) > 2 else ""]
        eps = float(_attr(n, "epsilon", 1e-5))
        return GNode(n.name, op, inputs, outs[:1], {"dim": dim, "eps": eps}, scope)

    def _sdpa(self, n: oir.Node, ins: list[str], outs: list[str], scope: str) -> GNode:
        params: dict[str, Any] = {}
        for attr, key in (("q_num_heads", "num_heads"), ("kv_num_heads", "num_kv_heads")):
            if _attr(n, attr) is not None:
                params[key] = int(_attr(n, attr))
        for key, v in (("num_heads", n.inputs[0]), ("num_kv_heads", n.inputs[1])):
            shape = v.shape if v is not None else None
            # 4-D inputs are [batch, heads, seq, head_dim]
            if (
                key not in params
                and shape is not None
                and len(shape) == 4
                and isinstance(shape[1], int)
            ):
                params[key] = shape[1]
        params["is_causal"] = bool(_attr(n, "is_causal", 0))
        if _attr(n, "scale") is not None:
            params["scale"] = float(_attr(n, "scale"))
        inputs = (ins + ["", "", "", ""])[:4]
        return GNode(n.name, "sdpa", inputs, outs, params, scope)

    def _prim_params(self, n: oir.Node) -> dict[str, Any]:
        t = n.op_type
        if t == "Transpose":
            perm = _attr(n, "perm")
            x = n.inputs[0]
            if perm is None and x is not None and x.shape is not None:
                perm = list(range(len(x.shape)))[::-1]
            return {"perm": perm}
        if t == "ReduceMean":
            axes = _attr(n, "axes")
            if axes is None and len(n.inputs) > 1 and self._is_const(n.inputs[1]):
                axes = [int(a) for a in self._const(n.inputs[1]).numpy().reshape(-1)]
            return {"axes": axes, "keepdims": bool(_attr(n, "keepdims", 1))}
        if t in ("Softmax", "Concat"):
            return {"axis": _attr(n, "axis", -1)}
        if t == "Cast":
            return {"to": _attr(n, "to")}
        if t in ("Add", "Sub", "Mul", "Div", "Pow") and len(n.inputs) == 2:
            # as the FX adapter: ``scalar`` is the value of a one-element constant operand
            ts = [self._const(v) for v in n.inputs]
            ones = [x for x in ts if x is not None and x.size == 1]
            if len(ones) == 1 and None in ts:
                return {"scalar": float(ones[0].numpy().reshape(-1)[0])}
        return {}
