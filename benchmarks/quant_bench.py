"""Quantization benchmark on SmolLM2-135M, side by side in one run (issue 3).

Rows: fp32; ONNX Runtime's own `quantize_dynamic` (int8 per channel) and MatMulNBits quantizer
(RTN block 128 at accuracy levels 0 and 4, and its GPTQ config); every rotaq quantization recipe
applied to the same ONNX graph. Columns: Wikipedia perplexity (ORT), latency ratio to fp32 at
1 / 16 / 512 tokens (ORT, 2 threads, median of repeats, fp32 re-timed in the same run), size,
and the ORT kernels that run the linears. MiniLM: embedding cosine to fp32 per recipe.

Writes benchmarks/results/quant.json and quant.md (quoted by the README).
Run: python benchmarks/quant_bench.py [--tokens 8192] [--rows fp32,ort-int8,...]
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

import rotaq
from rotaq.eval.latency import bench
from rotaq.eval.quality import cosine_to_reference, perplexity

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RECIPES = ["rotate", "w8a8", "w8a8-rotated", "w4a16", "w4a16-rotated", "w4a8-rotated", "w4a4-rotated"]
log = logging.getLogger("quant_bench")


def _ort_int8(src: str, dst: str, unsigned: bool = False) -> None:
    """ORT's own dynamic int8 quantization, per channel. With signed weights (its default) the
    u8 x s8 kernel saturates on CPUs without VNNI; ``unsigned`` uses uint8 weights instead."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, per_channel=True,
                     weight_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
                     use_external_data_format=True)


def _ort_4bit(src: str, dst: str, level: int, algo: str) -> None:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    cls = getattr(mq, "MatMulNBitsQuantizer", None) or mq.MatMul4BitsQuantizer
    if algo == "gptq":
        cfg = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=None, block_size=128)
    else:
        cfg = mq.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True,
                                              accuracy_level=level)
    q = cls(onnx.load(src), block_size=128, is_symmetric=True, accuracy_level=level,
            algo_config=cfg)
    q.process()
    q.model.save_model_to_file(dst, use_external_data_format=True)


def _row(name: str, path: str, args, fp32_lat: dict | None, extra: dict, source: dict) -> dict:
    model = rotaq.load(path)
    for k in ("tokenizer", "kind"):  # ORT's quantizers drop rotaq's metadata
        model.source.setdefault(k, source[k])
    ppl = perplexity(model, "wiki", args.tokens, args.window, progress=False)
    lat = bench(path, backend="ort", tokens=args.lat_tokens, repeats=args.repeats,
                threads=args.threads, progress=False)
    row = {"name": name, "ppl": ppl["ppl"], "tokens": ppl["tokens"],
           "size_mb": lat["size_mib"], "latency_ms": {k: v["median_ms"]
                                                      for k, v in lat["tokens"].items()},
           "kernels": {k: v for k, v in (lat.get("optimized_ops") or {}).items()
                       if any(s in k for s in ("MatMul", "Gemm", "QLinear", "Quantize"))}}
    if fp32_lat:
        row["latency_ratio"] = {k: row["latency_ms"][k] / fp32_lat[k] for k in row["latency_ms"]}
    row.update(extra)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="all")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an existing quant.json that this run does not redo")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--calib-tokens", type=int, default=None,
                    help="calibration tokens for GPTQ / static activations (recipe default 2048)")
    args = ap.parse_args()
    args.lat_tokens = (1, 16, 512)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = tempfile.mkdtemp(prefix="rotaq-qbench-")
    base = rotaq.load("smollm2-135m", ir="onnx")
    fp32 = os.path.join(work, "fp32.onnx")
    base.save(fp32)
    wanted = None if args.rows == "all" else set(args.rows.split(","))
    rows, fp32_lat = [], None
    run = 1 + max((r.get("run", 1) for r in _previous(args)), default=0) if args.merge else 1
    jobs = [("fp32", None)] + [(n, n) for n in ("ort-int8", "ort-int8-u8", "ort-4bit-rtn-l0", "ort-4bit-rtn-l4",
                                                "ort-4bit-gptq")] + [(r, r) for r in RECIPES]
    for name, how in jobs:
        if wanted and name not in wanted and name != "fp32":  # fp32: ratios are per run
            continue
        t0 = time.time()
        path = fp32 if how is None else os.path.join(work, f"{name}.onnx")
        extra: dict = {}
        try:
            if how in ("ort-int8", "ort-int8-u8"):
                _ort_int8(fp32, path, unsigned=how.endswith("u8"))
            elif how and how.startswith("ort-4bit"):
                _ort_4bit(fp32, path, 4 if how.endswith("l4") else 0,
                          "gptq" if "gptq" in how else "rtn")
            elif how:
                opts = {"calib_tokens": args.calib_tokens} if args.calib_tokens and \
                    how.startswith("w") else None
                res = rotaq.optimize(base, how, options=opts)
                res.save(path)
                extra["rotaq_report"] = {"max_rel_error": res.report["max_rel_error"],
                                         "passes": res.report["passes"]}
            row = _row(name, path, args, fp32_lat, extra, base.source)
        except Exception as err:  # a baseline that fails is reported, not fatal
            log.error("%s failed: %s", name, err)
            rows.append({"name": name, "error": f"{type(err).__name__}: {err}",
                         "trace": traceback.format_exc(limit=3)})
            continue
        if name == "fp32":
            fp32_lat = row["latency_ms"]
            row["latency_ratio"] = {k: 1.0 for k in fp32_lat}
        row["seconds"] = round(time.time() - t0, 1)
        row["run"] = run
        rows.append(row)
        log.info("%s: ppl %.2f, latency %s", name, row["ppl"], row.get("latency_ratio"))
        _write(args, rows)
    if not args.no_minilm:
        rows += _minilm(args)
    _write(args, rows)
    shutil.rmtree(work, ignore_errors=True)


def _minilm(args) -> list[dict]:
    out = []
    ref = rotaq.load("minilm-l6", ir="onnx")
    for r in ["w8a8", "w8a8-rotated", "w4a16-rotated", "w4a8-rotated"]:
        try:
            res = rotaq.optimize(ref, r)
            cos = cosine_to_reference(res.model, ref)
            out.append({"name": f"minilm {r}", "cosine_mean": cos["cosine_mean"],
                        "cosine_min": cos["cosine_min"]})
        except Exception as err:
            out.append({"name": f"minilm {r}", "error": f"{type(err).__name__}: {err}"})
    return out


def _previous(args) -> list[dict]:
    old = os.path.join(args.out, "quant.json")
    if not os.path.exists(old):
        return []
    with open(old) as f:
        return json.load(f)["rows"]


def _write(args, rows: list[dict]) -> None:
    """Write json + md; with --merge, rows of earlier runs are kept (each keeps its run number
    and its ratios to the fp32 of its own run)."""
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        mine = {(r["name"], r.get("run")) for r in rows}
        rows = [r for r in _previous(args) if (r["name"], r.get("run")) not in mine
                and not (r["name"] in {m[0] for m in mine} and r["name"] != "fp32")] + rows
    with open(os.path.join(args.out, "quant.json"), "w") as f:
        json.dump({"tokens": args.tokens, "window": args.window, "threads": args.threads,
                   "rows": rows}, f, indent=2, default=str)
    fp = next((r for r in rows if r["name"] == "fp32" and "ppl" in r), None)  # same ppl in every run
    lines = [f"SmolLM2-135M, Wikipedia perplexity on {args.tokens} tokens ({args.window}-token "
             f"windows, ORT); latency: ORT CPU, {args.threads} threads, median, as a ratio to fp32 "
             "timed in the same run.", "",
             "| run | model | ppl | vs fp32 | 1 tok | 16 tok | 512 tok | size MB | "
             "linear kernels |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.get("run", 0)):
        if r["name"].startswith("minilm"):
            continue
        run = r.get("run", "")
        if "error" in r:
            lines.append(f"| {run} | {r['name']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        lr = r.get("latency_ratio", {})
        rel = f"x{r['ppl'] / fp['ppl']:.3f}" if fp else ""
        ker = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in sorted(r["kernels"].items()))
        lines.append(f"| {run} | {r['name']} | {r['ppl']:.2f} | {rel} | {lr.get('1', 0):.2f} | "
                     f"{lr.get('16', 0):.2f} | {lr.get('512', 0):.2f} | {r['size_mb']:.0f} | "
                     f"{ker} |")
    mini = [r for r in rows if r["name"].startswith("minilm")]
    if mini:
        lines += ["", "MiniLM-L6 embedding cosine to fp32 (8 real sentence pairs):", "",
                  "| recipe | mean cosine | min cosine |", "|---|---|---|"]
        for r in mini:
            if "error" in r:
                lines.append(f"| {r['name']} | failed: {r['error'][:80]} | |")
            else:
                lines.append(f"| {r['name'][7:]} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} |")
    with open(os.path.join(args.out, "quant.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
