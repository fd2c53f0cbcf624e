"""``rotaq export`` (the ONNX or .pt2 form of a torch model) and ``rotaq optimize`` (apply a
recipe, verify, write)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from rotaq.cli.common import (
    add_dtype_arg,
    add_input_args,
    add_kv_arg,
    add_stats_args,
    emit,
    input_options,
    options,
    size,
)
from rotaq.errors import RotaqError
from rotaq.model import TOKENIZER_SUFFIX


def cmd_export(args: argparse.Namespace) -> int:
    import rotaq

    _check_output(args.model, args.output)
    from rotaq.api import file_sizes

    model = rotaq.load(args.model, kv_cache=not args.no_kv_cache, dtype=args.dtype)
    files = file_sizes(model.save(args.output))
    emit({"model": model.source.get("name", ""), "output": os.path.abspath(args.output),
           "files": files}, args.json,
          lambda d: print("wrote " + ", ".join(f"{f['path']} ({size(f['bytes'])})"
                                               for f in d["files"])))
    return 0


def _check_output(src: str, out: str) -> None:
    if not out.lower().endswith((".onnx", ".pt2")):
        raise RotaqError(f"{out}: output must end in .onnx or .pt2")
    if os.path.exists(src) and os.path.abspath(src) == os.path.abspath(out):
        raise RotaqError(f"{out}: refusing to overwrite the input model")
    if os.path.isdir(out):
        raise RotaqError(f"{out}: is a directory (-o names the output file)")
    if src.lower().endswith(".onnx") and out.lower().endswith(".pt2"):
        raise RotaqError(f"{out}: an ONNX model cannot be written as .pt2 (a torch.export "
                         "archive); write .onnx")


def _print_optimize(d: dict[str, Any]) -> None:
    print(f"recipe {d['recipe']['name']} on {d['model']} ({d['ir']}): passes {d['seconds']:.1f} s")
    for p in d["passes"]:
        # per-layer tables (e.g. the ranks of every linear) go to --json, not the summary line
        items = [f"{k}={v}" if not isinstance(v, (dict, list)) else f"{k}=({len(v)} in --json)"
                 for k, v in p["stats"].items()]
        print(f"  {p['pass']}: " + ", ".join(items))
    v, tol = d["verify"], d.get("tolerance_used", d["tolerance"])
    basis = d.get("tolerance_basis", "")
    why = f"; {basis}" if basis and "noise" in basis else ""  # fp16/bf16: derived bound
    checks = [f"{k} in {c['runtime']} {c['max_rel_error']:.3g}" for k in ("rewrite", "written")
              if (c := v.get(k))]
    if not checks:
        verdict = "not verified (--no-verify)"
    elif tol is None:
        verdict = "no tolerance (lossy recipe)"
    elif v["passed"]:
        verdict = f"PASS (tolerance {tol:.3g}{why})"
    else:  # an exact recipe over its tolerance has already failed with exit code 3
        verdict = f"over the tolerance {tol:.3g} (not enforced: lossy recipe)"
    print(f"  max relative error: {', '.join(checks) or '-'}: {verdict}")
    if d.get("dtype"):
        print(f"  dtype {d['dtype']['output']} (source {d['dtype']['source']}); tolerance: "
              f"{d.get('tolerance_basis') or 'none'}")
    if checks and d.get("verify_inputs"):
        rms = d.get("rel_rms_error")
        print(f"  relative RMS error: {'-' if rms is None else f'{rms:.3g}'}; verified on "
              f"{_inputs_label(d['verify_inputs'])}")
    for c in d.get("calibration_inputs") or []:
        print(f"  calibrated on {_inputs_label(c)}")
    files = ", ".join(f"{f['path']}{'/' if f['path'].endswith(TOKENIZER_SUFFIX) else ''} "
                      f"({size(f['bytes'])})" for f in d.get("files", []))
    total = f" in {d['total_seconds']:.1f} s" if "total_seconds" in d else ""
    print(f"wrote {files or d.get('output', '')}{total}")


def _inputs_label(d: dict[str, Any]) -> str:
    how = {"text": f"'{d.get('text')}' text", "synthetic": f"synthetic inputs (seed "
           f"{d.get('seed')})", "user": f"{d.get('file')} {d.get('rows', '')}".strip()}
    shapes = ", ".join(f"{k} {v}" for k, v in d.get("shapes", {}).items())
    return f"{how.get(d.get('source'), d.get('source'))}: {shapes}"


def cmd_optimize(args: argparse.Namespace) -> int:
    from rotaq import dist

    if args.workers < 1:
        raise RotaqError(f"--workers must be 1 or more, not {args.workers}")
    if args.workers > 1 and not dist.launched():
        return dist.launch(args.workers, _without_workers(getattr(args, "argv", None)))
    dist.init()
    try:
        return _optimize(args)
    finally:
        dist.finish()


def _without_workers(argv: list[str] | None) -> list[str]:
    """The command line of this process without ``--workers N``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            out.append(a)
    return out


def _optimize(args: argparse.Namespace) -> int:
    import rotaq
    from rotaq import dist
    from rotaq.eval import stats as st
    from rotaq.genai import check_decoder, is_folder_target

    t0 = time.perf_counter()
    folder = is_folder_target(args.output)  # -o DIR/: a generation folder (rotaq.genai)
    if not folder:
        _check_output(args.model, args.output)
    recipe = rotaq.Recipe.load(args.recipe).with_options(options(args.set))
    exact = all(p.exact for p in recipe.build())
    # a lossy recipe written as ONNX runs on the ONNX form, so that it lowers to ORT's integer
    # kernels; on the torch side quantization is simulated (dequantized weights)
    # an exact one too when the model takes the streaming ONNX capture (rotaq.loading_stream)
    from rotaq.loading_stream import streams

    onnx_out = folder or args.output.lower().endswith(".onnx")
    streamed = streams(args.model, not getattr(args, "no_kv_cache", False), args.dtype)
    ir = "onnx" if onnx_out and (not exact or streamed) else "fx"
    model = rotaq.load(args.model, ir=ir, dtype=args.dtype, **input_options(args))
    if folder:
        check_decoder(model, args.model, args.output)
    # across processes every rank calibrates its share; only rank 0 verifies, writes, prints
    res = rotaq.optimize(model, recipe, verify=not args.no_verify and dist.is_main())
    if not dist.is_main():
        return 0
    if args.stats:
        feeds = st.calibration_feeds(model, args.text, args.tokens, args.window)
        before, after = st.activation_stats(model, feeds), st.activation_stats(res.model, feeds)
        res.report["stats_before"] = st.summarize(before)
        res.report["stats_after"] = st.summarize(after)
    if folder:
        from rotaq.genai import save_folder

        save_folder(res, args.output)
    else:
        res.save(args.output)
    res.report["total_seconds"] = round(time.perf_counter() - t0, 1)
    emit(res.report, args.json, _print_optimize)
    return 0



def add_commands(sub: Any, model_help: str) -> None:
    """Add ``export`` and ``optimize`` to the ``rotaq`` command's subparsers."""
    sp = sub.add_parser("export", help="write the ONNX (or .pt2) form of a torch model")
    sp.add_argument("model", help=model_help)
    sp.add_argument("-o", "--output", required=True, help="out.onnx or out.pt2")
    sp.add_argument("--json", action="store_true", help="print the written path as JSON")
    add_dtype_arg(sp)
    add_kv_arg(sp)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("optimize", help="apply a recipe, verify, and write the result")
    sp.add_argument("model", help=model_help)
    sp.add_argument("--recipe", default="rotate",
                    help="built-in recipe name (rotaq recipes), a .json file, or a pass name "
                         "(rotate, quantize, lowrank, ...) as a one-pass recipe; a name without "
                         "a path separator or .json suffix is always the built-in (./NAME for "
                         "a file in the current directory)")
    sp.add_argument("-o", "--output", required=True,
                    help="out.onnx or out.pt2, or DIR/ (a trailing slash or an existing "
                         "folder) for a generation folder of a decoder with a KV cache: "
                         "model.onnx, genai_config.json, config.json, tokenizer")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a pass option (e.g. seed=1 or rotate.rotate_qk=true)")
    sp.add_argument("--json", action="store_true", help="print the JSON report")
    sp.add_argument("--no-verify", action="store_true", help="skip before/after verification")
    sp.add_argument("--stats", action="store_true",
                    help="add per-linear outlier statistics before and after to the report")
    add_dtype_arg(sp)
    sp.add_argument("--workers", type=int, default=1, metavar="N",
                    help="calibrate across N processes (torch.distributed, gloo on CPU): "
                         "launches torchrun --nproc-per-node N -m rotaq optimize ...")
    add_stats_args(sp)
    add_input_args(sp)
    sp.set_defaults(func=cmd_optimize)
