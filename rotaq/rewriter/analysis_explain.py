"""Why a candidate was not matched (``rotaq inspect --explain``).

The analysis records the reasons where a match fails (a ``mean`` that does not start an
RMSNorm, a softmax that is not one of attention: ``Analysis.reasons``). :func:`explain` adds the
reasons that only the finished analysis can give: a matmul that is no linear (its weight is
computed, or not a 2-D constant), a linear with no place in the residual structure (neither a
norm's reader, a writer of the stream, an attention projection nor the head), a norm off the
stream, an attention without its projections, a block that reads the stream without a norm.
It walks the view only on demand, never while a pass runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rotaq.rewriter.analysis_graph import (
    Reason,
    _upstream_linears,
    closure,
    const_like,
    const_root,
    consumers_of,
    describe,
    passthrough,
)
from rotaq.rewriter.sites import GNode, GraphView

if TYPE_CHECKING:
    from rotaq.rewriter.analysis import Analysis

GRAPH = "(graph)"  # the key of a reason about the whole graph
_LINEAR_LIKE = ("Gemm", "aten.linear", "aten.addmm", "aten.mm")  # ops a linear may come as


def explain(a: Analysis) -> list[Reason]:
    """Every reason, in graph order of the candidates (the recorded ones first)."""
    view = a.view
    out = list(a.reasons)
    out += _matmuls(a)
    out += _residual(a)
    out += _linears(a)
    out += _norms(a)
    out += _attention(a)
    order = {n.key: i for i, n in enumerate(view.nodes)}
    return sorted(out, key=lambda r: order.get(r.key, -1))  # graph-wide reasons first


def _source(view: GraphView, value: str) -> str:
    """What ``value`` is, above the casts, reshapes and transposes that carry it."""
    for _ in range(16):
        p = view.producer.get(value)
        if p is None or p.op not in ("cast", "identity", "reshape", "transpose") or not p.inputs:
            break
        value = p.inputs[0]
    return describe(view, value)


def _matmuls(a: Analysis) -> list[Reason]:
    """Matmuls (and Gemm / aten.linear nodes left as ``other``) that are neither a linear nor
    a part of a matched attention."""
    view = a.view
    used = {k for s in a.attention for k in (s.key, s.q_consumer, s.k_consumer, s.v_consumer)}
    for s in a.attention:  # P V (v_consumer may name the KV cache's Concat instead)
        if s.kind == "explicit":
            probs = closure(view, view.by_key[s.key].outputs[0])
            used.update(c.key for c in consumers_of(view, probs) if c.op == "matmul")
    out = []
    for n in view.nodes:
        target = str(n.params.get("target", ""))
        if n.key in used or not (n.op == "matmul" or n.op == "other"
                                 and target.startswith(_LINEAR_LIKE)):
            continue
        what = "matmul" if n.op == "matmul" else target
        data = [i for i in n.inputs if i]
        consts = [k for k, i in enumerate(data) if const_like(view, i)]
        if len(consts) == len(data):
            why = "all its operands are constants"
        elif consts and n.op == "matmul" and consts == [0]:
            why = f"the constant {data[0]} is the left operand (W x), not the weight of x W"
        elif consts:
            w = data[consts[-1]]
            root = const_root(view, w) or w
            shape = view.shape(root)
            if shape is not None and len(shape) != 2:
                why = f"its constant operand {root} has shape {list(shape)}, not a 2-D weight"
            else:
                why = (f"its constant operand {root} reaches it as {describe(view, w)}, not as "
                       "a stored weight (or a transposed one)")
        else:
            w = data[1] if len(data) > 1 else ""
            why = (f"its weight operand is computed ({_source(view, w)}), not a constant; "
                   "and it is not part of a matched attention")
        out.append(Reason(n.key, "matmul", f"{what} {n.key}: not a linear: {why}"))
    return out


def _roles(a: Analysis) -> set[str]:
    res = a.residual
    keys = set(res.head) | set(a.routers)
    for b in res.blocks:
        keys.update(b.readers, b.writers)
    for s in a.attention:
        keys.update(k for k in (s.q_proj, s.k_proj, s.v_proj, s.o_proj) if k)
    return keys


def _linears(a: Analysis) -> list[Reason]:
    """Linears that no block, attention or head claims: what they read and what they feed."""
    view = a.view
    placed = _roles(a)
    norm_outs = {n.output: k for k, n in a.norms.items()}
    out = []
    for key, lin in a.linears.items():
        if key in placed:
            continue
        src = lin.input
        for _ in range(16):  # up through token-only ops to what the linear really reads
            if src in norm_outs:
                break
            p = view.producer.get(src)
            if p is None or not passthrough(view, p):
                break
            src = p.inputs[0]
        if src in norm_outs:
            nk = norm_outs[src]
            reads = f"reads norm '{nk}', which is not a norm of the residual stream"
        else:
            reads = f"input is not the output of a norm (reads {describe(view, src)})"
        feeds = [f"{c.op if c.op != 'other' else c.params.get('target')} node '{c.key}'"
                 for c in consumers_of(view, closure(view, lin.output))]
        if not a.residual.blocks:
            where = "the graph has no residual stream"
        else:
            where = f"its output goes to {', '.join(feeds[:3]) or 'nothing'}, not a residual add"
        label = f"{key} ({lin.name})" if lin.name and lin.name != key else key
        out.append(Reason(key, "linear", f"linear {label}: not a reader or writer of a "
                                         f"residual block: {reads}; {where}"))
    return out


def _norms(a: Analysis) -> list[Reason]:
    res = a.residual
    on = set(res.post_norms) | ({res.final_norm} if res.final_norm else set())
    for b in res.blocks:
        on.update(b.norms, b.branch_norms)
    return [Reason(k, "norm", f"norm {k}" + (f" ({n.name})" if n.name and n.name != k else "")
                   + f": not on the residual stream (reads {_source(a.view, n.input)})")
            for k, n in a.norms.items() if k not in on]


def _attention(a: Analysis) -> list[Reason]:
    view = a.view
    out = []
    for s in a.attention:
        node = view.by_key[s.key]
        ins = {"q": node.inputs[0] if node.inputs else "", "k": s.k_value, "v": s.v_value}
        for role, proj in (("q", s.q_proj), ("k", s.k_proj), ("v", s.v_proj)):
            if proj is None:
                ups = _upstream_linears(view, ins[role]) if ins[role] else []
                found = f"{len(ups)} linears above it" + (f" ({', '.join(ups[:4])})" if ups
                                                           else "")
                out.append(Reason(s.key, "attention", f"attention {s.key}: no {role} "
                                                      f"projection ({found}, expected one)"))
        if s.o_proj is None:
            out.append(Reason(s.key, "attention", f"attention {s.key}: no o projection (no "
                                                  "linear reads its output through reshapes)"))
    return out


def _residual(a: Analysis) -> list[Reason]:
    """No stream at all, or blocks that read the stream without a norm (not pre-norm)."""
    view = a.view
    res = a.residual
    if not res.blocks:
        adds = [n for n in view.nodes if n.op == "add" and len(n.inputs) == 2
                and not any(const_like(view, i) for i in n.inputs)]
        why = (f"{len(a.embeddings)} embeddings, {len(adds)} adds of two computed tensors, none "
               "of them adds a linear's output back into its input (x + f(x))")
        return [Reason(GRAPH, "residual", f"no residual stream: {why}")]
    out = []
    for i, b in enumerate(res.blocks):
        if b.norm:
            continue
        direct = [r for r in b.readers if _reads_without_norm(a, view.by_key[r])]
        if direct:
            who = f"linear {direct[0]} reads {describe(view, a.linears[direct[0]].input)}"
        elif res.post_norms:
            who = f"post-norm: norm {res.post_norms[0]} normalizes the stream after the add"
        else:
            who = "no norm reads the stream before it"
        out.append(Reason(b.add, "residual", f"block {i} (add {b.add}): reads the stream "
                                             f"without a norm ({who}), so it is not pre-norm"))
    return out


def _reads_without_norm(a: Analysis, n: GNode) -> bool:
    outs = {s.output for s in a.norms.values()}
    v = n.inputs[0] if n.inputs else ""
    for _ in range(16):
        if v in outs:
            return False
        p = a.view.producer.get(v)
        if p is None or not passthrough(a.view, p):
            return True
        v = p.inputs[0]
    return True
