"""W4A4 accuracy on SmolLM2-135M: without rotation vs with, same quantizer (ORT, fake-quant
activations: CPUs have no int4-activation kernel, so no latency is reported).

Writes benchmarks/results/w4a4.json and w4a4.md. GPTQ is selectable (--method gptq) but takes
~20 min per row on 2 cores; the default is RTN with MSE clipping.
"""

import argparse
import json
import os
import time

import rotaq
from rotaq.eval.quality import perplexity

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    base = rotaq.load("smollm2-135m", ir="onnx")
    quant = json.load(open(os.path.join(os.path.dirname(rotaq.__file__), "recipes",
                                        "w4a4-rotated.json")))["passes"][-1]
    quant = {**quant, "method": args.method}
    rows = [{"name": "fp32", "ppl": perplexity(base, "wiki", args.tokens, 512, progress=False)["ppl"]}]
    for name, passes in [("w4a4 (no rotation)", [quant]),
                         ("w4a4-rotated", [{"pass": "rotate", "rotate_qk": True}, quant])]:
        t = time.time()
        res = rotaq.optimize(base, rotaq.Recipe(name, passes, None))
        ppl = perplexity(res.model, "wiki", args.tokens, 512, progress=False)["ppl"]
        rows.append({"name": name, "ppl": ppl, "seconds": round(time.time() - t),
                     "quantize": res.report["passes"][-1]["stats"]})
        print(name, ppl, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "w4a4.json"), "w") as f:
        json.dump({"tokens": args.tokens, "method": args.method, "rows": rows}, f, indent=2)
    fp = rows[0]["ppl"]
    lines = [f"W4A4 on SmolLM2-135M ({args.method.upper()}, int4 g128 asymmetric weights with MSE "
             f"clip, int4 per-token activations (clip 0.9), int4 KV cache; Wikipedia "
             f"perplexity on {args.tokens} tokens, ORT):", "",
             "| model | ppl | vs fp32 |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['ppl']:.2f} | x{r['ppl'] / fp:.2f} |" for r in rows]
    with open(os.path.join(args.out, "w4a4.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
