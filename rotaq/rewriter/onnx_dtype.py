"""Low-precision ONNX graphs (fp16 / bf16): float copies and the dtype's own rounding noise.

- :func:`convert_float` copies a model with every fp16/bf16 tensor (initializers, constants,
  ``Cast`` targets, value types, graph inputs/outputs) in fp32. fp16 and bf16 values are exact in
  fp32, so the copy computes the same function with less rounding.
- :func:`round_through` inserts ``Cast(low) -> Cast(float)`` after every float node output of an
  fp32 graph: the graph then rounds each intermediate as a ``low`` graph would, while ORT runs
  it in fp32 kernels (its CPU provider has no bf16 MatMul).
- :func:`rotaq.rewriter.onnx_noise.rounding_noise` measures ``e0`` with them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as oir

from rotaq import tags

logger = logging.getLogger(__name__)

LOW = {oir.DataType.FLOAT16: "float16", oir.DataType.BFLOAT16: "bfloat16"}
_F32 = oir.DataType.FLOAT
_ROUND_ROLE = tags.ROUND
# fewer mantissa bits first: the coarser dtype decides the noise when both appear
_COARSE_FIRST = (oir.DataType.BFLOAT16, oir.DataType.FLOAT16)


def _convert_tensor(t: Any, to: oir.DataType) -> oir.Tensor:
    """``t`` (fp16 / bf16) widened to ``to`` directly: exact, and no float64 copy of a large
    weight (a block's fp32 copy costs its fp32 size, not three times it)."""
    arr = np.asarray(t.numpy()).astype(to.numpy())
    return oir.Tensor(arr, dtype=to, name=t.name)


def convert_float(model: oir.Model, to: oir.DataType = _F32) -> oir.Model:
    """A copy of ``model`` with every fp16/bf16 tensor, constant and ``Cast`` target in ``to``."""
    copy = model.clone()
    g = copy.graph
    for v in g.initializers.values():
        if v.const_value is not None and v.const_value.dtype in LOW:
            v.const_value = _convert_tensor(v.const_value, to)
    seen = {id(v) for v in g.inputs} | {id(v) for v in g.initializers.values()}
    values = [*g.inputs, *g.initializers.values(), *g.outputs]
    for node in oir.traversal.RecursiveGraphIterator(g):
        values += [o for o in node.outputs if id(o) not in seen]
        for name, attr in node.attributes.items():
            if name in ("to", "dtype") and attr.type == oir.AttributeType.INT:
                if attr.value in (int(d) for d in LOW):
                    node.attributes[name] = oir.AttrInt64(name, int(to))
            elif attr.type == oir.AttributeType.TENSOR and attr.value.dtype in LOW:
                node.attributes[name] = oir.AttrTensor(name, _convert_tensor(attr.value, to))
    for v in values:
        if v.dtype in LOW:  # a new type object: a clone shares its types with the original
            v.type = oir.TensorType(to)
    return copy


def round_through(model: oir.Model, low: oir.DataType) -> oir.Model:
    """A copy of the fp32 ``model`` whose every float node output is rounded to ``low``."""
    copy = model.clone()
    g = copy.graph
    for node in list(g):
        if node.op_type == "Constant" or node.metadata_props.get(_ROUND_ROLE):
            continue
        for y in node.outputs:
            if y.dtype != _F32:
                continue
            output = any(o is y for o in g.outputs)
            mid = oir.Value(name=f"{y.name}__rotaq_{LOW[low]}", type=oir.TensorType(low))
            back = oir.Value(name=f"{y.name}__rotaq_rounded", type=oir.TensorType(_F32),
                             shape=y.shape)
            y.replace_all_uses_with(back, replace_graph_outputs=True)  # before the Cast reads y
            tape = oir.tape.Tape()
            for src, to, out in ((y, low, mid), (mid, _F32, back)):
                tape.op("Cast", [src], {"to": int(to)}, output=out,
                        metadata_props={_ROUND_ROLE: "1"})
            g.insert_after(node, tape.nodes)
            if output:  # the graph output keeps its name
                back.name, y.name = y.name, f"{y.name}__rotaq_unrounded"
    return copy


def has_low(model: oir.Model) -> bool:
    """Whether any initializer or value of ``model``'s main graph is fp16 / bf16."""
    g = model.graph
    return any(v.dtype in LOW for v in [*g.inputs, *g.initializers.values()]) or any(
        o.dtype in LOW for n in g for o in n.outputs)


def low_precision(graph: Any) -> tuple[oir.DataType | None, bool]:
    """(coarsest fp16/bf16 dtype among the linears' weights as stored and their activations,
    whether the activations themselves are in it) for an ``OnnxGraph``; (None, False) when
    every linear is fp32/fp64."""
    seen: set[oir.DataType] = set()
    compute: set[oir.DataType] = set()
    view = graph.view()
    for n in view.nodes:
        if n.op != "linear" or n.params.get("quantized"):  # pre-quantized: no float weight
            continue
        lin = graph._linear(n.key)
        x = lin.node.inputs[0]
        if x is not None and x.dtype in LOW:
            compute.add(x.dtype)
        stored = graph._const(lin.weight)
        if stored is not None and stored.dtype in LOW:
            seen.add(stored.dtype)
    seen |= compute
    for d in _COARSE_FIRST:
        if d in seen:
            return d, d in compute
    return None, False
