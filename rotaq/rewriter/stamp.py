"""A decoder captured with a few layers, grown to all its layers by stamping its last block.

torch.export and the ONNX exporter cost time in proportion to the graph: a 30-layer decoder
takes minutes where its first three layers take seconds. A decoder's blocks are one graph
repeated, so rotaq captures ``K`` = :data:`CAPTURED` layers and copies the last block's nodes
for layers ``K .. L-1``:

* The blocks are the nodes whose module scope (the exporter's ``pkg.torch.onnx.name_scopes``
  node metadata) lies under ``P.i`` for one module list ``P`` and ``i`` in ``0..K-1``; a block's
  *template* adds the scope-less nodes that feed only it (e.g. the ``Shape`` of its own past).
* Block ``K-2`` and block ``K-1`` must match node for node (op, attributes, and each input in
  the same role): computed inside the block, the previous block's output (the residual
  chain), the layer's own past (``past_key_values.i.*``) or weight (safetensors key
  ``P.i.*``), or a value shared with the rest of the graph (rotary cos/sin, mask, sizes,
  constants). Block 0 is not a template: it also computes what all later blocks share.
* Each copy for layer ``i`` gets new value and node names, the layer's past inputs and present
  outputs, lazily read weights from the layer's safetensors keys, its scope metadata renamed
  ``P.i``; it reads the previous copy's residual output; the nodes after the blocks (final
  norm, head) read the last copy's.

Whatever does not fit raises :class:`CannotStamp` (the caller exports every layer instead).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as oir

from rotaq.rewriter.onnx import fresh_name, node_scopes

CAPTURED = 3  # layers captured: block 0 (shared values), blocks 1 and 2 (compared templates)
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
_SMALL = 4096  # constants up to this many elements may be compared by value
# graph metadata that describes the captured (K-layer) program, stale once stamped
_STALE_META = ("pkg.torch.export.ExportedProgram.graph_signature",
               "pkg.torch.export.ExportedProgram.range_constraints")

WeightFn = Callable[[str, bool, oir.DataType, tuple, str], oir.TensorProtocol]


class CannotStamp(Exception):
    """The captured layers do not repeat in a way stamping can reproduce."""


def _block_of(node: oir.Node) -> tuple[str, int] | None:
    """(module list, index) of the outermost numbered module scope of ``node``."""
    for s in node_scopes(node):
        m = re.match(r"^(.+)\.(\d+)$", s)
        if m:
            return m.group(1), int(m.group(2))
    return None


def find_blocks(graph: oir.Graph, count: int) -> tuple[str, list[list[oir.Node]]]:
    """The module list ``P`` whose scopes ``P.0 .. P.{count-1}`` hold the blocks, and each
    block's template nodes in graph order."""
    by: dict[str, dict[int, list[oir.Node]]] = {}
    for n in graph:
        b = _block_of(n)
        if b is not None:
            by.setdefault(b[0], {}).setdefault(b[1], []).append(n)
    lists = [p for p, d in by.items() if sorted(d) == list(range(count))]
    if len(lists) != 1:
        raise CannotStamp(f"no single module list with blocks 0..{count - 1} in the node scopes "
                          f"(found {sorted((p, sorted(d)) for p, d in by.items())})")
    prefix = lists[0]
    blocks = [set(by[prefix][i]) for i in range(count)]
    # scope-less nodes feeding one block only (fixpoint in one reverse pass)
    nodes = list(graph)
    for n in reversed(nodes):
        if _block_of(n) is not None or any(v.is_graph_output() for v in n.outputs):
            continue
        users = {u.node for v in n.outputs for u in v.uses()}
        for blk in blocks:
            if users and users <= blk:
                blk.add(n)
                break
    return prefix, [[n for n in nodes if n in blk] for blk in blocks]


def _attr_key(attr: Any) -> Any:
    v = attr.value
    if isinstance(v, (oir.Graph, oir.GraphProtocol)) or attr.type in (
            oir.AttributeType.GRAPH, oir.AttributeType.GRAPHS):
        raise CannotStamp("a node with a subgraph attribute")
    if isinstance(v, oir.TensorProtocol):
        return ("tensor", str(v.dtype), tuple(v.shape), v.numpy().tobytes())
    if isinstance(v, (list, tuple)):
        return (attr.type, tuple(v))
    return (attr.type, v)


def _same_const(a: oir.Value, b: oir.Value) -> bool:
    ta, tb = a.const_value, b.const_value
    if ta is None or tb is None or ta.dtype != tb.dtype or tuple(ta.shape) != tuple(tb.shape):
        return False
    if int(np.prod(ta.shape)) > _SMALL:
        return False
    return np.array_equal(ta.numpy(), tb.numpy())


class _Plan:
    """The role of each input of the template block ``t2`` (block K-1), checked against block
    ``t1`` (block K-2)."""

    def __init__(self, t1: list[oir.Node], t2: list[oir.Node], prefix: str, k: int,
                 sources: dict[str, tuple[str, bool]]) -> None:
        self.t1, self.t2, self.prefix, self.k, self.sources = t1, t2, prefix, k, sources
        self.pos1 = {n: q for q, n in enumerate(t1)}
        self.pos2 = {n: q for q, n in enumerate(t2)}
        if len(t1) != len(t2):
            raise CannotStamp(f"blocks {k - 2} and {k - 1} have {len(t1)} and {len(t2)} nodes")
        for n1, n2 in zip(t1, t2):
            self._same_node(n1, n2)
        self.roles = [[self._role(a, b, n2) for a, b in zip(n1.inputs, n2.inputs)]
                      for n1, n2 in zip(t1, t2)]
        self.chain = {(r[1], r[2]) for rs in self.roles for r in rs if r[0] == "chain"}
        self.presents, self.exits = self._outputs()
        for what, got in (("pasts", {r[1] for rs in self.roles for r in rs if r[0] == "past"}),
                          ("presents", set(self.presents.values()))):
            if got != {"key", "value"}:
                raise CannotStamp(f"block {k - 1} has {what} {sorted(got)}, not key and value")

    def _same_node(self, n1: oir.Node, n2: oir.Node) -> None:
        sig = [(n.domain, n.op_type, n.overload, len(n.inputs), len(n.outputs), sorted(
            (k, _attr_key(a)) for k, a in n.attributes.items())) for n in (n1, n2)]
        if sig[0] != sig[1]:
            raise CannotStamp(f"blocks {self.k - 2} and {self.k - 1} differ at {n1.name} "
                              f"({n1.op_type}) / {n2.name} ({n2.op_type})")

    def shift(self, name: str, i: int, frm: int | None = None) -> str | None:
        """``name`` with ``P.{frm}`` (default K-1) renamed ``P.{i}``; None when absent."""
        old = f"{self.prefix}.{self.k - 1 if frm is None else frm}"
        pat = re.compile(re.escape(old) + r"(?![0-9])")
        return pat.sub(f"{self.prefix}.{i}", name) if pat.search(name) else None

    def _role(self, a: oir.Value | None, b: oir.Value | None, n2: oir.Node) -> tuple:
        if a is None or b is None:
            if a is None and b is None:
                return ("none",)
            raise CannotStamp(f"an optional input differs at {n2.name}")
        pa, pb = a.producer(), b.producer()
        if pb in self.pos2:
            if pa in self.pos1 and self.pos1[pa] == self.pos2[pb] and a.index() == b.index():
                return ("internal", self.pos2[pb], b.index())
        elif pb in self.pos1:  # block K-2's output read by block K-1: the residual chain
            if pa is not None and pa not in self.pos1 and pa.op_type == pb.op_type \
                    and a.index() == b.index() and not any(u.node in self.pos2 for u in a.uses()):
                return ("chain", self.pos1[pb], b.index())
        elif b.is_graph_input():
            ma, mb = _PAST.match(a.name or ""), _PAST.match(b.name or "")
            if a is b and mb is None:
                return ("shared", b)
            if ma and mb and ma.group(2) == mb.group(2) and int(ma.group(1)) == self.k - 2 \
                    and int(mb.group(1)) == self.k - 1:
                return ("past", mb.group(2), b)
        elif b.is_initializer():
            if a is b and b.name not in self.sources:
                return ("shared", b)
            sa, sb = self.sources.get(a.name or ""), self.sources.get(b.name or "")
            if sa and sb and sa[1] == sb[1] and self.shift(sa[0], self.k - 1, self.k - 2) == sb[0]:
                return ("weight", b)
            if sa is None and sb is None and _same_const(a, b):
                return ("shared", b)
        elif a is b and pb is not None:
            return ("shared", b)
        raise CannotStamp(f"input {b.name} of {n2.name} ({n2.op_type}) has no counterpart in "
                          f"block {self.k - 2} ({a.name})")

    def _outputs(self) -> tuple[dict[tuple[int, int], str], list[tuple[int, int]]]:
        presents: dict[tuple[int, int], str] = {}
        exits: list[tuple[int, int]] = []
        inside = set(self.pos1) | set(self.pos2)
        for q, (n1, n2) in enumerate(zip(self.t1, self.t2)):
            for j, (v1, v2) in enumerate(zip(n1.outputs, n2.outputs)):
                if v2.is_graph_output() or v1.is_graph_output():
                    m1, m2 = _PRESENT.match(v1.name or ""), _PRESENT.match(v2.name or "")
                    if not (m1 and m2 and m1.group(2) == m2.group(2)
                            and int(m1.group(1)) == self.k - 2
                            and int(m2.group(1)) == self.k - 1):
                        raise CannotStamp(f"graph output {v2.name} is not block "
                                          f"{self.k - 1}'s present")
                    presents[(q, j)] = m2.group(2)
                if any(u.node not in self.pos2 for u in v2.uses()):
                    exits.append((q, j))
                if (q, j) not in self.chain and any(u.node not in inside for u in v1.uses()):
                    raise CannotStamp(f"{v1.name} of block {self.k - 2} is read after the blocks")
        if sorted(exits) != sorted(self.chain) or not exits:
            raise CannotStamp(f"block {self.k - 1}'s outputs read after it {sorted(exits)} are "
                              f"not the values it takes from block {self.k - 2} "
                              f"{sorted(self.chain)}")
        return presents, exits

    def weights(self) -> dict[str, tuple[str, bool]]:
        """Template initializer name -> (source key, transposed) of the weights to stamp."""
        return {r[1].name: self.sources[r[1].name] for rs in self.roles for r in rs
                if r[0] == "weight"}


def _copy_attrs(node: oir.Node) -> dict[str, oir.Attr]:
    return {a.name: oir.Attr(a.name, a.type, a.value, ref_attr_name=a.ref_attr_name,
                             doc_string=a.doc_string) for a in node.attributes.values()}


class _Names:
    """Fresh value and node names: ``{name}_l{i}``, a counter added on a clash."""

    def __init__(self, graph: oir.Graph) -> None:
        self.taken = {n.name for n in graph} | {v.name for n in graph for v in n.outputs}
        self.taken |= {v.name for v in graph.inputs} | set(graph.initializers)

    def __call__(self, name: str | None, i: int) -> str:
        return fresh_name(self.taken, f"{name or 'v'}_l{i}")


def stamp(model: oir.Model, num_layers: int, sources: dict[str, tuple[str, bool]],
          key_shapes: dict[str, tuple[int, ...]], weight: WeightFn) -> int:
    """Grow ``model``, a cache graph captured with :data:`CAPTURED` layers, to ``num_layers``
    layers in place (see the module doc). ``sources``: initializer name -> (safetensors key,
    read transposed); ``key_shapes``: the shapes of all keys; ``weight(key, transposed, dtype,
    shape, name)`` makes the lazy tensor of a stamped weight. Returns the nodes added; raises
    :class:`CannotStamp` before changing anything when the blocks do not repeat."""
    k = CAPTURED
    g = model.graph
    prefix, blocks = find_blocks(g, k)
    plan = _Plan(blocks[k - 2], blocks[k - 1], prefix, k, sources)
    _io_anchor(g.inputs, _PAST, k)
    _io_anchor(g.outputs, _PRESENT, k)
    # every stamped weight exists, with the template's shape
    stamped: dict[tuple[str, int], tuple[str, bool]] = {}
    for name, (key, tr) in plan.weights().items():
        want = tuple(g.initializers[name].shape or ())
        for i in range(k, num_layers):
            ki = plan.shift(key, i)
            shape = key_shapes.get(ki or "")
            if shape is None or (tuple(shape[::-1]) if tr else tuple(shape)) != want:
                raise CannotStamp(f"weight {ki or key} for layer {i}: "
                                  f"{'missing' if shape is None else f'shape {shape}'}")
            stamped[(name, i)] = (ki, tr)  # type: ignore[assignment]
    names = _Names(g)
    t2 = plan.t2
    prev = {(q, j): v for q, n in enumerate(t2) for j, v in enumerate(n.outputs)}
    last = t2[-1]
    added = 0
    copies: set[oir.Node] = set()
    new_inputs: list[oir.Value] = []
    new_outputs: list[oir.Value] = []
    for i in range(k, num_layers):
        vals: dict[tuple[int, int], oir.Value] = {}
        inits: dict[str, oir.Value] = {}
        my_pasts: dict[str, oir.Value] = {}
        tape = oir.tape.Tape()
        for q, n in enumerate(t2):
            ins: list[oir.Value | None] = []
            for r in plan.roles[q]:
                if r[0] == "none":
                    ins.append(None)
                elif r[0] == "internal":
                    ins.append(vals[(r[1], r[2])])
                elif r[0] == "chain":
                    ins.append(prev[(r[1], r[2])])
                elif r[0] == "shared":
                    ins.append(r[1])
                elif r[0] == "past":
                    if r[1] not in my_pasts:
                        t = r[2]
                        my_pasts[r[1]] = oir.Value(
                            name=f"past_key_values.{i}.{r[1]}", type=t.type,
                            shape=t.shape.copy() if t.shape is not None else None)
                    ins.append(my_pasts[r[1]])
                else:  # weight
                    t = r[1]
                    if t.name not in inits:
                        key, tr = stamped[(t.name, i)]
                        nm = plan.shift(t.name, i) or names(t.name, i)
                        inits[t.name] = tape.initializer(
                            weight(key, tr, t.dtype, tuple(t.shape), nm), nm)
                    ins.append(inits[t.name])
            outs = []
            for j, o in enumerate(n.outputs):
                kind = plan.presents.get((q, j))
                nm = f"present.{i}.{kind}" if kind else names(o.name, i)
                outs.append(oir.Value(name=nm, type=o.type,
                                      shape=o.shape.copy() if o.shape is not None else None))
                vals[(q, j)] = outs[-1]
                if kind:
                    new_outputs.append(outs[-1])
            meta = {key: (plan.shift(v, i) or v) for key, v in n.metadata_props.items()}
            tape.op_multi_out(n.op_type, ins, _copy_attrs(n), outputs=outs, domain=n.domain,
                              overload=n.overload, version=n.version, name=names(n.name, i),
                              doc_string=n.doc_string, metadata_props=meta)
        for v in tape.initializers:
            g.register_initializer(v)
        new_inputs += [my_pasts[w] for w in ("key", "value") if w in my_pasts]
        nodes = tape.nodes
        g.insert_after(last, nodes)
        copies.update(nodes)
        last = nodes[-1]
        added += len(nodes)
        prev = vals
    for q, j in plan.exits:  # the nodes after the blocks read the last copy
        for use in list(t2[q].outputs[j].uses()):
            if use.node not in copies:
                use.node.replace_input_with(use.idx, prev[(q, j)])
    _insert_io(g, new_inputs, new_outputs, k)
    for key in _STALE_META:
        g.metadata_props.pop(key, None)
    g.sort()
    return added


def _io_anchor(seq: Any, pattern: re.Pattern, k: int) -> int:
    """Position of the last graph input / output of layer ``k-1`` matching ``pattern``."""
    at = max((j for j, v in enumerate(seq) if (m := pattern.match(v.name or ""))
              and int(m.group(1)) == k - 1), default=None)
    if at is None:
        raise CannotStamp(f"no graph input or output {pattern.pattern} of layer {k - 1}")
    return at


def _insert_io(g: oir.Graph, inputs: list[oir.Value], outputs: list[oir.Value], k: int) -> None:
    """Stamped pasts after ``past_key_values.{k-1}.*``, presents after ``present.{k-1}.*``."""
    for seq, pattern, new in ((g.inputs, _PAST, inputs), (g.outputs, _PRESENT, outputs)):
        at = _io_anchor(seq, pattern, k)
        for off, v in enumerate(new):
            seq.insert(at + 1 + off, v)
