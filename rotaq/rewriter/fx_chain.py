"""Chains on the FX side: a linear replaced by (or extended with) a :class:`Chain` of aten ops.

``replace_linear``: ``Linear(x) -> chain(x)``; ``add_branch``: ``Linear(x) -> Linear(x) + chain(x)``;
``insert_chain``: ``x -> chain(x)`` for some consumers of ``x``.
Emitted nodes carry ``meta["rotaq"] = "chain"``: the view lifts them as op ``chain``, never as
linears or residual adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rotaq import tags
from rotaq.errors import RewriteError
from rotaq.rewriter.chain import TINY, Chain, Step
from rotaq.rewriter.fx_lift import _attr

if TYPE_CHECKING:
    from rotaq.rewriter.fx import FxGraph

aten = torch.ops.aten
ROLE = tags.FX_CHAIN
_INDEX = torch.zeros((), dtype=torch.int64)  # dtype of gather indices


def _emit(g: FxGraph, x: torch.fx.Node, chain: Chain, before: torch.fx.Node,
          like: torch.Tensor) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    graph = g.gm.graph
    created: list[torch.fx.Node] = []

    def call(target, *args):
        with graph.inserting_before(before):
            node = graph.call_function(target, args)
        created.append(node)
        return node

    val = x.meta.get("val")
    rank = val.dim() if isinstance(val, torch.Tensor) else None
    y = x
    if chain.flat:
        if rank is None:
            raise RewriteError(f"chain on {x.name!r}: the input's rank is unknown")
        lead = [call(aten.sym_size.int, x, i) for i in range(rank - 1)]
        y = call(aten.reshape.default, x, [-1, chain.in_features])
    grid = None
    for s in chain.steps:
        if s.op in ("absmax", "minmax", "grid"):
            grid, y = _quant_step(call, y, s, grid)
        elif s.op in ("matmul", "lmatmul", "add", "mul"):
            c = g._new_attr(s.const, like, before)
            created.append(c)
            if s.op == "matmul":
                y = call(aten.matmul.default, y, c)
            elif s.op == "lmatmul":
                y = call(aten.matmul.default, c, y)
            elif s.op == "mul":
                y = call(aten.mul.Tensor, y, c)
            else:
                y = call(aten.add.Tensor, y, c)
        elif s.op == "gather":
            idx = g._new_attr(np.asarray(s.arg, np.int64), _INDEX, before)
            created.append(idx)
            y = call(aten.index_select.default, y, -1, idx)
        elif s.op == "split":
            y = call(aten.unflatten.int, y, -1, list(s.arg))
        elif s.op == "merge":
            y = call(aten.flatten.using_ints, y, -s.arg[0], -1)
        elif s.op == "reshape":
            y = call(aten.reshape.default, y, list(s.arg))
        elif s.op == "transpose":
            y = call(aten.permute.default, y, list(s.arg))
        else:
            y = call(aten.sum.dim_IntList, y, [s.arg[0]])
    if chain.flat:
        y = call(aten.reshape.default, y, [*lead, chain.out_features])
    for node in created:
        node.meta[tags.FX_META] = ROLE
        node.meta["nn_module_stack"] = before.meta.get("nn_module_stack", {})
    return y, created


def _quant_step(call: Any, y: torch.fx.Node, s: Step, grid: tuple | None) -> tuple[Any, Any]:
    """A fake-quant step: ``absmax`` / ``minmax`` return the new row ``(scale, zero)``, ``grid``
    the quantized-dequantized ``y``."""
    if s.op == "absmax":
        amax = call(aten.amax.default, call(aten.abs.default, y), [-1], True)
        return (call(aten.clamp_min.default, call(aten.mul.Tensor, amax, float(s.const)), TINY),
                None), y
    qmin, qmax = s.arg
    if s.op == "minmax":
        clip = float(s.const)
        lo = call(aten.mul.Tensor, call(aten.clamp_max.default,
                                        call(aten.amin.default, y, [-1], True), 0.0), clip)
        hi = call(aten.mul.Tensor, call(aten.clamp_min.default,
                                        call(aten.amax.default, y, [-1], True), 0.0), clip)
        scale = call(aten.clamp_min.default,
                     call(aten.div.Tensor, call(aten.sub.Tensor, hi, lo), float(qmax)), TINY)
        zr = call(aten.round.default, call(aten.div.Tensor, call(aten.neg.default, lo), scale))
        return (scale, call(aten.clamp.default, zr, qmin, qmax)), y
    if s.const is not None:
        grid = float(s.const[0]), (float(s.const[1]) or None)
    if grid is None:
        raise RewriteError("chain step 'grid' needs a scale: a constant or absmax / minmax first")
    scale, zp = grid
    q = call(aten.round.default, call(aten.div.Tensor, y, scale))
    if zp is not None:
        q = call(aten.add.Tensor, q, zp)
    q = call(aten.clamp.default, q, qmin, qmax)
    if zp is not None:
        q = call(aten.sub.Tensor, q, zp)
    return grid, call(aten.mul.Tensor, q, scale)


def _site(g: FxGraph, key: str, chain: Chain) -> tuple[torch.fx.Node, torch.fx.Node, torch.Tensor]:
    n = g._node(key)
    parts = g._linear_parts(n) if n.op == "call_function" else None
    if parts is None:
        raise RewriteError(f"node {key!r} is not a linear")
    x, w, w_out_in, _ = parts
    weight = _attr(g.gm, w.target)
    out_f, in_f = weight.shape if w_out_in else weight.shape[::-1]
    if (chain.in_features, chain.out_features) != (in_f, out_f):
        raise RewriteError(f"chain {chain.in_features}->{chain.out_features} does not fit "
                           f"linear {key!r} ({in_f}->{out_f})")
    return n, x, weight


def replace_linear(g: FxGraph, key: str, chain: Chain) -> str:
    """``Linear(x) -> chain(x)`` (the chain carries the bias, if any); returns the new output."""
    n, x, weight = _site(g, key, chain)
    out, _ = _emit(g, x, chain, n, weight)
    if "val" in n.meta:
        out.meta["val"] = n.meta["val"]
    n.replace_all_uses_with(out)
    g.gm.graph.erase_node(n)
    g._touch()
    return out.name


def add_branch(g: FxGraph, key: str, chain: Chain) -> str:
    """``Linear(x) -> Linear(x) + chain(x)``; returns the sum's name."""
    n, x, weight = _site(g, key, chain)
    users = [u for u in n.users]
    nxt = n.next
    branch, _ = _emit(g, x, chain, nxt, weight)
    with g.gm.graph.inserting_before(nxt):
        total = g.gm.graph.call_function(aten.add.Tensor, (n, branch))
    return g._wire(n, total, users, [total], ROLE)


def insert_chain(g: FxGraph, value: str, consumers: Sequence[str], chain: Chain,
                 role: str = ROLE) -> str:
    """``x -> chain(x)`` on ``value`` for ``consumers`` only; returns the new node's name.
    ``role`` tags the nodes (``meta["rotaq"]``): ``"chain"``, ``"online"`` (an online transform)
    or ``"quant"``."""
    if role not in ("chain", "online", "quant"):
        raise RewriteError(f"insert_chain: role must be chain, online or quant, not {role!r}")
    src = g._node(value)
    users = [g._node(c) for c in consumers]
    if not users:
        raise RewriteError("insert_chain: no consumers given")
    for u in users:
        if src not in u.all_input_nodes:
            raise RewriteError(f"insert_chain: node {u.name!r} does not read {value!r}")
    val = src.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
        raise RewriteError(f"insert_chain: {value!r} is not a float tensor")
    if val.dim() == 0 or (isinstance(val.shape[-1], int) and chain.in_features >= 0
                          and val.shape[-1] != chain.in_features):
        raise RewriteError(f"insert_chain: {value!r} has shape {tuple(val.shape)}, "
                           f"the chain takes last dim {chain.in_features}")
    order = {n: i for i, n in enumerate(g.gm.graph.nodes)}
    first = min(users, key=lambda u: order[u])
    out, created = _emit(g, src, chain, first, torch.zeros((), dtype=val.dtype))
    for node in created:
        node.meta[tags.FX_META] = role
        node.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
    width = val.shape[-1] if chain.out_features < 0 else chain.out_features
    out.meta["val"] = val.new_empty((*val.shape[:-1], width))
    for u in users:
        u.replace_input_with(src, out)
    g._touch()
    return out.name

