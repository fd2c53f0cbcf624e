"""``rotaq compile``: a deployable artefact folder for the TVM or ONNX Runtime backend.

``--backend tvm``: compiled libraries + params + metadata (:mod:`rotaq.backends.tvm`).
``--backend ort``: ORT's optimized ONNX (graph optimizations applied and saved) plus the session
settings to run it with, and the same ``metadata.json`` layout, so both backends share one
interface: ``rotaq eval DIR`` / ``rotaq bench DIR`` read the backend from the metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from rotaq.cli.common import emit, options, size
from rotaq.errors import RotaqError

ORT_SETTINGS = {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": 2,
                "execution_mode": "ORT_SEQUENTIAL",
                "config": {"session.qdq_matmulnbits_accuracy_level": "0"}}


def _model_for(src: str, recipe: str | None, opts: dict[str, Any]) -> Any:
    """The model to compile: ``src`` (ONNX form), rewritten by ``recipe`` when given."""
    import rotaq

    model = rotaq.load(src, ir="onnx")
    if recipe:
        rec = rotaq.Recipe.load(recipe).with_options(opts)
        model = rotaq.optimize(model, rec, verify=False).model
    return model


def compile_ort(model: Any, out_dir: str) -> dict[str, Any]:
    """Write ORT's optimized form of ``model`` and its session settings to ``out_dir``."""
    import onnxruntime as ort

    from rotaq.backends.tvm import FORMAT, replace_dir
    from rotaq.model import portable_source
    from rotaq.runtime import ort_session

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".rotaq-ort-", dir=parent)
    try:
        src = os.path.join(work, "source.onnx")
        model.save(src, tokenizer=False)
        ort_session(src, "all", {
            **ORT_SETTINGS["config"],
            "session.optimized_model_external_initializers_file_name": "model.onnx.data",
            "session.optimized_model_external_initializers_min_size_in_bytes": "1024"},
            optimized_path=os.path.join(work, "model.onnx"))
        for f in os.listdir(work):
            if f.startswith("source.onnx"):
                os.unlink(os.path.join(work, f))
        meta = {"format": FORMAT, "version": 1, "backend": "ort", "target": "cpu",
                "target_kind": "cpu", "ort_version": ort.__version__, "model_file": "model.onnx",
                "session": ORT_SETTINGS, "source": portable_source(model.source, work)}
        with open(os.path.join(work, "metadata.json"), "w") as f:
            json.dump(meta, f, indent=2)
        replace_dir(work, out_dir)
        return meta
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def load_artifact(folder: str) -> Any:
    """A compiled artefact (either backend) as a Model."""
    from rotaq.backends.tvm import read_metadata

    meta = read_metadata(folder)
    if meta["backend"] == "tvm":
        from rotaq.backends import tvm as tb

        return tb.load(folder)
    import rotaq
    from rotaq.model import resolve_source

    model = rotaq.load(os.path.join(folder, meta["model_file"]))
    model.source.update(resolve_source(meta.get("source") or {}, os.path.abspath(folder)))
    return model


def cmd_compile(args: argparse.Namespace) -> int:
    from rotaq.api import file_sizes

    t0 = time.perf_counter()
    if args.backend == "tvm":
        from rotaq.backends.tvm import require_tvm

        require_tvm()  # fail before any rewrite work
    model = _model_for(args.model, args.recipe, options(args.set))
    if args.backend == "ort":
        meta = compile_ort(model, args.output)
    else:
        from rotaq.backends.tvm import compile_tvm

        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        meta = compile_tvm(model, args.output, target=args.target, tokens=tokens,
                           progress=sys.stderr.isatty(), pad_axes=_pad_axes(args.pad_axis))
    meta["output"] = os.path.abspath(args.output)
    meta["files"] = file_sizes([os.path.join(args.output, f)
                                for f in sorted(os.listdir(args.output))])
    meta["total_seconds"] = round(time.perf_counter() - t0, 1)
    emit(meta, args.json, _print_compile)
    return 0


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
    sp.add_argument("--pad-axis", action="append", metavar="NAME:AXIS",
                    help="tvm: the token axis of input NAME, padded to the compiled length "
                         "(NAME:none: keep its shape); default: axis 1 of integer *ids/*mask "
                         "inputs, every other input keeps its shape")
    sp.add_argument("-o", "--output", required=True, help="artefact folder")
    sp.add_argument("--json", action="store_true", help="print the metadata as JSON")
    sp.set_defaults(func=cmd_compile)


def check_artifact_backend(path: str, backend: str | None) -> str | None:
    """For an artefact folder: its backend (``--backend`` must agree); else None."""
    from rotaq.backends.tvm import is_artifact, read_metadata

    if not is_artifact(path):
        return None
    have = read_metadata(path)["backend"]
    if backend and backend != have:
        raise RotaqError(f"{path} is a {have} artefact: use --backend {have}")
    return have
