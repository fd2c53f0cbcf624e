"""Write your own pass: a residual rotation by any orthogonal matrix, folded exactly.

The pass below derives from rotaq's ``Pass`` base class and composes the public folds of
``rotaq.passes.folds``: fold the norm scales into the linears that read them, rotate the
residual stream by Q (embeddings ``E Q``, readers ``W Q``, writers ``Q^T W``) and rotate V/O per
head by H. Here Q and H are Haar-random orthogonal matrices from a seed; a pass that learns its
rotation (SpinQuant) would pass its learned matrices the same way. Registered, it is usable by
name in recipes and with ``--set``; the base class checks its options from their type hints,
its requirements, and reports ``modified`` from the graph's edit counter.

    python examples/custom_pass.py [MODEL] [--seed 3] [-o OUT.onnx]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

import rotaq
from rotaq.model import Model
from rotaq.passes import folds
from rotaq.passes.base import Pass, PassResult, register


def haar_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed by R's diagonal)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


@register
@dataclass(frozen=True)
class RandomOrthogonal(Pass):
    """Rotate the residual stream (and V/O per head) by seeded Haar-random orthogonal matrices."""

    name: ClassVar[str] = "random-orthogonal"
    exact: ClassVar[bool] = True
    seed: int = 0
    rotate_ov: bool = True

    def requires(self) -> tuple[str, ...]:
        return ("pre-norm", "before:quantize")

    def call(self, model: Model) -> PassResult:
        g, a = model.graph, model.analysis()
        rng = np.random.default_rng(self.seed)
        d = a.embeddings[a.residual.embedding].dim
        edits = folds.WeightEdits(g)
        readers = folds.norm_readers(g, a)
        folded = folds.fold_norms(g, a, readers, edits)
        q = folds.dense_rotation(haar_orthogonal(d, rng))
        writers = folds.rotate_residual(g, a, q, readers, edits)
        ov = 0
        if self.rotate_ov and a.attention:
            ov = len(folds.rotate_ov(a, edits, haar_orthogonal(a.attention[0].head_dim, rng)))
        edits.flush()
        stats = {"dim": d, "norms_folded": folded, "writers": len(writers),
                 "ov_heads_rotated": ov}
        folds.cache_note(model, stats)  # the KV cache now holds rotated values: say so
        return PassResult(model, True, stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="model (default: a tiny random Llama)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("-o", "--output", help="output .onnx (default: a temporary folder)")
    args = ap.parse_args()
    if args.model is None:
        from tiny_model import make_tiny_llama

        args.model = make_tiny_llama()
    out = args.output or os.path.join(tempfile.mkdtemp(prefix="rotaq-example-"), "model.onnx")

    # a one-pass recipe held to 1e-4, as the built-in exact recipes are
    recipe = rotaq.Recipe("random-orthogonal", [{"pass": "random-orthogonal"}], 1e-4)
    recipe = recipe.with_options({"seed": str(args.seed)})  # a string, as from --set
    res = rotaq.optimize(rotaq.load(args.model, ir="onnx"), recipe)
    res.save(out)
    st = res.report["passes"][0]
    print(f"{st['pass']}: modified={st['modified']}, " + ", ".join(
        f"{k}={v}" for k, v in st["stats"].items()))
    print(f"max relative error {res.report['max_rel_error']:.3g} (bound 1e-4); "
          f"written file: {res.report['verify']['written']['max_rel_error']:.3g}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
