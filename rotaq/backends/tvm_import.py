"""ONNX -> Relax for the TVM backend.

Rewritten graphs are first specialized to a static ``[batch, tokens]`` input shape and
simplified (onnxscript's optimizer: constant folding, shape arithmetic gone), then imported by
a subclass of TVM's ONNX importer that adds what the stock one lacks:

- ``com.microsoft.MatMulNBits`` (2/4/8-bit blocked weights, asymmetric zero points, bias,
  ``accuracy_level=4`` int8 activations) -> a ``call_tir`` of :func:`tvm_kernels.qmatmul_func`
  with the weight repacked to ``uint8 [K / per, N]`` plus fp32 scale and shift ``[blocks, N]``;
- ``MatMul`` with a constant 2-D weight (plain linears, low-rank chains, Kronecker factors of
  online Hadamards) -> the same kernel with an fp32 weight, so every linear gets a schedule;
- values whose shape the importer lost are re-annotated with ONNX's inferred static shape
  (``match_cast``), and scalar shape values are turned into tensors where an op needs one.

Large initializers stay function parameters (bound at run time from the artefact's params);
small ones become constants so shape computations fold.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

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


# ---- MatMulNBits weights ----------------------------------------------------------------------
def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes from bytes, low bits first: ``[rows, bytes] -> [rows, count]``."""
    per = 8 // bits
    p = packed.astype(np.uint16)
    parts = [(p >> (i * bits)) & (2**bits - 1) for i in range(per)]
    return np.stack(parts, axis=-1).reshape(p.shape[0], -1)[:, :count]


def repack_nbits(b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, k: int, n: int,
                 bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits ``B [N, blocks, blob]``, scales, packed zero points -> (codes ``uint8
    [ceil(K/per), N]`` packed along K, scale ``[blocks, N]``, shift ``[blocks, N]``) with
    ``w[k, n] = code * scale + shift``."""
    nb = -(-k // block)
    codes = _unpack(b.reshape(n, -1), bits, nb * block)  # [N, nb*block]
    per = 8 // bits
    kp = -(-nb * block // per)
    c = np.zeros((n, kp * per), np.uint16)
    c[:, : codes.shape[1]] = codes
    c = c.reshape(n, kp, per)
    packed = np.zeros((n, kp), np.uint16)
    for i in range(per):
        packed |= c[:, :, i] << (i * bits)
    sc = np.asarray(scales, np.float32).reshape(n, nb)
    if zp is None:
        z = np.full((n, nb), 2 ** (bits - 1), np.float32)
    elif zp.dtype == np.uint8:
        z = _unpack(zp.reshape(n, -1), bits, nb).astype(np.float32)
    else:
        z = np.asarray(zp, np.float32).reshape(n, nb)
    return (np.ascontiguousarray(packed.astype(np.uint8).T), np.ascontiguousarray(sc.T),
            np.ascontiguousarray((-z * sc).T))


_QOP = "RotaqQMatMul"


def lower_nbits(proto: Any) -> int:
    """Replace each MatMulNBits node by ``RotaqQMatMul(A, codes, scale, shift[, bias])`` with
    the weights repacked by :func:`repack_nbits` (new initializers; unused old ones dropped).
    Returns the number of nodes replaced."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    count = 0
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = list(node.input) + [""] * (6 - len(node.input))
        if ins[4]:
            raise ValueError(f"{node.name}: MatMulNBits with g_idx is not supported")
        arrs = [numpy_helper.to_array(inits[i]) if i else None for i in ins[1:4]]
        if arrs[0] is None or arrs[1] is None or any(i and i not in inits for i in ins[1:4]):
            raise ValueError(f"{node.name}: MatMulNBits needs constant weights")
        k, n, bits, block = (int(at[a]) for a in ("K", "N", "bits", "block_size"))
        new = repack_nbits(arrs[0], arrs[1], arrs[2], k, n, bits, block)
        names = []
        for suffix, arr in zip(("codes", "scale", "shift"), new):
            name = f"rotaq_q{count}_{suffix}"
            proto.graph.initializer.append(numpy_helper.from_array(arr, name))
            names.append(name)
        act = 8 if int(at.get("accuracy_level", 0)) == 4 else 0
        node.op_type, node.domain = _QOP, ""
        del node.input[:]
        node.input.extend([ins[0], *names] + ([ins[5]] if ins[5] else []))
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute(a, v) for a, v in
                               (("K", k), ("N", n), ("bits", bits), ("block_size", block),
                                ("act_bits", act))])
        count += 1
    used = {i for nd in proto.graph.node for i in nd.input}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return count


# ---- importer ---------------------------------------------------------------------------------
def _importer_class():
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as F

    from rotaq.backends import tvm_kernels as K

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

        def __init__(self, shapes: dict, cpu: bool, **kw: Any):
            super().__init__({}, "float32", keep_params_in_input=True, **kw)
            self._known = shapes
            self._cpu = cpu
            self.stats = {"qmatmul": 0, "matmul_const": 0, "reannotated": 0}

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
            keep = [n for n in saved if n.op_type != _QOP]
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
            if op_name == _QOP:
                out = self._nbits(fixed, attrs)
            elif op_name == "MatMul" and self._const_weight(fixed) is not None:
                out = self._dense(fixed)
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

        def _const_weight(self, inputs: Any) -> np.ndarray | None:
            w = inputs[1]
            if not isinstance(w.ty, relax.TensorType) or w.ty.ndim != 2:
                return None
            x = inputs[0]
            if not isinstance(x.ty, relax.TensorType) or x.ty.shape is None or x.ty.ndim < 1:
                return None
            arr = const_np(w, self._params)
            return arr if arr is not None and arr.dtype == np.float32 else None

        def _rows(self, x: Any) -> tuple[Any, list[int], int]:
            shape = [int(d) for d in x.ty.shape]
            m = int(np.prod(shape[:-1], dtype=np.int64))
            return self.bb.normalize(relax.op.reshape(x, (m, shape[-1]))), shape, m

        def _call(self, func: Any, args: list, m: int, n: int, shape: list[int],
                  hint: str) -> Any:
            gv = self.bb.add_func(func.without_attr("global_symbol"), hint)
            y = self.bb.emit(relax.call_tir(gv, args, relax.TensorType((m, n), "float32")))
            return self.bb.normalize(relax.op.reshape(y, (*shape[:-1], n)))

        def _schedule(self, func: Any, m: int, n: int) -> Any:
            return (K.schedule_qmatmul_cpu if self._cpu else K.schedule_qmatmul_gpu)(func, m, n)

        def _dense(self, inputs: Any) -> Any:
            x2, shape, m = self._rows(inputs[0])
            k, n = (int(d) for d in inputs[1].ty.shape)
            func = self._schedule(K.qmatmul_func(m, k, n, 32, 1), m, n)
            self.stats["matmul_const"] += 1
            return self._call(func, [x2, inputs[1]], m, n, shape, "dense_matmul")

        def _nbits(self, inputs: Any, attrs: dict) -> Any:
            k, n, bits, block = (int(attrs[a]) for a in ("K", "N", "bits", "block_size"))
            act = int(attrs.get("act_bits", 0))
            bias = inputs[4] if len(inputs) > 4 else None
            x2, shape, m = self._rows(inputs[0])
            func = self._schedule(K.qmatmul_func(m, k, n, bits, block, act, bias is not None),
                                  m, n)
            self.stats["qmatmul"] += 1
            call_args = [x2, *inputs[1:4]] + ([bias] if bias is not None else [])
            return self._call(func, call_args, m, n, shape, f"qmatmul_int{bits}")

    return Importer


def import_onnx(proto: Any, cpu: bool = True) -> tuple[Any, list[str], list[np.ndarray], dict]:
    """Relax module of a specialized ONNX model -> (module without params, input names,
    parameter arrays in call order, importer stats)."""
    from tvm import relax

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    known = {}
    by_output = _static_shapes(proto)
    for node in proto.graph.node:
        if len(node.output) == 1 and node.output[0] in by_output:
            known[node.name] = by_output[node.output[0]][0]
    lower_nbits(proto)
    importer = _importer_class()(known, cpu)
    mod = importer.from_onnx(proto.graph, opset)
    mod, params = relax.frontend.detach_params(mod)
    arrays = [p.numpy() for p in params.get("main", [])]
    return mod, list(importer._input_names), arrays, dict(importer.stats)
