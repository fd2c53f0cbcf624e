"""Help texts of the ``rotaq`` command: examples, exit codes, defaults shown."""

from __future__ import annotations

import argparse
import textwrap

from rotaq.version import __version__

EXIT_CODES = """exit codes:
  0  success
  1  internal error in rotaq (rerun with --debug for the traceback)
  2  bad input or a refused rewrite (one line on stderr names the problem)
  3  verification failed: an exact recipe changed the outputs beyond its tolerance
     (nothing is written)"""

DESCRIPTION = (f"rotaq {__version__}: structured compression of trained networks by graph "
               "rewriting (rotations, quantization, low-rank, Kronecker), lowered to ONNX "
               "Runtime or TVM. Options go after the command; -v and --debug before it.")

EXAMPLES = {
    None: """examples:
  rotaq inspect smollm2-135m
  rotaq optimize smollm2-135m --recipe rotate -o smol-rotated.onnx
  rotaq optimize model.onnx --recipe w8a8-rotated -o model-w8a8.onnx --json > report.json
  rotaq eval smol-rotated.onnx --task ppl
  rotaq bench smol-rotated.onnx --tokens 1,16
  rotaq compile smol-rotated.onnx --backend tvm --tokens 1,16 -o smol-tvm/
  rotaq recipes""",
    "inspect": """examples:
  rotaq inspect smollm2-135m --json
  rotaq inspect model.onnx --stats --recipe rotate --plot down.png \\
      --layer model.layers.3.mlp.down_proj""",
    "export": """examples:
  rotaq export smollm2-135m -o smollm2.onnx
  rotaq export ./my-hf-model -o my-model.pt2""",
    "optimize": """examples:
  rotaq optimize smollm2-135m --recipe rotate -o smol-rotated.onnx
  rotaq optimize model.onnx --recipe my-recipe.json --set seed=3 -o out.onnx --json
  rotaq optimize ./my-hf-model --recipe w4a16-rotated --set method=rtn -o out.onnx
  rotaq optimize smollm2-135m --recipe w4a8-rotated -o smol-w4a8/

The output's tokenizer (when the model has one) is written beside it as OUT.tokenizer/;
ONNX weights over ~100 MB go to OUT.data. -o DIR/ (a trailing slash or an existing folder)
writes a generation folder for a decoder with a KV cache: model.onnx, genai_config.json,
config.json and the tokenizer, which onnxruntime_genai.Model(DIR) loads. --json prints the report (schema 1).""",
    "eval": """examples:
  rotaq eval smol-rotated.onnx --task ppl --tokens 4096
  rotaq eval smol-w8a8.onnx --task agreement --reference smollm2-135m
  rotaq eval minilm-rotated.onnx --task cosine""",
    "bench": """examples:
  rotaq bench smol-rotated.onnx --tokens 1,16,512
  rotaq bench smol-tvm/ --backend tvm --tokens 1,16 --json""",
    "compile": """examples:
  rotaq compile smol-rotated.onnx --backend tvm --tokens 1,16 -o smol-tvm/
  rotaq compile smollm2-135m --recipe w4a16-rotated --backend ort -o smol-ort/""",
    "generate": """examples:
  rotaq generate smol-w4a8/ --prompt "The capital of France is" --max-new-tokens 32
  rotaq generate smol-w4a8/ --prompt "Once upon a time" --backend genai \\
      --temperature 0.8 --top-p 0.9 --seed 1
  rotaq generate model.onnx --prompt "Hello" --tokenizer ./tokenizer-dir --json

The text streams to stdout; prefill and decode tokens/s go to stderr.""",
    "recipes": """examples:
  rotaq recipes
  rotaq recipes --json""",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks and appends ``(default: X)`` to options that have a
    default and do not state it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or "default" in text.lower()
                or action.option_strings == [] or isinstance(default, list)):
            return text
        return f"{text} (default: {default})"


def finish(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction) -> None:
    """Formatter, description, examples and exit codes for the parser and every command."""
    parser.formatter_class = HelpFormatter
    parser.description = textwrap.fill(DESCRIPTION, 79)
    parser.epilog = f"{EXAMPLES[None]}\n\n{EXIT_CODES}"
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, sp in sub.choices.items():
        sp.formatter_class = HelpFormatter
        text = (helps.get(name) or "").rstrip(".")
        sp.description = sp.description or textwrap.fill(text[:1].upper() + text[1:] + ".", 79)
        sp.epilog = "\n\n".join(t for t in (EXAMPLES.get(name), EXIT_CODES) if t)
