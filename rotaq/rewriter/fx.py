"""torch.export / FX adapter.

A model is captured with ``torch.export`` (non-strict) and edited as the unlifted
``GraphModule`` that ``ExportedProgram.module()`` returns: weights are ``get_attr`` nodes, so a
new weight is one new attribute plus one ``get_attr`` node. Saving re-exports the edited module.
The lifting into the IR-neutral view is the :class:`~rotaq.rewriter.fx_lift.FxLift` mixin.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from rotaq import tags
from rotaq.decoder_io import complete_feeds, contract_name, fx_name, is_past
from rotaq.decoder_io import dynamic_shapes as kv_dynamic_shapes
from rotaq.errors import LoadError, RewriteError
from rotaq.files import atomic_file
from rotaq.floats import tensor_from_numpy, tensor_to_numpy
from rotaq.rewriter import fx_chain, fx_quant
from rotaq.rewriter.chain import ChainAdapter
from rotaq.rewriter.fx_lift import (  # noqa: F401 (re-exported: the adapter's names)
    _ELEMENTWISE,
    _LINEAR_TARGETS,
    FxLift,
    _attr,
    _scope,
    _shape,
)
from rotaq.rewriter.sites import GraphView, counts_edits

log = logging.getLogger(__name__)
aten = torch.ops.aten


def _to_numpy(t: Any) -> np.ndarray:
    return tensor_to_numpy(t)  # bf16 kept, as ml_dtypes.bfloat16


def _from_numpy(a: Any) -> torch.Tensor:
    return tensor_from_numpy(a)  # ml_dtypes.bfloat16 included


@counts_edits
class FxGraph(FxLift, ChainAdapter):
    """GraphAdapter over an unlifted torch.export GraphModule."""

    ir = "fx"

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: dict[str, torch.Tensor],
                 dynamic_shapes: Any = None, n_positional: int = 0) -> None:
        self.gm = gm
        self.example_inputs = example_inputs
        self.dynamic_shapes = dynamic_shapes
        self.n_positional = n_positional  # inputs the program takes positionally, in order
        self.metadata: dict[str, str] = {}
        self._view: GraphView | None = None
        self._counter = 0

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: torch.nn.Module, example_inputs: dict[str, torch.Tensor],
                dynamic: bool = True) -> FxGraph:
        """Capture ``module(**example_inputs)`` with torch.export (dims 0/1 dynamic when asked)."""
        from torch.export import Dim

        dyn = None
        if dynamic:
            # batch 1 would specialize to a constant: capture with two rows, dims left AUTO
            example_inputs = {k: torch.cat([v, v]) if v.dim() >= 1 and v.shape[0] == 1 else v
                              for k, v in example_inputs.items()}
            dyn = {k: {0: Dim.AUTO, 1: Dim.AUTO} if v.dim() >= 2 else {0: Dim.AUTO}
                   for k, v in example_inputs.items()}
        module = module.eval()
        try:
            with torch.no_grad():
                ep = torch.export.export(module, (), dict(example_inputs), dynamic_shapes=dyn,
                                         strict=False)
        except Exception as err:  # torch raises many types here
            if not dynamic:
                raise LoadError(f"torch.export failed: {type(err).__name__}: {err}") from err
            log.warning("dynamic export failed (%s); retrying with static shapes", err)
            return cls.from_module(module, example_inputs, dynamic=False)
        return cls.from_exported(ep, example_inputs, dyn)

    @classmethod
    def from_exported(cls, ep: torch.export.ExportedProgram,
                      example_inputs: dict[str, torch.Tensor] | None = None,
                      dynamic_shapes: Any = None) -> FxGraph:
        # a KV-cache graph is captured with batch, seq and past >= 2 (so that none specializes);
        # torch's guards would then refuse the 1-token, empty-past first step it computes right
        cache = any(is_past(n.name) for n in ep.graph.nodes if n.op == "placeholder")
        gm, n_positional = ep.module(check_guards=not cache), 0
        if example_inputs is None:  # a loaded program: positional inputs first, then keywords
            args, kwargs = ep.example_inputs or ((), {})
            # positional inputs are named by the module's placeholders (`input` -> `input_1`)
            names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
            n_positional = len(args)
            example_inputs = {contract_name(k): v for k, v in
                              {**dict(zip(names, args)), **dict(kwargs)}.items()}
        if dynamic_shapes is None and ep.range_constraints:
            dynamic_shapes = _dynamic_from_fake(ep, example_inputs)
        return cls(gm, dict(example_inputs), dynamic_shapes, n_positional)

    @classmethod
    def load(cls, path: str) -> FxGraph:
        extra = {tags.FX_METADATA: ""}
        try:  # registers the pytree types of Hugging Face model outputs, needed to deserialize
            import transformers.modeling_outputs  # noqa: F401
        except ImportError:
            pass
        from rotaq.rewriter.pt2_safe import load_exported

        if not os.path.isfile(path):
            raise LoadError(f"{path}: no such file")
        ep = load_exported(path, extra)  # refuses archives that would run code
        fx = cls.from_exported(ep)
        try:
            fx.metadata = dict(json.loads(extra[tags.FX_METADATA] or "{}"))
        except ValueError:
            fx.metadata = {}
        return fx

    # ---- view ---------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        """Placeholder names; a KV-cache past as its contract name (``past_key_values.0.key``)."""
        return [contract_name(n.name) for n in self.gm.graph.nodes if n.op == "placeholder"]

    def dynamic_batch_inputs(self) -> set[str]:
        """Inputs whose first dimension the program keeps symbolic."""
        out = set()
        for n in self.gm.graph.nodes:
            val = n.meta.get("val") if n.op == "placeholder" else None
            if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0],
                                                                          torch.SymInt):
                out.add(contract_name(n.name))
        return out

    def _touch(self) -> None:
        self._view = None
        self._stale = True

    def _compiled(self) -> torch.fx.GraphModule:
        if getattr(self, "_stale", False):
            self.gm.recompile()
            self._stale = False
        return self.gm


    # ---- weights ------------------------------------------------------------------------
    def _node(self, key: str) -> torch.fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == key:
                return n
        raise KeyError(key)

    def _new_attr(self, value: np.ndarray, like: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
        self._counter += 1
        name = f"rotaq_const_{self._counter}"
        while hasattr(self.gm, name):
            self._counter += 1
            name = f"rotaq_const_{self._counter}"
        tensor = torch.from_numpy(np.ascontiguousarray(value)).to(like.dtype)
        self.gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(name)
        node.meta["val"] = tensor
        return node

    def get_const(self, value: str) -> np.ndarray:
        node = self._node(value)
        if node.op != "get_attr":
            raise KeyError(f"{value} is not a constant")
        return _to_numpy(_attr(self.gm, node.target)).astype(np.float64)

    def set_const(self, node: str, index: int, array: np.ndarray) -> None:
        n = self._node(node)
        name = self._lift_node(n, {}).inputs[index]  # this node only: no full re-lift
        old = self._node(name)
        like = _attr(self.gm, old.target) if old.op == "get_attr" else old.meta["val"]
        new = self._new_attr(np.asarray(array).reshape(tuple(like.shape)), like, n)
        n.replace_input_with(old, new)
        self._touch()

    def get_linear(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        _, w, w_out_in, b = self._linear_parts(self._node(key))
        wt = _to_numpy(_attr(self.gm, w.target)).astype(np.float64)
        bias = _to_numpy(_attr(self.gm, b.target)).astype(np.float64) if b is not None else None
        return (wt if w_out_in else wt.T), bias

    def set_linear(self, key: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
        n = self._node(key)
        x, w, _, b = self._linear_parts(n)
        like = _attr(self.gm, w.target)
        # the new weight replaces the op's weight argument (bypassing a transpose node, if any):
        # linear takes [out, in]; addmm / mm / matmul take [in, out]
        new_w = self._new_attr(weight if n.target == aten.linear.default else weight.T, like, n)
        new_b = self._new_attr(bias, like, n) if bias is not None else None
        if n.target == aten.linear.default:
            n.args = (x, new_w, new_b)
        elif n.target == aten.addmm.default:
            n.args = (new_b if new_b is not None else b, x, new_w) + tuple(n.args[3:])
            if bias is None and b is not None:
                raise RewriteError(f"{key}: dropping the bias of an addmm linear is not supported")
        else:
            if new_b is not None:
                raise RewriteError(f"{key}: adding a bias to a bias-free matmul linear is not supported")
            n.args = (x, new_w)
        self._touch()

    def get_embedding(self, key: str) -> np.ndarray:
        n = self._node(key)
        return _to_numpy(_attr(self.gm, n.args[0].target)).astype(np.float64)

    def set_embedding(self, key: str, table: np.ndarray) -> None:
        n = self._node(key)
        new = self._new_attr(table, _attr(self.gm, n.args[0].target), n)
        n.args = (new,) + tuple(n.args[1:])
        self._touch()

    def _wire(self, src: torch.fx.Node, out: torch.fx.Node, users: list[torch.fx.Node],
              created: list[torch.fx.Node], role: str) -> str:
        """Tag nodes rotaq emitted (the view lifts them as op ``role``, never as linears) and
        make ``users`` read ``out`` instead of ``src``."""
        first = users[0]
        for node in created:
            node.meta[tags.FX_META] = role
            node.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
        if "val" in src.meta:
            out.meta["val"] = src.meta["val"]
        for u in users:
            u.replace_input_with(src, out)
        self._touch()
        return out.name

    # emission: one chain emitter (fx_chain); quantized linears are simulated (fx_quant)
    quantize_linear = fx_quant.quantize_linear
    insert_fake_quant = fx_quant.insert_fake_quant
    replace_linear = fx_chain.replace_linear
    add_branch = fx_chain.add_branch
    insert_chain = fx_chain.insert_chain

    # ---- running and saving -------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = complete_feeds(self, feeds)  # a KV-cache graph fed tokens only: a full prefill
        args, kwargs = self._split({k: _from_numpy(v) for k, v in feeds.items()})
        with torch.no_grad():
            out = self._compiled()(*args, **kwargs)
        return [_to_numpy(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]

    def capture(self, feeds: dict[str, np.ndarray], values: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = set(values)
        seen: dict[str, np.ndarray] = {}

        class _Rec(torch.fx.Interpreter):
            def run_node(self, n):
                res = super().run_node(n)
                if n.name in wanted and isinstance(res, torch.Tensor):
                    seen[n.name] = _to_numpy(res)
                return res

        args = [_from_numpy(feeds[n]) for n in self.input_names]
        with torch.no_grad():
            _Rec(self._compiled()).run(*args)
        return seen

    def clone(self) -> FxGraph:
        with warnings.catch_warnings():  # torch's own pytree deprecation, raised by deepcopy
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec",
                                    category=FutureWarning)
            gm = copy.deepcopy(self.gm)
        other = FxGraph(gm, self.example_inputs, self.dynamic_shapes, self.n_positional)
        other.metadata = dict(self.metadata)
        other._counter = self._counter
        return other

    def _cleanup(self) -> None:
        g = self.gm.graph
        g.eliminate_dead_code()
        used = {n.target for n in g.nodes if n.op == "get_attr"}
        # a rewritten weight is a new attribute; the one it replaced is no longer read by any
        # node but stays registered, and torch.export would save it too (every weight twice)
        named = list(self.gm.named_parameters(remove_duplicate=False)) + \
            list(self.gm.named_buffers(remove_duplicate=False))
        # a called submodule (e.g. torch's _guards_fn) reads its own attributes: keep those
        called = tuple(f"{n.target}." for n in g.nodes if n.op == "call_module")
        for name, _ in named:
            if name not in used and not name.startswith(called):
                owner, _, leaf = name.rpartition(".")
                delattr(self.gm.get_submodule(owner) if owner else self.gm, leaf)
        self.gm.recompile()

    def export(self) -> torch.export.ExportedProgram:
        self._cleanup()
        args, kwargs = self._split(self.example_inputs)
        with torch.no_grad():
            return torch.export.export(self.gm, args, kwargs,
                                       dynamic_shapes=self.dynamic_shapes, strict=False)

    def _split(self, inputs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """(positional, keyword) arguments of the program for ``inputs`` keyed by name."""
        names = self.input_names[:self.n_positional]
        return (tuple(inputs[n] for n in names),
                {fx_name(k): v for k, v in inputs.items() if k not in names})

    def save(self, path: str) -> None:
        """Write ``.pt2`` (re-exported ExportedProgram) or ``.onnx`` atomically."""
        ext = os.path.splitext(path)[1].lower()
        if ext == ".pt2":
            ep = self.export()
            extra = {tags.FX_METADATA: json.dumps(self.metadata)}
            with atomic_file(path) as tmp:
                torch.export.save(ep, tmp, extra_files=extra)
        elif ext == ".onnx":
            from rotaq.rewriter.export_onnx import export_onnx

            export_onnx(self.export(), path, self.metadata)
        else:
            raise RewriteError(f"{path}: output must end in .pt2 or .onnx")




def _dynamic_from_fake(ep: torch.export.ExportedProgram, inputs: dict[str, Any]) -> Any:
    """Mark dims 0/1 of every 2-D+ user input dynamic again (as at capture)."""
    from torch.export import Dim

    if any(is_past(k) for k in inputs):
        return kv_dynamic_shapes(list(inputs))
    return {k: ({0: Dim.AUTO, 1: Dim.AUTO} if getattr(v, "dim", lambda: 0)() >= 2 else None)
            for k, v in inputs.items()}