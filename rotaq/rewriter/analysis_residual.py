"""The residual stream: blocks (the norms that read it, the linears that write it, the add),
post-sublayer norms, the final norm and the head, walked from the embedding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rotaq.rewriter.analysis_graph import (
    _upstream_linears,
    closure,
    const_like,
    consumers_of,
    first_linears,
    passthrough,
)
from rotaq.rewriter.sites import Block, GNode, GraphView, ResidualStream

if TYPE_CHECKING:
    from rotaq.rewriter.analysis import Analysis


def _norm_by_output(a: Analysis) -> dict[str, str]:
    return {n.output: k for k, n in a.norms.items()}


def _branch(view: GraphView, a: Analysis, n: GNode, stream: list[str]
            ) -> tuple[list[str], list[str]] | None:
    """If ``n`` adds a sublayer's output into the stream, (writer linears, branch norms).

    The sublayer's output reaches the add through passthrough ops, through a norm applied to
    the sublayer's output (sandwich / post-sublayer norms: Gemma-2/3, OLMo-2), and through adds
    of several sublayers (parallel attention + MLP: GPT-J, GPT-NeoX, Phi, Falcon).
    """
    if n.op != "add" or len(n.inputs) != 2 or any(const_like(view, i) for i in n.inputs):
        return None
    ins = [i for i in n.inputs if i in stream]
    if len(ins) != 1:
        return None
    other = n.inputs[1] if n.inputs[0] in stream else n.inputs[0]
    return _tail(view, a, other, set(stream))


def _tail(view: GraphView, a: Analysis, value: str, stream: set[str]
          ) -> tuple[list[str], list[str]] | None:
    by_out = _norm_by_output(a)
    writers: list[str] = []
    norms: list[str] = []
    todo, seen = [value], set()
    while todo:
        v = todo.pop()
        for _ in range(64):
            if v in stream or v in seen or view.is_const(v):
                return None
            seen.add(v)
            p = view.producer.get(v)
            if p is None:
                return None
            if p.op == "linear":
                writers.append(p.key)
                break
            if v in by_out:
                norms.append(by_out[v])
                v = a.norms[by_out[v]].input
                continue
            if p.op == "add" and len(p.inputs) == 2 and not any(view.is_const(i) for i in p.inputs):
                todo.extend(p.inputs)
                break
            if p.op == "experts":  # MoE: the experts' down projections write the stream
                writers.append(p.key)
                break
            if passthrough(view, p):
                v = p.inputs[0]
                continue
            carry = _channel_input(view, p, v)
            if carry is None:
                return None
            v = carry
        else:
            return None
    order = {nd.key: i for i, nd in enumerate(view.nodes)}
    return sorted(writers, key=order.get), norms


def _channel_input(view: GraphView, n: GNode, out: str) -> str | None:
    """For token-axis ops in a MoE combine (gather, routing-weight scale, sum over the top-k
    axis): the one input that carries the output's channel axis, if exactly one does."""
    if n.op not in ("mul", "reshape", "other") or n.op == "other" and not any(
            t in str(n.params.get("target", "")) for t in ("index", "sum", "Gather", "ReduceSum",
                                                         "scatter", "Scatter")):
        return None
    dim = (view.shape(out) or (0,))[-1]
    if dim <= 1:
        return None
    carry = [i for i in n.inputs if i and not view.is_const(i)
             and (view.shape(i) or (0,))[-1] == dim]
    return carry[0] if len(carry) == 1 else None


def _stream_norms(a: Analysis, cons: list[GNode]) -> list[str]:
    keys = {c.key for c in cons}
    return [k for k, s in a.norm_internal.items() if keys & s and a.norms[k].input in
            {i for c in cons for i in c.inputs}]


def _find_residual(view: GraphView, a: Analysis) -> ResidualStream:
    """Every residual stream, walked block by block from its start: an embedding, or (for
    encoders that start from a convolution or patch projection) the stream input of the first
    residual add no stream holds yet. Encoder-decoders have two streams; their blocks are listed
    encoder first, ``streams`` counts them."""
    res = ResidualStream(False, None, None, [], [])
    starts = [e.output for e in a.embeddings.values()]
    last_head: list[str] = []
    done: set[str] = set()
    walked = 0
    while True:
        start = next((v for v in starts if v not in done), None)
        if start is None:
            start = _first_free_add(view, a, {b.add for b in res.blocks})
            if start is None:
                break
        done.add(start)
        part = _walk(view, a, start)
        if not part.blocks or part.blocks[0].add in {b.add for b in res.blocks}:
            continue
        walked += 1
        if res.embedding is None:
            res.embedding = next((k for k, e in a.embeddings.items() if e.output == start), None)
        res.blocks.extend(part.blocks)
        res.post_norms.extend(part.post_norms)
        res.final_norm = part.final_norm
        last_head = part.head
    res.streams = walked
    res.head = _heads_from_outputs(view)
    if not res.head:  # an output the walk up cannot cross (e.g. a custom op): the stream's end
        res.head = last_head or (first_linears(view, a.norms[res.final_norm].output)
                                 if res.final_norm else [])
    return _finish(view, a, res)


def _first_free_add(view: GraphView, a: Analysis, taken: set[str]) -> str | None:
    """The stream input of the first residual add (in graph order) outside ``taken``."""
    for n in view.nodes:
        if n.op != "add" or n.key in taken or len(n.inputs) != 2 or any(
                const_like(view, i) for i in n.inputs):
            continue
        sides = [i for i, o in ((n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0]))
                 if (t := _tail(view, a, o, set(closure(view, i)))) and t[0]
                 and _depends(view, o, i) and not _depends(view, i, o)]
        if len(sides) == 1:
            return sides[0]
    return None


def _depends(view: GraphView, value: str, target: str, limit: int = 4096) -> bool:
    """Is ``value`` computed from ``target`` (a residual branch is computed from its stream)?"""
    todo, seen = [value], set()
    while todo and len(seen) < limit:
        v = todo.pop()
        if v == target:
            return True
        if v in seen:
            continue
        seen.add(v)
        p = view.producer.get(v)
        if p is not None:
            todo.extend(i for i in p.inputs if i and not view.is_const(i))
    return False


def _walk(view: GraphView, a: Analysis, v: str) -> ResidualStream:
    res = ResidualStream(False, None, None, [], [])
    for _ in range(10_000):
        stream = closure(view, v)
        cons = consumers_of(view, stream)
        adds = [(c, b) for c in cons for b in [_branch(view, a, c, stream)] if b and b[0]]
        norm_keys = _stream_norms(a, cons)
        if adds:
            add, (writers, bnorms) = adds[0]
            readers = [r for nk in norm_keys for r in first_linears(view, a.norms[nk].output)]
            readers += [c.key for c in cons if c.op == "linear" and c.key not in readers]
            res.blocks.append(Block(norm_keys[0] if norm_keys else None, readers, writers,
                                    add.key, norms=norm_keys, branch_norms=bnorms))
            v = add.outputs[0]
            after = consumers_of(view, closure(view, v))
            after_norms = _stream_norms(a, after)
            if after_norms and not any(c.op == "linear" for c in after) and not any(
                    _branch(view, a, c, closure(view, v)) for c in after):
                nk2 = after_norms[0]
                if _continues(view, a, a.norms[nk2].output):
                    res.post_norms.append(nk2)
                    v = a.norms[nk2].output
            continue
        if norm_keys:
            nk = norm_keys[0]
            if _continues(view, a, a.norms[nk].output):
                res.post_norms.append(nk)
                v = a.norms[nk].output
                continue
            res.final_norm = nk
            res.head = first_linears(view, a.norms[nk].output)
            break
        combine = [c for c in cons if c.op == "add" and len(c.inputs) == 2
                   and not _upstream_linears(view, next((i for i in c.inputs
                                                         if i not in stream), v))]
        if combine:
            v = combine[0].outputs[0]
            continue
        res.head = [c.key for c in cons if c.op == "linear"]
        break
    return res


def _finish(view: GraphView, a: Analysis, res: ResidualStream) -> ResidualStream:
    """The final norm is the norm the head reads (found from the graph output, never by
    position); pre-norm means every block reads the stream through a norm and writes it back
    without one."""
    by_out = _norm_by_output(a)
    found = None
    for h in res.head:
        v = view.by_key[h].inputs[0]
        for _ in range(16):
            if v in by_out:
                found = by_out[v]
                break
            p = view.producer.get(v)
            if p is None or not passthrough(view, p):
                break
            v = p.inputs[0]
        if found:
            break
    if res.head:  # a head that reads the stream without a norm: no final norm to fold
        res.final_norm = found
    blocks = res.blocks
    res.pre_norm = bool(blocks) and not res.post_norms and all(
        b.norm and not b.branch_norms for b in blocks)
    return res


def _heads_from_outputs(view: GraphView) -> list[str]:
    """Linears whose outputs reach a graph output through elementwise ops on one tensor only
    (casts, reshapes, slices, scalar scales, tanh soft-capping): the model's heads."""
    heads: list[str] = []
    for out in view.outputs:
        v = out
        for _ in range(32):
            p = view.producer.get(v)
            if p is None:
                break
            if p.op == "linear":
                if p.key not in heads:
                    heads.append(p.key)
                break
            live = [i for i in p.inputs if i and not const_like(view, i)]
            tanh = p.op == "other" and "tanh" in str(p.params.get("target", "")).lower()
            bias = p.op in ("add", "sub") and len(live) == 1  # a logits bias (BART)
            if not (passthrough(view, p) or p.op == "transpose" or tanh or bias) or not live:
                break
            v = p.inputs[0] if p.inputs[0] in live else live[0]
    return heads


def _continues(view: GraphView, a: Analysis, value: str) -> bool:
    """Does the stream go on after this norm (a residual add reads its output downstream)?"""
    stream = closure(view, value)
    for c in view.nodes:
        if c.op == "add" and _branch(view, a, c, stream):
            return True
    return False
