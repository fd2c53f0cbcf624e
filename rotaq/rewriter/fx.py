"""torch.export / FX adapter.

A model is captured with ``torch.export`` (non-strict) and edited as the unlifted
``GraphModule`` that ``ExportedProgram.module()`` returns: weights are ``get_attr`` nodes, so a
new weight is one new attribute plus one ``get_attr`` node. Saving re-exports the edited module.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from rotaq.errors import LoadError, RewriteError
from rotaq.files import atomic_file
from rotaq.rewriter import fx_chain, fx_quant
from rotaq.rewriter.chain import ChainAdapter
from rotaq.rewriter.kv_capture import contract_name, fx_name, is_past
from rotaq.rewriter.kv_capture import dynamic_shapes as kv_dynamic_shapes
from rotaq.rewriter.sites import GNode, GraphView

log = logging.getLogger(__name__)
aten = torch.ops.aten

_ELEMENTWISE = {
    aten.add.Tensor: "add", aten.add_.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul",
    aten.div.Tensor: "div", aten.pow.Tensor_Scalar: "pow", aten.sqrt.default: "sqrt",
    aten.rsqrt.default: "rsqrt", aten.reciprocal.default: "reciprocal", aten.neg.default: "neg",
    aten.mean.dim: "mean", aten.softmax.int: "softmax", aten._softmax.default: "softmax",
    aten.matmul.default: "matmul", aten.bmm.default: "matmul", aten.mm.default: "matmul",
    aten.transpose.int: "transpose", aten.permute.default: "transpose", aten.t.default: "transpose",
    aten.view.default: "reshape", aten.reshape.default: "reshape", aten._unsafe_view.default: "reshape",
    aten.unsqueeze.default: "reshape", aten.squeeze.dim: "reshape", aten.flatten.using_ints: "reshape",
    aten.unflatten.int: "reshape",
    aten.to.dtype: "cast", aten.to.dtype_layout: "cast", aten._to_copy.default: "cast",
    aten.type_as.default: "cast",
    aten.clone.default: "identity", aten.alias.default: "identity", aten.contiguous.default: "identity",
    aten.dropout.default: "identity", aten.detach.default: "identity",
    aten.slice.Tensor: "slice", aten.select.int: "slice", aten.cat.default: "concat",
    aten.expand.default: "expand",
    aten.scaled_dot_product_attention.default: "sdpa",
}
_LINEAR_TARGETS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default)


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(int(d) if isinstance(d, int) else -1 for d in val.shape)


def _scope(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return str(list(stack.values())[-1][0])


def _attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _to_numpy(t: Any) -> np.ndarray:
    from rotaq.dtypes import tensor_to_numpy

    return tensor_to_numpy(t)  # bf16 kept, as ml_dtypes.bfloat16


def _from_numpy(a: Any) -> torch.Tensor:
    from rotaq.dtypes import tensor_from_numpy

    return tensor_from_numpy(a)  # ml_dtypes.bfloat16 included


class FxGraph(ChainAdapter):
    """GraphAdapter over an unlifted torch.export GraphModule."""

    ir = "fx"

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: dict[str, torch.Tensor],
                 dynamic_shapes: Any = None, n_positional: int = 0) -> None:
        self.gm = gm
        self.example_inputs = example_inputs
        self.dynamic_shapes = dynamic_shapes
        self.n_positional = n_positional  # inputs the program takes positionally, in order
        self.metadata: dict[str, str] = {}
        self._view: GraphView | None = None
        self._counter = 0

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: torch.nn.Module, example_inputs: dict[str, torch.Tensor],
                dynamic: bool = True) -> FxGraph:
        """Capture ``module(**example_inputs)`` with torch.export (dims 0/1 dynamic when asked)."""
        from torch.export import Dim

        dyn = None
        if dynamic:
            # batch 1 would specialize to a constant: capture with two rows, dims left AUTO
            example_inputs = {k: torch.cat([v, v]) if v.dim() >= 1 and v.shape[0] == 1 else v
                              for k, v in example_inputs.items()}
            dyn = {k: {0: Dim.AUTO, 1: Dim.AUTO} if v.dim() >= 2 else {0: Dim.AUTO}
                   for k, v in example_inputs.items()}
        module = module.eval()
        try:
            with torch.no_grad():
                ep = torch.export.export(module, (), dict(example_inputs), dynamic_shapes=dyn,
                                         strict=False)
        except Exception as err:  # torch raises many types here
            if not dynamic:
                raise LoadError(f"torch.export failed: {type(err).__name__}: {err}") from err
            log.warning("dynamic export failed (%s); retrying with static shapes", err)
            return cls.from_module(module, example_inputs, dynamic=False)
        return cls.from_exported(ep, example_inputs, dyn)

    @classmethod
    def from_exported(cls, ep: torch.export.ExportedProgram,
                      example_inputs: dict[str, torch.Tensor] | None = None,
                      dynamic_shapes: Any = None) -> FxGraph:
        # a KV-cache graph is captured with batch, seq and past >= 2 (so that none specializes);
        # torch's guards would then refuse the 1-token, empty-past first step it computes right
        cache = any(is_past(n.name) for n in ep.graph.nodes if n.op == "placeholder")
        gm, n_positional = ep.module(check_guards=not cache), 0
        if example_inputs is None:  # a loaded program: positional inputs first, then keywords
            args, kwargs = ep.example_inputs or ((), {})
            # positional inputs are named by the module's placeholders (`input` -> `input_1`)
            names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
            n_positional = len(args)
            example_inputs = {contract_name(k): v for k, v in
                              {**dict(zip(names, args)), **dict(kwargs)}.items()}
        if dynamic_shapes is None and ep.range_constraints:
            dynamic_shapes = _dynamic_from_fake(ep, example_inputs)
        return cls(gm, dict(example_inputs), dynamic_shapes, n_positional)

    @classmethod
    def load(cls, path: str) -> FxGraph:
        extra = {"rotaq.json": ""}
        try:  # registers the pytree types of Hugging Face model outputs, needed to deserialize
            import transformers.modeling_outputs  # noqa: F401
        except ImportError:
            pass
        from rotaq.rewriter.pt2_safe import load_exported

        if not os.path.isfile(path):
            raise LoadError(f"{path}: no such file")
        ep = load_exported(path, extra)  # refuses archives that would run code
        fx = cls.from_exported(ep)
        try:
            fx.metadata = dict(json.loads(extra["rotaq.json"] or "{}"))
        except ValueError:
            fx.metadata = {}
        return fx

    # ---- view ---------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        """Placeholder names; a KV-cache past as its contract name (``past_key_values.0.key``)."""
        return [contract_name(n.name) for n in self.gm.graph.nodes if n.op == "placeholder"]

    def dynamic_batch_inputs(self) -> set[str]:
        """Inputs whose first dimension the program keeps symbolic."""
        out = set()
        for n in self.gm.graph.nodes:
            val = n.meta.get("val") if n.op == "placeholder" else None
            if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0],
                                                                          torch.SymInt):
                out.add(contract_name(n.name))
        return out

    def view(self) -> GraphView:
        if self._view is None:
            self._view = self._lift()
        return self._view

    def _touch(self) -> None:
        self._view = None
        self._stale = True

    def _compiled(self) -> torch.fx.GraphModule:
        if getattr(self, "_stale", False):
            self.gm.recompile()
            self._stale = False
        return self.gm

    def _linear_parts(self, n: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, bool,
                                                         torch.fx.Node | None] | None:
        """(x, weight get_attr, weight_is_out_in, bias get_attr | None) if ``n`` is a linear."""
        t = n.target
        if t == aten.linear.default:
            x, w = n.args[0], n.args[1]
            b = n.args[2] if len(n.args) > 2 else None
            w_out_in = True
        elif t == aten.addmm.default:
            b, x, w = n.args[0], n.args[1], n.args[2]
            w_out_in = False
        elif t in (aten.mm.default, aten.matmul.default):
            x, w, b = n.args[0], n.args[1], None
            w_out_in = False
        else:
            return None
        if isinstance(w, torch.fx.Node) and w.op == "call_function" and w.target in (
                aten.t.default, aten.permute.default, aten.numpy_T.default) \
                and w.args[0].op == "get_attr":
            if w.target == aten.permute.default and list(w.args[1]) != [1, 0]:
                return None
            w, w_out_in = w.args[0], not w_out_in
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            return None
        if not isinstance(x, torch.fx.Node) or x.op == "get_attr":
            return None
        if _attr(self.gm, w.target).dim() != 2:
            return None
        if b is not None and not (isinstance(b, torch.fx.Node) and b.op == "get_attr"):
            return None
        return x, w, w_out_in, b

    def _experts_parts(self, n: torch.fx.Node) -> dict[str, int] | None:
        """MoE experts as one grouped matmul (transformers' grouped_mm / batched_mm) on a 3-D
        weight [experts, out, in] (read transposed) or [experts, in, out]."""
        if n.op != "call_function" or not any(k in str(n.target) for k in ("grouped_mm",
                                                                          "batched_mm")):
            return None
        if len(n.args) < 2 or not all(isinstance(a, torch.fx.Node) for a in n.args[:2]):
            return None
        w, transposed = n.args[1], False
        if w.op == "call_function" and w.target in (aten.transpose.int, aten.permute.default):
            w, transposed = w.args[0], True
        if w.op != "get_attr" or _attr(self.gm, w.target).dim() != 3:
            return None
        e, a, b = _attr(self.gm, w.target).shape
        out_f, in_f = (a, b) if transposed else (b, a)
        return {"num_experts": int(e), "in_features": int(in_f), "out_features": int(out_f)}

    def _lift(self) -> GraphView:
        nodes: list[GNode] = []
        consts: set[str] = set()
        shapes: dict[str, tuple[int, ...] | None] = {}
        inputs: list[str] = []
        outputs: list[str] = []
        attr_users: dict[str, int] = {}
        for n in self.gm.graph.nodes:
            if n.op == "get_attr":
                attr_users[n.target] = attr_users.get(n.target, 0) + len(n.users)
        for n in self.gm.graph.nodes:
            shapes[n.name] = _shape(n)
            if n.op == "get_attr":
                consts.add(n.name)
                attr = _attr(self.gm, n.target)
                if isinstance(attr, torch.Tensor):
                    shapes[n.name] = tuple(attr.shape)
                continue
            if n.op == "placeholder":
                inputs.append(n.name)
                continue
            if n.op == "output":
                outputs = [a.name for a in tree_flatten(n.args)[0] if isinstance(a, torch.fx.Node)]
                continue
            nodes.append(self._lift_node(n, attr_users))
        return GraphView(nodes, consts, shapes, inputs, outputs)

    def _lift_node(self, n: torch.fx.Node, attr_users: dict[str, int]) -> GNode:
        scope = _scope(n)
        if n.meta.get("rotaq") in ("online", "quant", "chain"):  # emitted by rotaq: never a linear
            ins = [a.name for a in n.all_input_nodes]
            return GNode(n.name, n.meta["rotaq"], ins, [n.name], {}, scope)
        lin = self._linear_parts(n) if n.op == "call_function" else None
        if lin is not None:
            x, w, w_out_in, b = lin
            wt = _attr(self.gm, w.target)
            out_f, in_f = wt.shape if w_out_in else wt.shape[::-1]
            return GNode(n.name, "linear", [x.name], [n.name], {
                "in_features": int(in_f), "out_features": int(out_f), "has_bias": b is not None,
                "weight_shared": attr_users.get(w.target, 0) > 1}, scope)
        t = n.target
        args = [a for a in n.args]
        node_inputs = [a.name for a in tree_flatten(args)[0] if isinstance(a, torch.fx.Node)]
        experts = self._experts_parts(n)
        if experts is not None:
            return GNode(n.name, "experts", [args[0].name], [n.name], experts, scope)
        if t == aten.embedding.default and args[0].op == "get_attr":
            wt = _attr(self.gm, args[0].target)
            return GNode(n.name, "embedding", [args[1].name], [n.name], {
                "num_embeddings": int(wt.shape[0]), "dim": int(wt.shape[1]),
                "weight_shared": attr_users.get(args[0].target, 0) > 1}, scope)
        if t in (aten.layer_norm.default, aten.rms_norm.default):
            w_i, b_i = (2, 3) if t == aten.layer_norm.default else (2, None)
            ins = [args[0].name]
            for i in (w_i, b_i):
                a = args[i] if i is not None and len(args) > i else None
                ins.append(a.name if isinstance(a, torch.fx.Node) else "")
            eps_i = 4 if t == aten.layer_norm.default else 3
            eps = args[eps_i] if len(args) > eps_i and args[eps_i] is not None else 1e-5
            op = "layer_norm" if t == aten.layer_norm.default else "rms_norm"
            return GNode(n.name, op, ins, [n.name],
                         {"dim": int(np.prod(args[1])), "eps": float(eps)}, scope)
        op = _ELEMENTWISE.get(t, "other") if n.op == "call_function" else "other"
        params: dict[str, Any] = {}
        if op == "other":
            params["target"] = str(t)
        scalars = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if op in ("add", "sub", "mul", "div", "pow") and scalars:
            params["scalar"] = float(scalars[0])
        if op == "mean":
            params["axes"] = list(args[1]) if len(args) > 1 else None
        if op == "transpose":
            params["perm"] = list(args[1]) if t == aten.permute.default else None
        return GNode(n.name, op, node_inputs, [n.name], params, scope)

    # ---- weights ------------------------------------------------------------------------
    def _node(self, key: str) -> torch.fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == key:
                return n
        raise KeyError(key)

    def _new_attr(self, value: np.ndarray, like: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
        self._counter += 1
        name = f"rotaq_const_{self._counter}"
        while hasattr(self.gm, name):
            self._counter += 1
            name = f"rotaq_const_{self._counter}"
        tensor = torch.from_numpy(np.ascontiguousarray(value)).to(like.dtype)
        self.gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(name)
        node.meta["val"] = tensor
        return node

    def get_const(self, value: str) -> np.ndarray:
        node = self._node(value)
        if node.op != "get_attr":
            raise KeyError(f"{value} is not a constant")
        return _to_numpy(_attr(self.gm, node.target)).astype(np.float64)

    def set_const(self, node: str, index: int, array: np.ndarray) -> None:
        n = self._node(node)
        name = self._lift_node(n, {}).inputs[index]  # this node only: no full re-lift
        old = self._node(name)
        like = _attr(self.gm, old.target) if old.op == "get_attr" else old.meta["val"]
        new = self._new_attr(np.asarray(array).reshape(tuple(like.shape)), like, n)
        n.replace_input_with(old, new)
        self._touch()

    def get_linear(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        _, w, w_out_in, b = self._linear_parts(self._node(key))
        wt = _to_numpy(_attr(self.gm, w.target)).astype(np.float64)
        bias = _to_numpy(_attr(self.gm, b.target)).astype(np.float64) if b is not None else None
        return (wt if w_out_in else wt.T), bias

    def set_linear(self, key: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
        n = self._node(key)
        x, w, _, b = self._linear_parts(n)
        like = _attr(self.gm, w.target)
        # the new weight replaces the op's weight argument (bypassing a transpose node, if any):
        # linear takes [out, in]; addmm / mm / matmul take [in, out]
        new_w = self._new_attr(weight if n.target == aten.linear.default else weight.T, like, n)
        new_b = self._new_attr(bias, like, n) if bias is not None else None
        if n.target == aten.linear.default:
            n.args = (x, new_w, new_b)
        elif n.target == aten.addmm.default:
            n.args = (new_b if new_b is not None else b, x, new_w) + tuple(n.args[3:])
            if bias is None and b is not None:
                raise RewriteError(f"{key}: dropping the bias of an addmm linear is not supported")
        else:
            if new_b is not None:
                raise RewriteError(f"{key}: adding a bias to a bias-free matmul linear is not supported")
            n.args = (x, new_w)
        self._touch()

    def get_embedding(self, key: str) -> np.ndarray:
        n = self._node(key)
        return _to_numpy(_attr(self.gm, n.args[0].target)).astype(np.float64)

    def set_embedding(self, key: str, table: np.ndarray) -> None:
        n = self._node(key)
        new = self._new_attr(table, _attr(self.gm, n.args[0].target), n)
        n.args = (new,) + tuple(n.args[1:])
        self._touch()

    def _wire(self, src: torch.fx.Node, out: torch.fx.Node, users: list[torch.fx.Node],
              created: list[torch.fx.Node], role: str) -> str:
        """Tag nodes rotaq emitted (the view lifts them as op ``role``, never as linears) and
        make ``users`` read ``out`` instead of ``src``."""
        first = users[0]
        for node in created:
            node.meta["rotaq"] = role
            node.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
        if "val" in src.meta:
            out.meta["val"] = src.meta["val"]
        for u in users:
            u.replace_input_with(src, out)
        self._touch()
        return out.name

    # emission: one chain emitter (fx_chain); quantized linears are simulated (fx_quant)
    quantize_linear = fx_quant.quantize_linear
    insert_fake_quant = fx_quant.insert_fake_quant
    replace_linear = fx_chain.replace_linear
    add_branch = fx_chain.add_branch
    insert_chain = fx_chain.insert_chain

    # ---- running and saving -------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from rotaq.rewriter.kv_capture import complete_feeds

        feeds = complete_feeds(self, feeds)  # a KV-cache graph fed tokens only: a full prefill
        args, kwargs = self._split({k: _from_numpy(v) for k, v in feeds.items()})
        with torch.no_grad():
            out = self._compiled()(*args, **kwargs)
        return [_to_numpy(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]

    def capture(self, feeds: dict[str, np.ndarray], values: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = set(values)
        seen: dict[str, np.ndarray] = {}

        class _Rec(torch.fx.Interpreter):
            def run_node(self, n):
                res = super().run_node(n)
                if n.name in wanted and isinstance(res, torch.Tensor):
                    seen[n.name] = _to_numpy(res)
                return res

        args = [_from_numpy(feeds[n]) for n in self.input_names]
        with torch.no_grad():
            _Rec(self._compiled()).run(*args)
        return seen

    def clone(self) -> FxGraph:
        with warnings.catch_warnings():  # torch's own pytree deprecation, raised by deepcopy
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec",
                                    category=FutureWarning)
            gm = copy.deepcopy(self.gm)
        other = FxGraph(gm, self.example_inputs, self.dynamic_shapes, self.n_positional)
        other.metadata = dict(self.metadata)
        other._counter = self._counter
        return other

    def _cleanup(self) -> None:
        g = self.gm.graph
        g.eliminate_dead_code()
        used = {n.target for n in g.nodes if n.op == "get_attr"}
        # a rewritten weight is a new attribute; the one it replaced is no longer read by any
        # node but stays registered, and torch.export would save it too (every weight twice)
        named = list(self.gm.named_parameters(remove_duplicate=False)) + \
            list(self.gm.named_buffers(remove_duplicate=False))
        # a called submodule (e.g. torch's _guards_fn) reads its own attributes: keep those
        called = tuple(f"{n.target}." for n in g.nodes if n.op == "call_module")
        for name, _ in named:
            if name not in used and not name.startswith(called):
                owner, _, leaf = name.rpartition(".")
                delattr(self.gm.get_submodule(owner) if owner else self.gm, leaf)
        self.gm.recompile()

    def export(self) -> torch.export.ExportedProgram:
        self._cleanup()
        args, kwargs = self._split(self.example_inputs)
        with torch.no_grad():
            return torch.export.export(self.gm, args, kwargs,
                                       dynamic_shapes=self.dynamic_shapes, strict=False)

    def _split(self, inputs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """(positional, keyword) arguments of the program for ``inputs`` keyed by name."""
        names = self.input_names[:self.n_positional]
        return (tuple(inputs[n] for n in names),
                {fx_name(k): v for k, v in inputs.items() if k not in names})

    def save(self, path: str) -> None:
        """Write ``.pt2`` (re-exported ExportedProgram) or ``.onnx`` atomically."""
        ext = os.path.splitext(path)[1].lower()
        if ext == ".pt2":
            ep = self.export()
            extra = {"rotaq.json": json.dumps(self.metadata)}
            with atomic_file(path) as tmp:
                torch.export.save(ep, tmp, extra_files=extra)
        elif ext == ".onnx":
            from rotaq.rewriter.export_onnx import export_onnx

            export_onnx(self.export(), path, self.metadata)
        else:
            raise RewriteError(f"{path}: output must end in .pt2 or .onnx")




def _dynamic_from_fake(ep: torch.export.ExportedProgram, inputs: dict[str, Any]) -> Any:
    """Mark dims 0/1 of every 2-D+ user input dynamic again (as at capture)."""
    from torch.export import Dim

    if any(is_past(k) for k in inputs):
        return kv_dynamic_shapes(list(inputs))
    return {k: ({0: Dim.AUTO, 1: Dim.AUTO} if getattr(v, "dim", lambda: 0)() >= 2 else None)
            for k, v in inputs.items()}
