"""FX execution of graph segments for :mod:`rotaq.rewriter.blocks`.

A segment is the range of FX nodes after the previous boundary node up to its own boundary
node (placeholders are fed, ``get_attr`` nodes read on demand, the output node is left out); it
runs node by node through a ``torch.fx.Interpreter`` over an environment holding only its
external inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from rotaq.decoder_io import contract_name

_SKIP = ("placeholder", "get_attr", "output")


class FxSegments:
    """Segments of an ``FxGraph`` cut after the nodes named ``ends`` (+ a tail)."""

    def __init__(self, graph: Any, ends: list[str]) -> None:
        self.graph = graph
        self.ends = ends
        self._nodes: list[list[torch.fx.Node]] = []
        self._info: dict[int, tuple[list[str], set[str]]] = {}
        self._split()

    def _split(self) -> None:
        nodes = list(self.graph.gm.graph.nodes)
        at = {n.name: i for i, n in enumerate(nodes)}
        cuts = [at[v] + 1 for v in self.ends]
        starts, stops = [0, *cuts], [*cuts, len(nodes)]
        self._nodes = [[n for n in nodes[a:b] if n.op not in _SKIP]
                       for a, b in zip(starts, stops)]
        self._info = {}

    def changed(self, k: int) -> None:
        nodes = list(self.graph.gm.graph.nodes)
        at = {n.name: i for i, n in enumerate(nodes)}
        first = at[self.ends[k - 1]] + 1 if k > 0 else 0
        last = at[self.ends[k]] + 1 if k < len(self.ends) else len(nodes)
        self._nodes[k] = [n for n in nodes[first:last] if n.op not in _SKIP]
        self._info.pop(k, None)

    def release(self, k: int) -> None:
        pass

    def _analyze(self, k: int) -> tuple[list[str], set[str]]:
        if k not in self._info:
            mine = set(self._nodes[k])
            ext: dict[str, None] = {}
            for n in self._nodes[k]:
                for a in n.all_input_nodes:
                    if a not in mine and a.op != "get_attr":
                        ext[a.name] = None
            self._info[k] = (list(ext), {n.name for n in self._nodes[k]})
        return self._info[k]

    def inputs(self, k: int) -> set[str]:
        return set(self._analyze(k)[0])

    def produced(self, k: int) -> set[str]:
        return self._analyze(k)[1]

    def input_values(self) -> dict[str, str]:
        return {contract_name(n.name): n.name for n in self.graph.gm.graph.nodes
                if n.op == "placeholder"}

    def output_values(self) -> list[str]:
        out = next(n for n in self.graph.gm.graph.nodes if n.op == "output")
        return [a.name for a in tree_flatten(out.args)[0] if isinstance(a, torch.fx.Node)]

    def run(self, k: int, env: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
        gm = self.graph._compiled()
        interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
        by_name = {}
        for n in self._nodes[k]:
            for a in n.all_input_nodes:
                by_name[a.name] = a
        for name, x in env.items():
            node = by_name.get(name)
            if node is not None:
                interp.env[node] = torch.from_numpy(np.array(x)) if isinstance(
                    x, np.ndarray) else x
        for n in self._nodes[k]:
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in interp.env:
                    interp.env[a] = interp.fetch_attr(a.target)
        want = set(outputs)
        got: dict[str, Any] = {}
        with torch.no_grad():
            for n in self._nodes[k]:
                interp.env[n] = interp.run_node(n)
                if n.name in want:
                    got[n.name] = interp.env[n]
        return got
