"""How far SmolLM2 `w4a16-rotated` perplexity moves between GPTQ runs that differ only by
float rounding.

GPTQ is chaotic: a Hessian change at fp32 rounding level flips a few int4 codes, error feedback
carries each flip along its row, and the next blocks calibrate on inputs that differ. This script
quantizes the rotated model (``--rotated``, written once by ``--prepare``) with the block-wise
one-pass GPTQ (1024 calibration tokens), optionally multiplying every ``X^T X`` entry by
``1 + e`` with ``|e| ~ 1e-7`` (``--noise SEED``, the size of fp32 rounding), and measures
Wikipedia perplexity (8192 tokens, 512-token windows) of the written file, as ``rotaq eval``
does. One JSON line per run is appended to ``--out``.

Run: python benchmarks/gptq_noise.py --prepare; python benchmarks/gptq_noise.py [--noise 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import rotaq
from rotaq.eval.quality import perplexity
from rotaq.passes.quantize import Quantize

RECIPE = {"w_bits": 4, "w_group": 128, "method": "gptq", "w_symmetric": False,
          "calib_tokens": 1024}


def _perturb(seed: int, size: float = 1e-7) -> None:
    """Quantize._solve with X^T X scaled entry-wise by 1 + e, e symmetric, |e| ~ ``size``."""
    rng = np.random.default_rng(seed)
    orig = Quantize._solve

    def solve(self, w, xtx, count, x, fmt=None, gram=None):
        if xtx is not None:
            e = rng.standard_normal(xtx.shape) * size
            xtx = xtx * (1 + (e + e.T) / 2)
        return orig(self, w, xtx, count, x, fmt, gram)

    Quantize._solve = solve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rotated", default="/tmp/rotaq-gptq-noise/rot.onnx")
    ap.add_argument("--prepare", action="store_true", help="write the rotated model and exit")
    ap.add_argument("--noise", type=int, default=None, help="perturbation seed (none: exact)")
    ap.add_argument("--out", default="benchmarks/results/gptq_noise.jsonl")
    args = ap.parse_args()
    if args.prepare:
        os.makedirs(os.path.dirname(args.rotated), exist_ok=True)
        src = rotaq.load("smollm2-135m", ir="onnx")
        rotaq.optimize(src, "rotate", verify=False).model.save(args.rotated)
        return
    if args.noise is not None:
        _perturb(args.noise)
    t, c = time.time(), time.process_time()
    res = Quantize(**RECIPE)(rotaq.load(args.rotated))
    wall, cpu = time.time() - t, time.process_time() - c
    out = os.path.join(os.path.dirname(args.rotated), f"q-{args.noise}.onnx")
    res.model.save(out)
    ppl = perplexity(rotaq.load(out), "wiki", 8192, 512, progress=False)["ppl"]
    row = {"noise_seed": args.noise, "ppl": round(ppl, 4), "quant_wall_s": round(wall, 1),
           "quant_cpu_s": round(cpu, 1),
           "weight_rel_error_mean": round(res.stats["weight_rel_error_mean"], 6),
           "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    print(json.dumps(row))
    with open(args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
