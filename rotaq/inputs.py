"""Sample (verification) and calibration inputs: synthetic, from the user, described for reports.

The two sets are always disjoint:

- a model with a known tokenizer verifies on Wikipedia text and calibrates on other text (Lee
  news by default; windows that overlap the verification tokens are skipped when the corpora
  are the same);
- a model without one verifies on synthetic inputs drawn with seed ``VERIFY_SEED`` (or its own
  example inputs) and calibrates on synthetic inputs drawn with ``CALIB_SEED``;
- user inputs (``--inputs FILE.npz``): arrays keyed by the model's input names, each with a
  leading sample axis (rows of the model's batch axis). With ``N >= 2`` rows the last
  ``ceil(N/4)`` verify and the first ``N - ceil(N/4)`` calibrate; one row only verifies. With a
  second file (``--verify-inputs``) the first file only calibrates and the second only verifies.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from typing import Any

import numpy as np

from rotaq.decoder_io import complete_feeds, is_cache_graph, token_feeds
from rotaq.errors import LoadError

log = logging.getLogger(__name__)
VERIFY_SEED = 0
VERIFY_ROWS = 8  # synthetic verification samples: enough that the error is representative
CALIB_SEED = 1
VERIFY_TEXT = "wiki"
Feeds = dict[str, np.ndarray]


def input_specs(g: Any) -> dict[str, tuple[np.dtype, list[int | None]]]:
    """Graph input name -> (numpy dtype, dims); ``None`` for a symbolic (dynamic) dim (each graph
    says, ``g.input_specs()``); empty for a graph without specs to check against."""
    return g.input_specs() if hasattr(g, "input_specs") else {}


def token_vocab(g: Any, name: str = "input_ids") -> int | None:
    """Rows of the embedding that input ``name`` indexes (directly or through a Cast/Reshape);
    the smallest embedding when none is found that way; ``None`` without embeddings."""
    view = g.view()
    embs = [n for n in view.nodes if n.op == "embedding"]
    for n in embs:
        v, hops = n.inputs[0], 0
        while v != name and hops < 4 and v in view.producer and view.producer[v].inputs:
            v, hops = view.producer[v].inputs[0], hops + 1
        if v == name:
            return int(n.params["num_embeddings"])
    return min((int(n.params["num_embeddings"]) for n in embs), default=None)


def synthetic(g: Any, seed: int, rows: int = 1, seq_len: int = 32) -> Feeds:
    """Random feeds from the graph's input specs: ``rows`` batches on the batch axis (of the
    graph's fixed batch size, or of one row), ``seq_len`` on other dynamic axes; token ids below
    the embedding size, masks all ones, floats N(0, 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dtype, dims) in input_specs(g).items():
        fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
        shape = [d if d and i else (rows * (d or 1) if i == 0 else seq_len)
                 for i, d in enumerate(fixed)]
        if np.issubdtype(dtype, np.integer):
            if "mask" in name:
                feeds[name] = np.ones(shape, dtype)
            elif "type" in name:
                feeds[name] = np.zeros(shape, dtype)
            else:
                vocab = token_vocab(g, name) or 100
                feeds[name] = rng.integers(0, vocab, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = np.ones(shape, dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    if is_cache_graph(g) and "input_ids" in feeds:  # a KV-cache graph: prefills, empty pasts
        feeds = token_feeds(g, feeds["input_ids"])
    return feeds


def synthetic_calibration(g: Any, n_tokens: int, window: int, seed: int = CALIB_SEED) -> Feeds:
    """About ``n_tokens`` positions of synthetic calibration input: sequences of ``window``
    positions when an input has a dynamic axis after the batch, else one position per row for
    rank-2 inputs and ``n_tokens // window`` samples for fixed-shape ones (e.g. audio frames)."""
    specs = input_specs(g)
    dyn_seq = any(None in dims[1:] for _, dims in specs.values())
    ranks = {len(dims) for _, dims in specs.values()}
    per_row = window if dyn_seq or max(ranks, default=2) > 2 else 1
    rows = max(2, n_tokens // per_row)
    return synthetic(g, seed, rows=rows, seq_len=window)


def rows_of(feeds: Feeds) -> int:
    return int(next(iter(feeds.values())).shape[0]) if feeds else 0


def describe(feeds: Feeds, source: str, **extra: Any) -> dict[str, Any]:
    """What a report says about an input set: source, shapes, samples and how it was made."""
    d = {"source": source, "shapes": {k: list(v.shape) for k, v in feeds.items()},
         "samples": rows_of(feeds)}
    d.update({k: v for k, v in extra.items() if v is not None})
    return d


def overlap(a: Feeds, b: Feeds) -> int:
    """Rows of ``a`` that also occur in ``b`` (same values in every input)."""
    keys = [k for k in a if k in b and a[k].shape[1:] == b[k].shape[1:]]
    if not keys or len(keys) != len(a):
        return 0
    seen = {tuple(np.ascontiguousarray(b[k][i]).tobytes() for k in keys)
            for i in range(rows_of(b))}
    return sum(tuple(np.ascontiguousarray(a[k][i]).tobytes() for k in keys) in seen
               for i in range(rows_of(a)))


# ---- user inputs ----------------------------------------------------------------------------
def read(src: Any, what: str = "--inputs") -> tuple[Feeds, str]:
    """An .npz path or a dict of arrays -> (feeds, a label for reports)."""
    if isinstance(src, dict):
        return {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
                for k, v in src.items()}, "arrays"
    if not isinstance(src, (str, os.PathLike)):
        raise LoadError(f"{what}: expected an .npz path or a dict of arrays, "
                        f"not {type(src).__name__}")
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise LoadError(f"{what} {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise LoadError(f"{what} {path}: not an .npz archive (write one with numpy.savez)")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise LoadError(f"{what} {path}: not an .npz archive (save one with numpy.savez)")
        with z:
            feeds = {k: z[k] for k in z.files}
    except LoadError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise LoadError(f"{what} {path}: not a readable .npz archive: {err}") from err
    return feeds, os.path.abspath(path)


def _fmt(dims: list[int | None]) -> str:
    return "[" + ", ".join("N" if i == 0 else ("?" if d is None else str(d))
                           for i, d in enumerate(dims)) + "]"


def _is_float(dt: np.dtype) -> bool:
    return np.issubdtype(dt, np.floating) or "float" in np.dtype(dt).name  # ml_dtypes bfloat16


def validate(g: Any, feeds: Feeds, label: str) -> Feeds:
    """Check ``feeds`` against the graph inputs (names, ranks, fixed dims, dtype kind) and cast
    to the model's dtypes; raise :class:`LoadError` naming the input and what is expected.
    For a KV-cache graph, tokens suffice: the mask, positions and empty pasts are filled in."""
    feeds = complete_feeds(g, feeds)
    specs = input_specs(g)
    missing = [k for k in specs if k not in feeds]
    if missing:
        k = missing[0]
        raise LoadError(f"{label}: no array for input '{k}' (expected {_fmt(specs[k][1])} "
                        f"{specs[k][0]}; the model's inputs: {', '.join(specs)})")
    extra = [k for k in feeds if k not in specs]
    if extra:
        raise LoadError(f"{label}: '{extra[0]}' is not an input of the model (its inputs: "
                        f"{', '.join(specs)})")
    out, n = {}, None
    for k, (dtype, dims) in specs.items():
        v, want = feeds[k], f"{_fmt(dims)} {dtype}"
        if v.ndim != len(dims):
            raise LoadError(f"{label}: input '{k}' has shape {list(v.shape)} (rank {v.ndim}); "
                            f"expected {want} (rank {len(dims)}, samples first)")
        for i, (d, have) in enumerate(zip(dims, v.shape)):
            if i > 0 and d is not None and d != have:
                raise LoadError(f"{label}: input '{k}' has shape {list(v.shape)}; expected "
                                f"{want} (axis {i} must be {d})")
        same_kind = (np.issubdtype(v.dtype, np.integer) and np.issubdtype(dtype, np.integer)) or \
            (_is_float(v.dtype) and _is_float(dtype)) or v.dtype == dtype
        if not same_kind:
            raise LoadError(f"{label}: input '{k}' has dtype {v.dtype}; expected {want}")
        if n is None:
            n = v.shape[0]
        elif v.shape[0] != n:
            raise LoadError(f"{label}: input '{k}' has {v.shape[0]} samples, others {n} "
                            "(the leading axis counts samples and must agree)")
        out[k] = np.ascontiguousarray(v.astype(dtype, copy=False))
    if not n:
        raise LoadError(f"{label}: no samples (the leading axis is empty)")
    return out


def split(feeds: Feeds) -> tuple[Feeds | None, Feeds]:
    """(calibration, verification): the last ``ceil(N/4)`` rows verify, the others calibrate;
    a single row only verifies."""
    n = rows_of(feeds)
    if n < 2:
        return None, feeds
    k = math.ceil(n / 4)
    return ({key: v[: n - k] for key, v in feeds.items()},
            {key: v[n - k:] for key, v in feeds.items()})


def user_inputs(g: Any, inputs: Any, verify_inputs: Any = None
                ) -> tuple[Feeds | None, Feeds | None, dict[str, Any]]:
    """(calibration, verification, descriptions) from the user's arrays; ``None`` for a part
    they do not give."""
    info: dict[str, Any] = {}
    calib = verify = None
    if inputs is not None:
        feeds, label = read(inputs)
        feeds = validate(g, feeds, f"--inputs {label}")
        if verify_inputs is None:
            calib, verify = split(feeds)
            n = rows_of(feeds)
            if calib is not None:
                info["calibration"] = describe(calib, "user", file=label,
                                               rows=f"0..{rows_of(calib) - 1} of {n}")
            info["verify"] = describe(verify, "user", file=label,
                                      rows=f"{n - rows_of(verify)}..{n - 1} of {n}")
        else:
            calib = feeds
            info["calibration"] = describe(calib, "user", file=label)
    if verify_inputs is not None:
        feeds, label = read(verify_inputs, "--verify-inputs")
        verify = validate(g, feeds, f"--verify-inputs {label}")
        info["verify"] = describe(verify, "user", file=label)
    if calib is not None and verify is not None:
        dup = overlap(verify, calib)
        if dup:
            log.warning("%d verification sample(s) also appear in the calibration inputs", dup)
            info["verify"]["rows_also_in_calibration"] = dup
    return calib, verify, info


# ---- running several samples through a fixed-batch graph ------------------------------------
def batch_capacity(g: Any) -> int | None:
    """The fixed batch size of the graph's inputs (``None`` when the batch axis is dynamic)."""
    fixed = {dims[0] for _, dims in input_specs(g).values() if dims and isinstance(dims[0], int)}
    return min(fixed) if fixed else None


def chunks(g: Any, feeds: Feeds, batch: int | None = None):
    """``feeds`` in pieces of at most ``batch`` rows (and never more than the graph's fixed
    batch size)."""
    n, cap = rows_of(feeds), batch_capacity(g)
    step = min(x for x in (batch, cap, n) if x) if n else 1
    if cap and n % cap:
        raise LoadError(f"the model takes batches of exactly {cap}; the inputs have {n} samples")
    for i in range(0, n, step):
        yield {k: v[i:i + step] for k, v in feeds.items()}


def run(g: Any, feeds: Feeds) -> list[np.ndarray]:
    """``g.run`` over all rows of ``feeds``, in fixed-size batches when the graph needs them
    (outputs concatenated on the batch axis)."""
    cap = batch_capacity(g)
    if not cap or rows_of(feeds) <= cap:
        return g.run(feeds)
    parts = [g.run(c) for c in chunks(g, feeds)]
    return [np.concatenate(outs, axis=0) for outs in zip(*parts)]
