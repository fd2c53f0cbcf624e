"""Calibration statistics of linear inputs, shared by the passes that need them.

``input_stats`` runs the model block by block (:mod:`rotaq.rewriter.blocks`) over calibration
windows a few at a time and accumulates, for every distinct input value of the chosen linears,
the Gram matrix ``G = X^T X`` (float64) and the mean absolute value per channel; memory stays at
one block's activations plus the Gram matrices. ``calibration_feeds`` makes the calibration
inputs (text windows, sample inputs or the user's file).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from rotaq.errors import RewriteError, RotaqError
from rotaq.inputs import chunks, rows_of
from rotaq.model import Model

log = logging.getLogger(__name__)


@dataclass
class InputStats:
    gram: np.ndarray  # X^T X, float64 [n, n]
    abs_sum: np.ndarray  # sum |x| per channel
    count: int  # tokens

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)


def linear_inputs(model: Model, keys: list[str]) -> dict[str, str]:
    """key -> the value its linear reads."""
    view = model.graph.view()
    return {k: view.by_key[k].inputs[0] for k in keys}


def feeds_for(model: Model, text: str, tokens: int, window: int) -> dict[str, np.ndarray]:
    return calibration_feeds(model, text, tokens, window)


def capture(model: Model, feeds: dict[str, np.ndarray], values: list[str],
            batch: int | None = None) -> dict[str, np.ndarray]:
    """``model.graph.capture`` over all rows of ``feeds``, in batches the graph accepts
    (captured values concatenated on their first axis)."""
    parts = [model.graph.capture(p, values) for p in chunks(model.graph, feeds, batch)]
    if len(parts) == 1:
        return parts[0]
    return {v: np.concatenate([p[v] for p in parts], axis=0) for v in parts[0]}


def counts(feeds: dict[str, np.ndarray] | None, positions: int) -> dict[str, int]:
    """What a pass reports about its calibration: samples fed and positions (tokens, frames,
    rows) seen by a calibrated linear."""
    return {"calibration_samples": rows_of(feeds) if feeds else 0,
            "calibration_tokens": int(positions)}


def input_stats(model: Model, values: list[str], feeds: dict[str, np.ndarray],
                batch: int = 2, gram: bool = True, desc: str = "calibrate"
                ) -> dict[str, InputStats]:
    """Gram matrix and mean |x| of each value over all tokens of ``feeds``, in one block-wise
    pass over the model (:mod:`rotaq.rewriter.blocks`); across processes each rank runs its
    share of the rows and the sums are all-reduced."""
    from rotaq import dist

    out: dict[str, InputStats] = {}
    wanted = sorted(set(values))
    mine = rank_rows(model, feeds)

    def add(v: str, x: np.ndarray) -> None:
        _accumulate(out, v, x, gram)

    capture_blockwise(model, wanted, mine, batch, add, desc)
    for v in wanted:
        st = out.setdefault(v, InputStats(np.zeros((0, 0)), np.zeros(0), 0))
        if dist.active():
            st.gram = dist.allreduce_sum(st.gram)
            st.abs_sum = dist.allreduce_sum(st.abs_sum)
            st.count = dist.allreduce_int(st.count)
    return out


def _accumulate(out: dict[str, InputStats], v: str, x: np.ndarray, gram: bool) -> None:
    x = np.asarray(x, np.float64)
    x = x.reshape(-1, x.shape[-1])
    st = out.get(v)
    if st is None:
        dim = x.shape[1]
        st = out[v] = InputStats(np.zeros((dim, dim) if gram else (0, 0)), np.zeros(dim), 0)
    if gram:
        st.gram += x.T @ x
    st.abs_sum += np.abs(x).sum(axis=0)
    st.count += x.shape[0]


def rank_rows(model: Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This rank's share of the rows of ``feeds`` (completed for a KV-cache graph)."""
    from rotaq import dist
    from rotaq.decoder_io import complete_feeds

    feeds = complete_feeds(model.graph, feeds)
    sl = dist.shard(rows_of(feeds))
    return {k: v[sl] for k, v in feeds.items()}


def capture_blockwise(model: Model, values: list[str], feeds: dict[str, np.ndarray],
                      batch: int, take, desc: str) -> None:
    """One block-wise pass over ``feeds``: ``take(value, array)`` for each chunk of rows and
    each of ``values``, in the segment that computes it; stops after the last one needed."""
    from rotaq.rewriter.blocks import BlockRunner

    with BlockRunner(model.graph, feeds, batch=batch, keep_outputs=False) as runner:
        where: dict[int, list[str]] = {}
        for v in values:
            k = next((k for k in range(len(runner.segments)) if v in runner.exec.produced(k)
                      or v in runner._inputs[k]), None)
            if k is None:
                raise ValueError(f"no segment of the graph computes {v!r}")
            where.setdefault(k, []).append(v)

        def hook(sr) -> bool:
            for part in sr.each(where.get(sr.segment.index, [])):
                for v, x in part.items():
                    take(v, x)
            return False

        runner.run(hook, until=max(where, default=0), desc=desc)


def capture_rows(model: Model, values: list[str], feeds: dict[str, np.ndarray],
                 batch: int = 2, desc: str = "calibrate", keep: float | dict[str, float] = 1.0,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Each value over all tokens of ``feeds`` as float32 ``[tokens, channels]``, in one
    block-wise pass (across processes: every rank's rows, gathered in rank order). ``keep < 1``
    (one fraction, or one per value): each row kept with that probability, drawn from a
    generator of ``seed`` and the value's name, so a value's sample does not depend on what
    else is captured; memory is that fraction."""
    import zlib

    from rotaq import dist

    parts: dict[str, list[np.ndarray]] = {v: [] for v in values}
    rngs = {v: np.random.default_rng([seed, zlib.crc32(v.encode())]) for v in values}

    def take(v: str, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        x = x.reshape(-1, x.shape[-1])
        frac = keep.get(v, 1.0) if isinstance(keep, dict) else keep
        parts[v].append(x if frac >= 1 else x[rngs[v].random(len(x)) < frac].copy())

    capture_blockwise(model, sorted(set(values)), rank_rows(model, feeds), batch, take, desc)
    return {v: dist.gather_rows(np.concatenate(p)) for v, p in parts.items()}


# ---- calibration inputs from text (also rotaq.eval.stats.calibration_feeds) -----------------
def calibration_feeds(model: Model, corpus: str = "lee", n_tokens: int = 512,
                      window: int = 128) -> dict[str, np.ndarray]:
    """Calibration inputs, never the verification ones: the user's calibration rows when given,
    else ``n_tokens`` of ``corpus`` text in windows of ``window`` tokens (windows that overlap
    the verification text are skipped), else synthetic inputs drawn with the calibration seed.
    The set used is recorded in ``model.inputs_info["calibration_used"]``."""
    import time

    from rotaq import inputs as inp

    t0 = time.perf_counter()
    tok_dir = model.source.get("tokenizer")
    if model.calibration is not None:
        from rotaq.decoder_io import complete_feeds

        feeds = complete_feeds(model.graph, model.calibration)  # cache graph: empty pasts
        info = model.inputs_info.get("calibration") or inp.describe(feeds, "user")
    elif tok_dir and os.path.isdir(tok_dir) and "input_ids" in model.graph.input_names:
        feeds, info = _text_feeds(model, tok_dir, corpus, n_tokens, window)
    else:
        log.warning("no tokenizer and no calibration inputs for this model: calibrating on "
                    "synthetic inputs (seed %d); give --inputs FILE.npz or --tokenizer DIR for "
                    "real data", inp.CALIB_SEED)
        feeds = inp.synthetic_calibration(model.graph, n_tokens, window)
        info = inp.describe(feeds, "synthetic", seed=inp.CALIB_SEED)
        _check_runs(model, feeds)
    dup = inp.overlap(feeds, model.sample_inputs)
    if dup:
        log.warning("%d calibration sample(s) equal verification samples", dup)
        info = {**info, "rows_also_in_verify": dup}
    used = model.inputs_info.setdefault("calibration_used", [])
    if info not in used:
        used.append(info)
    log.info("calibration inputs: %s %s (%.1f s)", info["source"], info["shapes"],
             time.perf_counter() - t0)
    return feeds


def _check_runs(model: Model, feeds: dict[str, np.ndarray]) -> None:
    """Synthetic calibration inputs the model cannot run on: ask for real ones."""
    from rotaq import inputs as inp

    first = next(inp.chunks(model.graph, feeds, 1))
    try:
        model.graph.run(first)
    except RotaqError:
        raise
    except Exception as err:  # ORT / torch raise many types here
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RewriteError(f"the model fails on synthetic calibration inputs "
                           f"{inp.describe(first, '')['shapes']} ({msg[:200]}); give valid "
                           "inputs with --inputs FILE.npz (Python: inputs=...)") from err


def _text_feeds(model: Model, tok_dir: str, corpus: str, n_tokens: int, window: int
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from transformers import AutoTokenizer

    from rotaq import assets
    from rotaq import inputs as inp

    fixed = inp.input_specs(model.graph)["input_ids"][1][1:2]
    if fixed and isinstance(fixed[0], int):  # a graph with a fixed sequence length
        window = fixed[0]
    verify = model.inputs_info.get("verify", {})
    skip = 0
    if verify.get("source") == "text" and verify.get("text") == corpus:
        skip = -(-int(verify.get("tokens", 0)) // window)  # whole windows covering them
    tok = AutoTokenizer.from_pretrained(tok_dir)
    windows = assets.token_windows(tok, corpus, n_tokens + skip * window, window)[skip:]
    if not windows:
        raise RewriteError(f"calibration text '{corpus}' has fewer than {window} tokens "
                           "beyond the verification text")
    feeds = model.token_feeds(np.asarray(windows))
    feeds = {k: v for k, v in feeds.items() if k in set(model.graph.input_names)}
    info = inp.describe(feeds, "text", text=corpus, tokens=len(windows) * window,
                        skipped_tokens=skip * window or None)
    return feeds, info
