"""TVM vs ORT for several rewritten SmolLM2 files in one table (issue 14's must-show: `rotate`,
`w4a16-rotated`, `w4a8-rotated`), from `tvm_bench.py` runs on each file's artefact.

Each input is the tvm.json that ``python benchmarks/tvm_bench.py --onnx FILE --artifact DIR
--skip hadamard,parity,ppl_parity`` wrote (copied aside after the run); the artefacts here were
compiled with ``rotaq compile FILE --backend tvm --target llvm --tokens 1,16,128,512,2048
--tune N [--tune-db DIR]``. Writes benchmarks/results/tvm_recipes.json and tvm_recipes.md.

Run: python benchmarks/tvm_recipes.py LABEL=tvm.json [LABEL=tvm.json ...] [--note TEXT]
     [--keep]   (--keep: the rows already in tvm_recipes.json stay; a LABEL given replaces its row)
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def render(runs: dict[str, dict], note: str) -> str:
    lines = [note, "", "| file | compile (s) | artefact (MiB) | prefill TVM / ORT at "
             + " / ".join(_tokens(runs)) + " tokens | worst | decode tok/s TVM / genai "
             "(ratio) at context " + " / ".join(_contexts(runs)) + " | max rel logit diff |",
             "|---|---|---|---|---|---|---|"]
    for label, d in runs.items():
        e, dec = d["e2e"], d.get("decode", {"contexts": {}})
        ratios = [e["tokens"][t]["ratio"] for t in _tokens(runs) if t in e["tokens"]]
        diffs = [r["max_rel_diff"] for r in e["tokens"].values()]
        diffs += [r["max_rel_diff"] for r in dec["contexts"].values()]
        decs = [f"{r['tvm_tok_s']:.1f} / {r['genai_tok_s']:.1f} ({r['tvm_vs_genai']:.2f}x)"
                for r in dec["contexts"].values()]
        cpu = e.get("cpu")  # recorded since 2026-12-02 16:00
        where = f", {cpu['model']} ({', '.join(cpu['int8_flags'])})" if cpu else ""
        lines.append(f"| {label} (`{e['onnx']}`, {d['dates']['e2e']}{where}) | {e['compile_s']:.0f} | "
                     f"{e['artifact_mib']:.1f} | " + " / ".join(f"{r:.2f}x" for r in ratios)
                     + f" | {max(ratios):.2f}x | " + "; ".join(decs)
                     + f" | {max(diffs):.1e} |")
    return "\n".join(lines) + "\n"


def _tokens(runs: dict) -> list[str]:
    return list(next(iter(runs.values()))["e2e"]["tokens"])


def _contexts(runs: dict) -> list[str]:
    return list(next(iter(runs.values())).get("decode", {"contexts": {}})["contexts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=path/to/tvm.json")
    ap.add_argument("--note", default="")
    ap.add_argument("--keep", action="store_true", help="keep the recorded rows")
    args = ap.parse_args()
    runs = {}
    saved = os.path.join(HERE, "tvm_recipes.json")
    if args.keep and os.path.exists(saved):
        with open(saved) as f:
            old = json.load(f)
        runs.update(old["runs"])
        args.note = args.note or old["note"]
    for spec in args.runs:
        label, path = spec.split("=", 1)
        with open(path) as f:
            runs[label] = json.load(f)
    keep = {k: {"dates": v["dates"], "e2e": v["e2e"], "decode": v.get("decode")}
            for k, v in runs.items()}
    with open(os.path.join(HERE, "tvm_recipes.json"), "w") as f:
        json.dump({"note": args.note, "runs": keep}, f, indent=1)
    with open(os.path.join(HERE, "tvm_recipes.md"), "w") as f:
        f.write(render(runs, args.note))


if __name__ == "__main__":
    main()
