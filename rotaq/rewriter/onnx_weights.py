"""Reads and writes of an :class:`~rotaq.rewriter.onnx.OnnxGraph`'s weights: the
:class:`OnnxWeights` mixin. Every setter writes a fresh initializer in the original dtype (behind
a fresh ``Cast`` when the weight is stored cast up), so a tensor read by another node is never
changed behind its back; large new tensors are spilled to disk (:mod:`rotaq.rewriter.onnx_store`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as oir

from rotaq.errors import RewriteError
from rotaq.rewriter import onnx_contrib, onnx_store
from rotaq.rewriter.onnx_lift import _attr, _scope


class OnnxWeights:
    """Constants, linears and embeddings of :class:`~rotaq.rewriter.onnx.OnnxGraph` as float64
    arrays, and their replacement."""

    def _array(self, v: oir.Value) -> np.ndarray:
        t = self._const(v)
        if t is None:
            raise RewriteError(f"value {v.name!r} is not a constant")
        arr = t.numpy()
        return arr.astype(np.float64) if t.dtype.is_floating_point() else np.array(arr)

    def get_const(self, value: str) -> np.ndarray:
        return self._array(self._value(value))

    # ------------------------------------------------------------------ edits
    def _initializer(self, array: np.ndarray, dtype: oir.DataType, hint: str) -> oir.Value:
        name = self._fresh(hint)
        v = oir.val(name, const_value=self._store.tensor(array, dtype, name))
        self.model.graph.register_initializer(v)
        return v

    def _like(self, ref: oir.Value, array: np.ndarray, hint: str) -> oir.Value:
        """A fresh constant holding ``array`` stored as ``ref`` is: in its dtype, or, when
        ``ref`` is ``Cast(W)``, in ``W``'s dtype behind a fresh Cast of the same target."""
        cast = self._const_cast(ref)
        if cast is None:
            return self._initializer(array, self._const(ref).dtype, hint)
        src = self._like(cast.inputs[0], array, hint)
        to = oir.DataType(_attr(cast, "to"))
        tape = oir.tape.Tape()
        out = tape.op("Cast", [src], {"to": int(to)}, name=self._fresh(f"{hint}_cast"),
                      metadata_props=dict(cast.metadata_props),
                      output=oir.val(self._fresh(f"{hint}_cast"), to, list(np.shape(array))))
        self.model.graph.insert_before(next(iter(self.model.graph)), tape.nodes)
        return out

    def _hint(self, node: oir.Node, suffix: str) -> str:
        scope = _scope(node)
        return f"{scope}.{suffix}" if scope else f"{node.name}.{suffix}"

    def _drop_if_unused(self, v: oir.Value | None) -> None:
        """Remove an orphaned initializer, or an orphaned Transpose/Constant and what it read."""
        g = self.model.graph
        if v is None or v.is_graph_output() or v.is_graph_input() or list(v.uses()):
            return
        if v.is_initializer():
            g.initializers.pop(v.name, None)
            return
        prod = v.producer()
        if prod is None or prod.graph is not g or prod.op_type not in (
                "Transpose", "Constant", "Cast"):
            return
        if any(list(o.uses()) or o.is_graph_output() for o in prod.outputs):
            return
        inputs = list(prod.inputs)
        g.remove(prod, safe=True)
        for i in inputs:
            self._drop_if_unused(i)

    def set_const(self, node: str, index: int, array: np.ndarray) -> None:
        """Input ``index`` of ``node`` <- a fresh constant holding ``array`` (original dtype)."""
        op = self._kinds.get(node) if self._view is None else None
        if op is None:
            g = self.view().by_key.get(node)
            op = g.op if g is not None else None
        n = self._node(node)
        if op is None or op in ("linear", "embedding"):
            raise RewriteError(f"set_const: use set_linear/set_embedding for node {node!r}")
        if op == "rms_norm" and index == 2:
            raise RewriteError(f"set_const: RMS norm {node!r} has no bias input")
        index = onnx_contrib.node_input_index(n, index)  # skip norms: view input 1 = node 2
        n_inputs = 3 if op in ("layer_norm", "rms_norm") else len(n.inputs)
        if index < 0 or index >= max(n_inputs, len(n.inputs)):
            raise RewriteError(f"set_const: node {node!r} has no input {index}")
        old = n.inputs[index] if index < len(n.inputs) else None
        if old is not None and not self._is_const(old):
            raise RewriteError(f"set_const: input {index} of {node!r} is not a constant")
        ref = old or next((v for v in n.inputs[1:] if v is not None and v.dtype), n.inputs[0])
        if ref is None or ref.dtype is None:
            raise RewriteError(f"set_const: dtype of input {index} of {node!r} is unknown")
        hint = self._hint(n, f"in{index}")
        new = (self._like(old, np.asarray(array), hint) if old is not None
               else self._initializer(np.asarray(array), ref.dtype, hint))
        if index >= len(n.inputs):
            n.resize_inputs(index + 1)
        n.replace_input_with(index, new)
        self._drop_if_unused(old)
        self._invalidate()

    def get_linear(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        lin = self._linear(key)
        t = self._const(lin.weight)
        if t is not None and len(t.shape) == 2 and t.dtype.is_floating_point():
            # one float64 copy, read in chunks from disk (no full-size temporaries)
            w = onnx_store.as_float64(t, transpose=lin.layout == "io")
        else:
            w = self._array(lin.weight)
            w = w.T if lin.layout == "io" else w
        if lin.alpha != 1.0:
            w = w * lin.alpha
        if lin.bias is None:
            return w, None
        b = self._array(lin.bias).reshape(-1)
        b = np.broadcast_to(b, (lin.out_features,)) * (lin.beta if lin.bias_add is None else 1.0)
        return np.ascontiguousarray(w), np.array(b)

    def set_linear(self, key: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """Linear(x) -> x W^T + b with fresh constants; the output value keeps its name."""
        lin = self._linear(key)
        n, g = lin.node, self.model.graph
        weight = np.asarray(weight, dtype=np.float64)
        if weight.shape != (lin.out_features, lin.in_features):
            raise RewriteError(
                f"set_linear {key!r}: weight shape {weight.shape} != "
                f"{(lin.out_features, lin.in_features)}"
            )
        if bias is not None:
            bias = np.asarray(bias, dtype=np.float64).reshape(-1)
            if bias.shape != (lin.out_features,):
                raise RewriteError(f"set_linear {key!r}: bias shape {bias.shape} is wrong")
        old_w = n.inputs[1]
        if n.op_type == "Gemm":
            new_w = self._like(lin.weight, weight, self._hint(n, "weight"))
            n.attributes["transB"] = oir.AttrInt64("transB", 1)
            n.attributes["alpha"] = oir.AttrFloat32("alpha", 1.0)
        else:
            new_w = self._like(lin.weight, weight.T, self._hint(n, "weight"))
        n.replace_input_with(1, new_w)
        self._drop_if_unused(old_w)
        if n.op_type == "Gemm" and lin.bias_add is None:
            old_c = n.inputs[2] if len(n.inputs) > 2 else None
            if bias is None:
                n.resize_inputs(2)
            else:
                ref = old_c if old_c is not None else lin.weight
                new_c = self._like(ref, bias, self._hint(n, "bias"))
                if len(n.inputs) < 3:
                    n.resize_inputs(3)
                n.replace_input_with(2, new_c)
                n.attributes["beta"] = oir.AttrFloat32("beta", 1.0)
            self._drop_if_unused(old_c)
        elif lin.bias_add is not None:
            add = lin.bias_add
            idx = 0 if add.inputs[0] is lin.bias else 1
            if bias is None:
                y, z = n.outputs[0], add.outputs[0]
                name = z.name
                z.replace_all_uses_with(y, replace_graph_outputs=True)
                g.remove(add, safe=True)
                z.name, y.name = self._fresh(f"{name}_removed"), name
            else:
                new_b = self._like(lin.bias, bias, self._hint(n, "bias"))
                add.replace_input_with(idx, new_b)
            self._drop_if_unused(lin.bias)
        elif bias is not None:
            self._append_bias(n, self._like(lin.weight, bias, self._hint(n, "bias")))
        self._invalidate()

    def _append_bias(self, n: oir.Node, b: oir.Value) -> None:
        """y = MatMul(...) -> y = Add(MatMul(...), b), keeping the name y for consumers."""
        g = self.model.graph
        y = n.outputs[0]
        name = y.name
        shape = y.shape.copy() if y.shape is not None else None
        z = oir.Value(name=self._fresh(f"{name}_biased"), shape=shape, type=y.type)
        y.replace_all_uses_with(z, replace_graph_outputs=True)  # before the Add reads y
        tape = oir.tape.Tape()
        tape.op("Add", [y, b], output=z, name=self._fresh(f"{n.name}_bias"),
                metadata_props=dict(n.metadata_props))
        g.insert_after(n, tape.nodes)
        y.name = self._fresh(f"{name}_nobias")
        z.name = name

    def get_embedding(self, key: str) -> np.ndarray:
        v = self._embedding(key).inputs[0]
        t = self._const(v)
        if t is not None and len(t.shape) == 2 and t.dtype.is_floating_point():
            return onnx_store.as_float64(t)  # one float64 copy, read in chunks
        return self._array(v)

    def _embedding(self, key: str) -> oir.Node:
        g = self.view().by_key.get(key)
        if g is None or g.op != "embedding":
            raise RewriteError(f"node {key!r} is not an embedding")
        onnx_contrib.refuse_quantized(self, key)
        return self._node(key)

    def set_embedding(self, key: str, table: np.ndarray) -> None:
        n = self._embedding(key)
        old = n.inputs[0]
        table = np.asarray(table, dtype=np.float64)
        if table.shape != tuple(self._const(old).shape):
            raise RewriteError(f"set_embedding {key!r}: table shape {table.shape} is wrong")
        n.replace_input_with(0, self._like(old, table, self._hint(n, "weight")))
        self._drop_if_unused(old)
        self._invalidate()
