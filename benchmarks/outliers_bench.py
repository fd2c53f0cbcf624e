"""LLM.int8() outlier decomposition (`w8a8-outliers`) on SmolLM2-135M, side by side in one run.

Rows (each through the CLI, as a user runs it, under ``/usr/bin/time -v`` for wall time and
peak RSS): fp32; `w8a8-rotated` and `w8a8` in ORT's per-tensor int8 kernels (``--set
w_group=-1``: DynamicQuantizeLinear + MatMulInteger per linear); `w8a8-rotated` as shipped
(MatMulNBits); `w8a8-outliers`. For each: ``rotaq optimize smollm2-135m --recipe R -o R.onnx``,
``rotaq eval R.onnx --task ppl`` (Wikipedia, 8192 tokens, 512-token windows, ORT) and ``rotaq
bench R.onnx --tokens 16,512`` (ORT, 2 threads, median); latency ratios are to the fp32 and
the per-tensor `w8a8-rotated` timed in the same run. The outlier columns per linear come from
the `int8-outliers` pass report.

Writes benchmarks/results/int8_outliers.json and int8_outliers.md.
Run: python benchmarks/outliers_bench.py [--rows fp32,w8a8-rotated-pt,w8a8-outliers]
         [--work DIR --reuse]  (--reuse: keep ONNX files already written in DIR)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODEL = "smollm2-135m"
# name -> (recipe, --set options); None: the fp32 model itself
ROWS = {
    "fp32": None,
    "w8a8-pt": ("w8a8", ["w_group=-1"]),
    "w8a8-rotated-pt": ("w8a8-rotated", ["w_group=-1"]),
    "w8a8-rotated": ("w8a8-rotated", []),
    "w8a8-outliers": ("w8a8-outliers", []),
    "w8a8-outliers-norot": ("norot", []),  # the recipe without its rotate pass (a file)
    "w8a8-outliers-max32": ("w8a8-outliers", ["max_columns=32"]),
}
LABEL = {"w8a8-pt": "w8a8 (per-tensor int8)", "w8a8-rotated-pt": "w8a8-rotated (per-tensor int8)",
         "w8a8-rotated": "w8a8-rotated (MatMulNBits, as shipped)",
         "w8a8-outliers": "w8a8-outliers (rotate, per-tensor int8 + float outlier columns)",
         "w8a8-outliers-norot": "w8a8-outliers without rotate (the paper's setting)",
         "w8a8-outliers-max32": "w8a8-outliers, at most 32 columns per linear"}


def _timed(cmd: list[str]) -> tuple[str, dict]:
    """Run ``cmd`` under /usr/bin/time -v: (stdout, {wall_s, peak_rss_mib, cmd})."""
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                       check=False)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-2000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return p.stdout, {"cmd": " ".join(["rotaq", *cmd[3:]]), "wall_s": round(time.time() - t0, 1),
                      "peak_rss_mib": round(int(rss.group(1)) / 1024) if rss else None}


def _norot(work: str) -> str:
    """The built-in w8a8-outliers recipe without its rotate pass, as a recipe file."""
    from rotaq.recipe import Recipe

    rec = Recipe.load("w8a8-outliers").to_dict()
    rec["name"] = "w8a8-outliers-norot"
    rec["passes"] = [p for p in rec["passes"] if p["pass"] != "rotate"]
    path = os.path.join(work, "w8a8-outliers-norot.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=2)
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rotaq.cli", *args]


def _row(name: str, work: str, args) -> dict:
    spec = ROWS[name]
    row: dict = {"name": name, "label": LABEL.get(name, name)}
    path = MODEL
    if spec is not None:
        recipe, sets = spec
        path = os.path.join(work, f"{name}.onnx")
        record = path + ".optimize.json"  # the optimize run, kept for --reuse
        if recipe == "norot":
            recipe = _norot(work)
        if not (args.reuse and os.path.exists(path) and os.path.exists(record)):
            cmd = _cli("optimize", MODEL, "--recipe", recipe, "-o", path, "--json")
            for s in sets:
                cmd[-1:-1] = ["--set", s]
            out, timing = _timed(cmd)
            with open(record, "w") as f:
                json.dump({"timing": timing, "report": json.loads(out)}, f)
        with open(record) as f:
            saved = json.load(f)
            row["optimize"], rep = saved["timing"], saved["report"]
        row["max_rel_error"] = rep.get("max_rel_error")
        for p in rep["passes"]:
            if p.get("pass") == "int8-outliers":
                st = p["stats"]
                row["outliers"] = {k: st[k] for k in ("linears", "split", "masks",
                                                      "outlier_columns", "outlier_columns_max",
                                                      "selection", "columns_per_linear")}
                row["outliers"]["kept_float"] = st.get("kept_float", [])
    if args.optimize_only:
        return row
    if not args.no_ppl and (not args.ppl_rows or name in args.ppl_rows.split(",")):
        record = os.path.join(work, f"{name}.eval.json")  # kept for --reuse
        if not (args.reuse and os.path.exists(record)):
            out, timing = _timed(_cli("eval", path, "--task", "ppl", "--tokens",
                                      str(args.tokens), "--json"))
            with open(record, "w") as f:
                json.dump({"timing": timing, "result": json.loads(out)}, f)
        with open(record) as f:
            saved = json.load(f)
        row["eval"], row["ppl"] = saved["timing"], saved["result"]["ppl"]
    row["path"] = path
    return row


def _bench(row: dict, args) -> None:
    """Latency of one row (all rows are timed after the optimize / eval phase, back to back)."""
    out, row["bench"] = _timed(_cli("bench", row["path"], "--tokens", args.lat_tokens,
                                    "--contexts", "128", "--json"))
    lat = json.loads(out)
    row["latency_ms"] = {k: v["median_ms"] for k, v in lat["tokens"].items()}
    row["size_mib"] = lat.get("size_mib")
    row["kernels"] = {k: v for k, v in (lat.get("optimized_ops") or {}).items()
                      if any(s in k for s in ("MatMul", "Gemm", "Quantize", "Gather"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default="fp32,w8a8-pt,w8a8-rotated-pt,w8a8-rotated,w8a8-outliers,"
                    "w8a8-outliers-norot")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--lat-tokens", default="16,512")
    ap.add_argument("--work", default=None)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--optimize-only", action="store_true",
                    help="write the optimized files (and their records) into --work, nothing else")
    ap.add_argument("--no-bench", action="store_true",
                    help="optimize and eval only (records in --work, for a later --reuse run)")
    ap.add_argument("--ppl-rows", default="",
                    help="comma-separated rows whose perplexity is measured (default: all)")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--write-only", action="store_true")
    args = ap.parse_args()
    if args.write_only:  # the tables again from int8_outliers.json
        with open(os.path.join(args.out, "int8_outliers.json")) as f:
            _write(args, json.load(f)["rows"])
        return
    work = args.work or tempfile.mkdtemp(prefix="rotaq-outliers-")
    os.makedirs(work, exist_ok=True)
    rows = []
    for name in args.rows.split(","):  # phase 1: optimize and perplexity
        try:
            rows.append(_row(name, work, args))
        except Exception as err:  # noqa: BLE001  (a row that fails is reported, not fatal)
            rows.append({"name": name, "label": LABEL.get(name, name),
                         "error": f"{type(err).__name__}: {str(err)[:300]}"})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "outliers"}), flush=True)
    if args.optimize_only or args.no_bench:
        return
    for row in rows:  # phase 2: latency, back to back
        if "error" in row:
            continue
        try:
            _bench(row, args)
        except Exception as err:  # noqa: BLE001
            row["error"] = f"bench: {type(err).__name__}: {str(err)[:300]}"
        print(json.dumps({k: row.get(k) for k in ("name", "latency_ms", "kernels")}), flush=True)
        _write(args, rows)


def _write(args, rows: list[dict]) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "int8_outliers.json"), "w") as f:
        json.dump({"model": MODEL, "tokens": args.tokens, "rows": rows}, f, indent=2)
    by = {r["name"]: r for r in rows if "latency_ms" in r}
    fp, rot = by.get("fp32"), by.get("w8a8-rotated-pt")
    lt = args.lat_tokens.split(",")
    lines = [(f"SmolLM2-135M: Wikipedia perplexity on {args.tokens} tokens (512-token windows, "
              "ORT); prefill latency (ORT CPU, 2 threads, median) as ratios to fp32 and to the "
              "per-tensor `w8a8-rotated`, all timed in this run; peak RSS and wall time of "
              "`rotaq optimize` / `rotaq eval` (/usr/bin/time -v)."), "",
             "| model | ppl | vs fp32 | " + " | ".join(f"{t} tok ms" for t in lt)
             + f" | {lt[-1]} tok vs fp32 | vs w8a8-rotated (per-tensor) | size MiB | optimize "
             "s / RSS MiB | eval s / RSS MiB |",
             "|---|---|---|" + "---|" * len(lt) + "---|---|---|---|---|"]
    for r in rows:
        if "latency_ms" not in r and "error" not in r:  # --optimize-only
            continue
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:100]} |" + " |" * (6 + len(lt)))
            continue
        ms = r["latency_ms"]
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else ""
        rel = f"x{r['ppl'] / fp['ppl']:.3f}" if fp and "ppl" in r and "ppl" in fp else ""
        last = lt[-1]
        vf = f"{ms[last] / fp['latency_ms'][last]:.2f}" if fp else ""
        vr = f"{ms[last] / rot['latency_ms'][last]:.2f}" if rot else ""
        opt, ev = r.get("optimize"), r.get("eval")
        lines.append(f"| {r['label']} | {ppl} | {rel} | "
                     + " | ".join(f"{ms[t]:.1f}" for t in lt)
                     + f" | {vf} | {vr} | {r['size_mib']:.0f} | "
                     + (f"{opt['wall_s']:.0f} / {opt['peak_rss_mib']}" if opt else "")
                     + " | " + (f"{ev['wall_s']:.0f} / {ev['peak_rss_mib']}" if ev else "") + " |")
    outs = [(r["label"], r["outliers"]) for r in rows if r.get("outliers")]
    for label, out in outs:
        lines += ["", (f"{label}: `int8-outliers` ({out['selection']}) split "
                       f"{out['outlier_columns']} columns off in {out['split']} of "
                       f"{out['linears']} linears ({out['masks']} masks, at most "
                       f"{out['outlier_columns_max']} in one linear)"
                       + (f"; every input column over the threshold, kept as float MatMuls: "
                          f"{', '.join(out['kept_float'])}" if out.get("kept_float") else "")
                       + "."), ""]
    if outs:
        kinds = ["q_proj", "o_proj", "gate_proj", "down_proj"]  # k/v = q, up = gate: shared
        head = " | ".join(f"{lab.split(' ')[0]}{' (no rotate)' if 'without' in lab else ''} "
                          f"{k.split('_')[0]}" for lab, _ in outs for k in kinds)
        lines += [("Outlier columns per layer (q/k/v share the q column set, gate/up the gate "
                   "one):"), "", "| layer | " + head + " |",
                  "|---|" + "---|" * (len(kinds) * len(outs))]
        per0 = outs[0][1]["columns_per_linear"]
        layers = sorted({int(m.group(1)) for k in per0
                         if (m := re.search(r"layers\.(\d+)\.", k))})
        for i in layers:
            cells = []
            for _, out in outs:
                per = out["columns_per_linear"]
                for k in kinds:
                    ends = (f"layers.{i}.self_attn.{k}", f"layers.{i}.mlp.{k}")
                    hit = [v for n, v in per.items() if n.endswith(ends)]
                    cells.append(str(hit[0]) if hit else "")
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "int8_outliers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
