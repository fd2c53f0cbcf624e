"""``rotaq eval`` (perplexity, embedding cosine, output agreement) and ``rotaq bench`` (latency,
size). ``add_commands(sub)`` adds both to the ``rotaq`` command's subparsers."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rotaq.cli.common import emit
from rotaq.errors import RotaqError
from rotaq.progress import stage

_MODEL_HELP = ("a built-in name (smollm2-135m, minilm-l6), a .onnx or .pt2 file, a Hugging "
               "Face model directory, a folder written by rotaq compile, or a generation "
               "folder (genai_config.json)")
_DEFAULT_TOKENS = {"ppl": 8192, "agreement": 2048}


def _is_onnx(src: str) -> bool:
    return src.lower().endswith(".onnx")


def load_for_backend(src: str, backend: str | None) -> Any:
    """``src`` loaded for ``backend``: ``ort`` gives the ONNX form (a built-in's cached export),
    ``torch`` the FX form; default ``ort`` for .onnx files and ``torch`` otherwise."""
    import rotaq
    from rotaq.backends.artifact import check_artifact_backend, load_artifact

    if check_artifact_backend(src, backend):  # a `rotaq compile` folder (tvm or ort)
        return load_artifact(src)
    if backend == "tvm":
        raise RotaqError(f"--backend tvm runs a compiled folder: `rotaq compile {src} --backend "
                         "tvm -o DIR` first")
    backend = backend or ("ort" if _is_onnx(src) else "torch")
    if backend == "torch" and _is_onnx(src):
        raise RotaqError(f"{src} is an ONNX file: it runs only with --backend ort")
    if backend not in ("ort", "torch"):
        raise RotaqError(f"--backend must be 'ort' or 'torch', not '{backend}'")
    model = rotaq.load(src, ir="onnx" if backend == "ort" else "fx")
    if backend == "ort" and model.ir != "onnx":  # a .pt2 file: export it to ONNX in memory
        import tempfile

        with tempfile.TemporaryDirectory(prefix="rotaq-eval-", ignore_cleanup_errors=True) as d:
            path = os.path.join(d, "model.onnx")
            model.save(path, tokenizer=False)
            model = rotaq.load(path)
    return model


# ---- eval -----------------------------------------------------------------------------------
def _print_eval(d: dict[str, Any]) -> None:
    if d["task"] == "ppl":
        print(f"ppl {d['ppl']:.2f} on {d['input_tokens']} tokens ({d['corpus']}, "
              f"{d['windows']} windows of {d['window']}, {d['backend']})")
    elif d["task"] == "agreement":
        print(f"top-1 agreement {100 * d['agreement']:.2f}% on {d['positions']} positions "
              f"({d['corpus']}, {d['windows']} windows of {d['window']}), max relative logit "
              f"error {d['max_rel_error']:.3g}; ppl {d['ppl_model']:.2f} vs "
              f"{d['ppl_reference']:.2f} ({d['backend']} vs {d['reference_backend']} "
              f"{d['reference']})")
    else:
        print(f"cosine to reference: mean {d['cosine_mean']:.6f}, min {d['cosine_min']:.6f} over "
              f"{d['sentences']} sentences ({d['backend']} vs {d['reference_backend']} "
              f"{d['reference']})")
        for (a, b), x, y in zip(d["pairs"], d["pair_cosine_model"], d["pair_cosine_reference"]):
            print(f"  {x:.4f} (ref {y:.4f})  {a!r} ~ {b!r}")


def _genai_folder(args: argparse.Namespace) -> None:
    """A generation folder (genai_config.json) is evaluated / benchmarked as its model.onnx,
    with the folder's own tokenizer."""
    from rotaq.genai import MODEL_FILE, is_genai_folder

    if is_genai_folder(args.model):
        if getattr(args, "tokenizer", "-") is None:
            args.tokenizer = args.model
        args.model = os.path.join(args.model, MODEL_FILE)


def cmd_eval(args: argparse.Namespace) -> int:
    _genai_folder(args)
    model = load_for_backend(args.model, args.backend)
    progress = sys.stderr.isatty()  # tqdm bars on a terminal; the stage lines always
    if args.task == "ppl":
        n = args.tokens or _DEFAULT_TOKENS["ppl"]
        what = f"perplexity on {n} tokens of {args.text} (windows of {args.window})"
    else:
        what = f"{args.task} against the reference"
    with stage(what):
        res = _evaluate(model, args, progress)
    res = {"task": args.task, **res}
    emit(res, args.json, _print_eval)
    return 0


def _evaluate(model: Any, args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    from rotaq.assets import BUILTIN_MODELS
    from rotaq.eval import quality as q

    if args.task == "ppl":
        return q.perplexity(model, corpus=args.text,
                            n_tokens=args.tokens or _DEFAULT_TOKENS["ppl"], window=args.window,
                            batch=args.batch, progress=progress, tokenizer=args.tokenizer)
    if args.reference:
        ref = load_for_backend(args.reference, None)
    elif model.ir == "fx" and args.model in BUILTIN_MODELS:
        ref = model  # a built-in loaded as is: it is its own original (saves a load)
    else:
        ref = q.reference_for(model, args.model)
    if args.task == "agreement":
        return q.agreement(model, ref, corpus=args.text,
                           n_tokens=args.tokens or _DEFAULT_TOKENS["agreement"],
                           window=args.window, progress=progress, tokenizer=args.tokenizer)
    return q.cosine_to_reference(model, ref, tokenizer=args.tokenizer)


# ---- bench ----------------------------------------------------------------------------------
def _token_list(s: str, flag: str = "--tokens") -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise RotaqError(f"{flag} expects comma-separated integers like 1,16,512, got '{s}'")
    if not out or min(out) < 1:
        raise RotaqError(f"{flag} expects positive integers, got '{s}'")
    return out


def _print_bench(d: dict[str, Any]) -> None:
    import textwrap

    print(f"{d['model']} ({d['backend']}, {d['threads']} threads): {d['size_mib']:.2f} MiB on "
          f"disk (MiB = 2^20 bytes; {', '.join(os.path.basename(f) for f in d['files'])})")
    print(f"{'tokens':>8s} {'median ms':>10s} {'p90 ms':>10s}")
    for n, t in d["tokens"].items():
        print(f"{n:>8s} {t['median_ms']:10.2f} {t['p90_ms']:10.2f}")
    ops = d.get("optimized_ops")
    if ops:  # every op type ORT runs after its graph optimizations, most frequent first
        items = sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))
        text = ", ".join(f"{k} x{v}" for k, v in items)
        print(textwrap.fill(text, 100, initial_indent="ORT kernels (optimized graph): ",
                            subsequent_indent="  "))
    elif d["backend"] == "ort":
        print("ORT kernels: not available (ORT could not write its optimized graph)")
    if d.get("decode"):  # a decoder with a KV cache: the token rows above are prefills
        print(f"{'context':>8s} {'decode ms/token':>16s} {'tokens/s':>9s}")
        for c, t in d["decode"].items():
            print(f"{c:>8s} {t['median_ms']:16.2f} {t['tokens_per_s']:9.1f}")
    if d.get("peak_rss_mib") is not None:
        print(f"peak RSS {d['peak_rss_mib']:.0f} MiB")


def cmd_bench(args: argparse.Namespace) -> int:
    from rotaq.backends.artifact import check_artifact_backend
    from rotaq.eval.latency import bench

    _genai_folder(args)
    tokens = _token_list(args.tokens)
    contexts = _token_list(args.contexts, "--contexts")
    backend = check_artifact_backend(args.model, args.backend) or args.backend or "ort"
    if backend == "tvm" and not os.path.isdir(args.model):
        raise RotaqError(f"--backend tvm benchmarks a compiled folder: `rotaq compile "
                         f"{args.model} --backend tvm -o DIR` first")
    if backend == "torch" and _is_onnx(args.model):
        raise RotaqError(f"{args.model} is an ONNX file: benchmark it with --backend ort")
    res = bench(args.model, backend=backend, tokens=tokens, repeats=args.repeats,
                warmup=args.warmup, threads=args.threads,
                progress=sys.stderr.isatty(), contexts=contexts)
    emit(res, args.json, _print_bench)
    return 0


# ---- parsers --------------------------------------------------------------------------------
def add_commands(sub: Any) -> None:
    """Add ``eval`` and ``bench`` to ``sub`` (the result of ``add_subparsers``)."""
    sp = sub.add_parser("eval", help="perplexity, embedding cosine or agreement with a reference")
    sp.add_argument("model", help=_MODEL_HELP)
    sp.add_argument("--task", choices=("ppl", "cosine", "agreement"), default="ppl",
                    help="ppl: perplexity on text; cosine: sentence-embedding cosine to the "
                         "reference (encoders); agreement: next-token top-1 agreement and logit "
                         "error to the reference (default: ppl)")
    sp.add_argument("--text", default="wiki", help="evaluation text: wiki, lee or a text file")
    sp.add_argument("--tokens", type=int, default=None,
                    help="tokens of text (default 8192 for ppl, 2048 for agreement)")
    sp.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    sp.add_argument("--batch", type=int, default=1, help="windows per forward pass (ppl)")
    sp.add_argument("--backend", choices=("torch", "ort", "tvm"), default=None,
                    help="run with PyTorch or ONNX Runtime (default: ort for .onnx, else torch), "
                         "or a folder written by rotaq compile (tvm or ort)")
    sp.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="tokenizer directory (default: the one the model records)")
    sp.add_argument("--reference", default=None, metavar="MODEL",
                    help="model to compare with (default: the original the model records)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("bench", help="latency of warm forward passes, and size on disk")
    sp.add_argument("model", help=_MODEL_HELP)
    sp.add_argument("--backend", choices=("ort", "torch", "tvm"), default=None,
                    help="ONNX Runtime on CPU (default; a built-in runs its cached ONNX export), "
                         "PyTorch, or tvm for a folder written by rotaq compile")
    sp.add_argument("--tokens", default="1,16,512",
                    help="comma-separated sequence lengths (default 1,16,512)")
    sp.add_argument("--contexts", default="128,1024",
                    help="a decoder with a KV cache: contexts (comma-separated) after which "
                         "single-token decode steps are timed (default 128,1024)")
    sp.add_argument("--repeats", type=int, default=20, help="timed runs per length")
    sp.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    sp.add_argument("--threads", type=int, default=2, help="intra-op threads")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_bench)
