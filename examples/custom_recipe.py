"""Write your own recipe file and use it, from Python and from the command line.

A recipe is JSON: a name, the passes with their options, and the tolerance an exact recipe
must meet (null for a lossy one). examples/recipes/rotate-w4-mlp.json rotates the model, then
quantizes the MLP weights to 4 bits. The same file works on the command line:

    rotaq optimize MODEL --recipe examples/recipes/rotate-w4-mlp.json --set w_group=16 -o out.onnx

    python examples/custom_recipe.py [MODEL] [--recipe FILE] [--max-error 0.2] [-o OUT.onnx]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import rotaq

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="model (default: a tiny random Llama)")
    ap.add_argument("--recipe", default=os.path.join(HERE, "recipes", "rotate-w4-mlp.json"),
                    help="recipe file")
    ap.add_argument("--max-error", type=float, default=0.2,
                    help="largest accepted max relative error of the outputs")
    ap.add_argument("-o", "--output", help="output .onnx (default: a temporary folder)")
    args = ap.parse_args()
    if args.model is None:
        from tiny_model import make_tiny_llama

        args.model = make_tiny_llama()
    out = args.output or os.path.join(tempfile.mkdtemp(prefix="rotaq-example-"), "model.onnx")

    recipe = rotaq.Recipe.load(args.recipe)
    # options are overridden by name, as with --set on the command line
    recipe = recipe.with_options({"quantize.w_group": 16})
    for p in recipe.build():
        print(f"pass {p.name}: {p}")

    # a lossy recipe written as ONNX is applied to the ONNX form (ORT's integer kernels)
    model = rotaq.load(args.model, ir="onnx")
    res = rotaq.optimize(model, recipe)
    res.save(out)
    for p in res.report["passes"]:
        print(f"{p['pass']}: " + ", ".join(f"{k}={v}" for k, v in p["stats"].items()
                                           if not isinstance(v, (dict, list))))
    err = res.report["max_rel_error"]
    print(f"wrote {out}: max relative error {err:.3g} (bound {args.max_error:g})")
    if err > args.max_error:
        raise SystemExit(f"error {err:.3g} exceeds {args.max_error:g}")


if __name__ == "__main__":
    main()
