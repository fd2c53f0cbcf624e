"""Outlier statistics of SmolLM2-135M linear inputs before and after the exact `rotate` recipe.

Writes benchmarks/results/outliers.json, outliers.md (quoted in the README) and a per-channel
plot of the worst down projection. Calibration text: the Lee news corpus (not the Wikipedia
evaluation text).
"""

import argparse
import json
import os
import time

import rotaq
from rotaq.eval.stats import (
    activation_stats, calibration_feeds, linear_roles, plot_channels, worst_by_role,
)

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    t0 = time.time()
    model = rotaq.load(args.model)
    feeds = calibration_feeds(model, "lee", args.tokens, args.window)
    res = rotaq.optimize(model, "rotate")
    before = activation_stats(model, feeds)
    after = activation_stats(res.model, feeds)
    a = model.analysis()
    rows = worst_by_role(a, before, after)
    down = sorted(linear_roles(a)["down_proj"], key=lambda k: -before[k]["max_rms"])[0]
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "outliers_down_proj.png")
    plot_channels(before[down], after[down], png,
                  f"{args.model}: input channels of {before[down]['name']} (rotate)")
    out = {"model": args.model, "text": "lee", "tokens": int(feeds["input_ids"].size),
           "max_rel_error": res.report["max_rel_error"], "rows": rows,
           "plot": os.path.basename(png), "plot_layer": before[down]["name"],
           "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.out, "outliers.json"), "w") as f:
        json.dump(out, f, indent=2)
    lines = [f"Worst per-token max/RMS ratio and kurtosis of linear inputs, {args.model}, "
             f"{out['tokens']} tokens of Lee news text; `rotate` recipe (max relative logit "
             f"error {out['max_rel_error']:.2g}).", "",
             "| linears | count | max/RMS before | after | reduction | kurtosis before | after |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['role']} | {r['linears']} | {r['max_rms_before']:.1f} | "
                     f"{r['max_rms_after']:.1f} | {r['factor']:.1f}x | "
                     f"{r['kurtosis_before']:.0f} | {r['kurtosis_after']:.1f} |")
    with open(os.path.join(args.out, "outliers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
