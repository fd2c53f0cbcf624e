"""The TVM backend's ONNX-side lowerings, hand-written (git commit ``--old``, before the rewrite
rules) vs onnxscript rewrite rules (this checkout), side by side on the same specialized graphs:
identical nodes (op, name, inputs, outputs, attributes) and initializers (names, bytes), the
counts of RotaqKron / RotaqAttention / RotaqQMatMul / GQA-folded / causal-marked nodes, and the
time of each lowering step (min of ``--reps``, alternating). Writes
benchmarks/results/lowering_rules_ab.md.

Run: python benchmarks/lowering_rules_ab.py MODEL.onnx [MODEL2.onnx ...] [--tokens 16]
[--decode 255]
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

OLD = "b6468a4"  # the last commit with the hand-written passes
MODULES = ("tvm_graph", "tvm_hadamard", "tvm_attention", "tvm_import", "tvm_gqa", "tvm_causal")
KINDS = ("RotaqKron", "RotaqAttention", "RotaqQMatMul", "MatMul")


def _old_package(commit: str, root: str) -> str:
    """The hand-written modules of ``commit`` as package ``oldlow`` under a temp folder."""
    pkg = os.path.join(root, "oldlow")
    os.makedirs(pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    for mod in MODULES:
        src = subprocess.run(["git", "show", f"{commit}:rotaq/backends/{mod}.py"], check=True,
                             capture_output=True, text=True).stdout
        for m in MODULES:
            src = src.replace(f"from rotaq.backends.{m} import", f"from oldlow.{m} import")
            src = src.replace(f"from rotaq.backends import {m} as", f"from oldlow import {m} as")
        with open(os.path.join(pkg, f"{mod}.py"), "w") as f:
            f.write(src)
    return root


def _old_lower(proto):
    from oldlow import tvm_attention as oa
    from oldlow import tvm_causal as oc
    from oldlow import tvm_gqa as og
    from oldlow import tvm_hadamard as oh
    from oldlow import tvm_import as oi

    oh.lower_kron(proto)
    if oa.lower_attention(proto):
        og.fold_gqa(proto)
        oc.mark_causal(proto)
    oi.lower_matmuls(proto)
    return proto


def _summary(proto):
    from onnx import helper, numpy_helper

    nodes = [(n.op_type, n.domain, n.name, tuple(n.input), tuple(n.output),
              repr(sorted((a.name, helper.get_attribute_value(a)) for a in n.attribute)))
             for n in proto.graph.node]
    inits = [(t.name, numpy_helper.to_array(t)) for t in proto.graph.initializer]
    return nodes, inits


def _counts(proto) -> dict[str, int]:
    ops = [n.op_type for n in proto.graph.node]
    out = {k: ops.count(k) for k in KINDS}
    for attr in ("gqa_rep", "causal_off"):
        out[attr] = sum(1 for n in proto.graph.node for a in n.attribute if a.name == attr)
    return out


def _jobs(path: str, tokens: int, decode: list[int]):
    import onnx

    from rotaq.backends import tvm as tb
    from rotaq.backends import tvm_decode as D
    from rotaq.backends.tvm_import import pad_axes, static_shapes

    with tempfile.TemporaryDirectory() as tmp:
        _, _, sample = tb._onnx_source(path, tmp)
    proto = onnx.load(path, load_external_data=False)
    axes = pad_axes(proto)
    jobs = [(f"prefill {tokens}", static_shapes(proto, tokens, axes, sample), None)]
    if D.is_cache_proto(proto):
        one = static_shapes(proto, 1, axes, sample)
        jobs += [(f"decode {c}", D.decode_shapes(one, c), D.slice_presents) for c in decode]
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--decode", type=int, nargs="*", default=[255])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--old", default=OLD)
    ap.add_argument("-o", "--output", default=os.path.join(os.path.dirname(__file__), "results",
                                                           "lowering_rules_ab.md"))
    args = ap.parse_args()
    import onnx

    from rotaq.backends.tvm_import import lower, specialize

    root = tempfile.mkdtemp(prefix="rotaq-oldlow-")
    sys.path.insert(0, _old_package(args.old, root))
    rows, same_all = [], True
    for path in args.models:
        for name, shapes, edit in _jobs(path, args.tokens, args.decode):
            p = onnx.load(path)
            if edit is not None:
                edit(p)
            spec = specialize(p, shapes)
            t_old, t_new = [], []
            for _ in range(args.reps):
                a, b = copy.deepcopy(spec), copy.deepcopy(spec)
                t = time.perf_counter()
                a = _old_lower(a)
                t_old.append(time.perf_counter() - t)
                t = time.perf_counter()
                b, _ = lower(b, True)
                t_new.append(time.perf_counter() - t)
            (na, ia), (nb, ib) = _summary(a), _summary(b)
            same = na == nb and [k for k, _ in ia] == [k for k, _ in ib] and all(
                x.dtype == y.dtype and np.array_equal(x, y) for (_, x), (_, y) in zip(ia, ib))
            same = same and _counts(a) == _counts(b)
            same_all &= same
            rows.append((os.path.basename(path), name, len(spec.graph.node), _counts(b),
                         min(t_old), min(t_new), same))
            print(rows[-1], flush=True)
    lines = ["# TVM lowerings: hand-written vs onnxscript rewrite rules", "",
             (f"`python benchmarks/lowering_rules_ab.py {' '.join(sys.argv[1:])}` (old: commit "
              f"{args.old}; time: min of {args.reps}, the lowering step only: Kronecker, "
              "attention, GQA, causal, matmuls, with the rules' onnx_ir conversions)."), "",
             ("| model | graph | nodes | Kron | Attention | QMatMul | MatMul left | GQA | causal "
              "| old s | rules s | ratio | identical |"), "|" + "---|" * 13]
    for model, name, n, c, to, tn, same in rows:
        lines.append(f"| {model} | {name} | {n} | {c['RotaqKron']} | {c['RotaqAttention']} | "
                     f"{c['RotaqQMatMul']} | {c['MatMul']} | {c['gqa_rep']} | "
                     f"{c['causal_off']} | {to:.3f} | {tn:.3f} | {tn / to:.2f} | "
                     f"{'yes' if same else 'NO'} |")
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("identical" if same_all else "DIFFERENCES")
    sys.exit(0 if same_all else 1)


if __name__ == "__main__":
    main()
