"""The ``rotaq`` command: a thin layer over the Python API.

Exit codes: 0 success, 2 a problem with the input or a refused rewrite (one line on stderr),
3 a verification failure, 1 an unexpected internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from rotaq.errors import RotaqError, VerificationError
from rotaq.model import TOKENIZER_SUFFIX
from rotaq.progress import stage

log = logging.getLogger("rotaq")


def _options(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs or []:
        if "=" not in p:
            raise RotaqError(f"--set expects KEY=VALUE, got '{p}'")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _emit(data: dict[str, Any], as_json: bool, human) -> None:
    if as_json:
        json.dump(data, sys.stdout, indent=2, default=_jsonable)
        sys.stdout.write("\n")
    else:
        human(data)


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ---- inspect --------------------------------------------------------------------------------
def _print_inspect(d: dict[str, Any]) -> None:
    print(f"model: {d['model']}  ({d['ir']})")
    quant = sum(1 for x in d["linears"] if x.get("quantized"))
    print(f"linears: {d['num_linears']}" + (f" ({quant} already quantized)" if quant else ""))
    kinds: dict[str, int] = {}
    for n in d["norms"]:
        kinds[n["kind"]] = kinds.get(n["kind"], 0) + 1
    skip = sum(1 for n in d["norms"] if n.get("residual_add"))
    print("norms: " + ", ".join(f"{v} {'RMSNorm' if k == 'rms' else 'LayerNorm'}"
                                for k, v in kinds.items())
          + (f" ({skip} with the residual add fused in)" if skip else ""))
    if d["attention"]:
        a0 = d["attention"][0]
        print(f"attention: {len(d['attention'])} sites ({a0['kind']}), {a0['num_heads']} heads, "
              f"{a0['num_kv_heads']} KV heads, head size {a0['head_dim']}")
    if d.get("experts"):
        e0 = d["experts"][0]
        print(f"MoE experts: {len(d['experts'])} grouped weights x {e0['num_experts']} experts; "
              f"routers (kept in float): {len(d['routers'])}")
    r = d["residual"]
    print(f"residual stream: {d['structure']}, {r['blocks']} blocks, embedding "
          f"{r['embedding']}, final norm {r['final_norm']}, head "
          f"{', '.join(map(str, r['head'])) or 'none'}")
    for i, b in enumerate(d.get("block_structure", [])):
        before = ", ".join(b["norm_before"]) or "no norm"
        after = f"; norm on the sublayer output: {', '.join(b['norm_after_sublayer'])}" \
            if b["norm_after_sublayer"] else ""
        print(f"  block {i}: reads through {before}{after}; writers "
              f"{', '.join(b['writers'])}{' (parallel)' if b['parallel'] else ''}")
    if "unmatched" in d:
        print(f"not matched ({len(d['unmatched'])}):")
        for u in d["unmatched"]:
            print(f"  {u['kind']:9s} {u['reason']}")
    if "stats" in d:
        _print_stats(d)


def _print_stats(d: dict[str, Any]) -> None:
    """Per-linear input statistics, before and (with --recipe) after, side by side."""
    after = {r["key"]: r for r in d.get("stats_after", [])}
    rec = d.get("stats_recipe")
    print(f"\ninput statistics of each linear ({d['stats_tokens']} tokens of {d['stats_text']}"
          + (f"; before -> after recipe {rec}" if rec else "") + ")")
    if after:
        print(f"{'linear':44s} {'max/RMS before':>14s} {'after':>7s} {'kurtosis before':>16s} "
              f"{'after':>7s}")
    else:
        print(f"{'linear':44s} {'max/RMS':>8s} {'kurtosis':>9s}")
    for row in d["stats"]:
        name = row["name"] if len(row["name"]) <= 44 else "..." + row["name"][-41:]
        a = after.get(row["key"])
        if a:
            print(f"{name:44s} {row['max_rms']:14.1f} {a['max_rms']:7.1f} "
                  f"{row['kurtosis']:16.1f} {a['kurtosis']:7.1f}")
        else:
            print(f"{name:44s} {row['max_rms']:8.1f} {row['kurtosis']:9.1f}")
    if d.get("stats_summary"):
        print(f"\nworst per role: {'role':10s} {'linears':>7s} {'max/RMS before':>14s} "
              f"{'after':>6s} {'factor':>7s} {'kurtosis before':>15s} {'after':>6s}")
        for r in d["stats_summary"]:
            print(f"{'':16s}{r['role']:10s} {r['linears']:7d} {r['max_rms_before']:14.1f} "
                  f"{r['max_rms_after']:6.1f} {r['factor']:6.1f}x {r['kurtosis_before']:15.1f} "
                  f"{r['kurtosis_after']:6.1f}")
    if "plot" in d:
        print(f"\nplot of the input channels of {d['plot']['layer']}: {d['plot']['file']}")


def cmd_inspect(args: argparse.Namespace) -> int:
    import rotaq
    from rotaq.eval import stats as st

    if args.plot:  # checked before the statistics run
        _check_plot_path(args.plot)
    model = rotaq.load(args.model, ir="onnx" if args.onnx else "fx", **input_options(args))
    data = rotaq.inspect(model, explain=args.explain)
    if args.stats or args.plot:
        names = {k: s.name or s.key for k, s in model.analysis().linears.items()}
        layer = _pick_layer(names, args.layer) if args.layer else None
        feeds = st.calibration_feeds(model, args.text, args.tokens, args.window)
        with stage(f"input statistics of {len(names)} linears"):
            before = st.activation_stats(model, feeds)
        data["stats"] = st.summarize(before)
        data["stats_text"], data["stats_tokens"] = args.text, _feed_tokens(feeds)
        after = None
        if args.recipe:
            res = rotaq.optimize(model, args.recipe)
            with stage(f"input statistics after {args.recipe}"):
                after = st.activation_stats(res.model, feeds)
            data["stats_after"] = st.summarize(after)
            data["stats_recipe"] = args.recipe
            data["stats_summary"] = st.worst_by_role(model.analysis(), before, after)
        if args.plot:
            key = layer or max(before, key=lambda k: before[k]["max_rms"])
            title = f"{data['model']}: input of {before[key]['name']}"
            st.plot_channels(before[key], after[key] if after else None, args.plot, title,
                             recipe=args.recipe)
            data["plot"] = {"file": os.path.abspath(args.plot), "layer": before[key]["name"]}
    _emit(data, args.json, _print_inspect)
    return 0


def _feed_tokens(feeds: dict[str, Any]) -> int:
    ids = feeds.get("input_ids")
    return int(ids.size) if ids is not None else 0


def _pick_layer(names: dict[str, str], layer: str) -> str:
    """The key of the linear ``layer`` names (its key, its name, or a unique part of a name)."""
    if layer in names:
        return layer
    hits = [k for k, v in names.items() if v == layer] or \
        [k for k, v in names.items() if layer in v]
    if not hits:
        raise RotaqError(f"--layer '{layer}' matches no linear (try a name from `rotaq inspect "
                         "--stats`)")
    if len(hits) > 1:
        some = ", ".join(f"{k} ({names[k]})" for k in hits[:4])
        raise RotaqError(f"--layer '{layer}' matches {len(hits)} linears: {some}"
                         f"{', ...' if len(hits) > 4 else ''}; give one key or full name")
    return hits[0]


# ---- export / optimize ----------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    import rotaq

    _check_output(args.model, args.output)
    from rotaq.api import file_sizes

    model = rotaq.load(args.model, kv_cache=not args.no_kv_cache, dtype=args.dtype)
    files = file_sizes(model.save(args.output))
    _emit({"model": model.source.get("name", ""), "output": os.path.abspath(args.output),
           "files": files}, args.json,
          lambda d: print("wrote " + ", ".join(f"{f['path']} ({_size(f['bytes'])})"
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


def _check_plot_path(path: str) -> None:
    """Before the statistics run: the plot's folder must exist and the name must be free."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise RotaqError(f"--plot {path}: is a directory (give a file name, e.g. p.png)")
    if not os.path.isdir(folder):
        raise RotaqError(f"--plot {path}: folder {os.path.dirname(path) or folder} does not "
                         "exist")
    if not os.access(folder, os.W_OK):
        raise RotaqError(f"--plot {path}: folder {folder} is not writable")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


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
                      f"({_size(f['bytes'])})" for f in d.get("files", []))
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
    recipe = rotaq.Recipe.load(args.recipe).with_options(_options(args.set))
    exact = all(getattr(p, "exact", False) for p in recipe.build())
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
    _emit(res.report, args.json, _print_optimize)
    return 0


def add_input_args(sp: argparse.ArgumentParser) -> None:
    """``--inputs`` / ``--verify-inputs`` / ``--tokenizer`` (see ``rotaq.inputs``)."""
    sp.add_argument("--inputs", metavar="FILE.npz",
                    help="model inputs by input name, samples first: the last quarter of the "
                         "samples verify, the rest calibrate (all calibrate with --verify-inputs)")
    sp.add_argument("--verify-inputs", metavar="FILE.npz",
                    help="verification inputs (same format), kept apart from --inputs")
    sp.add_argument("--tokenizer", metavar="DIR",
                    help="a Hugging Face tokenizer folder, for a model file without rotaq "
                         "metadata: verify on Wikipedia text, calibrate on Lee news text "
                         "(the passes' calib_text)")
    add_kv_arg(sp)


def add_dtype_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                    help="output dtype (default: the model's own); fp16/bf16 models are "
                         "verified against their measured rounding noise")


def add_kv_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--no-kv-cache", action="store_true",
                    help="capture a decoder-only LM without its KV cache (logits only; by "
                         "default past_key_values.* inputs and present.* outputs)")


def input_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"inputs": getattr(args, "inputs", None),
            "verify_inputs": getattr(args, "verify_inputs", None),
            "tokenizer": getattr(args, "tokenizer", None),
            "kv_cache": not getattr(args, "no_kv_cache", False)}


def cmd_recipes(args: argparse.Namespace) -> int:
    from rotaq.recipe import Recipe, builtin_recipes

    data = {n: Recipe.load(n).to_dict() for n in builtin_recipes()}
    _emit(data, args.json, lambda d: [print(f"{k:14s} {v['description']}") for k, v in d.items()])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rotaq.cli_help import HelpFormatter, finish
    from rotaq.version import __version__

    p = argparse.ArgumentParser(prog="rotaq", formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"rotaq {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show rotaq's log (INFO) and its progress lines (these are shown on a "
                        "terminal anyway)")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks, other libraries' logs and warnings")
    sub = p.add_subparsers(dest="command", required=True)
    model_help = ("a built-in name (smollm2-135m, minilm-l6), a .onnx or .pt2 file, or a "
                  "Hugging Face model directory")

    def stats_args(sp):
        sp.add_argument("--text", default="lee", help="calibration text: lee, wiki or a file")
        sp.add_argument("--tokens", type=int, default=512, help="tokens of text for statistics")
        sp.add_argument("--window", type=int, default=128, help="tokens per sequence")

    sp = sub.add_parser("inspect", help="show linears, attention, norms and the residual stream")
    sp.add_argument("model", help=model_help)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("--onnx", action="store_true", help="inspect the ONNX form of a torch model")
    sp.add_argument("--explain", action="store_true",
                    help="also say why each candidate linear, matmul, norm or attention was not "
                         "matched")
    sp.add_argument("--stats", action="store_true",
                    help="per-linear input max/RMS ratio and kurtosis on calibration text")
    sp.add_argument("--recipe", default=None,
                    help="with --stats/--plot: also measure after this recipe (e.g. rotate)")
    sp.add_argument("--plot", default=None, metavar="FILE.png",
                    help="draw per-channel input magnitudes of one linear (before/after --recipe)")
    sp.add_argument("--layer", default=None,
                    help="linear to plot (name or key; default: the worst max/RMS)")
    stats_args(sp)
    add_input_args(sp)
    sp.set_defaults(func=cmd_inspect)

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
    stats_args(sp)
    add_input_args(sp)
    sp.set_defaults(func=cmd_optimize)

    from rotaq.cli_compile import add_command as add_compile
    from rotaq.cli_eval import add_commands

    add_commands(sub)
    add_compile(sub, model_help)
    from rotaq.cli_generate import add_command as add_generate

    add_generate(sub)

    sp = sub.add_parser("recipes", help="list the built-in recipes")
    sp.add_argument("--json", action="store_true", help="print every recipe in full as JSON")
    sp.set_defaults(func=cmd_recipes)
    finish(p, sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    from rotaq.cli_log import setup_logging

    setup_logging(args.verbose, args.debug)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rotaq.rewriter.onnx_store import return_large_frees

    return_large_frees()  # freed weights go back to the system (peak RSS with one block)
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from rotaq.rewriter.export_onnx import sigterm_raises

    try:
        with sigterm_raises():  # SIGTERM unwinds, so temporary files and folders are removed
            return args.func(args)
    except VerificationError as err:
        print(f"rotaq: verification failed: {err}", file=sys.stderr)
        return 3
    except RotaqError as err:
        if args.debug:
            raise
        print(f"rotaq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rotaq: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user, traceback with --debug
        if args.debug:
            raise
        print(f"rotaq: internal error: {type(err).__name__}: {err} (rerun with --debug)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
