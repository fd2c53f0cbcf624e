"""Helpers shared by the ``rotaq`` commands: output (JSON or text), ``--set`` pairs, the input
options several commands take."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rotaq.errors import RotaqError

MODEL_HELP = ("a built-in name (smollm2-135m, minilm-l6), a .onnx or .pt2 file, or a "
              "Hugging Face model directory")


def options(pairs: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as a dict (values stay strings; the passes coerce them)."""
    out: dict[str, Any] = {}
    for p in pairs or []:
        if "=" not in p:
            raise RotaqError(f"--set expects KEY=VALUE, got '{p}'")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def emit(data: dict[str, Any], as_json: bool, human: Any) -> None:
    """Print ``data`` as JSON, or through ``human(data)``."""
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


def size(n: int) -> str:
    """A byte count in KiB or MiB."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def add_stats_args(sp: argparse.ArgumentParser) -> None:
    """``--text`` / ``--tokens`` / ``--window`` of the statistics options."""
    sp.add_argument("--text", default="lee", help="calibration text: lee, wiki or a file")
    sp.add_argument("--tokens", type=int, default=512, help="tokens of text for statistics")
    sp.add_argument("--window", type=int, default=128, help="tokens per sequence")


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
    """The keyword arguments of ``rotaq.load`` that the input options give."""
    return {"inputs": getattr(args, "inputs", None),
            "verify_inputs": getattr(args, "verify_inputs", None),
            "tokenizer": getattr(args, "tokenizer", None),
            "kv_cache": not getattr(args, "no_kv_cache", False)}
