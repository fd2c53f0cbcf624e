"""The ``rotaq`` command: a thin layer over the Python API.

Exit codes: 0 success, 2 a problem with the input or a refused rewrite (one line on stderr),
3 a verification failure, 1 an unexpected internal error. One module per command group
(``inspect``, ``optimize``, ``eval``, ``compile``, ``generate``); shared helpers in ``common``.
"""

from __future__ import annotations

import argparse
import os
import sys

from rotaq.cli import compile as compile_cmd
from rotaq.cli import eval as eval_cmd
from rotaq.cli import generate as generate_cmd
from rotaq.cli import inspect as inspect_cmd
from rotaq.cli import optimize as optimize_cmd
from rotaq.cli.common import MODEL_HELP, emit
from rotaq.errors import RotaqError, VerificationError

__all__ = ["build_parser", "main"]


def cmd_recipes(args: argparse.Namespace) -> int:
    from rotaq.recipe import Recipe, builtin_recipes

    data = {n: Recipe.load(n).to_dict() for n in builtin_recipes()}
    emit(data, args.json, lambda d: [print(f"{k:14s} {v['description']}") for k, v in d.items()])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``rotaq`` argument parser with every command."""
    from rotaq.cli.help import HelpFormatter, finish
    from rotaq.version import __version__

    p = argparse.ArgumentParser(prog="rotaq", formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"rotaq {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show rotaq's log (INFO) and its progress lines (these are shown on a "
                        "terminal anyway)")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks, other libraries' logs and warnings")
    sub = p.add_subparsers(dest="command", required=True)
    inspect_cmd.add_command(sub, MODEL_HELP)
    optimize_cmd.add_commands(sub, MODEL_HELP)
    eval_cmd.add_commands(sub)
    compile_cmd.add_command(sub, MODEL_HELP)
    generate_cmd.add_command(sub)

    sp = sub.add_parser("recipes", help="list the built-in recipes")
    sp.add_argument("--json", action="store_true", help="print every recipe in full as JSON")
    sp.set_defaults(func=cmd_recipes)
    finish(p, sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``rotaq`` command on ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    args = build_parser().parse_args(argv)
    args.argv = argv
    from rotaq.cli.log import setup_logging

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
