"""X^T X of each linear under the old whole-graph per-group GPTQ and the block-wise one-pass
GPTQ, on the first segments of a model (default: the rotated SmolLM2 of gptq_noise.py).

Run: python benchmarks/gptq_old_vs_blockwise.py [--segments 5] [--rotated PATH]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import rotaq
from rotaq.passes import quantize_calib as qc
from rotaq.passes.calib import capture, feeds_for
from rotaq.passes.quantize import Quantize
from rotaq.rewriter.blocks import BlockRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rotated", default="/tmp/rotaq-gptq-noise/rot.onnx")
    ap.add_argument("--segments", type=int, default=5)
    args = ap.parse_args()
    base = rotaq.load(args.rotated)
    q = Quantize(w_bits=4, w_group=128, method="gptq", w_symmetric=False, calib_tokens=1024)
    feeds = feeds_for(base, q.calib_text, q.calib_tokens, q.calib_window)
    a = base.analysis()
    keys = q._select(a)
    view = base.graph.view()
    xin = {k: view.by_key[k].inputs[0] for k in keys}
    new, old = base.clone(), base.clone()
    got: dict[str, dict[str, np.ndarray]] = {"new": {}, "old": {}}

    def solve(graph, key, xtx, count, which):
        got[which][key] = xtx
        q._apply(graph, key, q._solve(graph.get_linear(key)[0], xtx, count, None))

    t = time.time()
    with BlockRunner(new.graph, feeds, batch=1, keep_outputs=False, analysis=a) as runner:
        plan = qc.plan(a, runner.segments, keys)
        segs = sorted(plan)[:args.segments]

        def hook(sr):
            if sr.segment.index not in segs:
                return False
            for group in plan[sr.segment.index]:
                values = sorted({xin[k] for k in group})
                xtx = dict.fromkeys(values, 0.0)
                count = dict.fromkeys(values, 0)
                for part in sr.each(values):
                    for v in values:
                        xs = np.asarray(part[v], np.float64).reshape(-1, part[v].shape[-1])
                        xtx[v] = xtx[v] + xs.T @ xs
                        count[v] += xs.shape[0]
                for k in group:
                    solve(new.graph, k, xtx[xin[k]], count[xin[k]], "new")
            return True

        runner.run(hook, until=max(segs))
    print(f"block-wise: {time.time() - t:.1f} s")
    t = time.time()
    for s in segs:
        for group in plan[s]:
            caught = capture(old, feeds, sorted({xin[k] for k in group}))
            for k in group:
                x = np.asarray(caught[xin[k]], np.float64).reshape(-1, caught[xin[k]].shape[-1])
                solve(old.graph, k, x.T @ x, x.shape[0], "old")
    print(f"whole graph: {time.time() - t:.1f} s")
    for s in segs:
        for k in (k for group in plan[s] for k in group):
            hn, ho = got["new"][k], got["old"][k]
            rel = np.linalg.norm(hn - ho) / np.linalg.norm(ho)
            print(f"{a.linears[k].name or k}: rel |dXtX| = {rel:.2e}")


if __name__ == "__main__":
    main()
