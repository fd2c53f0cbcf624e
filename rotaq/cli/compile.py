"""``rotaq compile``: a deployable artefact folder for the TVM or ONNX Runtime backend (the
folder's format: :mod:`rotaq.backends.artifact`).

``--backend tvm``: compiled libraries + params + metadata (:mod:`rotaq.backends.tvm`).
``--backend ort``: ORT's optimized ONNX (graph optimizations applied and saved) plus the session
settings to run it with, and the same ``metadata.json`` layout, so both backends share one
interface: ``rotaq eval DIR`` / ``rotaq bench DIR`` read the backend from the metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from rotaq.cli.common import emit, options, size
from rotaq.errors import RotaqError


def _model_for(src: str, recipe: str | None, opts: dict[str, Any]) -> Any:
    """The model to compile: ``src`` (ONNX form), rewritten by ``recipe`` when given."""
    import rotaq

    model = rotaq.load(src, ir="onnx")
    if recipe:
        rec = rotaq.Recipe.load(recipe).with_options(opts)
        model = rotaq.optimize(model, rec, verify=False).model
    return model


def cmd_compile(args: argparse.Namespace) -> int:
    from rotaq.api import file_sizes

    t0 = time.perf_counter()
    if args.backend == "tvm":
        from rotaq.backends.tvm import require_tvm

        require_tvm()  # fail before any rewrite work
    contexts = _contexts(args.contexts)
    tune = _trials(args.tune)
    if tune or args.tune_db is not None:
        from rotaq.backends.tvm_tune import check

        check(tune, args.tune_db, args.backend, args.target)
    model = _model_for(args.model, args.recipe, options(args.set))
    if args.backend == "ort":
        from rotaq.backends.ort import compile_ort

        meta = compile_ort(model, args.output)
    else:
        from rotaq.backends.tvm import compile_tvm

        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        meta = compile_tvm(model, args.output, target=args.target, tokens=tokens,
                           progress=sys.stderr.isatty(), pad_axes=_pad_axes(args.pad_axis),
                           decode=contexts, tune=tune, tune_db=args.tune_db)
    meta["output"] = os.path.abspath(args.output)
    meta["files"] = file_sizes([os.path.join(args.output, f)
                                for f in sorted(os.listdir(args.output))])
    meta["total_seconds"] = round(time.perf_counter() - t0, 1)
    emit(meta, args.json, _print_compile)
    return 0


def _trials(spec: str) -> int:
    """``--tune N``: an integer (range checked in :func:`tvm_tune.check`)."""
    try:
        return int(spec)
    except ValueError:
        raise RotaqError(f"--tune expects a number of trials, got '{spec}'") from None


def _contexts(spec: str | None) -> list[int] | None:
    """``--contexts 191,1151`` -> [191, 1151]; ``none`` -> [] (no decode steps); unset: None
    (the backend's default contexts)."""
    if spec is None:
        return None
    if spec.strip().lower() == "none":
        return []
    try:
        out = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise RotaqError(f"--contexts expects comma-separated positive integers like 255,1151 "
                         f"(or none), got '{spec}'")
    return out


def _pad_axes(specs: list[str] | None) -> dict[str, int | None]:
    """``--pad-axis NAME:AXIS`` (``NAME:none``: no token axis) -> {name: axis or None}."""
    out: dict[str, int | None] = {}
    for spec in specs or []:
        name, sep, axis = spec.rpartition(":")
        if not sep or not name or not (axis.isdigit() or axis.lower() == "none"):
            raise RotaqError(f"--pad-axis expects NAME:AXIS or NAME:none, got '{spec}'")
        out[name] = None if axis.lower() == "none" else int(axis)
    return out


def _print_compile(d: dict[str, Any]) -> None:
    target = d["target_kind"] + (f" (CPU {d['mcpu']})" if d.get("mcpu") else "")
    tokens = f", token counts {','.join(map(str, d['tokens']))}" if d.get("tokens") else ""
    files = ", ".join(f"{os.path.basename(f['path'])} ({size(f['bytes'])})" for f in d["files"])
    print(f"wrote {d['output']}/ ({d['backend']}, {target}{tokens}) in {d['total_seconds']} s: "
          f"{files}")
    t = d.get("tuning")
    if t:
        how = (f"{t['trials']} trials on {t.get('tasks', 0)} of {t.get('tunable', 0)} tunable "
               f"functions in {t.get('seconds', 0)} s" if t["trials"] else f"database {t['from']}")
        print(f"tuning: {how}; {t.get('applied', 0)} functions use tuned schedules")


def add_command(sub: Any, model_help: str) -> None:
    """Add ``compile`` to the ``rotaq`` command's subparsers."""
    sp = sub.add_parser("compile", help="compile a model (optionally rewritten by a recipe) to "
                                        "a TVM or ONNX Runtime artefact folder")
    sp.add_argument("model", help=model_help)
    sp.add_argument("--recipe", default=None, help="recipe to apply first (name or .json)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a pass option of --recipe (repeatable)")
    sp.add_argument("--backend", choices=("tvm", "ort"), default="tvm",
                    help="tvm: compiled libraries + parameters; ort: ORT's optimized ONNX and "
                         "its session settings")
    sp.add_argument("--target", default="llvm",
                    help="tvm: llvm (this machine's CPU and its vector units), llvm:CPU (an "
                         "LLVM CPU name; llvm:generic for a portable build), cuda (sm_80) or "
                         "cuda:sm_90 (default llvm)")
    sp.add_argument("--tokens", default="1,16,512",
                    help="tvm: sequence lengths to compile (static shapes; default 1,16,512)")
    sp.add_argument("--contexts", default=None, metavar="C1,C2,...",
                    help="tvm, a decoder with a KV cache: cache slots of the compiled one-token "
                         "decode steps (comma-separated; none: no decode steps); a step over "
                         "C slots attends over C+1 keys, so C+1 a multiple of 64 tiles best "
                         "(default 191,255,383,511,767,1151,1535,2047)")
    sp.add_argument("--pad-axis", action="append", metavar="NAME:AXIS",
                    help="tvm: the token axis of input NAME, padded to the compiled length "
                         "(NAME:none: keep its shape); default: axis 1 of integer *ids/*mask "
                         "inputs, every other input keeps its shape")
    sp.add_argument("--tune", default="0", metavar="N",
                    help="tvm, llvm: MetaSchedule tuning of the default-lowered functions (norms, "
                         "RoPE, elementwise; rotaq's kernels keep their own schedules), N "
                         "measured trials in total; the database is saved in DIR/tuning/ "
                         "(default 0: no tuning)")
    sp.add_argument("--tune-db", default=None, metavar="PATH",
                    help="tvm, llvm: a tuning database to apply (a DIR/tuning/ folder or an "
                         "artefact folder); with --tune N, tuning continues from it")
    sp.add_argument("-o", "--output", required=True, help="artefact folder")
    sp.add_argument("--json", action="store_true", help="print the metadata as JSON")
    sp.set_defaults(func=cmd_compile)

