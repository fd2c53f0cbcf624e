"""Decode tokens/s of several TVM artefacts of the same ONNX file and onnxruntime-genai on it,
in one run (before/after a kernel change, tuned vs untuned), with each artefact's max relative
logit difference to the first one's. genai runs with 1 and with 2 intra-op threads: on 2
cores shared with other jobs its 2-thread steps took 45 ms where 1 thread took 23 ms.

The runners take turns in blocks of ``--block`` consecutive steps, the order rotated every
round: stepping them strictly in turn made the one after genai 1.5x slower than the same
artefact placed last (each evicts the others' weights from the shared L3; 164 MB of weights per
SmolLM2 step), so a fixed order measures the order, not the code. Each runner's cache
continues across its blocks (``steps`` in all, the same fixed random tokens for every TVM
runner; genai steps its own greedy tokens); the median step is reported, and the logits of
the last step are compared.

Run: python benchmarks/tvm_decode_ab.py FILE.onnx NAME=DIR [NAME=DIR ...] --contexts 128
     [--steps 48] [--block 8] [--genai-threads 1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _genai(onnx_path: str, threads: list[int]) -> dict[str, object]:
    """onnxruntime-genai runners (the generation folder tvm_bench writes) per thread count."""
    import hashlib
    from pathlib import Path

    from benchmarks.decode_bench import GenaiRunner
    from benchmarks.tvm_bench import _genai_runner
    from rotaq import assets

    _genai_runner(onnx_path, None)  # writes the folder when missing
    st = os.stat(onnx_path)
    key = hashlib.sha1(f"{os.path.abspath(onnx_path)}|{st.st_mtime}".encode()).hexdigest()[:12]
    folder = Path(assets.cache_dir()) / "tvm" / f"genai-{key}"
    return {f"genai_{t}t": GenaiRunner(folder, t) for t in threads}


def run(onnx_path: str, arts: dict[str, str], contexts: list[int], steps: int,
        genai: list[int], block: int = 8) -> dict:
    from rotaq.backends import tvm as tb
    from rotaq.backends.tvm_decode import TvmCacheRunner

    runners = {k: TvmCacheRunner(tb.load(d).graph) for k, d in arts.items()}
    gens = _genai(onnx_path, genai) if genai else {}
    first = next(iter(arts))
    out = {}
    for c in contexts:
        ids = np.random.default_rng(c).integers(0, 32, (1, c)).astype(np.int64)
        last = {k: r.prefill(ids) for k, r in runners.items()}
        feed = np.random.default_rng(c + 1).integers(0, 32, steps)  # the same tokens for all
        step = {k: r.run for k, r in runners.items()}
        for gname, gen in gens.items():
            g = gen._generator(c + steps + 1)
            g.append_tokens(ids[0].astype(np.int32))
            step[gname] = lambda _tok, g=g: g.generate_next_token()
        ms: dict[str, list[float]] = {k: [] for k in step}
        done = {k: 0 for k in step}
        names = list(step)
        for rnd in range(-(-steps // block)):
            for name in names[rnd % len(names):] + names[: rnd % len(names)]:
                for _ in range(min(block, steps - rnd * block)):
                    t0 = time.perf_counter()
                    res = step[name](np.array([[feed[done[name]]]]))
                    ms[name].append((time.perf_counter() - t0) * 1e3)
                    done[name] += 1
                    if name in runners:
                        last[name] = res
        ref = last[first][0, -1]
        diff = {k: float(np.abs(last[k][0, -1] - ref).max() / np.abs(ref).max())
                for k in runners}
        row = {k: {"step_ms": float(np.median(v)), "tok_s": 1e3 / float(np.median(v))}
               for k, v in ms.items()}
        for k in runners:
            row[k]["max_rel_diff_vs_" + first] = diff[k]
            for gname in gens:
                row[k]["vs_" + gname] = row[k]["tok_s"] / row[gname]["tok_s"]
        out[str(c)] = row
        print(f"context {c}: " + ", ".join(
            f"{k} {v['tok_s']:.1f} tok/s ({v['step_ms']:.1f} ms"
            + "".join(f", {r:.2f}x {g[3:]}" for g, r in v.items() if g.startswith("vs_")) + ")"
            for k, v in row.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx")
    ap.add_argument("artefacts", nargs="+", metavar="NAME=DIR")
    ap.add_argument("--contexts", default="128")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--genai-threads", default="1,2",
                    help="onnxruntime-genai runners with these intra-op thread counts ('' none)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    arts = dict(a.split("=", 1) for a in args.artefacts)
    res = run(args.onnx, arts, [int(c) for c in args.contexts.split(",")], args.steps,
              [int(t) for t in args.genai_threads.split(",") if t.strip()], args.block)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"onnx": args.onnx, "artefacts": arts, "steps": args.steps,
                       "block": args.block,
                       "contexts": res}, f, indent=1)


if __name__ == "__main__":
    main()
