"""LLM.int8() mixed-precision decomposition (Dettmers et al. 2022), as pure array math.

A linear ``y = x W^T + b`` (x [..., n], W [m, n]) splits over a set ``O`` of input columns:

    y = x[..., O] W[:, O]^T + (x * mask) W'^T + b,   mask = 0 on O, 1 elsewhere,
                                                      W' = W with the columns O zeroed.

Proof: ``x W^T = sum_j x_j W[:, j]^T``; the columns in ``O`` are the first term, the others the
second (``(x * mask)_j = x_j`` and ``W'[:, j] = W[:, j]`` for ``j`` not in ``O``; for ``j`` in
``O`` both factors of the second term vanish, so each column is counted once). The rewrite is
exact in real arithmetic; the int8 path then quantizes ``x * mask`` (whose per-tensor scale no
longer sees the outlier columns) and ``W'`` (per output channel), while the outlier columns run
as a small float MatMul on the gathered ``x[..., O]``.

The columns come from calibration: the per-column maximum of ``|x|`` over all calibration
tokens, against a threshold (6.0 in the paper) or the ``top_k`` largest.
"""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 6.0


def column_absmax(x: np.ndarray) -> np.ndarray:
    """``max |x[..., j]|`` over all leading axes: float64 ``[n]``."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("column_absmax needs at least one axis")
    return np.abs(x.reshape(-1, x.shape[-1])).max(axis=0).astype(np.float64)


def merge_absmax(acc: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """Running ``column_absmax`` over chunks of rows: ``acc`` updated with the chunk ``x``."""
    cur = column_absmax(x)
    if acc is None:
        return cur
    if acc.shape != cur.shape:
        raise ValueError(f"column counts differ: {acc.shape} vs {cur.shape}")
    return np.maximum(acc, cur)


def select_columns(absmax: np.ndarray, threshold: float = DEFAULT_THRESHOLD, top_k: int = 0,
                   max_columns: int = 0) -> np.ndarray:
    """Outlier input columns, sorted ascending (int64).

    ``top_k > 0``: the ``top_k`` columns of largest ``absmax`` (ties broken by index);
    otherwise every column with ``absmax > threshold``. ``max_columns > 0`` keeps at most that
    many, the largest first. Non-finite statistics are refused.
    """
    a = np.asarray(absmax, np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError("column statistics must be finite")
    if top_k < 0 or max_columns < 0:
        raise ValueError("top_k and max_columns must be >= 0")
    if top_k == 0 and not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    order = np.argsort(-a, kind="stable")  # largest first; equal values by index
    if top_k > 0:
        cols = order[: min(top_k, a.size)]
    else:
        cols = order[a[order] > threshold]
    if max_columns > 0:
        cols = cols[:max_columns]
    return np.sort(cols).astype(np.int64)


def column_mask(n: int, cols: np.ndarray) -> np.ndarray:
    """``[n]`` float64: 0 on ``cols``, 1 elsewhere."""
    cols = _check_cols(n, cols)
    m = np.ones(n)
    m[cols] = 0.0
    return m


def split_weight(w: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(W', W[:, O])`` in float64: ``W'`` is ``W`` with the columns ``O`` zeroed, ``W[:, O]``
    the ``[m, |O|]`` block the float branch multiplies with."""
    w = np.asarray(w, np.float64)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got {w.shape}")
    cols = _check_cols(w.shape[1], cols)
    rest = w.copy()
    rest[:, cols] = 0.0
    return rest, w[:, cols].copy()


def decomposed(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, cols: np.ndarray,
               quant_x=None, quant_w=None) -> np.ndarray:
    """``x[..., O] W[:, O]^T + qx(x * mask) qw(W')^T + b``: the decomposed linear, float64.

    ``quant_x`` / ``quant_w`` (optional callables) fake-quantize the int8 path's activation and
    weight; without them the result equals ``x W^T + b`` up to rounding.
    """
    x = np.asarray(x, np.float64)
    rest, out_cols = split_weight(w, cols)
    xm = x * column_mask(x.shape[-1], cols)
    if quant_x is not None:
        xm = quant_x(xm)
    if quant_w is not None:
        rest = quant_w(rest)
    y = x[..., cols] @ out_cols.T + xm @ rest.T
    return y if bias is None else y + np.asarray(bias, np.float64)


def _check_cols(n: int, cols: np.ndarray) -> np.ndarray:
    cols = np.asarray(cols, np.int64).reshape(-1)
    if cols.size and (cols.min() < 0 or cols.max() >= n):
        raise ValueError(f"column indices out of range [0, {n})")
    if np.unique(cols).size != cols.size:
        raise ValueError("column indices repeat")
    return cols
