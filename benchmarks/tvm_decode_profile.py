"""Where a TVM decode step spends its time: one-token steps over an (almost) full cache of each
compiled context, timed per Relax VM call (``VirtualMachine.set_instrument``), grouped by the
called function's name (the bucket tag stripped) and printed largest first.

Run: python benchmarks/tvm_decode_profile.py ARTEFACT [--contexts 191,1151] [--steps 5]
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import numpy as np

_TAG = re.compile(r"_(decode|prefill)?\d*$")


def profile(folder: str, contexts: list[int], steps: int = 5, top: int = 12) -> dict:
    """{context: {"step_ms": median wall per step, "calls_ms": {function: ms per step}}}."""
    from tvm import relax

    from rotaq.backends import tvm as tb
    from rotaq.backends.tvm_decode import TvmCacheRunner

    acc: dict[str, float] = collections.defaultdict(float)
    start: dict[str, float] = {}
    on = [False]

    def instrument(_func, name, before, _ret, *_args):
        if on[0]:
            if before:
                start[name] = time.perf_counter()
            else:
                acc[name] += time.perf_counter() - start[name]
        return 0

    base = relax.VirtualMachine

    class _VM(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.set_instrument(instrument)

    relax.VirtualMachine = _VM  # every VM the artefact creates gets the instrument
    try:
        runner = TvmCacheRunner(tb.load(folder).graph)
    finally:
        relax.VirtualMachine = base
    out = {}
    for ctx in contexts:
        runner.prefill(np.ones((1, 1), np.int64))
        runner.ctx = 0
        runner._grow(ctx - 3)  # the cache of context ctx
        runner.length = ctx - 3
        for _ in range(2):  # warm up
            runner.run(np.array([[1]]))
        acc.clear()
        on[0], wall = True, []
        for _ in range(steps):
            runner.length = ctx - 3
            t0 = time.perf_counter()
            runner.run(np.array([[1]]))
            wall.append(time.perf_counter() - t0)
        on[0] = False
        groups: dict[str, float] = collections.defaultdict(float)
        for name, sec in acc.items():
            groups[_TAG.sub("", name)] += sec * 1e3 / steps
        calls = dict(sorted(groups.items(), key=lambda kv: -kv[1])[:top])
        out[ctx] = {"step_ms": float(np.median(wall)) * 1e3,
                    "vm_calls_ms": sum(groups.values()), "calls_ms": calls}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artefact")
    ap.add_argument("--contexts", default="191,1151")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    res = profile(args.artefact, [int(c) for c in args.contexts.split(",")], args.steps)
    for ctx, r in res.items():
        print(f"context {ctx}: step {r['step_ms']:.1f} ms (VM calls {r['vm_calls_ms']:.1f} ms)")
        for name, ms in r["calls_ms"].items():
            print(f"  {ms:7.2f} ms  {name}")


if __name__ == "__main__":
    main()
