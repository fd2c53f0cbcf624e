"""Prefill latency of two TVM artefacts of the same ONNX file and ORT on it, alternated in one
run (e.g. before/after a kernel change), with each one's max relative logit difference to ORT.
The order of the three is rotated every repeat (which one runs first after another model
moved 1-token latency by 13%).

Run: python benchmarks/tvm_prefill_ab.py FILE.onnx BEFORE_DIR AFTER_DIR --tokens 512 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import rotaq
from rotaq.backends import tvm as tb
from rotaq.backends.ort import ort_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx")
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    before, after, ref = tb.load(args.before), tb.load(args.after), rotaq.load(args.onnx)
    sess = ort_session(args.onnx, "all", {"session.intra_op.allow_spinning": "0"}, threads=2)
    ids = np.random.default_rng(0).integers(0, 30000, (1, args.tokens))
    feeds = ref.token_feeds(ids)
    names = [i.name for i in sess.get_inputs()]
    runs = {"tvm_before": lambda: before.graph.run(before.token_feeds(ids))[0],
            "tvm_after": lambda: after.graph.run(after.token_feeds(ids))[0],
            "ort": lambda: sess.run(["logits"], {k: feeds[k] for k in names})[0]}
    outs, ms = {}, {k: [] for k in runs}
    order = list(runs)
    for rep in range(args.repeats):  # order rotated every repeat: the first after another
        for k in order[rep % 3:] + order[: rep % 3]:  # model finds its weights evicted
            fn = runs[k]
            t0 = time.perf_counter()
            outs[k] = fn()
            ms[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: float(np.median(v[1:] or v)) for k, v in ms.items()}  # first run: warm-up
    for k in runs:
        print(f"{k:11s} median {med[k]:8.1f} ms  runs {[round(x) for x in ms[k]]}")
    b = outs["ort"]
    for k in ("tvm_before", "tvm_after"):
        print(f"{k} max rel logit diff vs ORT {np.abs(outs[k] - b).max() / np.abs(b).max():.1e}")
    print(f"after / before {med['tvm_after'] / med['tvm_before']:.2f}x, "
          f"after / ORT {med['tvm_after'] / med['ort']:.2f}x")


if __name__ == "__main__":
    main()
