"""Greedy generation with the KV cache against full forwards without it (issue 15).

For each model (an ONNX file or a generation folder with ``model.onnx``, with the cache I/O:
``input_ids``, ``attention_mask``, ``position_ids`` (when declared), ``past_key_values.{i}.*`` ->
``logits``, ``present.{i}.*``), on N real prompts (consecutive Wikipedia windows, SmolLM2's
tokenizer), this script generates greedily with the cache (prefill, then one token per step
feeding the presents back) and checks every step against:

- **self**: the argmax of a full forward of the whole prefix with an empty past (what a
  graph without a cache computes), on the same graph and weights: a correct cache gives 100%;
- **fp32**: the first model's tokens (by convention the unrewritten fp32 model): the rewritten
  model is run teacher-forced on the first model's sequence, and the share of steps where its
  argmax equals the first model's token is reported, with the length of the identical prefix.

Writes benchmarks/results/generation.json and generation.md.
Run: python benchmarks/generation_parity.py --model fp32=DIR --model rotate=DIR [...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Greedy:
    """Greedy decoding and full forwards over one cache graph (rotaq.decoder_io.CacheRunner)."""

    def __init__(self, path: str):
        from rotaq.decoder_io import CacheRunner

        self.runner = CacheRunner(path if path.endswith(".onnx")
                                  else os.path.join(path, "model.onnx"), threads=2)

    def greedy(self, prompt: list[int], n_new: int) -> tuple[list[int], float, float]:
        t0 = time.perf_counter()
        logits = self.runner.prefill(np.asarray([prompt]))
        t_prefill = time.perf_counter() - t0
        tokens = [int(logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for _ in range(n_new - 1):
            logits = self.runner.run(np.asarray([tokens[-1:]]))
            tokens.append(int(logits[0, -1].argmax()))
        return tokens, t_prefill, time.perf_counter() - t0

    def full_argmax(self, ids: list[int]) -> np.ndarray:
        """The argmax at every position of a full forward of ``ids`` (empty past)."""
        return self.runner.prefill(np.asarray([ids]))[0].argmax(-1)


def _prompts(n: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from rotaq import assets

    tok = AutoTokenizer.from_pretrained(str(assets.builtin_model_dir("smollm2-135m")))
    windows = assets.token_windows(tok, "wiki", 8192 + 64 * 8 * n, 64)[128:]  # past the ppl text
    prompts = [w[:length] for w in windows[::8][:n]]
    if len(prompts) < n:
        raise SystemExit(f"the corpus gives only {len(prompts)} prompts")
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True,
                    help="LABEL=PATH (an .onnx or a folder with model.onnx); the first is the "
                         "reference (fp32)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(HERE, "generation"))
    args = ap.parse_args()
    prompts = _prompts(args.prompts, args.prompt_tokens)
    rows, ref_tokens = [], None
    for spec in args.model:
        label, path = spec.split("=", 1)
        runner = Greedy(path)
        gen, self_ok, fp32_ok, prefix, t_pre, t_dec = [], 0, 0, [], 0.0, 0.0
        for p in prompts:
            toks, a, b = runner.greedy(p, args.new_tokens)
            t_pre, t_dec = t_pre + a, t_dec + b
            full = runner.full_argmax(p + toks[:-1])[len(p) - 1:]
            self_ok += int((full == np.asarray(toks)).sum())
            gen.append(toks)
        if ref_tokens is None:
            ref_tokens = gen
        for p, ref, toks in zip(prompts, ref_tokens, gen):
            forced = runner.full_argmax(p + ref[:-1])[len(p) - 1:]
            fp32_ok += int((forced == np.asarray(ref)).sum())
            same = next((i for i, (x, y) in enumerate(zip(ref, toks)) if x != y), len(ref))
            prefix.append(same)
        steps = args.prompts * args.new_tokens
        rows.append({"model": label, "path": path, "steps": steps,
                     "cache_vs_full": self_ok / steps, "agree_fp32_forced": fp32_ok / steps,
                     "identical_to_fp32": sum(x == args.new_tokens for x in prefix),
                     "mean_identical_prefix": float(np.mean(prefix)),
                     "prefill_s": t_pre, "decode_tok_s": (steps - args.prompts) / t_dec})
        print(json.dumps(rows[-1]), flush=True)
    _write(args, rows)


def _write(args, rows: list[dict]) -> None:
    try:  # the same CPU description as the decode table (run as a script, or as a module)
        from decode_bench import cpu_info
    except ImportError:
        from benchmarks.decode_bench import cpu_info

    cpu = cpu_info()
    meta = {"cpu": f"{cpu['model']} ({', '.join(cpu['int8_flags'])}; {cpu['cores']} cores)", "python": platform.python_version(),
            "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [(f"Greedy generation with the KV cache: {args.prompts} Wikipedia prompts of "
             f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens each, ONNX Runtime "
             f"CPU, 2 threads. CPU: {meta['cpu']}."), "",
             ("| model | cache = full forward (per step) | = fp32 teacher-forced (per step) "
             f"| prompts identical to fp32 (all {args.new_tokens}) | mean identical prefix "
             "| decode tok/s |"),
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['cache_vs_full']:.2%} | {r['agree_fp32_forced']:.2%} "
                     f"| {r['identical_to_fp32']}/{args.prompts} | "
                     f"{r['mean_identical_prefix']:.1f} | {r['decode_tok_s']:.1f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
