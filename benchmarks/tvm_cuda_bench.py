"""TVM CUDA vs ONNX Runtime's CUDA execution provider on the same rewritten ONNX file, in one
short run (issue 14, Deliver 4).

For each token count: the graph is specialized and built for ``cuda:ARCH`` exactly as
``rotaq compile --target cuda:ARCH`` builds it (rotaq's quantized matmul with its GPU thread
mapping, dlight for the rest), run by a Relax VM on GPU 0, and compared with ORT's
CUDAExecutionProvider on the same feeds: median latency of alternating runs, the ratio and the
max relative logit difference. Without a GPU (or without ORT's CUDA provider) it still builds
every bucket (nvcc compiles the generated code) and stops with one line saying what is missing.

Writes benchmarks/results/tvm_cuda.json and tvm_cuda.md.
Run: python benchmarks/tvm_cuda_bench.py --onnx F.onnx [--arch sm_90] [--tokens 1,16,128,512]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

import rotaq
from rotaq.backends import tvm as tb
from rotaq.backends.tvm_import import pad_axes, static_shapes
from rotaq.eval.latency import time_alternating

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
log = logging.getLogger("tvm_cuda_bench")


def gpu_present() -> bool:
    import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return False


def ort_cuda_session(path: str):
    """ORT with the CUDA provider first, or None when this onnxruntime build has none."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    return ort.InferenceSession(path, providers=["CUDAExecutionProvider",
                                                 "CPUExecutionProvider"])


def run(onnx_path: str, arch: str, tokens: list[int]) -> dict:
    import onnx
    import tvm
    from tvm import relax

    ref = rotaq.load(onnx_path)
    proto = onnx.load(onnx_path, load_external_data=False)
    axes = pad_axes(proto)
    sample = {k: np.shape(v) for k, v in ref.sample_inputs.items()}
    target = tb.make_target(f"cuda:{arch}")
    have_gpu = gpu_present()
    sess = ort_cuda_session(onnx_path) if have_gpu else None
    out: dict = {"onnx": os.path.basename(onnx_path), "target": f"cuda:{arch}", "gpu": have_gpu,
                 "ort_cuda": sess is not None, "tokens": {}}
    for n in tokens:
        shapes = static_shapes(proto, n, axes, sample)
        t0 = time.perf_counter()
        ex, names, params, stats = tb.build_bucket(onnx_path, shapes, target)
        row = {"build_s": round(time.perf_counter() - t0, 1), "stats": stats}
        out["tokens"][str(n)] = row
        log.info("built %d tokens for %s in %.1f s", n, arch, row["build_s"])
        if not have_gpu:
            continue
        dev = tvm.cuda(0)
        vm = relax.VirtualMachine(ex, dev)
        feeds = ref.token_feeds(np.random.default_rng(n).integers(0, 32, (1, n)))
        args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[k]), dev) for k in names]
        gparams = [tvm.runtime.tensor(p, dev) for p in params]

        def run_tvm(args=args, gparams=gparams, vm=vm, dev=dev):
            res = vm["main"](*args, *gparams)
            dev.sync()
            return res

        res = run_tvm()
        got = (res[0] if not hasattr(res, "numpy") else res).numpy()
        fns = {"tvm": run_tvm}
        if sess is not None:
            names_ort = {i.name for i in sess.get_inputs()}
            f_ort = {k: v for k, v in feeds.items() if k in names_ort}
            want = sess.run(None, f_ort)[0]
            row["max_rel_diff"] = float(np.abs(got - want).max() / np.abs(want).max())
            fns["ort_cuda"] = lambda f=f_ort: sess.run(None, f)
        t = time_alternating(fns, 3, 20 if n <= 128 else 5)
        row.update({f"{k}_ms": v for k, v in t.items()})
        if "ort_cuda" in t:
            row["ratio"] = t["tvm"] / t["ort_cuda"]
        log.info("%d tokens: %s", n, row)
    return out


def write(res: dict) -> None:
    os.makedirs(HERE, exist_ok=True)
    with open(os.path.join(HERE, "tvm_cuda.json"), "w") as f:
        json.dump(res, f, indent=2)
    lines = [(f"TVM `{res['target']}` vs ORT CUDA EP on `{res['onnx']}` (GPU: {res['gpu']}, "
              f"ORT CUDA EP: {res['ort_cuda']})."), "",
             "| tokens | build (s) | TVM (ms) | ORT CUDA (ms) | TVM / ORT | max rel logit diff |",
             "|---|---|---|---|---|---|"]
    for n, r in res["tokens"].items():
        cells = [f"{r[k]:.2f}" if k in r else "" for k in ("tvm_ms", "ort_cuda_ms", "ratio")]
        diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else ""
        lines.append(f"| {n} | {r['build_s']} | {' | '.join(cells)} | {diff} |")
    with open(os.path.join(HERE, "tvm_cuda.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, help="a rewritten ONNX file (prefill graph)")
    ap.add_argument("--arch", default="sm_90", help="CUDA arch (default sm_90: H100/H200)")
    ap.add_argument("--tokens", default="1,16,128,512")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    res = run(args.onnx, args.arch, [int(t) for t in args.tokens.split(",")])
    write(res)
    if not res["gpu"]:
        print("built every bucket for CUDA; no GPU here, so nothing was timed", file=sys.stderr)
        return 3
    if not res["ort_cuda"]:
        print("TVM timed on the GPU; this onnxruntime has no CUDAExecutionProvider "
              "(pip install onnxruntime-gpu) for the comparison", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
