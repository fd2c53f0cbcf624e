"""Optimize a model from Python and save it.

Loads a model, applies a recipe (default: the exact ``rotate``), prints the verified error and
writes the result as ONNX; saving runs the written file again in ONNX Runtime and records its
error against the original too.

    python examples/optimize_and_save.py [MODEL] [--recipe rotate] [-o OUT.onnx]

MODEL is a built-in name (``smollm2-135m``), a ``.onnx`` / ``.pt2`` file or a Hugging Face model
directory; without it a tiny random Llama is built (examples/tiny_model.py).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import rotaq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="model to optimize (default: a tiny random Llama)")
    ap.add_argument("--recipe", default="rotate", help="built-in recipe name or a .json file")
    ap.add_argument("-o", "--output", help="output .onnx or .pt2 (default: a temporary folder)")
    args = ap.parse_args()
    if args.model is None:
        from tiny_model import make_tiny_llama

        args.model = make_tiny_llama()
    out = args.output or os.path.join(tempfile.mkdtemp(prefix="rotaq-example-"), "model.onnx")

    model = rotaq.load(args.model)
    info = rotaq.inspect(model)
    print(f"{info['num_linears']} linears, {len(info['attention'])} attention sites")

    res = rotaq.optimize(model, args.recipe)  # raises VerificationError if an exact recipe fails
    rewrite = res.report["verify"]["rewrite"]
    print(f"recipe {args.recipe}: max relative error {rewrite['max_rel_error']:.3g} "
          f"({rewrite['runtime']})")

    res.save(out)  # atomic; reloads the written file and verifies it again
    written = res.report["verify"]["written"]
    print(f"written file: max relative error {written['max_rel_error']:.3g} "
          f"({written['runtime']}), within tolerance: {res.report['verify']['passed']}")
    for f in res.report["files"]:  # the model, its .data (large models) and its tokenizer
        print(f"wrote {f['path']} ({f['bytes']} bytes)")


if __name__ == "__main__":
    main()
