"""ONNX adapter: lifts an ONNX model (through onnx-ir) into a :class:`GraphView` and edits it.

Matching is structural, never by name; what counts as a linear, an embedding, a norm or an
attention is described in :mod:`rotaq.rewriter.onnx_lift`.

Every setter writes a fresh initializer in the original dtype, so a tensor read by another node
(tied embeddings, initializers merged by the exporter) is never changed behind its back. External
data stays on disk and large new tensors are spilled there (:mod:`rotaq.rewriter.onnx_store`).

Real-world files: a graph without intermediate ``value_info`` gets onnx's shape inference (with
data propagation, through onnx-ir so > 2 GB models work) on load, in memory. A float ``Cast`` of a
constant counts as that constant (fp16/bf16 weights stored, fp32 computed): reads see through it,
writes keep the storage dtype behind a fresh ``Cast``. A graph ORT cannot run in its own dtype
(bf16: no CPU MatMul) runs as an fp32 copy (:mod:`rotaq.rewriter.onnx_dtype`). A node ORT does
not know (a custom domain) is refused with a :class:`RotaqError` when the graph must run; with
``--no-verify`` nothing runs and the rewrite treats the node as opaque.

:class:`OnnxGraph` is assembled from mixins: the lifting (:mod:`rotaq.rewriter.onnx_lift`), the
weight reads and writes (:mod:`rotaq.rewriter.onnx_weights`) and ONNX Runtime execution
(:mod:`rotaq.rewriter.onnx_exec`); this module holds loading, naming, lookups and saving, the
plumbing done by onnx-ir's passes: ``RemoveInitializersFromInputsPass``, ``NameFixPass`` (with
rotaq's names, :class:`_Names`) and ``TopologicalSortPass`` on load, ``RemoveUnusedNodesPass``
on save. Between edits dead weights are dropped where they fall
(:meth:`~rotaq.rewriter.onnx_weights.OnnxWeights._drop_if_unused`): a whole-graph pass per
edit would cost O(graph) each time, O(blocks x graph) for a rotation.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import onnx
import onnx_ir as oir
from onnx_ir.passes.common import (
    NameFixPass,
    RemoveInitializersFromInputsPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)
from onnx_ir.passes.common.naming import SimpleNameGenerator

from rotaq.errors import LoadError, RewriteError
from rotaq.rewriter import onnx_chain, onnx_contrib, onnx_quant, onnx_store
from rotaq.rewriter.chain import ChainAdapter
from rotaq.rewriter.onnx_exec import OnnxExec
from rotaq.rewriter.onnx_lift import (  # noqa: F401 (re-exported: the adapter's names)
    _PRIMITIVES,
    OnnxLift,
    _attr,
    _constant_operand,
    _first_line,
    _is_default,
    _Linear,
    _scope,
    node_scopes,
    refuse_hidden_linears,
)
from rotaq.rewriter.onnx_weights import OnnxWeights
from rotaq.rewriter.sites import GraphView, counts_edits

logger = logging.getLogger(__name__)

_EXTERNAL_DATA_BYTES = 100 * 2**20  # save weights to a side file above this size


def _static_dim(d: Any) -> int | None:
    """A dim's size: torch's exporter writes some static sizes as numeric symbols ("16")."""
    if isinstance(d, int):
        return d
    text = str(getattr(d, "value", d) or "")
    return int(text) if text.isdigit() else None


def fresh_name(taken: set[str], hint: str) -> str:
    """``hint``, or ``hint_1``, ``hint_2``, ... : the first not in ``taken`` (then added to it)."""
    name, k = hint, 0
    while name in taken:
        k += 1
        name = f"{hint}_{k}"
    taken.add(name)
    return name


def _values(g: oir.Graph) -> list[oir.Value]:
    """The graph's inputs, initializers and node outputs, in this order."""
    return [*g.inputs, *g.initializers.values(), *(o for n in g for o in n.outputs)]


class _Names(SimpleNameGenerator):
    """rotaq's names for :class:`NameFixPass`: an unnamed or clashing node of the main graph is
    ``{op_type}_{position}``, an unnamed value ``rotaq_v{position}`` (position in
    :func:`_values`); the keys stay stable from one load of a file to the next."""

    def __init__(self, g: oir.Graph) -> None:
        self._nodes = {n: i for i, n in enumerate(g)}
        self._values = {v: i for i, v in enumerate(_values(g))}

    def generate_node_name(self, node: oir.Node) -> str:
        i = self._nodes.get(node)
        return f"{node.op_type}_{i}" if i is not None else node.name or node.op_type

    def generate_value_name(self, value: oir.Value) -> str:
        i = self._values.get(value)
        return value.name or (f"rotaq_v{i}" if i is not None else "rotaq_v")


@counts_edits
class OnnxGraph(OnnxLift, OnnxWeights, OnnxExec, ChainAdapter):
    """An ONNX model held in memory, seen through the IR-neutral :class:`GraphView`."""

    ir = "onnx"

    def __init__(self, model: oir.Model, source: str | None = None) -> None:
        self.model = model
        self.source = source
        self.metadata: dict[str, str] = dict(model.metadata_props)
        self._upcast = False  # True once ORT could not run the graph in its fp16/bf16 dtype
        self._store = onnx_store.SpillStore()  # large new tensors go to disk
        self._prepare()
        self._infer_shapes()
        self._invalidate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | os.PathLike) -> OnnxGraph:
        """Read ``path``; external data stays on disk, read one tensor at a time when needed
        (:mod:`rotaq.rewriter.onnx_store`); the file is never written."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise LoadError(f"cannot load {path}: no such file")
        model = onnx_store.load_lazy(path)
        cls._validate(model, path)
        return cls(model, source=path)

    @classmethod
    def from_proto(cls, model: onnx.ModelProto | oir.Model, source: str | None = None) -> OnnxGraph:
        """Wrap an in-memory model. An ``onnx_ir.Model`` is taken over, not copied."""
        label = source or "<in-memory model>"
        try:
            if isinstance(model, onnx.ModelProto):
                if not model.HasField("graph") or not model.graph.node:
                    raise ValueError("the model has no graph")
                model = oir.serde.deserialize_model(model)
            model = oir.external_data.load_to_model(model)
        except Exception as err:
            raise LoadError(f"cannot load {label}: {_first_line(err)}") from err
        cls._validate(model, label)
        return cls(model, source=source)

    @staticmethod
    def _validate(model: oir.Model, label: str) -> None:
        """Refuse an empty graph, unreadable data, a value never defined or a cycle (one
        :class:`LoadError` line); sort the nodes topologically (stable)."""
        g = model.graph
        if g.num_nodes() == 0:
            raise LoadError(f"cannot load {label}: the graph has no nodes")
        for v in g.initializers.values():
            if onnx_store.is_on_disk(v.const_value):
                continue  # sizes checked on load; read when used
            try:
                v.const_value.numpy()
            except Exception as err:
                raise LoadError(
                    f"cannot load {label}: initializer {v.name!r} is unreadable "
                    f"(truncated data?): {_first_line(err)}"
                ) from err
        for node in g:
            for v in node.inputs:
                if v is None or v.is_graph_input() or v.is_initializer():
                    continue
                if v.producer() is None:
                    raise LoadError(
                        f"cannot load {label}: value {v.name!r} read by {node.op_type} node "
                        f"{node.name!r} "
                        "is never defined (truncated or corrupt model)"
                    )
        for v in g.outputs:
            if v.producer() is None and not (v.is_graph_input() or v.is_initializer()):
                raise LoadError(f"cannot load {label}: graph output {v.name!r} is never defined")
        try:
            TopologicalSortPass()(model)  # stable: a sorted graph keeps its order
        except ValueError as err:
            raise LoadError(f"cannot load {label}: the graph has a cycle ({err})") from err

    def _prepare(self) -> None:
        """Give every node and value a unique name (deterministic), once. Initializers listed as
        graph inputs (IR < 4 style, overridable defaults) become plain constants."""
        RemoveInitializersFromInputsPass()(self.model)
        NameFixPass(_Names(self.model.graph))(self.model)
        g = self.model.graph
        self._taken = {n.name for n in g} | {v.name for v in _values(g)}
        onnx_contrib.prepare(self)

    def _infer_shapes(self) -> None:
        """Shape inference (data propagation, symbolic dims kept) when a node output has no
        type or shape, e.g. a file written without ``value_info``; the model is edited in
        memory, never its file. Large initializers are left out of the call by onnx-ir."""
        from onnx_ir.passes.common import ShapeInferencePass

        def missing() -> int:
            return sum(o.shape is None or o.dtype is None for n in self.model.graph
                       for o in n.outputs if n.op_type != "Constant")

        before = missing()
        if not before:
            return
        ShapeInferencePass(strict_mode=False, data_prop=True)(self.model)
        logger.info("shape inference: %d of the values without a shape now have one",
                    before - missing())

    def _fresh(self, hint: str) -> str:
        return fresh_name(self._taken, hint)

    def _invalidate(self) -> None:
        # op kinds of untouched nodes survive an edit: set_const checks them without a re-lift
        self._kinds: dict[str, str] = {n.key: n.op for n in self._view.nodes} if getattr(
            self, "_view", None) is not None else getattr(self, "_kinds", {})
        self._view: GraphView | None = None
        self._values: dict[str, oir.Value] = {}
        self._nodes: dict[str, oir.Node] = {}
        self._linears: dict[str, _Linear] = {}
        self._sessions: dict[tuple[str, ...], Any] = {}

    # ------------------------------------------------------------------ properties
    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.model.graph.inputs if not v.is_initializer()]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.model.graph.outputs]

    # emission: one chain emitter (onnx_chain) and the ORT quantized lowerings (onnx_quant)
    quantize_linear = onnx_quant.quantize_linear
    insert_fake_quant = onnx_quant.insert_fake_quant
    replace_linear = onnx_chain.replace_linear
    add_branch = onnx_chain.add_branch
    insert_chain = onnx_chain.insert_chain

    def input_specs(self) -> dict[str, tuple[Any, list[int | str | None]]]:
        """Graph input name -> (numpy dtype, dims; symbolic dims as str/None)."""
        specs = {}
        for v in self.model.graph.inputs:
            if v.is_initializer():
                continue
            dtype = v.dtype.numpy() if v.dtype is not None else np.float32
            dims = [_static_dim(d) for d in (v.shape or [])]
            specs[v.name] = (np.dtype(dtype), dims)
        return specs

    # ------------------------------------------------------------------ lookups
    def _value(self, name: str) -> oir.Value:
        if self._view is None and getattr(self, "_kinds", None):
            # after an edit: a cheap scan of the graph's values, not a re-lift (a rotation
            # inserts one transform per block: a lift each would cost O(blocks x graph))
            if not self._values:
                g = self.model.graph
                self._values = {v.name: v for v in g.inputs}
                self._values.update({v.name: v for v in g.initializers.values()})
                self._values.update({o.name: o for n in g for o in n.outputs if o.name})
            v = self._values.get(name)
            if v is not None:
                return v
        self.view()
        v = self._values.get(name)
        if v is None:
            raise RewriteError(f"no value named {name!r} in the ONNX graph")
        return v

    def _node(self, key: str) -> oir.Node:
        n = self._nodes.get(key)
        if n is None and self._view is None and getattr(self, "_kinds", None):
            # after an edit: a cheap scan of the graph (names were fixed at the first lift)
            self._nodes = {m.name: m for m in self.model.graph}
            n = self._nodes.get(key)
        if n is None:
            self.view()
            n = self._nodes.get(key)
        if n is None:
            raise RewriteError(f"no node named {key!r} in the ONNX graph")
        return n

    def _linear(self, key: str) -> _Linear:
        lin = self._linears.get(key)
        if lin is None and self._view is None and self._kinds.get(key) == "linear":
            lin = self._match_linear(self._node(key))  # re-match this node only
            if lin is not None:
                self._linears[key] = lin
        if lin is None:
            self.view()
            lin = self._linears.get(key)
        if lin is None:
            onnx_contrib.refuse_quantized(self, key)
            raise RewriteError(f"node {key!r} is not a linear")
        return lin

    # ------------------------------------------------------------------ copies and files
    def clone(self) -> OnnxGraph:
        """An independent copy (tensors are shared but never mutated: setters write new ones)."""
        other = OnnxGraph(self.model.clone(), source=self.source)
        other.metadata = dict(self.metadata)
        other._upcast = self._upcast
        return other

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (plus ``<name>.data`` when the weights exceed ~100 MB) atomically:
        files go to a temporary folder next to the destination, then os.replace each."""
        path = os.path.abspath(os.fspath(path))
        folder, base = os.path.split(path)
        RemoveUnusedNodesPass()(self.model)  # dead nodes and initializers nothing reads
        self._invalidate()
        self.model.metadata_props.clear()
        self.model.metadata_props.update({str(k): str(v) for k, v in self.metadata.items()})
        size = sum(v.const_value.nbytes for v in self.model.graph.initializers.values())
        data_name = base + ".data"
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".rotaq-save-", dir=folder)
        try:
            tmp_path = os.path.join(tmp, base)
            if size > _EXTERNAL_DATA_BYTES:
                oir.save(self.model, tmp_path, external_data=data_name, size_threshold_bytes=1024)
                os.replace(os.path.join(tmp, data_name), os.path.join(folder, data_name))
            else:
                oir.save(self.model, tmp_path)
            os.replace(tmp_path, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("saved %s (%.1f MB of weights)", path, size / 2**20)