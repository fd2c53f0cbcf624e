"""ONNX adapter: lifts an ONNX model (through onnx-ir) into a :class:`GraphView` and edits it.

Matching is structural (never by name):

- ``linear``: ``MatMul(x, W)`` with ``W`` a 2-D constant ``[in, out]`` or ``Transpose(perm=[1, 0])``
  of a constant ``[out, in]`` (torch's tied ``lm_head``), or ``Gemm(x, B[, C])`` with constant
  ``B``/``C``; plus an optional ``Add`` of a 1-D constant of length ``out`` that is the only
  consumer of the product (absorbed: the GNode's output is the Add's output).
- ``embedding``: ``Gather(E, ids, axis=0)`` with ``E`` a 2-D constant.
- ``layer_norm`` (LayerNormalization), ``rms_norm`` (RMSNormalization, SimplifiedLayerNormalization),
  ``sdpa`` (opset-23 Attention) and the primitive vocabulary of :mod:`rotaq.rewriter.sites`.

Every setter writes a fresh initializer in the original dtype, so a tensor read by another node
(tied embeddings, initializers merged by the exporter) is never changed behind its back. External
data stays on disk and large new tensors are spilled there (:mod:`rotaq.rewriter.onnx_store`).

Real-world files: a graph without intermediate ``value_info`` gets onnx's shape inference (with
data propagation, through onnx-ir so > 2 GB models work) on load, in memory. A float ``Cast`` of a
constant counts as that constant (fp16/bf16 weights stored, fp32 computed): reads see through it,
writes keep the storage dtype behind a fresh ``Cast``. A graph ORT cannot run in its own dtype
(bf16: no CPU MatMul) runs as an fp32 copy (:mod:`rotaq.rewriter.onnx_dtype`). A node ORT does
not know (a custom domain) is refused with a :class:`RotaqError` when the graph must run; with
``--no-verify`` nothing runs and the rewrite treats the node as opaque.
"""

from __future__ import annotations

import ast
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import onnx
import onnx_ir as oir

from rotaq.errors import LoadError, RewriteError
from rotaq.rewriter import onnx_chain, onnx_contrib, onnx_quant, onnx_store
from rotaq.rewriter.chain import ChainAdapter
from rotaq.rewriter.onnx_run import not_implemented, ort_session
from rotaq.rewriter.sites import GNode, GraphView

logger = logging.getLogger(__name__)

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
_EXTERNAL_DATA_BYTES = 100 * 2**20  # save weights to a side file above this size
_ROLE = "rotaq.role"
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


def _static_dim(d: Any) -> int | None:
    """A dim's size: torch's exporter writes some static sizes as numeric symbols ("16")."""
    if isinstance(d, int):
        return d
    text = str(getattr(d, "value", d) or "")
    return int(text) if text.isdigit() else None


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


def fresh_name(taken: set[str], hint: str) -> str:
    """``hint``, or ``hint_1``, ``hint_2``, ... : the first not in ``taken`` (then added to it)."""
    name, k = hint, 0
    while name in taken:
        k += 1
        name = f"{hint}_{k}"
    taken.add(name)
    return name


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


class OnnxGraph(ChainAdapter):
    """An ONNX model held in memory, seen through the IR-neutral :class:`GraphView`."""

    ir = "onnx"

    def __init__(self, model: oir.Model, source: str | None = None) -> None:
        self.model = model
        self.source = source
        self.metadata: dict[str, str] = dict(model.metadata_props)
        self._upcast = False  # True once ORT could not run the graph in its fp16/bf16 dtype
        self._store = onnx_store.SpillStore()  # large new tensors go to disk
        self._prepare()
        self._infer_shapes()
        self._invalidate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | os.PathLike) -> OnnxGraph:
        """Read ``path``; external data stays on disk, read one tensor at a time when needed
        (:mod:`rotaq.rewriter.onnx_store`); the file is never written."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise LoadError(f"cannot load {path}: no such file")
        model = onnx_store.load_lazy(path)
        cls._validate(model, path)
        return cls(model, source=path)

    @classmethod
    def from_proto(cls, model: onnx.ModelProto | oir.Model, source: str | None = None) -> OnnxGraph:
        """Wrap an in-memory model. An ``onnx_ir.Model`` is taken over, not copied."""
        label = source or "<in-memory model>"
        try:
            if isinstance(model, onnx.ModelProto):
                if not model.HasField("graph") or not model.graph.node:
                    raise ValueError("the model has no graph")
                model = oir.serde.deserialize_model(model)
            model = oir.external_data.load_to_model(model)
        except Exception as err:
            raise LoadError(f"cannot load {label}: {_first_line(err)}") from err
        cls._validate(model, label)
        return cls(model, source=source)

    @staticmethod
    def _validate(model: oir.Model, label: str) -> None:
        g = model.graph
        if g.num_nodes() == 0:
            raise LoadError(f"cannot load {label}: the graph has no nodes")
        for v in g.initializers.values():
            if onnx_store.is_on_disk(v.const_value):
                continue  # sizes checked on load; read when used
            try:
                v.const_value.numpy()
            except Exception as err:
                raise LoadError(
                    f"cannot load {label}: initializer {v.name!r} is unreadable "
                    f"(truncated data?): {_first_line(err)}"
                ) from err
        seen: set[int] = set()
        needs_sort = False
        for node in g:
            for v in node.inputs:
                if v is None or v.is_graph_input() or v.is_initializer():
                    continue
                prod = v.producer()
                if prod is None:
                    raise LoadError(
                        f"cannot load {label}: value {v.name!r} read by {node.op_type} node "
                        f"{node.name!r} "
                        "is never defined (truncated or corrupt model)"
                    )
                needs_sort |= id(prod) not in seen and prod.graph is g
            seen.add(id(node))
        for v in g.outputs:
            if v.producer() is None and not (v.is_graph_input() or v.is_initializer()):
                raise LoadError(f"cannot load {label}: graph output {v.name!r} is never defined")
        if needs_sort:
            g.sort()

    def _prepare(self) -> None:
        """Give every node and value a unique name (deterministic), once. Initializers listed as
        graph inputs (IR < 4 style, overridable defaults) become plain constants."""
        g = self.model.graph
        for v in [v for v in g.inputs if v.is_initializer()]:
            g.inputs.remove(v)
        nodes = list(g)
        values = [*g.inputs, *g.initializers.values(), *(o for n in nodes for o in n.outputs)]
        taken = {n.name for n in nodes if n.name} | {v.name for v in values if v.name}
        self._taken = taken
        seen: set[str] = set()
        for i, n in enumerate(nodes):
            if not n.name or n.name in seen:
                n.name = self._fresh(f"{n.op_type}_{i}")
            seen.add(n.name)
        for i, v in enumerate(values):
            if not v.name:
                v.name = self._fresh(f"rotaq_v{i}")
        onnx_contrib.prepare(self)

    def _infer_shapes(self) -> None:
        """Shape inference (data propagation, symbolic dims kept) when a node output has no
        type or shape, e.g. a file written without ``value_info``; the model is edited in
        memory, never its file. Large initializers are left out of the call by onnx-ir."""
        from onnx_ir.passes.common import ShapeInferencePass

        def missing() -> int:
            return sum(o.shape is None or o.dtype is None for n in self.model.graph
                       for o in n.outputs if n.op_type != "Constant")

        before = missing()
        if not before:
            return
        ShapeInferencePass(strict_mode=False, data_prop=True)(self.model)
        logger.info("shape inference: %d of the values without a shape now have one",
                    before - missing())

    def _fresh(self, hint: str) -> str:
        return fresh_name(self._taken, hint)

    def _invalidate(self) -> None:
        # op kinds of untouched nodes survive an edit: set_const checks them without a re-lift
        self._kinds: dict[str, str] = {n.key: n.op for n in self._view.nodes} if getattr(
            self, "_view", None) is not None else getattr(self, "_kinds", {})
        self._view: GraphView | None = None
        self._values: dict[str, oir.Value] = {}
        self._nodes: dict[str, oir.Node] = {}
        self._linears: dict[str, _Linear] = {}
        self._sessions: dict[tuple[str, ...], Any] = {}

    # ------------------------------------------------------------------ properties
    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.model.graph.inputs if not v.is_initializer()]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.model.graph.outputs]

    # emission: one chain emitter (onnx_chain) and the ORT quantized lowerings (onnx_quant)
    quantize_linear = onnx_quant.quantize_linear
    insert_fake_quant = onnx_quant.insert_fake_quant
    replace_linear = onnx_chain.replace_linear
    add_branch = onnx_chain.add_branch
    insert_chain = onnx_chain.insert_chain

    def input_specs(self) -> dict[str, tuple[Any, list[int | str | None]]]:
        """Graph input name -> (numpy dtype, dims; symbolic dims as str/None)."""
        specs = {}
        for v in self.model.graph.inputs:
            if v.is_initializer():
                continue
            dtype = v.dtype.numpy() if v.dtype is not None else np.float32
            dims = [_static_dim(d) for d in (v.shape or [])]
            specs[v.name] = (np.dtype(dtype), dims)
        return specs

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
            if n.metadata_props.get(_ROLE) in (_TRANSFORM_ROLE, "quant", "chain"):
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
        if n.metadata_props.get(_ROLE) in ("quant", "chain"):  # quantized linears, chains we emitted
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

    # ------------------------------------------------------------------ lookups
    def _value(self, name: str) -> oir.Value:
        if self._view is None and getattr(self, "_kinds", None):
            # after an edit: a cheap scan of the graph's values, not a re-lift (a rotation
            # inserts one transform per block: a lift each would cost O(blocks x graph))
            if not self._values:
                g = self.model.graph
                self._values = {v.name: v for v in g.inputs}
                self._values.update({v.name: v for v in g.initializers.values()})
                self._values.update({o.name: o for n in g for o in n.outputs if o.name})
            v = self._values.get(name)
            if v is not None:
                return v
        self.view()
        v = self._values.get(name)
        if v is None:
            raise RewriteError(f"no value named {name!r} in the ONNX graph")
        return v

    def _node(self, key: str) -> oir.Node:
        n = self._nodes.get(key)
        if n is None and self._view is None and getattr(self, "_kinds", None):
            # after an edit: a cheap scan of the graph (names were fixed at the first lift)
            self._nodes = {m.name: m for m in self.model.graph}
            n = self._nodes.get(key)
        if n is None:
            self.view()
            n = self._nodes.get(key)
        if n is None:
            raise RewriteError(f"no node named {key!r} in the ONNX graph")
        return n

    def _linear(self, key: str) -> _Linear:
        lin = self._linears.get(key)
        if lin is None and self._view is None and self._kinds.get(key) == "linear":
            lin = self._match_linear(self._node(key))  # re-match this node only
            if lin is not None:
                self._linears[key] = lin
        if lin is None:
            self.view()
            lin = self._linears.get(key)
        if lin is None:
            onnx_contrib.refuse_quantized(self, key)
            raise RewriteError(f"node {key!r} is not a linear")
        return lin

    def _array(self, v: oir.Value) -> np.ndarray:
        t = self._const(v)
        if t is None:
            raise RewriteError(f"value {v.name!r} is not a constant")
        arr = t.numpy()
        return arr.astype(np.float64) if t.dtype.is_floating_point() else np.array(arr)

    def get_const(self, value: str) -> np.ndarray:
        return self._array(self._value(value))

    # ------------------------------------------------------------------ edits
    def _initializer(self, array: np.ndarray, dtype: oir.DataType, hint: str) -> oir.Value:
        name = self._fresh(hint)
        t = self._store.tensor(array, dtype, name)
        v = oir.Value(
            name=name, shape=oir.Shape(list(t.shape)), type=oir.TensorType(dtype), const_value=t
        )
        self.model.graph.register_initializer(v)
        return v

    def _like(self, ref: oir.Value, array: np.ndarray, hint: str) -> oir.Value:
        """A fresh constant holding ``array`` stored as ``ref`` is: in its dtype, or, when
        ``ref`` is ``Cast(W)``, in ``W``'s dtype behind a fresh Cast of the same target."""
        cast = self._const_cast(ref)
        if cast is None:
            return self._initializer(array, self._const(ref).dtype, hint)
        src = self._like(cast.inputs[0], array, hint)
        to = oir.DataType(_attr(cast, "to"))
        out = oir.Value(name=self._fresh(f"{hint}_cast"), shape=oir.Shape(list(np.shape(array))),
                        type=oir.TensorType(to))
        node = oir.Node("", "Cast", [src], [oir.AttrInt64("to", int(to))], outputs=[out],
                        name=self._fresh(f"{hint}_cast"), metadata_props=dict(cast.metadata_props))
        self.model.graph.insert_before(next(iter(self.model.graph)), node)
        return out

    def _hint(self, node: oir.Node, suffix: str) -> str:
        scope = _scope(node)
        return f"{scope}.{suffix}" if scope else f"{node.name}.{suffix}"

    def _drop_if_unused(self, v: oir.Value | None) -> None:
        """Remove an orphaned initializer, or an orphaned Transpose/Constant and what it read."""
        g = self.model.graph
        if v is None or v.is_graph_output() or v.is_graph_input() or list(v.uses()):
            return
        if v.is_initializer():
            g.initializers.pop(v.name, None)
            return
        prod = v.producer()
        if prod is None or prod.graph is not g or prod.op_type not in (
                "Transpose", "Constant", "Cast"):
            return
        if any(list(o.uses()) or o.is_graph_output() for o in prod.outputs):
            return
        inputs = list(prod.inputs)
        g.remove(prod, safe=True)
        for i in inputs:
            self._drop_if_unused(i)

    def set_const(self, node: str, index: int, array: np.ndarray) -> None:
        """Input ``index`` of ``node`` <- a fresh constant holding ``array`` (original dtype)."""
        op = self._kinds.get(node) if self._view is None else None
        if op is None:
            g = self.view().by_key.get(node)
            op = g.op if g is not None else None
        n = self._node(node)
        if op is None or op in ("linear", "embedding"):
            raise RewriteError(f"set_const: use set_linear/set_embedding for node {node!r}")
        if op == "rms_norm" and index == 2:
            raise RewriteError(f"set_const: RMS norm {node!r} has no bias input")
        index = onnx_contrib.node_input_index(n, index)  # skip norms: view input 1 = node 2
        n_inputs = 3 if op in ("layer_norm", "rms_norm") else len(n.inputs)
        if index < 0 or index >= max(n_inputs, len(n.inputs)):
            raise RewriteError(f"set_const: node {node!r} has no input {index}")
        old = n.inputs[index] if index < len(n.inputs) else None
        if old is not None and not self._is_const(old):
            raise RewriteError(f"set_const: input {index} of {node!r} is not a constant")
        ref = old or next((v for v in n.inputs[1:] if v is not None and v.dtype), n.inputs[0])
        if ref is None or ref.dtype is None:
            raise RewriteError(f"set_const: dtype of input {index} of {node!r} is unknown")
        hint = self._hint(n, f"in{index}")
        new = (self._like(old, np.asarray(array), hint) if old is not None
               else self._initializer(np.asarray(array), ref.dtype, hint))
        if index >= len(n.inputs):
            n.resize_inputs(index + 1)
        n.replace_input_with(index, new)
        self._drop_if_unused(old)
        self._invalidate()

    def get_linear(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        lin = self._linear(key)
        t = self._const(lin.weight)
        if t is not None and len(t.shape) == 2 and t.dtype.is_floating_point():
            # one float64 copy, read in chunks from disk (no full-size temporaries)
            w = onnx_store.as_float64(t, transpose=lin.layout == "io")
        else:
            w = self._array(lin.weight)
            w = w.T if lin.layout == "io" else w
        if lin.alpha != 1.0:
            w = w * lin.alpha
        if lin.bias is None:
            return w, None
        b = self._array(lin.bias).reshape(-1)
        b = np.broadcast_to(b, (lin.out_features,)) * (lin.beta if lin.bias_add is None else 1.0)
        return np.ascontiguousarray(w), np.array(b)

    def set_linear(self, key: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """Linear(x) -> x W^T + b with fresh constants; the output value keeps its name."""
        lin = self._linear(key)
        n, g = lin.node, self.model.graph
        weight = np.asarray(weight, dtype=np.float64)
        if weight.shape != (lin.out_features, lin.in_features):
            raise RewriteError(
                f"set_linear {key!r}: weight shape {weight.shape} != "
                f"{(lin.out_features, lin.in_features)}"
            )
        if bias is not None:
            bias = np.asarray(bias, dtype=np.float64).reshape(-1)
            if bias.shape != (lin.out_features,):
                raise RewriteError(f"set_linear {key!r}: bias shape {bias.shape} is wrong")
        old_w = n.inputs[1]
        if n.op_type == "Gemm":
            new_w = self._like(lin.weight, weight, self._hint(n, "weight"))
            n.attributes["transB"] = oir.AttrInt64("transB", 1)
            n.attributes["alpha"] = oir.AttrFloat32("alpha", 1.0)
        else:
            new_w = self._like(lin.weight, weight.T, self._hint(n, "weight"))
        n.replace_input_with(1, new_w)
        self._drop_if_unused(old_w)
        if n.op_type == "Gemm" and lin.bias_add is None:
            old_c = n.inputs[2] if len(n.inputs) > 2 else None
            if bias is None:
                n.resize_inputs(2)
            else:
                ref = old_c if old_c is not None else lin.weight
                new_c = self._like(ref, bias, self._hint(n, "bias"))
                if len(n.inputs) < 3:
                    n.resize_inputs(3)
                n.replace_input_with(2, new_c)
                n.attributes["beta"] = oir.AttrFloat32("beta", 1.0)
            self._drop_if_unused(old_c)
        elif lin.bias_add is not None:
            add = lin.bias_add
            idx = 0 if add.inputs[0] is lin.bias else 1
            if bias is None:
                y, z = n.outputs[0], add.outputs[0]
                name = z.name
                z.replace_all_uses_with(y, replace_graph_outputs=True)
                g.remove(add, safe=True)
                z.name, y.name = self._fresh(f"{name}_removed"), name
            else:
                new_b = self._like(lin.bias, bias, self._hint(n, "bias"))
                add.replace_input_with(idx, new_b)
            self._drop_if_unused(lin.bias)
        elif bias is not None:
            self._append_bias(n, self._like(lin.weight, bias, self._hint(n, "bias")))
        self._invalidate()

    def _append_bias(self, n: oir.Node, b: oir.Value) -> None:
        """y = MatMul(...) -> y = Add(MatMul(...), b), keeping the name y for consumers."""
        g = self.model.graph
        y = n.outputs[0]
        name = y.name
        uses = [(u.node, u.idx) for u in y.uses()]
        shape = y.shape.copy() if y.shape is not None else None
        z = oir.Value(name=self._fresh(f"{name}_biased"), shape=shape, type=y.type)
        add = oir.Node(
            "",
            "Add",
            [y, b],
            outputs=[z],
            name=self._fresh(f"{n.name}_bias"),
            metadata_props=dict(n.metadata_props),
        )
        g.insert_after(n, add)
        for user, idx in uses:
            user.replace_input_with(idx, z)
        for i, o in enumerate(g.outputs):
            if o is y:
                g.outputs[i] = z
        y.name = self._fresh(f"{name}_nobias")
        z.name = name

    def get_embedding(self, key: str) -> np.ndarray:
        v = self._embedding(key).inputs[0]
        t = self._const(v)
        if t is not None and len(t.shape) == 2 and t.dtype.is_floating_point():
            return onnx_store.as_float64(t)  # one float64 copy, read in chunks
        return self._array(v)

    def _embedding(self, key: str) -> oir.Node:
        g = self.view().by_key.get(key)
        if g is None or g.op != "embedding":
            raise RewriteError(f"node {key!r} is not an embedding")
        onnx_contrib.refuse_quantized(self, key)
        return self._node(key)

    def set_embedding(self, key: str, table: np.ndarray) -> None:
        n = self._embedding(key)
        old = n.inputs[0]
        table = np.asarray(table, dtype=np.float64)
        if table.shape != tuple(self._const(old).shape):
            raise RewriteError(f"set_embedding {key!r}: table shape {table.shape} is wrong")
        n.replace_input_with(0, self._like(old, table, self._hint(n, "weight")))
        self._drop_if_unused(old)
        self._invalidate()

    # ------------------------------------------------------------------ execution
    def _session(self, extra: tuple[str, ...] = (), only: bool = False):
        """A session computing the graph outputs plus ``extra`` values; with ``only``, just the
        ``extra`` values (ORT then drops the nodes past them, e.g. the head, when capturing)."""
        if (extra, only) in self._sessions:
            return self._sessions[(extra, only)]
        from rotaq.rewriter import onnx_dtype

        g = self.model.graph
        added = [self._value(name) for name in extra]
        kept = list(g.outputs)
        if only:
            g.outputs.clear()
        n_out = len(g.outputs)
        g.outputs.extend(added)
        try:
            if self._upcast:
                sess = ort_session(onnx_dtype.convert_float(self.model))
            else:
                try:
                    sess = ort_session(self.model)
                except Exception as err:
                    if not not_implemented(err) or not onnx_dtype.has_low(self.model):
                        raise
                    logger.info("ORT has no kernel for this graph in its own dtype (%s): "
                                "running an fp32 copy (weights upcast exactly)", _first_line(err))
                    self._upcast = True
                    sess = ort_session(onnx_dtype.convert_float(self.model))
        finally:
            while len(g.outputs) > n_out:
                g.outputs.pop()
            if only:
                g.outputs.extend(kept)
        self._sessions = {k: s for k, s in self._sessions.items() if k == ((), False)}
        self._sessions[(extra, only)] = sess
        return sess

    def free_sessions(self) -> None:
        """Drop the ORT sessions (their copy of the weights) until the next run."""
        self._sessions = {}
        onnx_store.trim()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model with ONNX Runtime (CPU) and return the graph outputs in order (fp32
        outputs for a graph that runs as its fp32 copy, see :meth:`runs_upcast`)."""
        self._upcast_for(feeds)
        sess = self._session()
        return sess.run(self.output_names, self._feeds(feeds))

    def _upcast_for(self, feeds: dict[str, np.ndarray]) -> None:
        """ORT takes no bfloat16 arrays as inputs: a graph fed bf16 runs as its fp32 copy."""
        if not self._upcast and any(np.asarray(a).dtype.name == "bfloat16"
                                    for a in feeds.values()):
            logger.info("bfloat16 inputs: running an fp32 copy of the graph")
            self._upcast = True
            self._sessions = {}

    def runs_upcast(self, feeds: dict[str, np.ndarray] | None = None) -> bool:
        """Whether ORT runs this graph as an fp32 copy (it has no kernel in the graph's dtype)."""
        self._session()
        return self._upcast

    def _feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._upcast:
            return feeds
        from rotaq.rewriter.onnx_dtype import LOW

        low = {v.name for v in self.model.graph.inputs if v.dtype in LOW}
        return {k: np.asarray(a, np.float32) if k in low else a for k, a in feeds.items()}

    def check_unverified(self) -> None:
        """Before a rewrite that will not be run: refuse a node ORT cannot run (custom domain)
        that lies between two matched sites (linear, embedding, norm), where a rewrite would
        change what it reads; one before or after every site sees the original values."""
        from rotaq.rewriter.onnx_run import check_unverified

        check_unverified(self)

    def rounding_noise(self, feeds: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """The fp16/bf16 rounding noise of this graph (see :mod:`rotaq.rewriter.onnx_dtype`);
        None for an fp32 graph."""
        from rotaq.rewriter.onnx_dtype import rounding_noise

        return rounding_noise(self, feeds)

    def capture(self, feeds: dict[str, np.ndarray], values: Sequence[str]) -> dict[str, np.ndarray]:
        """Values by name: graph inputs from ``feeds``, constants as stored, others computed."""
        result: dict[str, np.ndarray] = {}
        computed: list[str] = []
        for name in dict.fromkeys(values):
            v = self._value(name)
            if name in feeds:
                result[name] = np.asarray(feeds[name])
            elif self._is_const(v):
                arr = self._const(v).numpy()
                result[name] = arr.astype(v.dtype.numpy()) if v.dtype is not None else arr.copy()
            else:
                computed.append(name)
        if not computed:
            return result
        self._upcast_for(feeds)
        outs = self._session(tuple(computed), only=True).run(computed, self._feeds(feeds))
        got = dict(zip(computed, outs))
        for name in values:
            result.setdefault(name, got.get(name))
        return result

    # ------------------------------------------------------------------ copies and files
    def clone(self) -> OnnxGraph:
        """An independent copy (tensors are shared but never mutated: setters write new ones)."""
        other = OnnxGraph(self.model.clone(), source=self.source)
        other.metadata = dict(self.metadata)
        other._upcast = self._upcast
        return other

    def _remove_unused_initializers(self) -> None:
        g = self.model.graph
        for name, v in list(g.initializers.items()):
            if not list(v.uses()) and not v.is_graph_output() and not v.is_graph_input():
                g.initializers.pop(name)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (plus ``<name>.data`` when the weights exceed ~100 MB) atomically:
        files go to a temporary folder next to the destination, then os.replace each."""
        path = os.path.abspath(os.fspath(path))
        folder, base = os.path.split(path)
        self._remove_unused_initializers()
        self._invalidate()
        self.model.metadata_props.clear()
        self.model.metadata_props.update({str(k): str(v) for k, v in self.metadata.items()})
        size = sum(v.const_value.nbytes for v in self.model.graph.initializers.values())
        data_name = base + ".data"
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".rotaq-save-", dir=folder)
        try:
            tmp_path = os.path.join(tmp, base)
            if size > _EXTERNAL_DATA_BYTES:
                oir.save(self.model, tmp_path, external_data=data_name, size_threshold_bytes=1024)
                os.replace(os.path.join(tmp, data_name), os.path.join(folder, data_name))
            else:
                oir.save(self.model, tmp_path)
            os.replace(tmp_path, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("saved %s (%.1f MB of weights)", path, size / 2**20)
