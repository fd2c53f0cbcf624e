"""``rotaq generate``: stream text from a decoder with a KV cache; speeds on stderr.
``add_command(sub)`` adds it to the ``rotaq`` command's subparsers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def cmd_generate(args: argparse.Namespace) -> int:
    from rotaq.generate import generate, stream_stdout

    res = generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens,
                   backend=args.backend, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, tokenizer=args.tokenizer,
                   threads=args.threads, stream=None if args.json else stream_stdout)
    stats = res.stats()
    if args.json:
        json.dump({"text": res.text, "tokens": res.tokens, **stats}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"[{res.backend}] prompt {res.prompt_tokens} tokens: prefill "
              f"{stats['prefill_tokens_per_s']:.1f} tokens/s ({1e3 * res.prefill_s:.1f} ms); "
              f"{len(res.tokens)} new tokens, decode {stats['decode_tokens_per_s']:.1f} "
              f"tokens/s; stopped at {res.stopped}", file=sys.stderr)
    return 0


def add_command(sub: Any) -> None:
    """Add ``generate`` to ``sub`` (the result of ``add_subparsers``)."""
    sp = sub.add_parser("generate", help="generate text from a decoder with a KV cache")
    sp.add_argument("model", help="a generation folder (rotaq optimize ... -o DIR/), an .onnx "
                                  "graph with past_key_values inputs, or a built-in name")
    sp.add_argument("--prompt", required=True, help="the text to continue")
    sp.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new "
                                                                   "tokens (default 64)")
    sp.add_argument("--backend", choices=("ort", "genai", "tvm"), default="ort",
                    help="ort: rotaq's loop over ONNX Runtime (default); genai: "
                         "onnxruntime-genai on a generation folder; tvm: a folder written by "
                         "rotaq compile --backend tvm")
    sp.add_argument("--temperature", type=float, default=None,
                    help="sample (with --top-k/--top-p too) instead of greedy decoding")
    sp.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest")
    sp.add_argument("--top-p", type=float, default=None, help="sample from the nucleus p")
    sp.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    sp.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="tokenizer directory (default: the one the model records)")
    sp.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    sp.add_argument("--json", action="store_true",
                    help="print the text, token ids and speeds as JSON (no streaming)")
    sp.set_defaults(func=cmd_generate)
