"""Block-wise calibrated quantization (GPTQ, static activations) in one pass over the model.

For each segment of the block runner (:mod:`rotaq.rewriter.blocks`): the readers' inputs are
captured from the block's stored inputs, the readers quantized, the writers' inputs captured
with the quantized readers (re-running only this block), the writers quantized, and the
rewritten block run once more to produce the next block's inputs. This is the sequential GPTQ of
the whole-graph loop (each group's Hessian from inputs computed after every earlier group was
quantized), with one block in memory and no session of the whole model.

Across processes (:mod:`rotaq.dist`): every rank runs its share of the calibration rows, the
per-linear ``X^T X`` (float64) and token counts are all-reduced, the solves of a group are
shared out round-robin and every rank applies every result, so the next block's inputs agree.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from rotaq import dist
from rotaq.inputs import rows_of
from rotaq.linalg.quant import search_act_clip
from rotaq.model import Model
from rotaq.rewriter.analysis import Analysis
from rotaq.rewriter.blocks import BlockRunner, SegmentRun

log = logging.getLogger(__name__)

CALIB_BATCH = 1  # rows per run: a row's activations do not depend on how rows are split
CLIP_ROWS = 2048  # rows (tokens) of an input the activation clip search scores, evenly spaced


def plan(a: Analysis, segs: list, keys: list[str]) -> dict[int, list[list[str]]]:
    """Groups of linears to calibrate, per segment: each residual block's readers, then its
    writers, then the other selected linears of the segment one at a time (graph order)."""
    wanted = set(keys)
    out: dict[int, list[list[str]]] = {}
    done: set[str] = set()
    for s in segs:
        groups = []
        for b in s.blocks:
            for part in (b.readers, b.writers):
                g = [k for k in part if k in wanted and k not in done and k in s.linears]
                if g:
                    groups.append(g)
                    done.update(g)
        groups += [[k] for k in s.linears if k in wanted and k not in done]
        done.update(k for k in s.linears if k in wanted)
        if groups:
            out[s.index] = groups
    rest = [k for k in keys if k not in done]  # linears of block b counted in another segment
    if rest:
        out.setdefault(len(segs) - 1, []).extend([k] for k in rest)
    return out


def shard_rows(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This rank's rows of ``feeds`` (all of them in a single process)."""
    sl = dist.shard(rows_of(feeds))
    return {k: v[sl] for k, v in feeds.items()}


def calibrate_blockwise(q: Any, model: Model, a: Analysis, keys: list[str],
                        feeds: dict[str, np.ndarray], grams: dict[str, np.ndarray],
                        spill: bool | str = False) -> tuple[dict[str, float], int, dict[str, float]]:
    """Quantize ``keys`` with ``q`` (a :class:`rotaq.passes.quantize.Quantize`) block by block;
    returns (relative weight error per linear, tokens a calibrated linear saw, the activation
    clip chosen per linear when ``q.a_clip_search`` is set)."""
    g = model.graph
    view = g.view()
    xin = {k: view.by_key[k].inputs[0] for k in keys}
    groups: dict[int, list[list[str]]] = {}
    search = bool(q.a_bits and q.a_mode == "dynamic" and q.a_clip_search)
    static = bool(q.a_bits and q.a_mode == "static")
    need_x = static or search
    n_rows = rows_of(feeds)  # the rows of every rank; the runner takes CALIB_BATCH (1) at a time
    errors: dict[str, float] = {}
    clips: dict[str, float] = {}
    seen = 0

    def calibrate(group: list[str], sr: SegmentRun) -> None:
        nonlocal seen
        values = sorted({xin[k] for k in group})
        xtx: dict[str, np.ndarray] = {}
        count: dict[str, int] = {}
        rows: dict[str, list[np.ndarray]] = {v: [] for v in values}
        for part in sr.each(values):
            for v in values:
                x = np.asarray(part[v])
                xs = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
                xtx[v] = xtx[v] + xs.T @ xs if v in xtx else xs.T @ xs
                count[v] = count.get(v, 0) + xs.shape[0]
                if need_x:  # static: every row; the clip search: ~CLIP_ROWS evenly spaced,
                    xr = x.reshape(-1, x.shape[-1])  # copied so the part's buffer is freed
                    step = 1 if static else max(1, n_rows * len(xr) // CLIP_ROWS)
                    rows[v].append(xr if step == 1 else np.ascontiguousarray(xr[::step]))
        for v in values:
            xtx[v] = dist.allreduce_sum(xtx[v])
            count[v] = dist.allreduce_int(count[v])
            seen = max(seen, count[v])
        xs_all = {v: dist.gather_rows(np.concatenate(rows[v])) for v in values} if need_x else {}
        for v in values if search else ():  # one clip per input, shared by the linears reading it
            readers = [k for k in group if xin[k] == v]
            best, _ = search_act_clip(xs_all[v], [g.get_linear(k)[0] for k in readers],
                                      q.a_clip_search, q.a_bits, q.a_symmetric)
            clips.update(dict.fromkeys(readers, best))

        def solve(key: str) -> tuple:
            v = xin[key]
            return q._solve(g.get_linear(key)[0], xtx[v], count[v], xs_all.get(v),
                            gram=grams.get(key), a_clip=clips.get(key))

        for key, sol in zip(group, dist.share(group, solve)):
            errors[key] = q._apply(g, key, sol)

    def hook(sr: SegmentRun) -> bool:
        todo = groups.get(sr.segment.index)
        if not todo:
            return False
        for group in todo:
            calibrate(group, sr)
        return True

    with BlockRunner(g, shard_rows(feeds), batch=CALIB_BATCH, spill=spill, keep_outputs=False,
                     analysis=a) as runner:
        groups.update(plan(a, runner.segments, keys))
        runner.run(hook, until=max(groups, default=-1), desc=f"quantize ({q.method})")
    return errors, seen, clips
