"""Where a TVM decode step (or a prefill) spends its time: one-token steps over an (almost) full
cache of each compiled context, or prefills of ``--prefill`` tokens, timed per Relax VM call
(``VirtualMachine.set_instrument``), grouped by the called function's name (the bucket tag
stripped) and printed largest first.

Run: python benchmarks/tvm_decode_profile.py ARTEFACT [--contexts 191,1151] [--steps 5]
     python benchmarks/tvm_decode_profile.py ARTEFACT --prefill 16,128 [--steps 5]
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import numpy as np

_TAG = re.compile(r"_(decode|prefill)?\d*$")


def profile(folder: str, contexts: list[int], steps: int = 5, top: int = 12,
            prefill: bool = False) -> dict:
    """{context: {"step_ms": median wall per step, "calls_ms": {function: ms per step}}};
    ``prefill``: ``contexts`` are prompt lengths, each step one prefill of that many tokens."""
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
        art = tb.load(folder)
        runner = None if prefill else TvmCacheRunner(art.graph)
    finally:
        relax.VirtualMachine = base
    out = {}
    for ctx in contexts:
        if prefill:
            feeds = art.token_feeds(np.random.default_rng(0).integers(0, 30000, (1, ctx)))
            step = lambda feeds=feeds: art.graph.run(feeds)
        else:
            step = lambda ctx=ctx: _decode_step(runner, ctx)
            _prime(runner, ctx)
        for _ in range(2):  # warm up
            step()
        acc.clear()
        on[0], wall = True, []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            wall.append(time.perf_counter() - t0)
        on[0] = False
        groups: dict[str, float] = collections.defaultdict(float)
        for name, sec in acc.items():
            groups[_TAG.sub("", name)] += sec * 1e3 / steps
        calls = dict(sorted(groups.items(), key=lambda kv: -kv[1])[:top])
        out[ctx] = {"step_ms": float(np.median(wall)) * 1e3,
                    "vm_calls_ms": sum(groups.values()), "calls_ms": calls}
    return out


def _prime(runner, ctx: int) -> None:
    """The runner's cache grown to context ``ctx`` (filled with one prompt's keys)."""
    runner.prefill(np.ones((1, 1), np.int64))
    runner.ctx = 0
    runner._grow(ctx - 3)  # the cache of context ctx
    runner.length = ctx - 3


def _decode_step(runner, ctx: int) -> None:
    runner.length = ctx - 3  # the same position every step
    runner.run(np.array([[1]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artefact")
    ap.add_argument("--contexts", default="191,1151")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prefill", default="", help="prompt lengths: profile prefill instead")
    args = ap.parse_args()
    lengths = args.prefill or args.contexts
    res = profile(args.artefact, [int(c) for c in lengths.split(",")], args.steps,
                  prefill=bool(args.prefill))
    for ctx, r in res.items():
        print(f"{'prefill' if args.prefill else 'context'} {ctx}: step {r['step_ms']:.1f} ms (VM calls {r['vm_calls_ms']:.1f} ms)")
        for name, ms in r["calls_ms"].items():
            print(f"  {ms:7.2f} ms  {name}")


if __name__ == "__main__":
    main()
