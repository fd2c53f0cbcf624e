"""SpinQuant-style learned rotation (`w4a4-spin`) against the random Hadamard (`w4a4-rotated`)
on SmolLM2-135M: same W4A4 quantizer (int4 g128 GPTQ weights, int4 per-token activations, int4
KV cache), Wikipedia perplexity on 8192 tokens (512-token windows, ORT), calibration time.

Each row runs through the CLI, as a user runs it, under ``/usr/bin/time -v`` (wall time, peak
RSS): ``rotaq optimize smollm2-135m --recipe R -o R.onnx --json`` then ``rotaq eval R.onnx
--task ppl --tokens 8192 --json``. The spin pass report gives its loss before/after and its own
time. Rows whose recipe is not run here (``--rows``) are taken from the recorded results named in
the table (w4a4-rotated and kron-w4a4 from benchmarks/results/lowrank.json, run 2).

Writes benchmarks/results/spin.json and spin.md.
Run: python benchmarks/spin_bench.py [--rows w4a4-spin,w4a4-rotated] [--set OPT=V ...]
         [--work DIR --reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from outliers_bench import _cli, _timed

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODEL = "smollm2-135m"


def _row(name: str, args) -> dict:
    path = os.path.join(args.work, f"{name}.onnx")
    record = path + ".json"
    if not (args.reuse and os.path.exists(record)):
        cmd = _cli("optimize", MODEL, "--recipe", name, "-o", path, "--json")
        for s in args.set if name == "w4a4-spin" else []:
            cmd[-1:-1] = ["--set", s]
        out, opt = _timed(cmd)
        report = json.loads(out)
        out, ev = _timed(_cli("eval", path, "--task", "ppl", "--tokens", str(args.tokens),
                              "--json"))
        with open(record, "w") as f:
            json.dump({"optimize": opt, "report": report, "eval": ev,
                       "ppl": json.loads(out)["ppl"]}, f)
    with open(record) as f:
        saved = json.load(f)
    row = {"name": name, "ppl": saved["ppl"], "optimize": saved["optimize"],
           "eval": saved["eval"]}
    for p in saved["report"]["passes"]:
        if p.get("pass") == "spin":
            row["spin"] = {k: p["stats"].get(k) for k in (
                "objective", "loss_init", "loss_final", "steps", "calibration_seconds",
                "calibration_tokens")}
    return row


def _recorded() -> dict[str, float]:
    with open(os.path.join(HERE, "lowrank.json")) as f:
        data = json.load(f)
    rows = data["rows"] if isinstance(data, dict) else data
    out = {}
    for r in rows:
        label = r.get("label") or r.get("name", "")
        if r.get("run") == 2 and label.endswith("(gptq)"):
            out[label.split(" ")[0]] = r["ppl"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="w4a4-spin")
    ap.add_argument("--set", action="append", default=[], help="options for w4a4-spin")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--work", default=None)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="rotaq-spin-")
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for name in args.rows.split(","):
        rows.append(_row(name, args))
        print(json.dumps(rows[-1]), flush=True)
    recorded = {k: v for k, v in _recorded().items() if k not in {r["name"] for r in rows}}
    with open(os.path.join(args.out, "spin.json"), "w") as f:
        json.dump({"tokens": args.tokens, "set": args.set, "rows": rows,
                   "recorded": recorded}, f, indent=2)
    title = (f"W4A4 on SmolLM2-135M (int4 g128 GPTQ weights, int4 per-token activations, int4 "
             f"KV; Wikipedia perplexity on {args.tokens} tokens, 512-token windows, ORT). "
             f"Options for w4a4-spin: {', '.join(args.set) or 'the recipe as shipped'}.")
    header = ("| recipe | ppl | spin loss (start -> learned) | spin steps | spin time (s) | "
              "optimize wall (s) | optimize peak RSS (MiB) |")
    lines = [title, "", header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("spin") or {}
        loss = (f"{s['loss_init']:.4f} -> {s['loss_final']:.4f} ({s['objective']})"
                if s else "")
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {loss} | {s.get('steps', '')} | "
                     f"{s.get('calibration_seconds', '')} | {r['optimize']['wall_s']} | "
                     f"{r['optimize']['peak_rss_mib']} |")
    for name, ppl in recorded.items():
        lines.append(f"| {name} (recorded: results/lowrank.md, run 2) | {ppl:.2f} | | | | | |")
    with open(os.path.join(args.out, "spin.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
