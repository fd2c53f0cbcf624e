"""Weight and activation quantization pass (RTN or GPTQ), on any IR through the site interface.

``Linear(x) -> QLinear(fq_a(x))`` with ``W <- Q(W)``:

- weights: int 2..8 (symmetric or asymmetric, per channel or per group, optional MSE clip
  search), fp8 e4m3, MXFP4, NVFP4, by round-to-nearest or GPTQ. GPTQ runs block by block
  through the model as rewritten so far, in one pass (:mod:`rotaq.passes.quantize_calib`): the
  Hessian ``2 X^T X`` of each block's linears comes from inputs captured after every earlier
  block was quantized;
- activations: dynamic (per token) or static per tensor (min/max or percentile calibration);
- KV cache (simulated): per-token fake quantization of K (after the online Q/K rotation, if the
  model has one) and of V.

Embeddings, norms and the head stay in float unless ``quantize_head`` or ``include`` say
otherwise. The ONNX lowering (QDQ, MatMulNBits) is chosen by ``lowering``; the FX side runs the
same recipe as simulated quantization in plain torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
from tqdm import tqdm

from rotaq.errors import RewriteError
from rotaq.linalg import lowrank
from rotaq.linalg.formats import QuantizedWeight
from rotaq.linalg.quant import (
    QFormat,
    calibrate_per_tensor,
    gptq,
    quant_error,
    quantize_rtn,
)
from rotaq.linalg.threads import single_threaded
from rotaq.model import Model
from rotaq.passes.base import Pass, PassResult
from rotaq.passes.calib import counts, feeds_for, input_stats, linear_inputs
from rotaq.passes.options import Calibrated, Selected, select_linears
from rotaq.rewriter.analysis import Analysis
from rotaq.rewriter.chain import lowrank_chain
from rotaq.rewriter.sites import ActQuant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quantize(Pass, Selected, Calibrated):
    """Quantize the linears' weights (and optionally activations and the KV cache)."""

    name: ClassVar[str] = "quantize"
    exact: ClassVar[bool] = False
    w_bits: int = 8
    w_format: Literal["int", "fp8_e4m3", "mxfp4", "nvfp4"] = "int"
    w_group: int = -1  # -1: per output channel
    w_symmetric: bool = True
    w_clip: Literal["none", "mse"] = "none"
    method: Literal["rtn", "gptq"] = "rtn"
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    a_bits: int = 0  # 0: weight-only
    a_mode: Literal["dynamic", "static"] = "dynamic"  # per token | per tensor, calibrated
    a_calib: Literal["minmax", "percentile"] = "minmax"  # static only
    a_percentile: float = 99.99
    a_clip: float = 1.0
    a_symmetric: bool = True  # dynamic: absmax (True) or min/max with a zero point per token
    # dynamic: clip ratios to try per input (calibrated; the one with the least output error of
    # the linears reading it wins, else a_clip for all)
    a_clip_search: tuple[float, ...] = ()
    kv_bits: int = 0
    kv_symmetric: bool = True
    kv_clip: float = 1.0
    quantize_head: bool = False  # the head in the main format
    head_bits: int = 0  # >0: the head in its own int format (8: per channel; 4: w_group), RTN
    lowering: Literal["auto", "qdq", "matmulnbits", "dequant"] = "auto"  # ONNX only
    lowrank_rank: int = 0  # >0: a float rank-r correction branch per quantized linear
    # eora (fit Q's error in the activation space) | lq (LQ-LoRA)
    lowrank_mode: Literal["eora", "lq"] = "eora"
    lowrank_iters: int = 5  # lq: alternations of Q = quant(W - L), L = svd_r(W - Q)

    def validate(self) -> None:
        self.fmt()  # validates the weight format
        if any(b not in (0, 2, 3, 4, 8) for b in (self.a_bits, self.kv_bits, self.head_bits)):
            raise RewriteError("quantize: a_bits / kv_bits / head_bits must be 0 (off), 2, 3, 4 "
                               "or 8")
        if self.lowrank_rank < 0:
            raise RewriteError("quantize: lowrank_rank must be >= 0")
        for c in (self.a_clip, self.kv_clip, *self.a_clip_search):
            if not 0 < c <= 1:
                raise RewriteError(f"quantize: clip ratio {c} (a_clip, kv_clip, a_clip_search) "
                                   "must be in (0, 1]")

    def requires(self) -> tuple[str, ...]:
        return ("linears",)

    def fmt(self) -> QFormat:
        try:
            return QFormat(kind=self.w_format, bits=self.w_bits, symmetric=self.w_symmetric,
                           group_size=self.w_group, clip=self.w_clip)
        except ValueError as err:
            raise RewriteError(f"quantize: {err}") from err

    def call(self, model: Model) -> PassResult:
        a = model.analysis()
        if a.experts:
            e = next(iter(a.experts.values()))
            raise RewriteError(f"quantize: MoE experts '{e.name or e.key}' ({e.num_experts} "
                               "experts in one grouped weight) cannot be quantized yet; the "
                               "recipe would leave them in float")
        keys = self._select(a)
        if not keys and not (self.head_bits or self.kv_bits):
            raise RewriteError(self._nothing_selected(a))
        needs_calib = self.method == "gptq" or bool(self.a_bits and (
            self.a_mode == "static" or self.a_clip_search))
        eora = self.lowrank_rank > 0 and self.lowrank_mode == "eora"
        feeds = None
        if needs_calib or eora:
            feeds = feeds_for(model, self.calib_text, self.calib_tokens, self.calib_window)
        grams: dict[str, np.ndarray] = {}
        seen = 0  # positions (tokens, frames) a calibrated linear saw
        if eora and not needs_calib:  # one pass over the float model gives every Gram matrix
            ins = linear_inputs(model, keys)
            st = input_stats(model, list(ins.values()), feeds, desc="eora calibration")
            grams.update({k: st[v].gram for k, v in ins.items()})
            seen = max((s.count for s in st.values()), default=0)
        errors: dict[str, float] = {}
        clips: dict[str, float] = {}  # the activation clip chosen per linear (a_clip_search)
        if needs_calib:
            from rotaq.passes.quantize_calib import calibrate_blockwise

            errors, got, clips = calibrate_blockwise(self, model, a, keys, feeds, grams)
            seen = max(seen, got)
        else:
            for key in tqdm(keys, desc=f"quantize ({self.method})", unit="linear",
                            disable=len(keys) < 8, leave=False):
                errors[key] = self._quantize_one(model, a, key, {}, grams=grams)
        head = [k for k in a.residual.head if k not in errors] if self.head_bits else []
        for key in head:
            errors[key] = self._quantize_one(model, a, key, {}, self._head_fmt())
        kv = self._kv_cache(model) if self.kv_bits else 0
        lin_err = np.array(list(errors.values()) or [0.0])
        stats = {"linears": len(keys) + len(head), "format": self._describe(),
                 "method": self.method, "head_quantized": len(head),
                 "weight_rel_error_mean": float(lin_err.mean()),
                 "weight_rel_error_max": float(lin_err.max()),
                 **counts(feeds, seen),
                 "kv_quantized": kv}
        done = set(errors)
        stats["quantized"] = [a.linears[k].name or k for k in a.linears if k in done]
        stats["kept_float"] = [a.linears[k].name or k for k in a.linears if k not in done]
        if self.lowrank_rank:
            stats["lowrank"] = f"{self.lowrank_mode} rank {self.lowrank_rank}"
        if clips:
            chosen = [clips[k] for k in a.linears if k in clips]
            stats["a_clip_chosen"] = ", ".join(f"{c:g} x {chosen.count(c)}"
                                               for c in sorted(set(chosen)))
            stats["a_clip_per_linear"] = {a.linears[k].name or k: c for k, c in clips.items()}
        from rotaq.decoder_io import is_cache_graph

        if kv and is_cache_graph(model.graph):  # the fake-quantized K/V are what present.* holds
            stats["kv_cache"] = (f"int{self.kv_bits} per-token fake-quant of the new keys and "
                                 "values written to present.* (simulated: stored as float)")
        return PassResult(model, True, stats)

    # ---- selection and blocks ------------------------------------------------------------
    def _select(self, a: Analysis) -> list[str]:
        return select_linears(a, self.include, self.exclude, self.quantize_head)

    def _nothing_selected(self, a: Analysis) -> str:
        if self.include or self.exclude:
            return (f"quantize: no linear matches include={self.include!r} "
                    f"exclude={self.exclude!r}")
        heads = [a.linears[k].name or k for k in a.residual.head if k in a.linears]
        return (f"quantize: the model's only linear{'s are' if len(heads) > 1 else ' is'} its "
                f"head ({', '.join(heads)}), which stays in float by default; set "
                "quantize_head=true (main format) or head_bits=8 (its own format)")

    def _blocks(self, a: Analysis, keys: list[str]) -> list[list[str]]:
        """Linears grouped by residual block (readers, then writers), in graph order; GPTQ
        quantizes one group, then captures the next group's inputs from the updated model."""
        order = {n.key: i for i, n in enumerate(a.view.nodes)}
        wanted = set(keys)
        groups, seen = [], set()
        for b in a.residual.blocks:
            readers = [k for k in b.readers if k in wanted and k not in seen]
            writers = [k for k in b.writers if k in wanted and k not in seen]
            for part in (readers, writers):
                if part:
                    groups.append(part)
                    seen.update(part)
        rest = sorted((k for k in keys if k not in seen), key=order.get)
        groups.extend([k] for k in rest)
        return groups

    # ---- calibration ---------------------------------------------------------------------
    def _act(self, x: np.ndarray | None, clip: float | None = None) -> ActQuant | None:
        if not self.a_bits:
            return None
        if self.a_mode == "dynamic":
            return ActQuant(bits=self.a_bits, mode="dynamic", symmetric=self.a_symmetric,
                            clip_ratio=self.a_clip if clip is None else clip)
        scale, zp = calibrate_per_tensor(x, bits=self.a_bits, method=self.a_calib,
                                         percentile=self.a_percentile, symmetric=False)
        return ActQuant(bits=self.a_bits, mode="static", symmetric=False, scale=float(scale),
                        zero_point=int(zp))

    def _head_fmt(self) -> QFormat:
        group = -1 if self.head_bits > 4 else self.w_group
        return QFormat(kind="int", bits=self.head_bits, symmetric=True, group_size=group)

    def _quantize_one(self, model: Model, a: Analysis, key: str, caught: dict,
                      fmt: QFormat | None = None, grams: dict | None = None) -> float:
        """Quantize linear ``key`` (inputs from ``caught``, as captured, when calibrated)."""
        g = model.graph
        x = caught[g.view().by_key[key].inputs[0]] if caught else None
        xtx, count = None, 0
        if x is not None:
            xs = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
            xtx, count = xs.T @ xs, xs.shape[0]
        sol = self._solve(g.get_linear(key)[0], xtx, count, x, fmt, (grams or {}).get(key))
        return self._apply(g, key, sol)

    def _solve(self, w: np.ndarray, xtx: np.ndarray | None, count: int, x: np.ndarray | None,
               fmt: QFormat | None = None, gram: np.ndarray | None = None,
               a_clip: float | None = None) -> tuple:
        """(quantized weight, low-rank correction | None, activation quantizer | None, relative
        weight error) of weight ``w`` given its inputs' ``X^T X`` over ``count`` tokens (GPTQ's
        Hessian is ``2 X^T X / count``) and, for static activations, the inputs ``x``;
        ``a_clip`` overrides the dynamic activation clip (chosen by ``a_clip_search``)."""
        head = fmt is not None
        fmt = fmt or self.fmt()
        n_in = w.shape[1]
        group = fmt.group_size if fmt.kind == "int" else {"mxfp4": 32, "nvfp4": 16}.get(
            fmt.kind, fmt.group_size)
        # a ragged last group (576 inputs in groups of 128): pad with zero columns, which are
        # exact in every format and dead inputs for GPTQ; ORT's MatMulNBits pads the same way
        pad = (-n_in) % group if group > 0 else 0
        h = None
        if self.method == "gptq" and not head:
            h = (2.0 / max(count, 1)) * np.asarray(xtx, np.float64)
            h = np.pad(h, ((0, pad), (0, pad))) if pad else h

        def quant(target: np.ndarray) -> QuantizedWeight:
            tp = np.pad(target, ((0, 0), (0, pad))) if pad else target
            if h is not None:
                return gptq(tp, h, fmt, damp=self.gptq_damp, act_order=self.gptq_act_order)
            return quantize_rtn(tp, fmt)

        correction = None
        with single_threaded():
            if self.lowrank_rank and not head:
                qw, correction = self._lowrank(w, xtx if gram is None else gram, quant)
            else:
                qw = quant(w)
        act = self._act(x, a_clip) if not head or self.a_mode == "dynamic" else None
        approx = qw.dequantize()[:, :n_in]
        if correction is not None:
            approx = approx + correction[0] @ correction[1]
        return qw, correction, act, quant_error(w, approx)

    def _apply(self, g, key: str, sol: tuple) -> float:
        """Write a solution of :meth:`_solve` into the graph; returns its weight error."""
        qw, correction, act, err = sol
        if correction is not None:
            g.add_branch(key, lowrank_chain(*correction))
        g.quantize_linear(key, qw, act, self.lowering)
        return err

    def _lowrank(self, w: np.ndarray, gram: np.ndarray | None, quant
                 ) -> tuple[QuantizedWeight, tuple[np.ndarray, np.ndarray] | None]:
        """W ~ Q + a b: LQ-LoRA (Q = quant(W - ab), alternated) or EoRA (ab fits W - Q(W) in the
        space whitened by the inputs' Gram matrix)."""
        n_in = w.shape[1]
        rank = min(self.lowrank_rank, *w.shape)
        if self.lowrank_mode == "lq":
            _, fa, fb, _ = lowrank.lq_decompose(
                w, rank, lambda t: quant(t).dequantize()[:, :n_in], iters=self.lowrank_iters)
            return quant(w - fa @ fb), (fa, fb)
        qw = quant(w)
        if gram is None:
            raise RewriteError("quantize: eora needs calibration inputs")
        fa, fb = lowrank.eora(w - qw.dequantize()[:, :n_in], gram, rank)
        return qw, (fa, fb)

    def _kv_cache(self, model: Model) -> int:
        """Per-token fake quantization of K (post rotation) and V, per attention site."""
        a = model.analysis()
        act = ActQuant(bits=self.kv_bits, mode="dynamic", symmetric=self.kv_symmetric,
                       clip_ratio=self.kv_clip)
        done = 0
        for site in a.attention:
            if not site.k_value or site.kind == "onnx-attention":
                log.warning("attention %s: no K tensor with head_dim last; KV not quantized",
                            site.name)
                continue
            model.graph.insert_fake_quant(site.k_value, [site.k_consumer], act)
            if site.v_value:
                model.graph.insert_fake_quant(site.v_value, [site.v_consumer], act)
            done += 1
        return done

    def _describe(self) -> str:
        f = self.fmt()
        w = f"{f.kind}{f.bits if f.kind == 'int' else ''}"
        g = "per-channel" if f.group_size == -1 else f"g{f.group_size}"
        a_asym = " asym" if self.a_mode == "dynamic" and not self.a_symmetric else ""
        a = f", a{self.a_bits} {self.a_mode}{a_asym}" if self.a_bits else ""
        kv = f", kv{self.kv_bits}{'' if self.kv_symmetric else ' asym'}" if self.kv_bits else ""
        sym = "sym" if f.symmetric else "asym"
        return f"w {w} {sym} {g}{' mse-clip' if f.clip == 'mse' else ''}{a}{kv}"
