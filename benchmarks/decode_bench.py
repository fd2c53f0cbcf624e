"""Decode benchmark: SmolLM2-135M generation folders run through onnxruntime-genai on one CPU.

Rows: onnxruntime-genai's model builder on the fp32 safetensors rotaq caches (fp32; int4 with
its default settings; int4 with ``int4_accuracy_level=4``; int4 with accuracy level 1, i.e.
fp32 activations, for reference) and rotaq's folders (``rotaq optimize smollm2-135m --recipe R
-o DIR/`` for rotate, w8a8-rotated, w4a16-rotated, w4a8-rotated; given with ``--folder R=DIR``
or built with ``--build-rotaq``).

Columns: Wikipedia perplexity (8192 tokens, 512-token windows, each from an empty past, computed
with an ONNX Runtime session on the folder's model.onnx: the same ORT build genai runs),
prefill ms at 512 tokens (``append_tokens`` of 512 tokens into a fresh generator), decode
tokens/s after contexts of 128 and 1024 tokens (median ``generate_next_token`` time over
``--steps`` steps: search + one forward), size of model.onnx + data, and peak RSS of a separate
process that loads the folder, prefills 1024 tokens and decodes ``--steps`` tokens. Timings are
alternated (every model in turn, ``--rounds`` times) so that they share the machine's load; the
ratios to fp32 are the figures to compare.

    python benchmarks/decode_bench.py                       # the builder's rows (+ cached rotaq)
    python benchmarks/decode_bench.py --build-rotaq         # also build rotaq's folders
    python benchmarks/decode_bench.py --folder w4a8-rotated=out/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPES = ("rotate", "w8a8-rotated", "w4a16-rotated", "w4a8-rotated")
BUILDER = {  # row -> (precision, the builder's accuracy_level extra option)
    "builder fp32": ("fp32", None),
    "builder int4 (default)": ("int4", None),
    "builder int4 (accuracy_level=4)": ("int4", 4),
    "builder int4 (accuracy_level=1)": ("int4", 1),
}
_INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
               "amx_bf16")


def cpu_info() -> dict[str, object]:
    model, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(),
            "int8_flags": [f for f in _INT8_FLAGS if f in flags]}


# ---- folders --------------------------------------------------------------------------------
def builder_folder(row: str) -> Path:
    """The model builder's output for ``row`` (``rotaq.assets.builder_model_dir``: built once,
    cached under ~/.cache/rotaq/builder)."""
    from rotaq import assets

    prec, level = BUILDER[row]
    return Path(assets.builder_model_dir("smollm2-135m", prec, accuracy_level=level))


def rotaq_folder(recipe: str, build: bool) -> tuple[Path | None, str]:
    from rotaq import assets

    out = assets.cache_dir() / "decode-bench" / recipe
    if (out / "genai_config.json").is_file():
        return out, ""
    if not build:
        return None, "not built (run with --build-rotaq or --folder)"
    cmd = [sys.executable, "-m", "rotaq.cli", "optimize", "smollm2-135m", "--recipe", recipe,
           "-o", str(out) + "/"]
    print(f"[decode] building {recipe}: rotaq {' '.join(cmd[3:])}", file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        return None, f"rotaq optimize failed (exit {r.returncode}): " + (lines[-1] if lines
                                                                        else "")
    return out, ""


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data"))


# ---- measurements ---------------------------------------------------------------------------
def perplexity(folder: Path, windows: np.ndarray, threads: int) -> float:
    from rotaq.decoder_io import CacheRunner

    runner = CacheRunner(str(folder / "model.onnx"), threads=threads)
    total, count = 0.0, 0
    for w in windows:
        logits = runner.prefill(w[None])[0, :-1].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
        total += float(np.sum(lse - logits[np.arange(len(w) - 1), w[1:]]))
        count += len(w) - 1
    return float(np.exp(total / count))


class GenaiRunner:
    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill_ms(self, ids: np.ndarray) -> float:
        gen = self._generator(len(ids) + 1)
        t0 = time.perf_counter()
        gen.append_tokens(ids.astype(np.int32))
        return (time.perf_counter() - t0) * 1e3

    def decode_ms(self, ids: np.ndarray, steps: int) -> list[float]:
        gen = self._generator(len(ids) + steps + 1)
        gen.append_tokens(ids.astype(np.int32))
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            gen.generate_next_token()
            out.append((time.perf_counter() - t0) * 1e3)
        return out


# VmHWM (peak RSS of this address space), not ru_maxrss: Linux carries ru_maxrss over exec, so
# a child would report the parent's peak
_RSS_CHILD = """
import json, sys, numpy as np
sys.path.insert(0, sys.argv[1])
from benchmarks.decode_bench import GenaiRunner
r = GenaiRunner(__import__('pathlib').Path(sys.argv[2]), int(sys.argv[3]))
ids = np.array(json.loads(sys.argv[4]), np.int64)
r.decode_ms(ids, int(sys.argv[5]))
print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))
"""


def peak_rss_mib(folder: Path, ids: np.ndarray, steps: int, threads: int) -> float:
    """Peak RSS of a fresh process that loads ``folder`` in genai and decodes after ``ids``
    (python, numpy and onnxruntime-genai themselves included)."""
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(ROOT), str(folder), str(threads),
                        json.dumps(ids.tolist()), str(steps)], capture_output=True, text=True,
                       env=_env(), check=True)
    return int(r.stdout.strip().splitlines()[-1]) / 1024


# ---- main -----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", action="append", default=[], metavar="NAME=DIR",
                    help="a generation folder to include as row NAME (e.g. w4a8-rotated=out/)")
    ap.add_argument("--build-rotaq", action="store_true",
                    help="build rotaq's folders with rotaq optimize (cached)")
    ap.add_argument("--no-rotaq", action="store_true", help="only the builder's rows")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per round")
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks/results/decode.md"))
    ap.add_argument("--reuse-ppl", action="store_true",
                    help="take the perplexities from the previous run's .json (same folder, "
                         "same --ppl-tokens) instead of recomputing them")
    ap.add_argument("--note", default="", help="a note printed below the table")
    ap.add_argument("--partial", default="",
                    help="a note printed at the top of the table (e.g. which rows are missing)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    from rotaq import assets

    src = assets.builtin_model_dir("smollm2-135m")
    rows: dict[str, Path] = {}
    notes: dict[str, str] = {}
    for row in BUILDER:
        rows[row] = builder_folder(row)
    given = dict(f.split("=", 1) for f in args.folder)
    for recipe in [] if args.no_rotaq else RECIPES:
        if recipe in given:
            rows[f"rotaq {recipe}"] = Path(given.pop(recipe))
            continue
        folder, why = rotaq_folder(recipe, args.build_rotaq)
        if folder is None:
            notes[f"rotaq {recipe}"] = why
        else:
            rows[f"rotaq {recipe}"] = folder
    rows.update({k: Path(v) for k, v in given.items()})

    tok = AutoTokenizer.from_pretrained(str(src))
    wins = np.asarray(assets.token_windows(tok, "wiki", args.ppl_tokens, 512), np.int64)
    contexts = [int(c) for c in args.contexts.split(",")]
    text_ids = np.asarray(assets.token_windows(tok, "wiki", 2048, 2048)[0], np.int64)
    res: dict[str, dict] = {r: {"folder": str(p), "size_mib": folder_size(p) / 2**20}
                            for r, p in rows.items()}
    old = {}
    prev = Path(args.output).with_suffix(".json")
    if args.reuse_ppl and prev.is_file():
        data = json.loads(prev.read_text(encoding="utf-8"))
        if data.get("ppl_tokens") == args.ppl_tokens:
            old = {d["folder"]: d["ppl"] for d in data["rows"].values()}
    for r, p in rows.items():
        t0 = time.perf_counter()
        res[r]["ppl"] = old.get(str(p)) or perplexity(p, wins, args.threads)
        print(f"[decode] {r}: ppl {res[r]['ppl']:.2f} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    runners = {r: GenaiRunner(p, args.threads) for r, p in rows.items()}
    times: dict[str, dict[str, list[float]]] = {r: {} for r in rows}
    for k in range(args.rounds):
        for r, g in runners.items():  # alternated: every model once per round
            times[r].setdefault("prefill", []).append(g.prefill_ms(text_ids[: args.prefill]))
            for c in contexts:
                times[r].setdefault(str(c), []).extend(g.decode_ms(text_ids[:c], args.steps))
        print(f"[decode] round {k + 1}/{args.rounds} done", file=sys.stderr)
    for r, folder in rows.items():
        res[r]["prefill_ms"] = float(np.median(times[r]["prefill"][1:] or times[r]["prefill"]))
        for c in contexts:
            res[r][f"decode_{c}_tok_s"] = 1e3 / float(np.median(times[r][str(c)]))
        res[r]["peak_rss_mib"] = peak_rss_mib(folder, text_ids[: max(contexts)], args.steps,
                                              args.threads)
    write(args, res, notes, contexts)


def write(args: argparse.Namespace, res: dict, notes: dict, contexts: list[int]) -> None:
    import onnxruntime as ort
    import onnxruntime_genai as og

    cpu = cpu_info()
    base = res.get("builder fp32")
    head = (f"SmolLM2-135M-Instruct, every row run through onnxruntime-genai {og.__version__} "
            f"(onnxruntime {ort.__version__}) on one CPU in one run, timings alternated over "
            f"{args.rounds} rounds ({args.threads} threads). CPU: {cpu['model']}, "
            f"{cpu['cores']} cores; int8-relevant flags: {', '.join(cpu['int8_flags']) or 'none'}."
            f"\n\nppl: Wikipedia, {args.ppl_tokens} tokens in 512-token windows (ONNX Runtime "
            f"session on the folder's model.onnx). prefill: ms for {args.prefill} tokens. decode: "
            f"tokens/s after a context of {' / '.join(map(str, contexts))} tokens (median of "
            f"{args.steps} x {args.rounds} steps, search included). (x N): ratio to builder fp32 "
            f"in the same run. Peak RSS: a separate process loading the folder, prefilling "
            f"{max(contexts)} tokens and decoding {args.steps}.")
    lines = [head, ""]
    if args.partial or notes:
        lines += [f"**Partial table.** {args.partial}".strip(), ""]
    cols = ["row", "ppl", f"prefill {args.prefill} ms"] + [f"decode tok/s @{c}"
                                                            for c in contexts]
    lines += ["| " + " | ".join(cols + ["size MiB", "peak RSS MiB"]) + " |",
              "|" + "---|" * (len(cols) + 2)]

    def ratio(v: float, b: float | None, inverse: bool = False) -> str:
        if not b:
            return ""
        return f" (x{(b / v if inverse else v / b):.2f})"

    for r, d in res.items():
        cells = [r, f"{d['ppl']:.2f}",
                 f"{d['prefill_ms']:.1f}" + ratio(d["prefill_ms"], base and base["prefill_ms"],
                                                  inverse=True)]
        cells += [f"{d[f'decode_{c}_tok_s']:.1f}" + ratio(d[f"decode_{c}_tok_s"],
                                                          base and base[f"decode_{c}_tok_s"])
                  for c in contexts]
        cells += [f"{d['size_mib']:.1f}", f"{d['peak_rss_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for r, why in notes.items():
        lines.append(f"| {r} | {why} |" + " |" * (len(cols) + 1))
    lines.append("\n(prefill ratio: fp32 time / row time, so > 1 is faster.)")
    if {"builder int4 (default)", "builder int4 (accuracy_level=4)"} <= set(res):
        lines.append("\nonnxruntime-genai's builder defaults to accuracy_level 4 on CPU, so the "
                     "int4 (default) and int4 (accuracy_level=4) rows are the same graph "
                     "(MatMulNBits, blocks of 32, int8 activations): their difference is this "
                     "run's timing noise.")
    if args.note:
        lines.append("\n" + args.note)
    Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    Path(args.output).with_suffix(".json").write_text(json.dumps(
        {"cpu": cpu, "rows": res, "missing": notes, "ppl_tokens": args.ppl_tokens,
         "rounds": args.rounds, "steps": args.steps, "threads": args.threads,
         "max_rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        indent=2), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
