"""Text generation from a decoder graph with a KV cache.

Two backends: ``ort`` is rotaq's own loop over an ONNX Runtime session (prefill with an empty
past, then one token per step with the presents fed back; needs only onnxruntime), ``genai``
runs onnxruntime-genai on a generation folder. Greedy by default; ``temperature``, ``top_k``,
``top_p`` (any of them) switch to sampling as onnxruntime-genai does it (top-k, then top-p,
then a draw from softmax(logits / temperature)), reproducible with ``seed``.

``prefill`` time is the time to the first new token (the prompt's forward pass plus its pick);
``decode`` tokens/s counts the tokens after the first.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rotaq import tags
from rotaq.decoder_io import CacheRunner
from rotaq.errors import RotaqError

log = logging.getLogger(__name__)

__all__ = ["GenerationResult", "generate", "resolve_model", "sample_next"]


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    backend: str
    prefill_s: float
    decode_s: float
    stopped: str  # "eos" or "length"
    model: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")

    def stats(self) -> dict[str, Any]:
        return {"model": self.model, "backend": self.backend, "prompt_tokens": self.prompt_tokens,
                "new_tokens": len(self.tokens), "stopped": self.stopped,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


# ---- the model ------------------------------------------------------------------------------
@dataclass
class _Resolved:
    onnx_path: str
    tokenizer_dir: str | None
    folder: str | None  # a generation folder (genai_config.json)
    eos: list[int]
    tmp: Any = None  # a TemporaryDirectory kept alive while the model is used
    runner: Any = None  # a prepared cache runner (tvm: the compiled artefact's)


def _eos_ids(*sources: Any) -> list[int]:
    out: list[int] = []
    for v in sources:
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, int) and x >= 0 and x not in out:
                out.append(x)
    return out


def _folder_eos(folder: str) -> list[int]:
    with open(os.path.join(folder, "genai_config.json"), encoding="utf-8") as f:
        conf = json.load(f)
    return _eos_ids(conf.get("model", {}).get("eos_token_id"))


def resolve_model(src: str, tokenizer: str | None = None) -> _Resolved:
    """A generation folder, an .onnx file (tokenizer from its ``rotaq.tokenizer`` metadata or
    ``PATH.tokenizer/``), or anything :func:`rotaq.load` takes whose graph has a cache."""
    from rotaq.genai import MODEL_FILE, is_genai_folder

    if is_genai_folder(src):
        with open(os.path.join(src, "genai_config.json"), encoding="utf-8") as f:
            fname = json.load(f).get("model", {}).get("decoder", {}).get("filename", MODEL_FILE)
        return _Resolved(os.path.join(src, fname), tokenizer or src, src, _folder_eos(src))
    if src.lower().endswith(".onnx"):
        if not os.path.isfile(src):
            raise RotaqError(f"cannot load {src}: no such file")
        return _Resolved(src, tokenizer or _onnx_tokenizer(src), None, [])
    from rotaq.decoder_io import has_cache
    from rotaq.loading import load

    model = load(src, ir="onnx")
    if not has_cache(model.graph.input_names):
        raise RotaqError(f"this graph has no KV cache: {src} takes inputs "
                         f"{model.graph.input_names}; generation needs a decoder with "
                         "past_key_values inputs")
    tok = tokenizer or model.source.get("tokenizer")
    on_disk = getattr(model.graph, "source", None)
    if on_disk and os.path.isfile(on_disk):
        return _Resolved(on_disk, tok, None, [])
    tmp = tempfile.TemporaryDirectory(prefix="rotaq-generate-", ignore_cleanup_errors=True)
    path = os.path.join(tmp.name, "model.onnx")
    model.save(path, tokenizer=False)
    return _Resolved(path, tok, None, [], tmp)


def _resolve_tvm(folder: str, tokenizer: str | None, threads: int | None) -> _Resolved:
    """A ``rotaq compile --backend tvm`` folder of a cache graph."""
    from rotaq.backends.artifact import check_artifact_backend

    if not os.path.isdir(folder) or check_artifact_backend(folder, "tvm") != "tvm":
        raise RotaqError(f"--backend tvm generates from a compiled folder: `rotaq compile "
                         f"{folder} --backend tvm -o DIR` first")
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
    from rotaq.backends import tvm as tb
    from rotaq.backends.tvm_decode import TvmCacheRunner

    model = tb.load(folder)
    return _Resolved("", tokenizer or model.source.get("tokenizer"), None, [],
                     runner=TvmCacheRunner(model.graph))


def _onnx_tokenizer(path: str) -> str | None:
    import onnx

    from rotaq.model import TOKENIZER_SUFFIX

    try:
        meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001 - the session load reports a broken file
        meta = {}
    tok = meta.get(tags.TOKENIZER)
    if tok:
        tok = tok if os.path.isabs(tok) else os.path.join(os.path.dirname(os.path.abspath(path)),
                                                          tok)
        if os.path.isdir(tok):
            return tok
    beside = path + TOKENIZER_SUFFIX
    return beside if os.path.isdir(beside) else None


def _tokenizer(path: str | None, src: str) -> Any:
    if not path:
        raise RotaqError(f"no tokenizer is known for {src}: pass --tokenizer DIR")
    from rotaq.eval.quality import _load_tokenizer

    if not os.path.isdir(path):
        raise RotaqError(f"tokenizer directory {path} does not exist: pass --tokenizer DIR")
    return _load_tokenizer(os.path.abspath(path))


# ---- sampling -------------------------------------------------------------------------------
def sample_next(logits: np.ndarray, temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None, rng: np.random.Generator | None = None) -> int:
    """argmax of ``logits`` [vocab] when no sampling option is set; else top-k, top-p and a
    draw from softmax(logits / temperature)."""
    x = np.asarray(logits, np.float64)
    if temperature is None and top_k is None and top_p is None:
        return int(np.argmax(x))
    t = 1.0 if temperature is None else float(temperature)
    if t <= 0:
        return int(np.argmax(x))
    order = np.argsort(-x, kind="stable")
    if top_k:
        order = order[: int(top_k)]
    z = x[order] / t
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), float(top_p)) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    rng = rng or np.random.default_rng()
    return int(order[rng.choice(len(order), p=p)])


def _check_options(max_new_tokens: int, temperature: Any, top_k: Any, top_p: Any) -> None:
    if max_new_tokens < 1:
        raise RotaqError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature is not None and temperature < 0:
        raise RotaqError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise RotaqError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise RotaqError(f"top_p must be in (0, 1], got {top_p}")


# ---- backends -------------------------------------------------------------------------------
class _Streamer:
    """Decodes the new tokens as they come and hands each new piece of text to ``sink``."""

    def __init__(self, tok: Any, sink: Callable[[str], None] | None) -> None:
        self.tok, self.sink, self.ids, self.text = tok, sink, [], ""

    def add(self, token: int) -> None:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.sink and len(text) > len(self.text) and not text.endswith("\ufffd"):
            self.sink(text[len(self.text):])
            self.text = text
        elif not text.endswith("\ufffd"):
            self.text = text

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.sink and len(text) > len(self.text):
            self.sink(text[len(self.text):])
        self.text = text
        return text


def _run_ort(res: _Resolved, ids: list[int], tok: Any, max_new: int, sampling: dict[str, Any],
             seed: int | None, stream: Any, threads: int | None) -> tuple:
    runner = res.runner or CacheRunner(res.onnx_path, threads=threads)
    eos = res.eos or _eos_ids(tok.eos_token_id)
    rng = np.random.default_rng(seed)
    out = _Streamer(tok, stream)
    t0 = time.perf_counter()
    logits = runner.prefill(np.asarray([ids], np.int64))
    nxt = sample_next(logits[0, -1], rng=rng, **sampling)
    t1 = time.perf_counter()
    stopped = "length"
    for i in range(max_new):
        if nxt in eos:
            stopped = "eos"
            break
        out.add(nxt)
        if i + 1 == max_new:
            break
        nxt = sample_next(runner.run(np.asarray([[nxt]], np.int64))[0, -1], rng=rng, **sampling)
    t2 = time.perf_counter()
    return out.finish(), out.ids, t1 - t0, t2 - t1, stopped


def _run_genai(res: _Resolved, ids: list[int], tok: Any, max_new: int,
               sampling: dict[str, Any], seed: int | None, stream: Any,
               threads: int | None) -> tuple:
    from rotaq.genai import import_genai

    og = import_genai()
    if res.folder is None:
        raise RotaqError("--backend genai runs a generation folder (with genai_config.json): "
                         "write one with `rotaq optimize MODEL --recipe R -o DIR/`")
    try:
        config = og.Config(res.folder)
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(threads)}}}}))
        model = og.Model(config)
    except Exception as err:
        raise RotaqError(f"onnxruntime-genai cannot load {res.folder}: {err}") from err
    params = og.GeneratorParams(model)
    opts: dict[str, Any] = {"max_length": len(ids) + max_new, "do_sample": bool(sampling)}
    opts.update({k: v for k, v in sampling.items() if v is not None})
    if seed is not None:
        opts["random_seed"] = int(seed)
    params.set_search_options(**opts)
    gen = og.Generator(model, params)
    eos = res.eos or _eos_ids(tok.eos_token_id)
    out = _Streamer(tok, stream)
    t0 = time.perf_counter()
    t1 = None
    stopped = "length"
    try:
        gen.append_tokens(np.asarray(ids, np.int32))
        while not gen.is_done():
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if t1 is None:
                t1 = time.perf_counter()
            if token in eos:
                stopped = "eos"
                break
            out.add(token)
            if len(out.ids) >= max_new:
                break
    except RuntimeError as err:  # a folder whose model does not fit its genai_config.json
        msg = " ".join(str(err).split())
        raise RotaqError(f"onnxruntime-genai failed on {res.folder}: {msg[:300]}") from err
    t2 = time.perf_counter()
    t1 = t1 or t2
    return out.finish(), out.ids, t1 - t0, t2 - t1, stopped


def generate(model: str, prompt: str, max_new_tokens: int = 64, backend: str = "ort",
             temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None,
             stream: Callable[[str], None] | None = None, tokenizer: str | None = None,
             threads: int | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` (stops at the end-of-sequence token).

    ``model``: a generation folder, an .onnx cache graph, or a model :func:`rotaq.load` takes
    whose graph has a cache. ``stream`` receives each new piece of text as it is decoded.
    Greedy unless one of ``temperature``, ``top_k``, ``top_p`` is given.
    """
    _check_options(max_new_tokens, temperature, top_k, top_p)
    if backend not in ("ort", "genai", "tvm"):
        raise RotaqError(f"backend must be 'ort', 'genai' or 'tvm', not '{backend}'")
    res = _resolve_tvm(os.fspath(model), tokenizer, threads) if backend == "tvm" else \
        resolve_model(os.fspath(model), tokenizer)
    tok = _tokenizer(res.tokenizer_dir, model)
    ids = [int(i) for i in tok(prompt)["input_ids"]]
    if not ids:
        raise RotaqError("the prompt is empty after tokenization")
    sampling = {k: v for k, v in (("temperature", temperature), ("top_k", top_k),
                                  ("top_p", top_p)) if v is not None}
    try:
        if backend in ("ort", "tvm"):  # tvm: rotaq's loop over the compiled decode steps
            text, new, pre, dec, stopped = _run_ort(res, ids, tok, max_new_tokens, sampling,
                                                    seed, stream, threads)
        else:
            text, new, pre, dec, stopped = _run_genai(res, ids, tok, max_new_tokens, sampling,
                                                      seed, stream, threads)
    finally:
        if res.tmp is not None:
            res.tmp.cleanup()
    return GenerationResult(text, new, len(ids), backend, pre, dec, stopped, os.fspath(model))


def stream_stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
