"""ONNX -> Relax for the TVM backend.

Rewritten graphs are first specialized to a static ``[batch, tokens]`` input shape and
simplified (onnxscript's optimizer: constant folding, shape arithmetic gone), then imported by
a subclass of TVM's ONNX importer that adds what the stock one lacks:

- ``com.microsoft.MatMulNBits`` and ``MatMul`` with a constant 2-D weight (plain linears,
  low-rank chains, on GPU the Kronecker factors of online Hadamards) -> a ``call_tir`` of
  :func:`tvm_kernels.qmatmul_func` (the ``RotaqQMatMul`` nodes of :mod:`tvm_matmul`'s rewrite
  rules, weights repacked and tiled);
- on CPU, online Hadamards and attention chains -> rotaq's fused kernels (the ``RotaqKron`` /
  ``RotaqAttention`` nodes of the rules in :mod:`tvm_hadamard` and :mod:`tvm_attention`);
- values whose shape the importer lost are re-annotated with ONNX's inferred static shape
  (``match_cast``), and scalar shape values are turned into tensors where an op needs one.

Large initializers stay function parameters (bound at run time from the artefact's params);
small ones become constants so shape computations fold.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from rotaq.backends import tvm_attention as A
from rotaq.backends import tvm_hadamard as H
from rotaq.backends import tvm_kernels as K
from rotaq.backends import tvm_vnni as V
from rotaq.backends.tvm_causal import mark_causal
from rotaq.backends.tvm_gqa import fold_gqa
from rotaq.backends.tvm_matmul import QOP, lower_matmuls_ir
from rotaq.errors import RotaqError

log = logging.getLogger(__name__)

_CONST_MAX_ELEMS = 4096  # initializers up to this size are imported as constants
_PRIM_OK = {"Add", "Sub", "Mul", "Div", "Mod", "Unsqueeze", "Concat", "Equal", "Where", "Cast",
            "Shape", "Gather", "Slice", "Expand", "Squeeze", "CastLike"}


# ---- ONNX preprocessing -----------------------------------------------------------------------
def specialize(model: Any, shapes: dict[str, list[int]]) -> Any:
    """An ``onnx.ModelProto`` of ``model`` (path or ModelProto) with static input ``shapes``,
    constant-folded, with unique node names and ONNX-inferred shapes on every value."""
    import onnx
    import onnx_ir as oir
    import onnxscript.optimizer as opt

    m = oir.load(model) if isinstance(model, str) else oir.serde.deserialize_model(model)
    for v in m.graph.inputs:
        if v.name in shapes:
            v.shape = oir.Shape(list(shapes[v.name]))
    for node in m.graph:
        for o in node.outputs:
            o.shape = None
    for o in m.graph.outputs:
        o.shape = None
    opt.optimize(m, num_iterations=3)
    for i, node in enumerate(m.graph):
        node.name = f"n{i}_{node.op_type}"
    proto = oir.serde.serialize_model(m)
    return onnx.shape_inference.infer_shapes(proto, data_prop=True)


_TOKEN_NAME = re.compile(r"(ids|mask)$")  # input_ids, attention_mask, decoder_input_ids, ...
_INT_TYPES = (6, 7, 2, 3, 4, 5, 12, 13)  # ONNX INT32, INT64, UINT8, INT8, UINT16, INT16, ...


def _dims(vi: Any) -> list[Any]:
    return list(vi.type.tensor_type.shape.dim)


def _fixed(d: Any) -> int | None:
    """A dim's static size; torch's exporter sometimes writes one as a numeric dim_param."""
    if d.HasField("dim_value"):
        return int(d.dim_value)
    return int(d.dim_param) if d.dim_param.isdigit() else None


def pad_axes(proto: Any, declared: dict[str, int | None] | None = None) -> dict[str, int]:
    """Input name -> its token axis, the one padded to a compiled length at run time.

    Default: integer inputs named like token inputs (``*ids``, ``*mask``) whose axis 1 is
    symbolic get axis 1; every other input keeps its shape. ``declared`` (``--pad-axis
    NAME:AXIS``; ``None`` for no axis) overrides the default per input. An input whose dim
    carries the same symbolic name as a padded axis is padded on that dim too (it has the
    same length by the model's own declaration)."""
    specs = {vi.name: vi for vi in proto.graph.input}
    axes: dict[str, int] = {}
    for name, vi in specs.items():
        dims = _dims(vi)
        if (vi.type.tensor_type.elem_type in _INT_TYPES and _TOKEN_NAME.search(name)
                and len(dims) >= 2 and _fixed(dims[1]) is None):
            axes[name] = 1
    for name, axis in (declared or {}).items():
        if name not in specs:
            raise RotaqError(f"--pad-axis {name}: the model has no input {name!r} "
                             f"(inputs: {', '.join(specs)})")
        if axis is None:
            axes.pop(name, None)
            continue
        dims = _dims(specs[name])
        if not 0 <= axis < len(dims):
            raise RotaqError(f"--pad-axis {name}:{axis}: {name!r} has {len(dims)} axes")
        if _fixed(dims[axis]) is not None:
            raise RotaqError(f"--pad-axis {name}:{axis}: that axis is fixed at "
                             f"{_fixed(dims[axis])} in the model, it cannot be padded")
        axes[name] = axis
    params = {_dims(specs[n])[a].dim_param for n, a in axes.items()} - {""}
    for name, vi in specs.items():
        if name in axes or name in (declared or {}):
            continue
        shared = [i for i, d in enumerate(_dims(vi)) if i > 0 and d.dim_param in params]
        if shared:
            axes[name] = shared[0]
    return axes


def static_shapes(proto: Any, n: int, axes: dict[str, int],
                  sample: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """Input name -> static shape for ``n`` tokens: the token axis (``axes``) is ``n``, fixed
    dims stay, a symbolic batch (axis 0) is 1, other symbolic dims come from the model's sample
    inputs (``sample``: name -> shape)."""
    out = {}
    for vi in proto.graph.input:
        dims, shape = _dims(vi), []
        have = sample.get(vi.name)
        for i, d in enumerate(dims):
            if axes.get(vi.name) == i:
                shape.append(n)
            elif _fixed(d) is not None:
                shape.append(_fixed(d))
            elif i == 0:
                shape.append(1)
            elif have is not None and len(have) == len(dims):
                shape.append(int(have[i]))
            else:
                raise RotaqError(f"input {vi.name!r}: axis {i} ({d.dim_param or 'unnamed'}) is "
                                 "neither fixed nor a token axis and no sample input gives its "
                                 f"size: declare it with --pad-axis {vi.name}:{i}")
        out[vi.name] = shape
    return out


def _static_shapes(proto: Any) -> dict[str, tuple[list[int], int]]:
    out = {}
    for vi in list(proto.graph.value_info) + list(proto.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if all(d >= 0 for d in dims):
            out[vi.name] = (dims, t.elem_type)
    return out


# ---- importer ---------------------------------------------------------------------------------
def _importer_class():
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as F


    def is_prim(x: Any) -> bool:
        return x is not None and isinstance(getattr(x, "ty", None), tvm.ir.PrimType)

    def const_np(x: Any, params: dict) -> np.ndarray | None:
        if isinstance(x, tvm.ir.GenericConst):
            return x.value.numpy()
        for var, arr in params.values():
            if var.same_as(x):
                return arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr)
        return None

    class Importer(F.ONNXGraphImporter):
        """TVM's ONNX importer plus rotaq's kernels (see the module doc)."""

        def __init__(self, shapes: dict, cpu: bool, features: frozenset[str] = frozenset(),
                     **kw: Any):
            super().__init__({}, "float32", keep_params_in_input=True, **kw)
            self._known = shapes
            self._cpu = cpu
            self._avx512 = cpu and "avx512f" in features
            self._vnni = cpu and V.FEATURE in features
            self.stats = {"qmatmul": 0, "qmatmul_vnni": 0, "matmul_const": 0, "kron": 0,
                          "attention": 0, "reannotated": 0}

        def _parse_graph_initializers(self, graph: Any) -> None:
            for init in graph.initializer:
                arr = self._parse_array(init)
                if int(np.prod(init.dims, dtype=np.int64)) <= _CONST_MAX_ELEMS:
                    self._nodes[init.name] = relax.const(arr)
                    continue
                name = init.name.removeprefix("onnx::")
                var = self._new_var(name, shape=arr.shape, dtype=arr.dtype)
                self._nodes[init.name] = var
                self._params[name] = (var, arr)

        def _check_for_unsupported_ops(self, graph: Any) -> None:
            saved = list(graph.node)
            keep = [n for n in saved if n.op_type not in (QOP, H.KRON_OP, A.ATTN_OP)]
            del graph.node[:]
            graph.node.extend(keep)
            try:
                super()._check_for_unsupported_ops(graph)
            finally:
                del graph.node[:]
                graph.node.extend(saved)

        def _convert_operator(self, op_name: str, inputs: Any, attrs: dict, opset: int) -> Any:
            fixed = [self._tensor(x) if is_prim(x) and (op_name not in _PRIM_OK or
                                                         (op_name == "Reshape" and i == 0))
                     else x for i, x in enumerate(inputs)]
            name = attrs["tvm_custom"]["name"]
            if op_name == QOP:
                out = self._nbits(fixed, attrs)
            elif op_name == H.KRON_OP:
                out = self._kron(fixed, attrs, opset)
            elif op_name == "Sigmoid" and self._cpu:  # vectorizable exp (libm's is scalar)
                out = self.bb.emit_te(A.fast_sigmoid, fixed[0])
            elif op_name == A.ATTN_OP:
                out, fused = A.emit_attention(self.bb, fixed, attrs, self._call_tir)
                self.stats["attention"] += fused
            else:
                out = super()._convert_operator(op_name, F.onnx_input(fixed), attrs, opset)
            return self._reannotate(out, name)

        # -- helpers
        def _tensor(self, v: Any) -> Any:
            t = self.bb.normalize(relax.op.shape_to_tensor(relax.ShapeExpr([v])))
            return self.bb.normalize(relax.op.reshape(t, ()))

        def _reannotate(self, out: Any, node_name: str) -> Any:
            if not isinstance(out, relax.Expr) or not isinstance(out.ty, relax.TensorType):
                return out
            if out.ty.shape is not None and out.ty.ndim >= 0:
                return out
            known = self._known.get(node_name)
            if known is None:
                return out
            self.stats["reannotated"] += 1
            var = self.bb.emit(out)
            return self.bb.match_cast(var, relax.TensorType(known, out.ty.dtype))

        def _rows(self, x: Any) -> tuple[Any, list[int], int]:
            shape = [int(d) for d in x.ty.shape]
            m = int(np.prod(shape[:-1], dtype=np.int64))
            return self.bb.normalize(relax.op.reshape(x, (m, shape[-1]))), shape, m

        def _call(self, func: Any, args: list, m: int, n: int, shape: list[int],
                  hint: str) -> Any:
            y = self._call_tir(func, args, (m, n), hint)
            return self.bb.normalize(relax.op.reshape(y, (*shape[:-1], n)))

        def _call_tir(self, func: Any, args: list, out_shape: tuple, hint: str) -> Any:
            # opaque: FuseOps must not merge rotaq's scheduled kernels with neighbours
            func = func.without_attr("global_symbol").with_attr("op_pattern", 8)
            gv = self.bb.add_func(func, hint)
            return self.bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))

        def _schedule(self, func: Any, m: int, n: int, nt: int) -> Any:
            if self._cpu:
                return K.schedule_qmatmul_cpu(func, m, n, nt, avx512=self._avx512)
            return K.schedule_qmatmul_gpu(func, m, n, nt)

        def _kron(self, inputs: Any, attrs: dict, opset: int) -> Any:
            a, b, fa, fb = (int(attrs[k]) for k in ("a", "b", "fwht_a", "fwht_b"))
            plain = {"tvm_custom": attrs["tvm_custom"]}
            split = self.bb.normalize(super()._convert_operator(
                "Reshape", F.onnx_input([inputs[0], inputs[3]]), dict(plain), opset))
            shape = [int(d) for d in split.ty.shape]
            m = int(np.prod(shape, dtype=np.int64)) // (a * b)
            x2 = self.bb.normalize(relax.op.reshape(split, (m, a * b)))
            func = H.kron_func(m, a, b, bool(fa), bool(fb))
            func = H.schedule_kron_cpu(func, m)
            self.stats["kron"] += 1
            y = self._call(func, [x2, inputs[1], inputs[2]], m, a * b, [m, a * b], "hadamard")
            y = self.bb.normalize(relax.op.reshape(y, shape))
            return super()._convert_operator("Reshape", F.onnx_input([y, inputs[4]]), plain,
                                             opset)

        def _nbits(self, inputs: Any, attrs: dict) -> Any:
            k, n, bits, block, act, nt = (int(attrs[a]) for a in (
                "K", "N", "bits", "block_size", "act_bits", "tile"))
            n_w = 1 if bits == 32 else 3
            bias = inputs[1 + n_w] if len(inputs) > 1 + n_w else None
            x2, shape, m = self._rows(inputs[0])
            if self._vnni and V.applies(m, k, bits, block, act, nt):  # integer products
                self.stats["qmatmul_vnni"] += 1
                y = self._call(V.qmatmul_vnni_func(m, k, n, block, nt), [x2, *inputs[1:4]],
                               m, n, shape, "qmatmul_vnni")
                return y if bias is None else self.bb.normalize(relax.op.add(y, bias))
            func = K.qmatmul_func(m, k, n, bits, block, act, bias is not None, nt)
            func = self._schedule(func, m, n, nt)
            self.stats["qmatmul" if bits < 32 else "matmul_const"] += 1
            call_args = [x2, *inputs[1 : 1 + n_w]] + ([bias] if bias is not None else [])
            hint = f"qmatmul_int{bits}" if bits < 32 else "dense_matmul"
            return self._call(func, call_args, m, n, shape, hint)

    return Importer


def import_onnx(proto: Any, cpu: bool = True, features: frozenset[str] = frozenset()
                ) -> tuple[Any, list[str], list[np.ndarray], dict]:
    """Relax module of a specialized ONNX model -> (module without params, input names,
    parameter arrays in call order, importer stats). ``features``: the CPU target's
    :func:`tvm_build.cpu_features` (``avx512f``: register tiles of rotaq's matmul kernel,
    :func:`tvm_kernels.schedule_qmatmul_cpu`; ``avx512vnni``: :mod:`tvm_vnni`'s int8 kernel)."""
    from tvm import relax

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    known = {}
    by_output = _static_shapes(proto)
    for node in proto.graph.node:
        if len(node.output) == 1 and node.output[0] in by_output:
            known[node.name] = by_output[node.output[0]][0]
    proto, stats = lower(proto, cpu)
    importer = _importer_class()(known, cpu, features)
    mod = importer.from_onnx(proto.graph, opset)
    mod, params = relax.frontend.detach_params(mod)
    arrays = [p.numpy() for p in params.get("main", [])]
    return mod, list(importer._input_names), arrays, {**importer.stats, **stats}


def lower(proto: Any, cpu: bool) -> tuple[Any, dict[str, int]]:
    """The ONNX-side lowerings, as rewrite rules on one ``onnx_ir`` model: on CPU the online
    Hadamards (before the matmul rules take their factors) and attention chains, then the
    matmuls; then, on the proto, GQA folding and causal marking (they run subgraphs on probe
    data). Returns (lowered proto, stats: ``gqa_folded`` and ``causal`` on CPU)."""
    import onnx_ir as ir

    model, stats = ir.serde.deserialize_model(proto), {}
    attention = 0
    if cpu:  # GPU builds keep the two small MatMuls and the attention ops (dlight)
        H.lower_kron_ir(model)
        attention = A.lower_attention_ir(model)
        stats["gqa_folded"] = stats["causal"] = 0
    lower_matmuls_ir(model)
    # one conversion back: the weights are copied once (a second round trip before the matmul
    # rules cost as much as the whole hand-written lowering on SmolLM2's fp32 weights)
    proto = ir.serde.serialize_model(model)
    if attention:
        stats["gqa_folded"], stats["causal"] = fold_gqa(proto), mark_causal(proto)
        if stats["gqa_folded"]:  # the folded chains' shapes and scalars
            used = {i for nd in proto.graph.node for i in nd.input}
            keep = [t for t in proto.graph.initializer if t.name in used]
            del proto.graph.initializer[:]
            proto.graph.initializer.extend(keep)
    return proto, stats
