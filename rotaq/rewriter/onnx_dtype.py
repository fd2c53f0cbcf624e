"""Low-precision ONNX graphs (fp16 / bf16): float copies and the dtype's own rounding noise.

- :func:`convert_float` copies a model with every fp16/bf16 tensor (initializers, constants,
  ``Cast`` targets, value types, graph inputs/outputs) in fp32. fp16 and bf16 values are exact in
  fp32, so the copy computes the same function with less rounding.
- :func:`round_through` inserts ``Cast(low) -> Cast(float)`` after every float node output of an
  fp32 graph: the graph then rounds each intermediate as a ``low`` graph would, while ORT runs
  it in fp32 kernels (its CPU provider has no bf16 MatMul).
- :func:`rounding_noise` measures ``e0``: the max relative output error of the model in its low
  dtype (run natively, or emulated with :func:`round_through`) against its fp32 copy.
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


def rounding_noise(graph: Any, feeds: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """``{"dtype", "e0", "method"}``: the max relative error of ``graph`` in its low dtype vs
    its fp32 copy on ``feeds``; None for an fp32 graph (or when either run is not finite). ``method`` is ``native`` when ORT runs
    the graph in that dtype, else ``emulated`` (fp32 copy rounding every op output to it)."""
    from rotaq.model import blockwise_bytes, max_rel_error, weight_bytes
    from rotaq.rewriter.onnx_run import ort_session

    low, computes_low = low_precision(graph)
    if low is None:
        return None
    if weight_bytes(graph) > blockwise_bytes():  # one block's fp32 copy at a time
        ref, lp, method = _noise_blockwise(graph, feeds, low, computes_low)
    else:
        high = convert_float(graph.model)
        ref = run_model(high, feeds, ort_session)
        if computes_low and not graph.runs_upcast(feeds):
            lp, method = graph.run(feeds), "native"
        else:
            lp, method = run_model(round_through(high, low), feeds, ort_session), "emulated"
    if not all(np.isfinite(np.asarray(a, np.float64)).all() for a in [*ref, *lp]):
        logger.warning("%s rounding noise not measurable (non-finite outputs)", LOW[low])
        return None
    e0 = max_rel_error(ref, lp)
    logger.info("%s rounding noise e0=%.3g (%s)", LOW[low], e0, method)
    return {"dtype": LOW[low], "e0": e0, "method": method}


def _noise_blockwise(graph: Any, feeds: dict[str, np.ndarray], low: oir.DataType,
                     computes_low: bool) -> tuple[list, list, str]:
    """(fp32 reference, low-precision run, method) of a large graph, block by block: each
    segment converted to fp32 (and, emulated, rounded to ``low``) only while it runs."""
    from rotaq.rewriter.blocks import BlockRunner, run_blockwise

    ref = run_blockwise(graph, feeds, precision="fp32")
    if computes_low:
        with BlockRunner(graph, feeds) as r:
            r.run()
            if not r.exec._upcast:  # ORT ran every segment in the graph's own dtype
                return ref, r.result(), "native"
    return ref, run_blockwise(graph, feeds, precision=f"round:{LOW[low]}"), "emulated"


def run_model(model: oir.Model, feeds: dict[str, np.ndarray], make_session: Any) -> list:
    """Run ``model`` (an fp32 copy) on ``feeds``, float feeds cast to the input dtypes."""
    sess = make_session(model)
    return sess.run(None, cast_feeds(model, feeds))


def cast_feeds(model: oir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    types = {v.name: v.dtype for v in model.graph.inputs}
    for k, v in feeds.items():
        a = np.asarray(v)
        dt = types.get(k)
        floating = np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"
        if dt is not None and dt.is_floating_point() and floating:
            a = a.astype(dt.numpy())
        out[k] = a
    return out
