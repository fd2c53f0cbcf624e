"""Which quantizer the learned per-head V/O rotation (`spin --set learn_ov=true`) hurts: the
`w4a4-spin` recipe's spin with and without `learn_ov` on SmolLM2-135M, then the recipe's
quantizer with RTN weights (no GPTQ noise) switched on one part at a time, Wikipedia perplexity
on 8192 tokens (512-token windows) of the in-memory model (``--ir fx``: the torch capture, the
quantizers simulated in torch; ``--ir onnx``: the ONNX capture with its KV cache, as
``rotaq optimize ... -o X.onnx`` runs it, evaluated in ORT), side by side in one run.

Parts: int4 g128 weights only; int4 per-token activations only (clip searched, 8-bit weights
per channel so that nothing else is lost); the same on o_proj only; int4 KV cache only (8-bit
weights); everything (the recipe with ``method=rtn``).
Run: python benchmarks/spin_r2_ablation.py [--ir fx|onnx]   (about 30 min on 2 cores; prints a
Markdown table, appends it to benchmarks/results/spin_r2_ablation.md)
"""

from __future__ import annotations

import argparse
import os
import time

import rotaq
from rotaq.eval.quality import perplexity
from rotaq.passes.quantize import Quantize
from rotaq.passes.spin import Spin
from rotaq.recipe import Recipe

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                   "spin_r2_ablation.md")
W8 = {"w_bits": 8, "w_group": -1, "w_symmetric": True, "w_clip": "none"}
PARTS = {
    "weights int4 g128 only": {"a_bits": 0, "kv_bits": 0},
    "activations int4 only": {**W8, "kv_bits": 0},
    "o_proj input int4 only": {**W8, "kv_bits": 0, "include": "o_proj"},
    "KV cache int4 only": {**W8, "a_bits": 0},
    "everything (recipe, RTN)": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ir", choices=("fx", "onnx"), default="fx")
    args = ap.parse_args()
    spin_opts, q_opts = ({k: v for k, v in p.items() if k != "pass"}
                         for p in Recipe.load("w4a4-spin").passes)
    q_opts["method"] = "rtn"
    base = rotaq.load("smollm2-135m", ir=args.ir)
    ppl = {}
    for learn in (False, True):
        spun = Spin(**{**spin_opts, "learn_ov": learn})(base.clone()).model
        for part, over in PARTS.items():
            t0 = time.time()
            m = Quantize(**{**q_opts, **over})(spun.clone()).model
            ppl[(part, learn)] = perplexity(m, "wiki", 8192, 512, progress=False)["ppl"]
            print(f"{part:28s} learn_ov={learn}: ppl {ppl[(part, learn)]:.2f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        del spun
    lines = ["| quantized part (the rest float or 8-bit) | Hadamard R2 | learned R2 | ratio |",
             "|---|---|---|---|"]
    for part in PARTS:
        h, r = ppl[(part, False)], ppl[(part, True)]
        lines.append(f"| {part} | {h:.2f} | {r:.2f} | {r / h:.3f} |")
    text = "\n".join(lines)
    print(text)
    with open(OUT, "a") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, --ir {args.ir}\n\n"
                f"`python benchmarks/spin_r2_ablation.py --ir {args.ir}`\n\n{text}\n")


if __name__ == "__main__":
    main()
