"""Calibration statistics of linear inputs, shared by the passes that need them.

``input_stats`` runs the model block by block (:mod:`rotaq.rewriter.blocks`) over calibration
windows a few at a time and accumulates, for every distinct input value of the chosen linears,
the Gram matrix ``G = X^T X`` (float64) and the mean absolute value per channel; memory stays at
one block's activations plus the Gram matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rotaq.inputs import chunks, rows_of
from rotaq.model import Model


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
    from rotaq.eval.stats import calibration_feeds

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
    from rotaq.rewriter.kv_capture import complete_feeds

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
                 batch: int = 2, desc: str = "calibrate") -> dict[str, np.ndarray]:
    """Each value over all tokens of ``feeds`` as float32 ``[tokens, channels]``, in one
    block-wise pass (across processes: every rank's rows, gathered in rank order)."""
    from rotaq import dist

    parts: dict[str, list[np.ndarray]] = {v: [] for v in values}

    def take(v: str, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        parts[v].append(x.reshape(-1, x.shape[-1]))

    capture_blockwise(model, sorted(set(values)), rank_rows(model, feeds), batch, take, desc)
    return {v: dist.gather_rows(np.concatenate(p)) for v, p in parts.items()}
