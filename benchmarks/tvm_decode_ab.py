"""Decode tokens/s of several TVM artefacts of the same ONNX file and onnxruntime-genai on it,
stepped in turn in one run (before/after a kernel change, tuned vs untuned), with each
artefact's max relative logit difference to the first one's.

Run: python benchmarks/tvm_decode_ab.py FILE.onnx NAME=DIR [NAME=DIR ...] --contexts 128
     [--steps 32] [--no-genai] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(onnx_path: str, arts: dict[str, str], contexts: list[int], steps: int,
        genai: bool) -> dict:
    from benchmarks.tvm_bench import _genai_runner
    from rotaq.backends import tvm as tb
    from rotaq.backends.tvm_decode import TvmCacheRunner

    runners = {k: TvmCacheRunner(tb.load(d).graph) for k, d in arts.items()}
    gen = _genai_runner(onnx_path, None) if genai else None
    first = next(iter(arts))
    out = {}
    for c in contexts:
        ids = np.random.default_rng(c).integers(0, 32, (1, c)).astype(np.int64)
        last = {k: r.prefill(ids) for k, r in runners.items()}
        tok = np.array([[int(last[first][0, -1].argmax())]])
        step = {k: r.run for k, r in runners.items()}
        if gen is not None:
            g = gen._generator(c + steps + 1)
            g.append_tokens(ids[0].astype(np.int32))
            step["genai"] = lambda _tok, g=g: g.generate_next_token()
        ms: dict[str, list[float]] = {k: [] for k in step}
        diff = {k: 0.0 for k in runners}
        for _ in range(steps):
            for name, fn in step.items():
                t0 = time.perf_counter()
                res = fn(tok)
                ms[name].append((time.perf_counter() - t0) * 1e3)
                if name in runners:
                    last[name] = res
            ref = last[first][0, -1]
            for k in runners:
                diff[k] = max(diff[k], float(np.abs(last[k][0, -1] - ref).max()
                                             / np.abs(ref).max()))
            tok = np.array([[int(ref.argmax())]])
        row = {k: {"step_ms": float(np.median(v)), "tok_s": 1e3 / float(np.median(v))}
               for k, v in ms.items()}
        for k in runners:
            row[k]["max_rel_diff_vs_" + first] = diff[k]
            if gen is not None:
                row[k]["vs_genai"] = row[k]["tok_s"] / row["genai"]["tok_s"]
        out[str(c)] = row
        print(f"context {c}: " + ", ".join(
            f"{k} {v['tok_s']:.1f} tok/s ({v['step_ms']:.1f} ms"
            + (f", {v['vs_genai']:.2f}x genai" if "vs_genai" in v else "") + ")"
            for k, v in row.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx")
    ap.add_argument("artefacts", nargs="+", metavar="NAME=DIR")
    ap.add_argument("--contexts", default="128")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--no-genai", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    arts = dict(a.split("=", 1) for a in args.artefacts)
    res = run(args.onnx, arts, [int(c) for c in args.contexts.split(",")], args.steps,
              not args.no_genai)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"onnx": args.onnx, "artefacts": arts, "steps": args.steps,
                       "contexts": res}, f, indent=1)


if __name__ == "__main__":
    main()
