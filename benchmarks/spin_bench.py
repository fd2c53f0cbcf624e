"""SpinQuant-style learned rotation (`w4a4-spin`) against the random Hadamard (`w4a4-rotated`)
on SmolLM2-135M, side by side in one run: W4A4 (int4 g128 GPTQ weights, int4 per-token
activations, int4 KV cache), Wikipedia perplexity on 8192 tokens (512-token windows, ORT),
calibration time.

Each row runs through the CLI, as a user runs it, under ``/usr/bin/time -v`` (wall time, peak
RSS): ``rotaq optimize smollm2-135m --recipe R [--set OPT=V ...] -o R.onnx --json`` then
``rotaq eval R.onnx --task ppl --tokens 8192 --json``. The spin pass report gives its loss
before/after and its own time. ``kron-w4a4`` is taken from the recorded results
(benchmarks/results/lowrank.json, run 2) unless a row runs it.

Default rows: `w4a4-spin` and `w4a4-rotated` as shipped, and `w4a4-rotated` with the quantizer
of `w4a4-spin` (asymmetric activations with a searched clip, asymmetric KV cache at clip 0.95,
GPTQ on 8192 tokens), so that the learned rotation and the quantizer are measured apart.
`kron-w4a4` is not a default row: its calibration took 56 min here (lowrank.json, run 2); add
it with ``--row kron-w4a4=kron-w4a4``. Earlier runs and their settings:
benchmarks/results/spin_history.md.

Writes benchmarks/results/spin.json and spin.md.
Run: python benchmarks/spin_bench.py [--row "LABEL=RECIPE[;OPT=V...]" ...] [--work DIR --reuse]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from outliers_bench import _cli, _timed

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODEL = "smollm2-135m"


def _spin_quantizer() -> str:
    """The ``quantize`` options where `w4a4-spin` differs from `w4a4-rotated`, read from the two
    recipes, as ``quantize.OPT=V;...`` (options `w4a4-spin` leaves out keep `w4a4-rotated`'s)."""
    from rotaq.recipe import Recipe

    spin, rot = (Recipe.load(r).passes[-1] for r in ("w4a4-spin", "w4a4-rotated"))

    def text(v) -> str:
        return ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v).lower()

    return ";".join(f"quantize.{k}={text(v)}" for k, v in spin.items()
                    if k != "pass" and rot.get(k) != v)


ROWS = ["w4a4-spin=w4a4-spin", "w4a4-rotated=w4a4-rotated",
        f"w4a4-rotated, w4a4-spin's quantizer=w4a4-rotated;{_spin_quantizer()}"]


def _parse(spec: str) -> tuple[str, str, list[str]]:
    label, _, rest = spec.partition("=")
    recipe, *sets = rest.split(";")
    if not recipe:
        raise SystemExit(f"--row {spec!r}: expected LABEL=RECIPE[;OPT=V...]")
    return label, recipe, sets


def _row(spec: str, args) -> dict:
    label, recipe, sets = _parse(spec)
    slug = "".join(c if c.isalnum() else "-" for c in label)
    path = os.path.join(args.work, f"{slug}.onnx")
    record = path + ".json"
    if not (args.reuse and os.path.exists(record)):
        cmd = _cli("optimize", MODEL, "--recipe", recipe, "-o", path, "--json")
        for opt in sets:
            cmd[-1:-1] = ["--set", opt]
        print(f"[spin_bench] {label}: optimize", flush=True)
        out, opt = _timed(cmd)
        report = json.loads(out)
        print(f"[spin_bench] {label}: eval", flush=True)
        out, ev = _timed(_cli("eval", path, "--task", "ppl", "--tokens", str(args.tokens),
                              "--json"))
        with open(record, "w") as f:
            json.dump({"optimize": opt, "report": report, "eval": ev,
                       "ppl": json.loads(out)["ppl"],
                       "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}, f)
        for f in glob.glob(path + "*"):  # the model files are not needed once measured
            if f != record:
                shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)
    with open(record) as f:
        saved = json.load(f)
    when = saved.get("when") or time.strftime("%Y-%m-%d %H:%M",  # records before 2026-12-03
                                              time.gmtime(os.path.getmtime(record)))
    row = {"label": label, "recipe": recipe, "set": sets, "ppl": saved["ppl"],
           "optimize": saved["optimize"], "eval": saved["eval"], "when": when}
    for p in saved["report"]["passes"]:
        if p.get("pass") == "spin":
            row["spin"] = {k: p["stats"].get(k) for k in (
                "objective", "loss_init", "loss_final", "steps", "calibration_seconds",
                "calibration_tokens", "ov_learned", "ov_loss_init", "ov_loss_final")}
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
    ap.add_argument("--row", action="append", default=None,
                    help=f"LABEL=RECIPE[;OPT=V...] (repeatable; default: {' | '.join(ROWS)})")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--work", default=None)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="rotaq-spin-")
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for spec in args.row or ROWS:
        rows.append(_row(spec, args))
        print(json.dumps(rows[-1]), flush=True)
    ran = {r["recipe"] for r in rows if not r["set"]}
    recorded = {k: v for k, v in _recorded().items() if k == "kron-w4a4" and k not in ran}
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    with open(os.path.join(args.out, "spin.json"), "w") as f:
        json.dump({"date": when, "tokens": args.tokens, "rows": rows, "recorded": recorded},
                  f, indent=2)
    title = (f"W4A4 on SmolLM2-135M, rows run one after another (finished {when} UTC, each "
             f"row's own time in the last column; a row reused with --reuse keeps its time; "
             f"2-core machine): int4 g128 asymmetric GPTQ weights with MSE clip, int4 per-token "
             f"activations, int4 KV cache (each recipe's own settings); Wikipedia perplexity "
             f"on {args.tokens} tokens (512-token windows, ORT), "
             f"fp32 22.16. `python benchmarks/spin_bench.py`; each row `rotaq optimize "
             f"smollm2-135m --recipe R [--set ...]` then `rotaq eval --task ppl`, under "
             f"/usr/bin/time -v.")
    header = ("| row | options | ppl | spin loss R1 (start -> learned) | R2 loss, mean per "
              "attention | spin steps | spin time (s) | optimize wall (s) | optimize peak RSS "
              "(MiB) | run (UTC) |")
    lines = [title, "", header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("spin") or {}
        loss = (f"{s['loss_init']:.4f} -> {s['loss_final']:.4f} ({s['objective']})"
                if s else "")
        r2 = (f"{s['ov_loss_init']:.4f} -> {s['ov_loss_final']:.4f} ({s['ov_learned']})"
              if s.get("ov_learned") else "")
        opts = " ".join(f"`{o}`" for o in r["set"]) or "as shipped"
        lines.append(f"| {r['label']} | {opts} | {r['ppl']:.2f} | {loss} | {r2} | "
                     f"{s.get('steps', '')} | {s.get('calibration_seconds', '')} | "
                     f"{r['optimize']['wall_s']} | {r['optimize']['peak_rss_mib']} | "
                     f"{r['when']} |")
    for name, ppl in recorded.items():
        lines.append(f"| {name} | recorded (results/lowrank.md, run 2) | {ppl:.2f} | | | | | "
                     f"| | |")
    lines += ["", "Commands as run (from each row's record):", ""]
    lines += [f"- {r['label']}: `{r['optimize']['cmd']}`" for r in rows]
    with open(os.path.join(args.out, "spin.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
