"""LLM.int8() outlier decomposition (Dettmers et al. 2022) ahead of int8 quantization.

Per linear ``y = x W^T + b`` with outlier input columns ``O`` (calibration ``max |x_j|`` above
``threshold``, or the ``top_k`` largest):

    Linear_W(x) -> Linear_W'(x * mask) + x[..., O] W[:, O]^T,   W' = W with columns O zeroed

exact in float (math and proof in :mod:`rotaq.linalg.outliers`). A linear whose every input
column is an outlier (after ``rotate``, a down projection whose few massive tokens the online
Hadamard spread over all columns) is replaced by a float MatMul chain instead. The float branch (Gather of the
columns, MatMul) is emitted as a chain, which ``quantize`` never matches as a linear; the masked
``x * mask`` feeds the linear, so the int8 path that a following ``quantize`` pass lowers (one
dynamic activation scale per tensor in ORT's int8 kernels) no longer sees the outliers. Linears
reading one value with the same columns share one mask. Works on a rotated model too (put
``rotate`` first). Calibration runs block by block (:mod:`rotaq.passes.calib`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rotaq.errors import RewriteError
from rotaq.linalg import outliers as lo
from rotaq.model import Model
from rotaq.passes.base import Pass, PassResult
from rotaq.passes.calib import counts, feeds_for, linear_inputs
from rotaq.passes.options import Calibrated, Selected
from rotaq.rewriter.chain import Chain, Step
from rotaq.rewriter.sites import GraphAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Outliers(Pass, Selected, Calibrated):
    """Split outlier input columns of each linear off into a float MatMul (LLM.int8())."""

    name: ClassVar[str] = "int8-outliers"
    exact: ClassVar[bool] = True  # exact in float; pays off once the rest is quantized
    threshold: float = lo.DEFAULT_THRESHOLD  # a column is an outlier if max |x_j| > threshold
    top_k: int = 0  # >0: the top_k columns of largest max |x_j| per linear (ignores threshold)
    max_columns: int = 0  # >0: at most this many columns per linear (the largest)

    def validate(self) -> None:
        if not self.threshold > 0:
            raise RewriteError(f"int8-outliers: threshold must be > 0, got {self.threshold}")
        if self.top_k < 0 or self.max_columns < 0:
            raise RewriteError("int8-outliers: top_k and max_columns must be >= 0")

    def requires(self) -> tuple[str, ...]:
        return ("linears", "before:quantize")

    def call(self, model: Model) -> PassResult:
        a = model.analysis()
        keys = self.selected(a)
        inputs = linear_inputs(model, keys)
        feeds = feeds_for(model, self.calib_text, self.calib_tokens, self.calib_window)
        absmax, seen = column_absmax(model, sorted(set(inputs.values())), feeds)
        chosen = {k: lo.select_columns(absmax[inputs[k]], self.threshold, self.top_k,
                                       self.max_columns) for k in keys}
        # linears reading one value with the same columns share a mask
        groups: dict[tuple[str, bytes], list[str]] = {}
        for k in keys:
            if chosen[k].size:
                groups.setdefault((inputs[k], chosen[k].tobytes()), []).append(k)
        g = model.graph
        masks = 0
        for (value, _), members in groups.items():
            cols = chosen[members[0]]
            if cols.size == len(absmax[value]):  # every column: the linear stays float
                for k in members:
                    g.replace_linear(k, float_chain(*g.get_linear(k)))
                continue
            masks += 1
            for k in members:  # the branches read x itself: emit them before the mask
                w, bias = g.get_linear(k)
                rest, w_out = lo.split_weight(w, cols)
                g.add_branch(k, outlier_chain(w.shape[1], cols, w_out))
                g.set_linear(k, rest, bias)
            insert_mask(g, value, members, lo.column_mask(len(absmax[value]), cols))
        names = {k: a.linears[k].name or k for k in keys}
        per = {names[k]: int(chosen[k].size) for k in keys}
        split = [k for k in keys if chosen[k].size]
        whole = [names[k] for k in split if chosen[k].size == len(absmax[inputs[k]])]
        stats = {"linears": len(keys), "split": len(split), "masks": masks, "kept_float": whole,
                 "outlier_columns": int(sum(per.values())),
                 "outlier_columns_max": max(per.values(), default=0),
                 "selection": (f"top {self.top_k}" if self.top_k else
                               f"max |x| > {self.threshold:g}")
                 + (f", at most {self.max_columns}" if self.max_columns else ""),
                 "columns_per_linear": per,
                 "absmax_max": {names[k]: round(float(absmax[inputs[k]].max()), 3)
                                for k in keys},
                 **counts(feeds, seen)}
        if not split:
            log.info("int8-outliers: no input column over the threshold; graph unchanged")
        return PassResult(model, bool(split), stats)


def outlier_chain(n: int, cols: np.ndarray, w_out: np.ndarray) -> Chain:
    """``x -> x[..., O] @ W[:, O]^T`` (x [..., n] -> [..., m]) as Gather + MatMul."""
    steps = (Step("gather", arg=tuple(int(c) for c in cols)),
             Step("matmul", np.ascontiguousarray(w_out.T)))
    return Chain(steps, n, w_out.shape[0], "outliers")


def float_chain(w: np.ndarray, bias: np.ndarray | None) -> Chain:
    """The whole linear as a float MatMul (+ bias) chain, which ``quantize`` never matches."""
    steps = (Step("matmul", np.ascontiguousarray(np.asarray(w, np.float64).T)),)
    if bias is not None:
        steps += (Step("add", np.asarray(bias, np.float64).reshape(-1)),)
    return Chain(steps, w.shape[1], w.shape[0], "outliers")


def insert_mask(g: GraphAdapter, value: str, consumers: list[str], mask: np.ndarray) -> str:
    """``x -> x * mask`` on the last axis, wired to ``consumers`` only (a chain, so no pass
    matches it as a layer)."""
    n = mask.size
    return g.insert_chain(value, consumers, Chain((Step("mul", mask),), n, n, "outlier-mask"))


def column_absmax(model: Model, values: list[str], feeds: dict[str, np.ndarray],
                  batch: int = 2) -> tuple[dict[str, np.ndarray], int]:
    """``max |x_j|`` per column of each value over all rows of ``feeds`` (one block-wise pass;
    across processes the maxima of every rank's rows), and the tokens seen."""
    from rotaq import dist
    from rotaq.passes.calib import capture_blockwise, rank_rows

    acc: dict[str, np.ndarray] = {}
    seen: dict[str, int] = {}

    def take(v: str, x: np.ndarray) -> None:
        acc[v] = lo.merge_absmax(acc.get(v), x)
        seen[v] = seen.get(v, 0) + int(np.prod(np.shape(x)[:-1]))

    capture_blockwise(model, values, rank_rows(model, feeds), batch, take, "outlier calibration")
    if dist.active():
        acc = {v: dist.gather_rows(a[None]).max(axis=0) for v, a in acc.items()}
        seen = {v: dist.allreduce_int(c) for v, c in seen.items()}
    return acc, max(seen.values(), default=0)
