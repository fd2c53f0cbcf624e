"""``spin``: the residual rotation learned (SpinQuant style) instead of drawn at random.

The same exact rewrite as ``rotate`` in residual mode, composed from the public folds
(:mod:`rotaq.passes.folds`), with one difference: the residual rotation ``R1`` starts at
``rotate``'s random Hadamard (same ``seed``) and is then trained by Cayley SGD on the orthogonal
group under the weight/activation quantizers that the following ``quantize`` pass applies
(``w_bits``, ``w_group``, ``w_symmetric``, ``a_bits``, ``a_clip``: repeat its settings). Math in
:mod:`rotaq.linalg.spin`. ``objective``:

- ``outlier`` (default, the ``w4a4-spin`` recipe's): a smooth proxy of the readers' per-token
  activation quantization error, the mean squared peak-to-RMS ratio of the rotated reader inputs
  (:func:`spin.outlier_objective`); needs a sample of ``outlier_tokens`` captured rows only, and
  its gradient is the signal the straight-through gradient of the rounding error lacks;
- ``e2e`` (SpinQuant's): next-token cross-entropy of the quantized network on the calibration
  text, through a differentiable torch forward of the graph (needs ``input_ids`` and the weights
  in memory: a whole-model cost, like SpinQuant's own training);
- ``layer``: the mean relative output error of every stream linear on captured inputs (one
  block-wise capture; memory grows with the captures, not the activations of a whole forward).

``learn_ov``: the per-head V/O rotation ``R2`` of each attention is learned too (SpinQuant's
R2), from ``rotate``'s Hadamard, by Cayley SGD on the same outlier proxy taken over the
quantizers that read the rotated heads: o_proj's per-token input (the whole row) and the
per-token-and-head KV cache (one head of V) (:func:`spin.head_outlier_objective`). One small
problem per attention on a sample of its captured rows, so its cost grows with one block.

Order of work: (1) the R1-independent folds: norm scales into their readers, the per-head V/O
Hadamard, the online Hadamard before each MLP writer, the optional online Q/K rotation; (2) the
calibration data; (3) Cayley SGD on R1 (the best iterate is kept), then on each R2;
(4) ``rotate_residual(R1)`` and ``rotate_ov(R2)`` on top of the Hadamard. In float the result
equals the input model whatever R1 and R2 are learned (the folds are exact).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from tqdm import tqdm

from rotaq.decoder_io import complete_feeds
from rotaq.errors import RewriteError
from rotaq.linalg import spin
from rotaq.model import Model
from rotaq.passes import folds
from rotaq.passes.base import Pass, PassResult
from rotaq.passes.calib import capture_rows, counts, feeds_for
from rotaq.passes.options import Calibrated
from rotaq.passes.rotate import _online_reason
from rotaq.rewriter import torch_exec

log = logging.getLogger(__name__)


STEPS_LR = {"outlier": (300, 3.0), "e2e": (24, 0.02), "layer": (48, 0.02)}
"""Default Cayley SGD steps and learning rate per objective (measured on SmolLM2-135M:
benchmarks/results/spin_history.md; the angle cap bounds a step whatever ``lr``)."""


@dataclass(frozen=True)
class Spin(Pass, Calibrated):
    """Learned residual rotation (Cayley SGD under the W/A quantizers), folded exactly."""

    name: ClassVar[str] = "spin"
    exact: ClassVar[bool] = True
    seed: int = 0
    online_down: bool = True
    online_o: bool = False
    rotate_ov: bool = True
    rotate_qk: bool = False
    w_bits: int = 4
    w_group: int = 128
    w_symmetric: bool = False
    a_bits: int = 4
    a_clip: float = 0.9
    objective: Literal["e2e", "layer", "outlier"] = "outlier"
    steps: int | None = None  # None: the objective's default (STEPS_LR)
    lr: float | None = None
    calib_tokens: int = 512
    batch_tokens: int = 0  # e2e: tokens per step (whole rows); 0: all calibration tokens
    check_rows: int = 4  # e2e minibatches: rows on which the start and the result are compared
    outlier_p: float = 8.0  # outlier: the power mean that stands in for the max
    outlier_tokens: int = 32768  # outlier: reader-input rows sampled (over all blocks)
    learn_ov: bool = False  # R2: learn each attention's per-head V/O rotation (module doc)

    def validate(self) -> None:
        if self.w_bits not in (0, 2, 3, 4, 8) or self.a_bits not in (0, 2, 3, 4, 8):
            raise RewriteError("spin: w_bits / a_bits must be 0 (off), 2, 3, 4 or 8")
        if (self.steps is not None and self.steps < 0) or (self.lr is not None
                                                          and self.lr <= 0):
            raise RewriteError("spin: steps must be >= 0 and lr > 0")
        if self.outlier_p < 2 or self.outlier_tokens < 1:
            raise RewriteError("spin: outlier_p must be >= 2 and outlier_tokens >= 1")
        if not 0 < self.a_clip <= 1:
            raise RewriteError("spin: a_clip must be in (0, 1]")
        if self.learn_ov and (not self.rotate_ov or self.online_o):
            raise RewriteError("spin: learn_ov learns the per-head V/O rotation from rotate_ov's "
                               "Hadamard: it needs rotate_ov=true and online_o=false")

    def requires(self) -> tuple[str, ...]:
        return ("linears", "residual", "before:rotate", "before:spin", "before:quantize")

    def call(self, model: Model) -> PassResult:
        a = model.analysis()
        res = a.residual
        if not folds.residual_rotatable(a):
            raise RewriteError(f"spin learns a residual-stream rotation, which this model "
                               f"cannot carry: {_online_reason(a)}")
        if self.rotate_qk:
            folds.refuse_fused_rope(a)
        g = model.graph
        t0 = time.time()
        # 1. everything that does not depend on R1
        edits = folds.WeightEdits(g)
        readers = folds.norm_readers(g, a)
        folded = folds.fold_norms(g, a, readers, edits)
        ov = folds.rotate_ov(a, edits) if self.rotate_ov else []
        ov_keys = ov if self.learn_ov else []
        writers = [wk for b in res.blocks for wk in b.writers]
        online = folds.online_before_writers(g, a, edits, writers, mlp=self.online_down,
                                             attention=self.online_o)
        edits.flush()
        qk = folds.online_qk(g, a) if self.rotate_qk else 0
        # 2.-3. learn R1 from rotate's Hadamard
        a = model.analysis()
        readers = folds.norm_readers(g, a)
        feeds = feeds_for(model, self.calib_text, self.calib_tokens, self.calib_window)
        d = a.embeddings[a.residual.embedding].dim
        r0 = spin.random_start(d, self.seed)
        q = spin.Quantizers(self.w_bits, self.w_group, self.w_symmetric, self.a_bits,
                            self.a_clip)
        check, ov_rows = None, {}
        ov_sets = self._ov_sets(a, ov_keys)
        ov_values = sorted({v for _, vs in ov_sets.values() for v, _ in vs})
        if self.objective == "e2e":
            objective, check, tokens = self._e2e(model, a, readers, feeds, q)
        elif self.objective == "layer":
            objective, tokens = self._layer(model, a, readers, feeds, q)
        else:
            values = sorted({a.linears[readers[nk][0]].input for b in a.residual.blocks
                             for nk in b.norms})
            (xs, ov_rows), tokens = self._sample(model, feeds, [values, ov_values])
            objective = spin.outlier_objective(list(xs.values()), self.outlier_p,
                                               self.outlier_tokens, self.seed)
        if ov_values and self.objective != "outlier":
            (ov_rows,), _ = self._sample(model, feeds, [ov_values])
        if check is None or check.full_batch:
            check = None
        steps, lr = self._steps_lr(self.objective)
        bar = tqdm(total=steps + 1, desc=f"spin ({self.objective}, Cayley SGD)",
                   unit="step", leave=False)

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")

        try:
            learned = spin.cayley_minimize(objective, r0, steps=steps, lr=lr,
                                           keep_best=check is None, progress=progress)
        finally:
            bar.close()
        if check is not None:  # minibatches: compare start and end on the check rows
            learned = check.choose(r0, learned)
        del objective, check
        r2, ov_stats = self._learn_ov(ov_sets, ov_rows) if ov_keys else ({}, {})
        # 4. the learned rotations, folded exactly
        edits = folds.WeightEdits(g)
        folds.rotate_residual(g, a, folds.dense_rotation(learned.rotation), readers, edits)
        folds.rotate_ov(a, edits, r2)
        edits.flush()
        seconds = time.time() - t0
        log.info("spin: %s loss %.5g -> %.5g in %d steps (%.0f s)", self.objective,
                 learned.loss_init, learned.loss_final, learned.steps, seconds)
        stats = {"dim": d, "norms_folded": folded, "writers": len(writers),
                 "ov_heads_rotated": len(ov), "online_hadamards": int(online), "qk_rotated": qk,
                 "objective": self.objective, "loss_init": learned.loss_init,
                 "loss_final": learned.loss_final, "steps": learned.steps,
                 "loss_per_step": [round(v, 5) for v in learned.history],
                 **ov_stats, "calibration_seconds": round(seconds, 1),
                 **counts(feeds, tokens)}
        folds.cache_note(model, stats)
        return PassResult(model, True, stats)

    @staticmethod
    def _layer(model: Model, a, readers: dict[str, list[str]], feeds, q: spin.Quantizers):
        """The layer-wise objective: every block's linear inputs, captured block by block."""
        g = model.graph
        layout = [([readers[nk] for nk in b.norms], list(b.writers)) for b in a.residual.blocks]
        values = sorted({a.linears[k].input for groups, ws in layout for k in
                         [ks[0] for ks in groups] + ws})
        xs = capture_rows(model, values, feeds, batch=2, desc="spin calibration")
        blocks = [spin.Block([(xs[a.linears[ks[0]].input], [g.get_linear(k)[0] for k in ks])
                              for ks in groups],
                             [(xs[a.linears[k].input], g.get_linear(k)[0]) for k in ws])
                  for groups, ws in layout]
        tokens = max((x.shape[0] for x in xs.values()), default=0)
        return spin.layer_objective(blocks, q), tokens

    def _steps_lr(self, objective: str) -> tuple[int, float]:
        """``steps`` and ``lr`` as set, else ``objective``'s defaults (STEPS_LR)."""
        own = objective == self.objective
        return tuple(v if v is not None and own else d for v, d in
                     zip((self.steps, self.lr), STEPS_LR[objective]))

    def _sample(self, model: Model, feeds, groups: list[list[str]]):
        """One block-wise capture of several groups of values, each group sampled while
        capturing to about ``outlier_tokens`` rows in all (a text model: memory is that sample,
        not blocks x tokens; other inputs: everything captured). Returns one dict per group and
        the tokens seen."""
        total = int(np.asarray(feeds["input_ids"]).size) if "input_ids" in feeds else 0
        keep = {v: min(1.0, self.outlier_tokens / max(1, len(vs) * total)) if total else 1.0
                for vs in groups for v in vs}
        xs = capture_rows(model, sorted(keep), feeds, batch=2, desc="spin calibration",
                          keep=keep, seed=self.seed)
        tokens = max((len(x) for x in xs.values()), default=0)
        return [{v: xs[v] for v in vs} for vs in groups], total or tokens

    @staticmethod
    def _ov_sets(a, keys: list[str]) -> dict[str, tuple[int, list[tuple[str, int]]]]:
        """Per attention (keyed by o_proj) its head_dim and the captured values its R2 rotates,
        each with the span of the quantizer reading it: o_proj's input (its whole row) and,
        unless packed with q/k, V as the attention reads it (one head)."""
        sets = {}
        for site in a.attention:
            if site.o_proj in keys:
                vs = [(a.linears[site.o_proj].input, a.linears[site.o_proj].in_features)]
                if site.v_value and site.v_proj not in (site.q_proj, site.k_proj):
                    vs.append((site.v_value, site.head_dim))
                sets[site.o_proj] = (site.head_dim, vs)
        return sets

    def _learn_ov(self, sets: dict[str, tuple[int, list[tuple[str, int]]]],
                  rows: dict[str, np.ndarray]):
        """R2 of each attention: Cayley SGD from the identity (on top of the folded Hadamard)
        on :func:`spin.head_outlier_objective` of its sampled rows."""
        steps, lr = self._steps_lr("outlier")
        out, init, final = {}, 0.0, 0.0
        for key, (hd, vs) in tqdm(sets.items(), desc="spin R2 (per-head V/O, Cayley SGD)",
                                  unit="attention", leave=False):
            fn = spin.head_outlier_objective([(rows[v], group) for v, group in vs], hd,
                                             self.outlier_p)
            res = spin.cayley_minimize(fn, np.eye(hd), steps=steps, lr=lr)
            out[key] = res.rotation
            init, final = init + res.loss_init, final + res.loss_final
        n = max(1, len(out))
        log.info("spin: R2 of %d attentions, outlier loss %.5g -> %.5g", len(out), init / n,
                 final / n)
        return out, {"ov_learned": len(out), "ov_loss_init": round(init / n, 5),
                     "ov_loss_final": round(final / n, 5)}

    def _e2e(self, model: Model, a, readers: dict[str, list[str]], feeds, q: spin.Quantizers):
        """The end-to-end objective: next-token cross-entropy of the rotated, quantized network
        (its stream linears replaced by :func:`spin.reader` / :func:`spin.writer`, the
        embeddings rotated, the head reading ``x R^T``) on every calibration row."""
        g = model.graph
        if "input_ids" not in feeds:
            raise RewriteError("spin: objective=e2e trains on next-token cross-entropy and needs "
                               "a model with input_ids; use objective=layer")
        view = g.view()
        holder: dict[str, torch.Tensor] = {}

        def param(k: str) -> tuple[torch.Tensor, torch.Tensor | None]:
            w, b = g.get_linear(k)
            return (torch.as_tensor(w, dtype=torch.float32),
                    None if b is None else torch.as_tensor(b, dtype=torch.float32))

        replace = {}
        head = set(a.residual.head)
        for rs in readers.values():
            for k in rs:
                w, b = param(k)
                if k in head:  # float head of the rotated model: (x R^T) W^T
                    fn = (lambda x, w=w, b=b: torch.nn.functional.linear(
                        x @ holder["r"].T, w, b))
                else:
                    fn = lambda x, w=w, b=b: spin.reader(x, w, b, holder["r"], q)
                replace[view.by_key[k].outputs[0]] = (a.linears[k].input, fn)
        for blk in a.residual.blocks:
            for k in blk.writers:
                w, b = param(k)
                replace[view.by_key[k].outputs[0]] = (
                    a.linears[k].input, lambda x, w=w, b=b: spin.writer(x, w, b, holder["r"], q))
        after = {view.by_key[e].outputs[0]: (lambda t: t @ holder["r"])
                 for e in folds.stream_embeddings(a)}
        full = complete_feeds(g, feeds)
        consts: dict[str, torch.Tensor] = {}  # the graph's constants, converted once
        ids = np.asarray(feeds["input_ids"])
        rows = len(ids)
        per_step = rows if self.batch_tokens <= 0 else min(
            rows, max(1, self.batch_tokens // ids.shape[1]))

        def loss_on(i: int) -> torch.Tensor:
            row = {k: v[i:i + 1] for k, v in full.items()}
            logits = torch_exec.forward(g, row, replace, after, consts)[0]
            target = torch.as_tensor(ids[i, 1:]).long()
            return torch.nn.functional.cross_entropy(logits[0, :-1].float(), target)

        def objective(rt: torch.Tensor, step: int) -> float:
            holder["r"] = rt
            total = 0.0
            for j in range(per_step):  # one row's graph at a time
                loss = loss_on((step * per_step + j) % rows) / per_step
                loss.backward()
                total += float(loss.detach())
            return total

        def evaluate(r: np.ndarray) -> float:
            holder["r"] = torch.as_tensor(r, dtype=torch.float32)
            check = min(rows, self.check_rows)
            with torch.no_grad():
                return sum(float(loss_on(i)) for i in range(check)) / check

        return objective, _Check(evaluate, per_step >= rows), int(ids.size)


@dataclass
class _Check:
    """The loss of the start and of the learned rotation on the first ``check_rows`` rows
    (minibatch training): the better one is kept."""

    evaluate: Callable[[np.ndarray], float]
    full_batch: bool

    def choose(self, r0: np.ndarray, learned: spin.SpinResult) -> spin.SpinResult:
        start, end = self.evaluate(r0), self.evaluate(learned.rotation)
        if not end < start:
            log.warning("spin: the learned rotation is no better than the start on the "
                        "calibration data (%.5g vs %.5g); keeping the start", end, start)
            return spin.SpinResult(r0, start, start, learned.steps, learned.history)
        return spin.SpinResult(learned.rotation, start, end, learned.steps, learned.history)
