"""Per layer, what the learned per-head V/O rotation (`spin --set learn_ov=true`) does to the
int4 weight errors of v_proj and o_proj, on held-out text: SmolLM2-135M after the `w4a4-spin`
recipe's spin with and without `learn_ov`, then 2048 Wikipedia tokens (512-token windows).

Columns (relative output errors, RTN int4 g128 asymmetric with MSE clip, the recipe's weight
format without GPTQ): v_proj's weight error seen after o_proj (``X_v dW_v^T W_o^T``, GQA heads
expanded, attention taken as the identity) over all rows and over the first row of each window
(the position attention sinks form on); o_proj's and v_proj's own output errors.
Run: python benchmarks/spin_r2_layers.py [--ir fx|onnx]   (about 10 min on 2 cores; prints a
Markdown table)
"""

from __future__ import annotations

import argparse

import numpy as np
from spin_r2_probe import _rel, _w4

import rotaq
from rotaq.passes.calib import calibration_feeds, capture_rows
from rotaq.passes.spin import Spin
from rotaq.recipe import Recipe

WINDOW = 512


def layer_errors(model) -> np.ndarray:
    """[layers, 4]: v through o (all rows), v through o (first rows), o weight, v weight."""
    a = model.analysis()
    feeds = calibration_feeds(model, "wiki", 2048, WINDOW)
    sites = [s for s in a.attention if s.o_proj and s.v_proj]
    values = sorted({a.linears[k].input for s in sites for k in (s.o_proj, s.v_proj)})
    xs = capture_rows(model, values, feeds, desc="probe capture")
    rows = []
    for s in sites:
        x = xs[a.linears[s.o_proj].input].astype(np.float64)
        xv = xs[a.linears[s.v_proj].input].astype(np.float64)
        wo, _ = model.graph.get_linear(s.o_proj)
        wv, _ = model.graph.get_linear(s.v_proj)
        hd, rep = s.head_dim, s.num_heads // s.num_kv_heads
        idx = np.concatenate([np.arange(hd) + (h // rep) * hd for h in range(s.num_heads)])
        wvo, dvo = wo @ wv[idx], wo @ (_w4(wv) - wv)[idx]
        first = np.arange(0, len(xv), WINDOW)
        rows.append([_rel(xv @ dvo.T, xv @ wvo.T), _rel(xv[first] @ dvo.T, xv[first] @ wvo.T),
                     _rel(x @ (_w4(wo) - wo).T, x @ wo.T), _rel(xv @ (_w4(wv) - wv).T, xv @ wv.T)])
    return np.array(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ir", choices=("fx", "onnx"), default="fx")
    args = ap.parse_args()
    opts = {k: v for k, v in Recipe.load("w4a4-spin").passes[0].items() if k != "pass"}
    base = rotaq.load("smollm2-135m", ir=args.ir)
    h, lrn = (layer_errors(Spin(**{**opts, "learn_ov": learn})(base.clone()).model)
              for learn in (False, True))
    print("| layer | v via o, all rows (Hadamard / learned) | v via o, first rows | o_proj weight "
          "| v_proj weight |\n|---|---|---|---|---|")
    for i, (a, b) in enumerate([*zip(h, lrn), (h.mean(0), lrn.mean(0))]):
        name = "mean" if i == len(h) else str(i)
        print(f"| {name} | " + " | ".join(f"{a[j]:.4f} / {b[j]:.4f}" for j in range(4)) + " |")


if __name__ == "__main__":
    main()
