"""View helpers shared by the structural analysis (``analysis*.py``), and the collector of
reasons why a candidate was not matched (``rotaq inspect --explain``)."""

from __future__ import annotations

from dataclasses import dataclass

from rotaq.rewriter.sites import GNode, GraphView

_META_OPS = ("_assert", "sym_size", "sym_numel", "guards", "Shape")  # read no values


@dataclass(frozen=True)
class Reason:
    """Why the candidate ``key`` (a node of the view) was not matched as a ``kind`` (``linear``,
    ``matmul``, ``norm``, ``attention``, ``residual``)."""

    key: str
    kind: str
    reason: str


def describe(view: GraphView, value: str) -> str:
    """``value`` as a reason names it: the op and node that compute it, or what it is."""
    if not value:
        return "nothing"
    if view.is_const(value):
        return f"constant {value}"
    p = view.producer.get(value)
    if p is None:
        return f"graph input {value}" if value in view.inputs else value
    what = p.params.get("target", p.op) if p.op == "other" else p.op
    return f"{what} node '{p.key}'"


def _is_meta(n: GNode) -> bool:
    return n.op == "other" and any(m in str(n.params.get("target", "")) for m in _META_OPS)


def _scalar_const(view: GraphView, n: GNode) -> bool:
    """True for mul/div of a tensor by a scalar (a constant with <= 1 element)."""
    if n.op not in ("mul", "div"):
        return False
    if len(n.inputs) == 1 and "scalar" in n.params:
        return True
    others = [i for i in n.inputs if const_like(view, i)]
    shp = [view.shape(i) for i in others]
    return len(others) == 1 and shp[0] is not None and (len(shp[0]) == 0 or shp[0] == (1,))


def const_root(view: GraphView, value: str) -> str | None:
    """The constant that ``value`` is (or is a cast / reshape of), else None."""
    for _ in range(8):
        if view.is_const(value):
            return value
        p = view.producer.get(value)
        if p is None or p.op not in ("cast", "identity", "reshape") or not p.inputs:
            return None
        value = p.inputs[0]
    return None


def const_like(view: GraphView, value: str) -> bool:
    return const_root(view, value) is not None


def passthrough(view: GraphView, n: GNode) -> bool:
    """Ops that act on tokens only: the channel (last) axis reaches the output unchanged."""
    if n.op in ("cast", "identity"):
        return True
    if n.op in ("slice", "reshape", "expand") or (
            n.op == "other" and n.params.get("target") in ("Gather", "Squeeze", "Unsqueeze",
                                                           "aten.index.Tensor")):
        si, so = view.shape(n.inputs[0]), view.shape(n.outputs[0])
        return bool(si and so and si[-1] == so[-1] and si[-1] > 0)
    return _scalar_const(view, n)


def closure(view: GraphView, value: str) -> list[str]:
    """``value`` and every value reached from it through passthrough ops."""
    out, todo = [], [value]
    while todo:
        v = todo.pop()
        if v in out:
            continue
        out.append(v)
        for c in view.consumers.get(v, []):
            if passthrough(view, c) and c.inputs and c.inputs[0] == v:
                todo.extend(c.outputs)
    return out


def consumers_of(view: GraphView, values: list[str]) -> list[GNode]:
    seen, out = set(), []
    for v in values:
        for c in view.consumers.get(v, []):
            if c.key not in seen and not _is_meta(c) and not (passthrough(view, c) and c.inputs[0] == v):
                seen.add(c.key)
                out.append(c)
    order = {n.key: i for i, n in enumerate(view.nodes)}
    return sorted(out, key=lambda n: order[n.key])


def first_linears(view: GraphView, value: str) -> list[str]:
    """Linears (and MoE expert groups) reading ``value`` through passthrough ops."""
    return [c.key for c in consumers_of(view, closure(view, value))
            if c.op in ("linear", "experts")]


def _root(view: GraphView, value: str) -> str:
    while True:
        p = view.producer.get(value)
        if p is None or p.op not in ("cast", "identity"):
            return value
        value = p.inputs[0]


def _upstream_linears(view: GraphView, value: str, limit: int = 64) -> list[str]:
    """Nearest linears above ``value`` (BFS over producers, not crossing a linear)."""
    found, seen, todo = [], set(), [value]
    while todo and len(seen) < limit:
        v = todo.pop(0)
        if v in seen or view.is_const(v):
            continue
        seen.add(v)
        p = view.producer.get(v)
        if p is None:
            continue
        if p.op == "linear":
            if p.key not in found:
                found.append(p.key)
            continue
        if p.op in ("embedding", "sdpa", "gqa", "softmax", "layer_norm", "rms_norm") or _is_meta(p):
            continue  # a Shape (meta) output carries no values of what it reads
        todo.extend(i for i in p.inputs if i)
    return found


def _writer(view: GraphView, value: str) -> str | None:
    """The linear whose output reaches ``value`` through passthrough ops only."""
    while True:
        p = view.producer.get(value)
        if p is None:
            return None
        if p.op == "linear":
            return p.key
        if not passthrough(view, p):
            return None
        value = p.inputs[0]

