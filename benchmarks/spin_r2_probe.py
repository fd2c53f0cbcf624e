"""What the learned per-head V/O rotation (`spin --set learn_ov=true`) does to the two quantizers
it is learned for, on held-out text, without GPTQ's noise: SmolLM2-135M after `spin` (the
`w4a4-spin` recipe's spin options) with and without `learn_ov`, then on 2048 Wikipedia tokens
(never the Lee calibration text), per layer:

- o_proj's input, int4 asymmetric per token at clip 0.8 (what the clip search picks for most
  o_proj inputs): the relative output error ``||(Q(X) - X) W_o^T||^2 / ||X W_o^T||^2``;
- V as the attention reads it, int4 asymmetric per token and head at clip 0.95 (the KV cache):
  the relative error ``||Q(V) - V||^2 / ||V||^2``;
- the o_proj and v_proj weights, int4 g128 asymmetric RTN with MSE clip (the recipe's weight
  format, without GPTQ): the relative output error ``||X (Q(W) - W)^T||^2 / ||X W^T||^2`` on
  their held-out inputs.

Both columns are means over the 30 layers. R1 does not change either value (it rotates the
stream, not the heads), so the two runs differ by R2 only.
Run: python benchmarks/spin_r2_probe.py   (about 10 min on 2 cores; prints a Markdown table)
"""

from __future__ import annotations

import time

import numpy as np

import rotaq
from rotaq.linalg.quant import QFormat, fake_quantize, quantize_per_token
from rotaq.passes.calib import calibration_feeds, capture_rows
from rotaq.passes.spin import Spin
from rotaq.recipe import Recipe


W4 = QFormat("int", 4, False, 128, "mse")


def _w4(w: np.ndarray) -> np.ndarray:
    """RTN of ``w`` in W4, a ragged last group padded with zero columns (as `quantize` does)."""
    pad = (-w.shape[1]) % W4.group_size
    return fake_quantize(np.pad(w, ((0, 0), (0, pad))), W4)[:, :w.shape[1]]


def _rel(err: np.ndarray, ref: np.ndarray) -> float:
    return float((err ** 2).sum() / (ref ** 2).sum())


def errors(model) -> list[float]:
    """Means over layers: o_proj activation, V cache, o_proj weight, v_proj weight errors."""
    a = model.analysis()
    feeds = calibration_feeds(model, "wiki", 2048, 512)
    sites = [s for s in a.attention if s.o_proj and s.v_value]
    values = sorted({v for s in sites for v in (a.linears[s.o_proj].input, s.v_value,
                                                 a.linears[s.v_proj].input)})
    xs = capture_rows(model, values, feeds, desc="probe capture")
    out = []
    for s in sites:
        x = xs[a.linears[s.o_proj].input].astype(np.float64)
        w, _ = model.graph.get_linear(s.o_proj)
        v = xs[s.v_value].astype(np.float64)
        xv = xs[a.linears[s.v_proj].input].astype(np.float64)
        wv, _ = model.graph.get_linear(s.v_proj)
        out.append([_rel((quantize_per_token(x, 4, False, 0.8) - x) @ w.T, x @ w.T),
                    _rel(quantize_per_token(v, 4, False, 0.95) - v, v),
                    _rel(x @ (_w4(w) - w).T, x @ w.T),
                    _rel(xv @ (_w4(wv) - wv).T, xv @ wv.T)])
    return list(np.mean(out, axis=0))


def main() -> None:
    opts = {k: v for k, v in Recipe.load("w4a4-spin").passes[0].items() if k != "pass"}
    base = rotaq.load("smollm2-135m")
    rows = []
    for learn in (False, True):
        t0 = time.time()
        res = Spin(**{**opts, "learn_ov": learn})(base.clone())
        st = res.stats
        errs = " | ".join(f"{e:.5f}" for e in errors(res.model))
        r2 = (f"{st['ov_loss_init']:.3f} -> {st['ov_loss_final']:.3f}" if learn else "")
        rows.append(f"| {'learned' if learn else 'Hadamard'} | {r2} | {errs} | "
                    f"{time.time() - t0:.0f} |")
        print(rows[-1], flush=True)
    print("\n| per-head V/O rotation | R2 outlier loss (calibration) | o_proj input, int4 asym "
          "clip 0.8 | V, int4 asym clip 0.95 | o_proj weight, int4 g128 RTN | v_proj weight, "
          "int4 g128 RTN | spin + probe (s) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
