"""Lifting of an FX ``GraphModule`` into the IR-neutral :class:`GraphView`: the :class:`FxLift`
mixin of :class:`~rotaq.rewriter.fx.FxGraph` (structural matching of linears, MoE experts,
embeddings, norms and the primitive vocabulary of :mod:`rotaq.rewriter.sites`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from rotaq import tags
from rotaq.floats import numpy_dtype
from rotaq.rewriter.sites import GNode, GraphView

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


class FxLift:
    """The lifting half of :class:`~rotaq.rewriter.fx.FxGraph`: the view of ``self.gm``."""

    def view(self) -> GraphView:
        if self._view is None:
            self._view = self._lift()
        return self._view

    def input_specs(self) -> dict[str, tuple[np.dtype, list[int | None]]]:
        """Graph input name -> (numpy dtype, dims); ``None`` for a symbolic (dynamic) dim."""
        from torch.fx.experimental.symbolic_shapes import is_concrete_int

        specs = {}
        places = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        # feeds are keyed like the example inputs (the placeholder of `input` is `input_1`)
        names = list(self.example_inputs) if len(self.example_inputs) == len(places) else \
            [n.name for n in places]
        for name, n in zip(names, places):  # the placeholders' fake tensors: SymInt for dyn dims
            val = n.meta.get("val")
            if val is None:
                val = self.example_inputs.get(name)
                if val is None:
                    continue
            dims = [int(d) if is_concrete_int(d) else None for d in val.shape]
            specs[name] = (numpy_dtype(val.dtype), dims)  # bf16: ml_dtypes.bfloat16
        return specs

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
        if n.meta.get(tags.FX_META) in tags.FX_EMITTED:  # emitted by rotaq: never a linear
            ins = [a.name for a in n.all_input_nodes]
            return GNode(n.name, n.meta[tags.FX_META], ins, [n.name], {}, scope)
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
