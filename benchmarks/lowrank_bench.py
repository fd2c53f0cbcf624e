"""Low-rank and Kronecker benchmark on SmolLM2-135M, side by side in one run (issue 4).

Rows (each applied to the same ONNX graph, evaluated in ONNX Runtime):
- plain / activation-aware / whitened SVD at 10, 20, 30% fewer linear parameters (head excluded;
  ranks allocated by each method's own measured spectrum under one global budget);
- int4 (asymmetric g128 RTN) alone, with an EoRA rank-32 correction, with LQ-LoRA rank 32;
- W4A4 (int4 weights, int4 per-token activations, int4 KV) after Hadamard rotation only, and
  with learned Kronecker transforms (FlatQuant style), both with the same quantizer;
- Kronecker-sum and Monarch approximations at the same parameter fraction.
Columns: Wikipedia perplexity, latency ratio to fp32 at 1 / 16 / 512 tokens (ORT, 2 threads;
each row's model and the fp32 model are timed in turn, run for run, and the ratio of their
medians is reported, so a busy machine slows both alike), linear parameters removed, size.

Writes benchmarks/results/lowrank.json and lowrank.md (quoted by the README).
Run: python benchmarks/lowrank_bench.py [--rows fp32,whiten-20,...] [--merge]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
import traceback

import numpy as np

import rotaq
from rotaq.eval.latency import onnx_files
from rotaq.eval.quality import perplexity

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
log = logging.getLogger("lowrank_bench")


def _jobs(args) -> list[tuple[str, str, dict]]:
    jobs = [("fp32", "", {})]
    for ratio in (10, 20, 30):
        for method in ("svd", "asvd", "whiten"):
            jobs.append((f"{method}-{ratio}", "lowrank",
                         {"method": method, "ratio": ratio / 100, "rank_by": "budget"}))
    jobs += [
        ("w4a16-rtn", "w4a16", {}),
        ("w4a16-rtn + eora32 (lowrank-w4a16)", "lowrank-w4a16", {}),
        ("w4a16-rtn + lq32", "lowrank-w4a16", {"lowrank_mode": "lq"}),
        ("w4a4-rotated (rtn)", "w4a4-rotated", {"quantize.method": "rtn"}),
        ("kron-w4a4 (rtn)", "kron-w4a4", {"quantize.method": "rtn"}),
        ("w4a4-rotated (gptq)", "w4a4-rotated", {}),
        ("kron-w4a4 (gptq)", "kron-w4a4", {}),
        ("kron-50", "structured", {"kind": "kron", "keep": 0.5}),
        ("monarch-50 (monarch)", "monarch", {}),
        ("whiten-50", "lowrank", {"method": "whiten", "ratio": 0.5, "rank_by": "budget"}),
    ]
    return jobs


def _interleaved(paths: dict[str, str], threads: int, repeats: int) -> dict[str, dict]:
    """Median latency (ms) per model and token count, the models run in turn (A B A B ...) so
    that both see the same machine load; the ratio of medians is what the table reports."""
    from rotaq.backends.ort import ort_session
    from rotaq.eval.latency import _ORT_TYPES, _feeds, time_alternating

    sess = {k: ort_session(p, "all", threads=threads) for k, p in paths.items()}
    out: dict[str, dict] = {k: {} for k in paths}
    for n in (1, 16, 512):
        runs = {}
        for k, s in sess.items():
            specs = {i.name: (_ORT_TYPES.get(i.type, np.float32), list(i.shape))
                     for i in s.get_inputs()}
            feeds = _feeds(specs, n)
            names = [o.name for o in s.get_outputs()]
            runs[k] = (lambda s=s, f=feeds, o=names: s.run(o, f))
        for k, ms in time_alternating(runs, 1, repeats).items():
            out[k][str(n)] = ms
    return out


def _row(name: str, path: str, fp32: str, args, source: dict) -> dict:
    model = rotaq.load(path)
    for k in ("tokenizer", "kind"):
        model.source.setdefault(k, source[k])
    ppl = perplexity(model, "wiki", args.tokens, args.window, progress=False)
    size = sum(os.path.getsize(f) for f in onnx_files(path))
    lat = _interleaved({"fp32": fp32, "model": path}, args.threads, args.repeats)
    return {"name": name, "ppl": ppl["ppl"], "tokens": ppl["tokens"], "size_mb": size / 2**20,
            "latency_ms": lat["model"], "fp32_latency_ms": lat["fp32"],
            "latency_ratio": {k: lat["model"][k] / lat["fp32"][k] for k in lat["model"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="all", help="comma-separated row names (fp32 always runs)")
    ap.add_argument("--skip", default="", help="comma-separated row names to leave out")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--merge", action="store_true", help="keep rows of an earlier run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = tempfile.mkdtemp(prefix="rotaq-lrbench-")
    base = rotaq.load("smollm2-135m", ir="onnx")
    fp32 = os.path.join(work, "fp32.onnx")
    base.save(fp32)
    wanted = None if args.rows == "all" else set(args.rows.split(","))
    skip = set(filter(None, args.skip.split(",")))
    prev = _previous(args) if args.merge else []
    run = 1 + max((r.get("run", 1) for r in prev), default=0)
    rows = []
    for name, recipe, opts in _jobs(args):
        if name != "fp32" and ((wanted and name not in wanted) or name in skip):
            continue
        t0 = time.time()
        path = fp32 if not recipe else os.path.join(work, "model.onnx")
        extra: dict = {}
        try:
            if recipe:
                res = rotaq.optimize(base, recipe, options=opts or None)
                res.save(path)
                extra = {"recipe": recipe, "options": opts,
                         "max_rel_error": res.report["max_rel_error"],
                         "passes": [{k: p[k] for k in ("pass", "stats", "seconds")}
                                    for p in res.report["passes"]]}
                for p in res.report["passes"]:
                    st = p["stats"]
                    st.pop("ranks", None)
                    if "params_removed_ratio" in st:
                        extra["params_removed"] = st["params_removed_ratio"]
            row = _row(name, path, fp32, args, base.source)
        except Exception as err:  # noqa: BLE001 - a failing row is reported, not fatal
            log.error("%s failed: %s", name, err)
            rows.append({"name": name, "run": run, "error": f"{type(err).__name__}: {err}",
                         "trace": traceback.format_exc(limit=4)})
            _write(args, prev, rows)
            continue
        row.update(extra)
        row["seconds"] = round(time.time() - t0, 1)
        row["run"] = run
        rows.append(row)
        log.info("%s: ppl %.2f, latency %s (%.0fs)", name, row["ppl"], row.get("latency_ratio"),
                 row["seconds"])
        _write(args, prev, rows)
        if recipe and os.path.exists(path):
            for f in os.listdir(work):
                if f.startswith("model."):
                    os.remove(os.path.join(work, f))
    shutil.rmtree(work, ignore_errors=True)


def _previous(args) -> list[dict]:
    old = os.path.join(args.out, "lowrank.json")
    if not os.path.exists(old):
        return []
    with open(old) as f:
        return json.load(f)["rows"]


def _write(args, prev: list[dict], rows: list[dict]) -> None:
    os.makedirs(args.out, exist_ok=True)
    redone = {r["name"] for r in rows if r["name"] != "fp32"}
    keep = [r for r in prev if r["name"] not in redone]
    allrows = keep + rows
    with open(os.path.join(args.out, "lowrank.json"), "w") as f:
        json.dump({"tokens": args.tokens, "window": args.window, "threads": args.threads,
                   "rows": allrows}, f, indent=2, default=str)
    fp = next((r for r in allrows if r["name"] == "fp32" and "ppl" in r), None)
    lines = [(f"SmolLM2-135M, Wikipedia perplexity on {args.tokens} tokens ({args.window}-token "
             f"windows, ORT); latency: ORT CPU, {args.threads} threads, ratio of medians to the "
             "fp32 model timed alternately with it (run for run); params removed: share of the "
             "non-head linear parameters."), "",
             ("| run | model | ppl | vs fp32 | params removed | 1 tok | 16 tok | 512 tok | "
             "size MB |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(allrows, key=lambda r: r.get("run", 0)):
        if "error" in r:
            lines.append(f"| {r.get('run', '')} | {r['name']} | failed: {r['error'][:80]} "
                         "| | | | | | |")
            continue
        lr = r.get("latency_ratio", {})
        rel = f"x{r['ppl'] / fp['ppl']:.3f}" if fp else ""
        pr = f"{100 * r['params_removed']:.1f}%" if "params_removed" in r else ""
        lines.append(f"| {r.get('run', '')} | {r['name']} | {r['ppl']:.2f} | {rel} | {pr} | "
                     f"{lr.get('1', 0):.2f} | {lr.get('16', 0):.2f} | {lr.get('512', 0):.2f} | "
                     f"{r['size_mb']:.0f} |")
    with open(os.path.join(args.out, "lowrank.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
