"""Model quality: perplexity on real text, embedding cosine and output agreement to a reference.

- ``perplexity``: exp of the mean next-token cross-entropy over non-overlapping windows of a
  corpus (every window starts fresh; the first token of a window is context only);
- ``cosine_to_reference``: per-sentence cosine between a model's and a reference's sentence
  embeddings (mean pooling over the attention mask, L2 normalized), plus pair similarities;
- ``agreement``: top-1 next-token agreement and the max relative logit error to a reference.

A decoder with a KV cache (``past_key_values.*`` inputs) is fed an empty past per window.

Every loss and error is computed in float64 from the model's first output. The ``*_from_*``
functions take token ids directly (no tokenizer), for synthetic models and tests.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from rotaq.errors import RotaqError
from rotaq.model import Model

log = logging.getLogger(__name__)

_ROWS = 128  # log-softmax rows per chunk (bounds float64 temporaries to ~50 MB at vocab 49k)

__all__ = [
    "agreement",
    "agreement_from_windows",
    "backend_of",
    "cosine_from_encoded",
    "cosine_to_reference",
    "embed",
    "perplexity",
    "perplexity_from_windows",
    "reference_for",
    "tokenizer_for",
]


# ---- helpers --------------------------------------------------------------------------------
def backend_of(model: Model) -> str:
    """``torch`` for an FX graph, ``ort`` for an ONNX graph."""
    return {"fx": "torch", "onnx": "ort"}.get(model.ir, model.ir)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many types
        raise RotaqError(f"cannot load a tokenizer from {path}: {type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''} "
                         "(pass --tokenizer DIR)") from err


def tokenizer_for(model: Model, tokenizer: str | None = None) -> Any:
    """The tokenizer in ``tokenizer`` (a directory) or the one recorded in ``model.source``."""
    path = tokenizer or model.source.get("tokenizer")
    if not path:
        raise RotaqError(f"no tokenizer is known for {model.source.get('name', 'this model')}: "
                         "pass --tokenizer DIR (a Hugging Face tokenizer directory)")
    if not os.path.isdir(path):
        raise RotaqError(f"tokenizer directory {path} does not exist: pass --tokenizer DIR")
    return _load_tokenizer(os.path.abspath(path))


def _check_kind(model: Model, want: str, task: str) -> None:
    kind = model.source.get("kind")
    if kind and kind != "unknown" and kind != want:
        raise RotaqError(f"{task} needs a {want} model; {model.source.get('name', 'this model')} "
                         f"is a {kind}")


def _logits(model: Model, ids: np.ndarray) -> np.ndarray:
    out = np.asarray(model.graph.run(model.token_feeds(ids))[0])  # a KV cache starts empty
    if out.ndim != 3 or out.shape[:2] != ids.shape:
        raise RotaqError(f"expected logits [batch, seq, vocab] as the first output, got shape "
                         f"{tuple(out.shape)} for input {tuple(ids.shape)}")
    return out


def _as_windows(windows: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    arr = np.asarray(windows, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
        raise RotaqError(f"need at least one window of 2+ tokens, got an array of shape "
                         f"{arr.shape}")
    return arr


def _batches(arr: np.ndarray, batch: int):
    if batch < 1:
        raise RotaqError(f"batch must be positive, got {batch}")
    for i in range(0, len(arr), batch):
        yield arr[i : i + batch]


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="win", file=sys.stderr, disable=not progress,
                leave=False)


def _nll_sum(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum over rows and positions of -log softmax(logits[t])[ids[t+1]], in float64."""
    total = 0.0
    for b in range(ids.shape[0]):
        x_all, tgt_all = logits[b, :-1], ids[b, 1:]
        for s in range(0, len(tgt_all), _ROWS):
            x = np.asarray(x_all[s : s + _ROWS], dtype=np.float64)
            tgt = tgt_all[s : s + _ROWS]
            m = x.max(axis=-1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
            total += float(np.sum(lse - x[np.arange(len(tgt)), tgt]))
    return total


def _windows(model: Model, corpus: str, n_tokens: int, window: int,
             tokenizer: str | None) -> np.ndarray:
    from rotaq import assets

    if window < 2 or n_tokens < window:
        raise RotaqError(f"need 2 <= window <= tokens (got {n_tokens} tokens, window {window})")
    tok = tokenizer_for(model, tokenizer)
    try:
        wins = assets.token_windows(tok, corpus, n_tokens, window)
    except ValueError as err:
        raise RotaqError(str(err)) from err
    if not wins:
        raise RotaqError(f"text {corpus!r} has fewer than {window} tokens: use a smaller --window")
    return _as_windows(wins)


# ---- perplexity -----------------------------------------------------------------------------
def perplexity_from_windows(model: Model, windows: Sequence[Sequence[int]] | np.ndarray,
                            batch: int = 1, progress: bool = True) -> dict[str, Any]:
    """exp(mean cross-entropy) of each next token given its window prefix, over all windows.

    Returns ``ppl``, ``nll`` (mean, nats), ``tokens`` (predicted tokens scored: windows x
    (window - 1)), ``windows``, ``window`` and ``backend``.
    """
    arr = _as_windows(windows)
    total, count = 0.0, 0
    with _bar(len(arr), "ppl", progress) as bar:
        for ids in _batches(arr, batch):
            total += _nll_sum(_logits(model, ids), ids)
            count += ids.shape[0] * (ids.shape[1] - 1)
            bar.update(len(ids))
    nll = total / count
    return {"ppl": float(np.exp(nll)), "nll": nll, "tokens": count, "windows": len(arr),
            "window": int(arr.shape[1]), "backend": backend_of(model)}


def perplexity(model: Model, corpus: str = "wiki", n_tokens: int = 8192, window: int = 512,
               batch: int = 1, progress: bool = True,
               tokenizer: str | None = None) -> dict[str, Any]:
    """Perplexity on the first ``n_tokens`` tokens of ``corpus`` (``wiki``, ``lee`` or a text
    file) cut into non-overlapping windows of ``window`` tokens (a short tail is dropped).

    Keys: ``ppl``, ``nll``, ``tokens`` (predicted tokens scored), ``input_tokens``, ``windows``,
    ``window``, ``corpus``, ``backend`` (``torch`` or ``ort``), ``model``.
    """
    _check_kind(model, "causal-lm", "perplexity")
    wins = _windows(model, corpus, n_tokens, window, tokenizer)
    res = perplexity_from_windows(model, wins, batch=batch, progress=progress)
    res.update(corpus=corpus, input_tokens=int(wins.size), model=model.source.get("name", ""))
    return res


# ---- agreement ------------------------------------------------------------------------------
def agreement_from_windows(model: Model, reference: Model,
                           windows: Sequence[Sequence[int]] | np.ndarray,
                           progress: bool = True) -> dict[str, Any]:
    """Top-1 agreement of argmax logits at every position, max|a - b| / max|b| over all logits,
    and both models' perplexities on the same windows."""
    arr = _as_windows(windows)
    same = total = 0
    err = scale = 0.0
    nll_a = nll_b = 0.0
    with _bar(len(arr), "agreement", progress) as bar:
        for ids in _batches(arr, 1):
            a, b = _logits(model, ids), _logits(reference, ids)
            if a.shape != b.shape:
                raise RotaqError(f"logit shapes differ: model {a.shape}, reference {b.shape}")
            same += int(np.sum(a.argmax(-1) == b.argmax(-1)))
            total += a.shape[0] * a.shape[1]
            for s in range(0, a.shape[1], _ROWS):
                a64 = np.asarray(a[:, s : s + _ROWS], np.float64)
                b64 = np.asarray(b[:, s : s + _ROWS], np.float64)
                err = max(err, float(np.max(np.abs(a64 - b64))))
                scale = max(scale, float(np.max(np.abs(b64))))
            nll_a += _nll_sum(a, ids)
            nll_b += _nll_sum(b, ids)
            bar.update(len(ids))
    scored = arr.shape[0] * (arr.shape[1] - 1)
    return {"agreement": same / total, "max_rel_error": err / (scale or 1.0),
            "positions": total, "windows": len(arr), "window": int(arr.shape[1]),
            "ppl_model": float(np.exp(nll_a / scored)),
            "ppl_reference": float(np.exp(nll_b / scored)),
            "backend": backend_of(model), "reference_backend": backend_of(reference)}


def agreement(model: Model, reference: Model, corpus: str = "wiki", n_tokens: int = 2048,
              window: int = 512, progress: bool = True,
              tokenizer: str | None = None) -> dict[str, Any]:
    """Next-token top-1 agreement of ``model`` with ``reference`` on the same text windows.

    Keys: ``agreement`` (fraction of positions whose argmax match), ``max_rel_error``
    (max|a - b| / max|b| over all logits), ``ppl_model``, ``ppl_reference``, ``positions``,
    ``windows``, ``window``, ``corpus``, ``backend``, ``reference_backend``, ``model``,
    ``reference``.
    """
    _check_kind(model, "causal-lm", "agreement")
    wins = _windows(model, corpus, n_tokens, window, tokenizer)
    res = agreement_from_windows(model, reference, wins, progress=progress)
    res.update(corpus=corpus, model=model.source.get("name", ""),
               reference=reference.source.get("name", ""))
    return res


# ---- embeddings -----------------------------------------------------------------------------
def embed(model: Model, encoded: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    """Sentence embeddings [n, hidden]: the first output (last hidden state) mean-pooled over
    the attention mask, L2 normalized, in float64. ``encoded``: one feed dict per sentence."""
    names = model.graph.input_names
    rows = []
    for enc in encoded:
        ids = np.asarray(enc["input_ids"], np.int64).reshape(1, -1)
        mask = np.asarray(enc.get("attention_mask", np.ones_like(ids)), np.int64).reshape(1, -1)
        have = {"input_ids": ids, "attention_mask": mask,
                "token_type_ids": np.asarray(enc.get("token_type_ids", np.zeros_like(ids)),
                                             np.int64).reshape(1, -1)}
        missing = [n for n in names if n not in have]
        if missing:
            raise RotaqError(f"cannot feed the model's inputs {missing}: an encoder takes "
                             "input_ids, attention_mask and token_type_ids")
        hidden = np.asarray(model.graph.run({n: have[n] for n in names})[0], np.float64)
        if hidden.ndim != 3 or hidden.shape[:2] != ids.shape:
            raise RotaqError(f"expected a hidden state [batch, seq, hidden] as the first output, "
                             f"got shape {tuple(hidden.shape)}")
        m = mask[..., None].astype(np.float64)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        rows.append(pooled[0] / max(float(np.linalg.norm(pooled[0])), 1e-12))
    return np.stack(rows)


def cosine_from_encoded(model: Model, reference: Model,
                        encoded: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Per-sentence cosine between the two models' embeddings; consecutive sentences (0, 1),
    (2, 3), ... form the pairs whose similarity is reported for each model."""
    if not encoded:
        raise RotaqError("no sentences to embed")
    a, b = embed(model, encoded), embed(reference, encoded)
    cos = np.sum(a * b, axis=1)
    n_pairs = len(encoded) // 2
    pa = [float(a[2 * i] @ a[2 * i + 1]) for i in range(n_pairs)]
    pb = [float(b[2 * i] @ b[2 * i + 1]) for i in range(n_pairs)]
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "sentences": len(encoded),
            "pair_cosine_model": pa, "pair_cosine_reference": pb,
            "pair_cosine_max_diff": max((abs(x - y) for x, y in zip(pa, pb)), default=0.0),
            "backend": backend_of(model), "reference_backend": backend_of(reference)}


def cosine_to_reference(model: Model, reference: Model,
                        pairs: Sequence[tuple[str, str]] | None = None,
                        tokenizer: str | None = None) -> dict[str, Any]:
    """Cosine between ``model``'s and ``reference``'s sentence embeddings of the same sentences
    (default: ``assets.SENTENCE_PAIRS``, flattened), each tokenized alone with special tokens.

    Keys: ``cosine_mean``, ``cosine_min``, ``sentences``, ``pairs``, ``pair_cosine_model``,
    ``pair_cosine_reference``, ``pair_cosine_max_diff``, ``backend``, ``reference_backend``,
    ``model``, ``reference``.
    """
    from rotaq import assets

    _check_kind(model, "encoder", "cosine")
    pairs = list(assets.SENTENCE_PAIRS if pairs is None else pairs)
    tok = tokenizer_for(model, tokenizer)
    encoded = [{k: np.asarray(v, np.int64) for k, v in tok(s, return_tensors="np").items()}
               for pair in pairs for s in pair]
    res = cosine_from_encoded(model, reference, encoded)
    res.update(pairs=[list(p) for p in pairs], model=model.source.get("name", ""),
               reference=reference.source.get("name", ""))
    return res


# ---- reference ------------------------------------------------------------------------------
def reference_for(model: Model, path: str | None = None) -> Model:
    """The original model ``model`` was made from: ``load(model.source['name'])`` when
    that is a built-in name, or an existing file/directory other than the model itself
    (``path``: where ``model`` was loaded from, when known)."""
    from rotaq import assets
    from rotaq.loading import load

    name = model.source.get("name", "")
    if name in assets.BUILTIN_MODELS:
        return load(name)
    if name and os.path.exists(name):
        own = {os.path.abspath(p) for p in (path, getattr(model.graph, "source", None)) if p}
        if os.path.abspath(name) not in own:
            return load(name)
        raise RotaqError(f"{name} records no original model to compare with: pass --reference "
                         "MODEL")
    raise RotaqError(f"the original of {name or 'this model'} is unknown or missing: pass "
                     "--reference MODEL")
