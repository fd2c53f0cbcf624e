"""Latency and size benchmarks: warm batch-1 forward passes in ONNX Runtime (CPU) or PyTorch.

``bench`` times a full forward pass for each sequence length and reports the median and p90 in
milliseconds, the model's size on disk, and (ORT) the op types of ORT's optimized graph, which
shows what its fusions made of a rewrite (e.g. MatMulNBits, QLinearMatMul, SkipLayerNorm).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from rotaq.decoder_io import CacheRunner, has_cache
from rotaq.errors import LoadError, RotaqError
from rotaq.model import Model
from rotaq.progress import stage

log = logging.getLogger(__name__)

__all__ = ["bench", "onnx_files", "peak_rss_mib", "time_alternating", "time_calls"]
DECODE_CONTEXTS = (128, 1024)

_ORT_TYPES = {
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
}
_ID_RANGE = 32  # synthetic token ids are drawn from [0, 32): valid for any real vocabulary


# ---- inputs ---------------------------------------------------------------------------------
def _feeds(specs: dict[str, tuple[Any, Sequence[Any]]], n: int) -> dict[str, np.ndarray]:
    """Batch-1 inputs with ``n`` tokens: dynamic dim 0 -> 1, other dynamic dims -> ``n``;
    masks are ones, token types zeros, positions 0..n-1, other ids random in [0, 32)."""
    from rotaq.decoder_io import is_past

    rng = np.random.default_rng(0)
    out = {}
    for name, (dtype, shape) in specs.items():
        dims = [d if isinstance(d, int) and d > 0 else (1 if i == 0 and len(shape) > 1 else n)
                for i, d in enumerate(shape)]
        if is_past(name):  # a KV-cache graph: a prefill of n tokens (empty past)
            dims[2] = 0
        dtype = np.dtype(dtype)
        low = name.lower()
        if dtype.kind in "iub":
            if "mask" in low:
                arr = np.ones(dims, dtype)
            elif "type" in low:
                arr = np.zeros(dims, dtype)
            elif "position" in low:
                arr = np.broadcast_to(np.arange(dims[-1]), dims).astype(dtype)
            else:
                arr = rng.integers(0, _ID_RANGE, size=dims).astype(dtype)
        else:
            arr = rng.standard_normal(dims).astype(dtype)
        out[name] = arr
    return out


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    """Median, p90, min and mean milliseconds of ``repeats`` consecutive calls of ``fn``."""
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(ms)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "min_ms": float(a.min()), "mean_ms": float(a.mean())}


def time_alternating(fns: dict[str, Callable[[], Any]], warmup: int,
                     repeats: int) -> dict[str, float]:
    """Median milliseconds per function, the functions called in turn (A B A B ...) so that all
    see the same machine load: on a shared machine the ratio of these medians is the figure
    to compare, not the absolute times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ms: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ms[k].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in ms.items()}


# ---- files ----------------------------------------------------------------------------------
def _tensors(graph: Any):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def onnx_files(path: str) -> list[str]:
    """``path`` plus the external data files its tensors point to (absolute, existing)."""
    import onnx

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise LoadError(f"cannot load {path}: not a valid ONNX model (truncated or corrupt): "
                        f"{type(err).__name__}: {_first_line(err)}") from err
    folder = os.path.dirname(os.path.abspath(path))
    files = [os.path.abspath(path)]
    for t in _tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            f = os.path.join(folder, loc) if loc else None
            if f and f not in files:
                if not os.path.isfile(f):
                    raise RotaqError(f"{path}: external data file {loc} is missing")
                files.append(f)
    return files


# ---- ORT ------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _ort_session(path: str, threads: int) -> tuple[Any, dict[str, int] | None]:
    from rotaq.backends.ort import ort_kernel_report, ort_session

    try:
        sess = ort_session(path, "all", threads=threads)
    except Exception as err:
        raise RotaqError(f"ONNX Runtime cannot load {path}: {type(err).__name__}: "
                         f"{_first_line(err)}") from err
    try:
        ops = ort_kernel_report(path)
    except Exception as err:  # noqa: BLE001 - the timing is still valid without it
        log.warning("could not write ORT's optimized model (%s: %s); optimized_ops omitted",
                    type(err).__name__, _first_line(err))
        ops = None
    return sess, ops


def _onnx_path(model_or_path: Model | str, tmp: str) -> tuple[str, str]:
    """An ONNX file on disk for the model (saved into ``tmp`` when only in memory) + its name."""
    import rotaq

    if isinstance(model_or_path, Model):
        model, name = model_or_path, model_or_path.source.get("name", "")
    else:
        src = os.fspath(model_or_path)
        if src.lower().endswith(".onnx") and os.path.isfile(src):
            return os.path.abspath(src), os.path.abspath(src)
        model, name = rotaq.load(src, ir="onnx"), src
        on_disk = getattr(model.graph, "source", None)
        if model.ir == "onnx" and on_disk and os.path.isfile(on_disk):
            return on_disk, name  # freshly loaded, unmodified: the cached export itself
    path = os.path.join(tmp, "model", "model.onnx")
    model.save(path, tokenizer=False)  # an FX model is exported to ONNX here
    return path, name


def _bench_ort(model_or_path: Model | str, tokens: Sequence[int], repeats: int, warmup: int,
               threads: int, progress: bool,
               contexts: Sequence[int] = DECODE_CONTEXTS) -> dict[str, Any]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="rotaq-bench-", ignore_cleanup_errors=True) as tmp:
        path, name = _onnx_path(model_or_path, tmp)
        files = onnx_files(path)
        size = sum(os.path.getsize(f) for f in files)
        with stage("ONNX Runtime session and its optimized graph"):
            sess, ops = _ort_session(path, threads)
        specs = {i.name: (_ORT_TYPES.get(i.type, np.float32), list(i.shape))
                 for i in sess.get_inputs()}
        outs = [o.name for o in sess.get_outputs()]
        cache = has_cache(specs)
        runner = CacheRunner(path, session=sess) if cache else None
        timings = {}
        for n in tqdm(tokens, desc="bench", unit="len", file=sys.stderr, disable=not progress,
                      leave=False):
            # a cache graph: a prefill of n tokens from an empty past
            feeds = runner.spec.feeds(np.random.default_rng(0).integers(0, _ID_RANGE, (1, n))) \
                if cache else _feeds(specs, n)
            with stage(f"timing {n} tokens ({warmup} + {repeats} runs)"):
                timings[str(n)] = time_calls(lambda f=feeds: sess.run(outs, f), warmup, repeats)
        decode = {str(c): _time_decode(runner, c, warmup, repeats) for c in contexts} \
            if cache else None
        kept = [f if not f.startswith(os.path.abspath(tmp)) else os.path.basename(f)
                for f in files]
    res = {"model": name, "backend": "ort", "ort_version": ort.__version__, "threads": threads,
           "tokens": timings, "size_bytes": size, "size_mib": round(size / 2**20, 2),
           "files": kept, "optimized_ops": ops, "kv_cache": cache, "peak_rss_mib": peak_rss_mib()}
    if cache:
        res["decode"] = decode
    return res


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB; everything it loaded counts)."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 1024, 1)


def _time_decode(runner: CacheRunner, context: int, warmup: int,
                 repeats: int) -> dict[str, float]:
    """Prefill ``context`` tokens, then time single-token steps with the presents fed back
    (the cache grows by one per step: ``warmup`` + ``repeats`` steps after the context)."""
    rng = np.random.default_rng(1)
    with stage(f"decode after {context} tokens ({warmup} + {repeats} steps)"):
        runner.prefill(rng.integers(0, _ID_RANGE, (1, context)))
        tok = np.zeros((1, 1), np.int64)
        t = time_calls(lambda: runner.run(tok), warmup, repeats)
    t["tokens_per_s"] = 1e3 / t["median_ms"]
    return t


# ---- torch ----------------------------------------------------------------------------------
def _weight_bytes(gm: Any) -> int:
    seen, total = set(), 0
    for t in list(gm.state_dict(keep_vars=True).values()) + [
            v for v in vars(gm).values() if hasattr(v, "untyped_storage")]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _bench_torch(model_or_path: Model | str, tokens: Sequence[int], repeats: int, warmup: int,
                 threads: int, progress: bool) -> dict[str, Any]:
    import torch

    import rotaq

    pt2 = None
    if isinstance(model_or_path, Model):
        model = model_or_path
    else:
        src = os.fspath(model_or_path)
        if src.lower().endswith(".onnx"):
            raise RotaqError(f"{src} is an ONNX file: benchmark it with --backend ort")
        model = rotaq.load(src)
        pt2 = os.path.abspath(src) if src.lower().endswith(".pt2") else None
    from rotaq.decoder_io import is_past

    if model.ir != "fx":
        raise RotaqError("the torch backend needs a torch (FX) model; this one is ONNX: use "
                         "--backend ort")
    if pt2:
        size, source, files = os.path.getsize(pt2), "file", [pt2]
    else:  # no file on disk: count the weights held in memory
        size, source, files = _weight_bytes(model.graph.gm), "weights", []
    specs = {k: (v.dtype, [None, v.shape[1], 0, v.shape[3]] if is_past(k) else [None] * v.ndim)
             for k, v in model.sample_inputs.items()}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timings = {}
        for n in tqdm(tokens, desc="bench", unit="len", file=sys.stderr, disable=not progress,
                      leave=False):
            feeds = _feeds(specs, n)
            with stage(f"timing {n} tokens ({warmup} + {repeats} runs)"):
                timings[str(n)] = time_calls(lambda f=feeds: model.graph.run(f), warmup,
                                             repeats)
    finally:
        torch.set_num_threads(before)
    return {"model": model.source.get("name", "") if pt2 is None else pt2, "backend": "torch",
            "torch_version": torch.__version__, "threads": threads, "tokens": timings,
            "size_bytes": size, "size_mib": round(size / 2**20, 2), "size_source": source,
            "files": files, "optimized_ops": None}


# ---- compiled artefacts (rotaq compile) ---------------------------------------------------
def _artifact_model(src: Any) -> str | None:
    if isinstance(src, (str, os.PathLike)) and os.path.isfile(os.path.join(src, "metadata.json")):
        return os.fspath(src)
    return None


def _bench_artifact(src: Any, backend: str, tokens: Sequence[int], repeats: int, warmup: int,
                    threads: int, progress: bool,
                    contexts: Sequence[int] = DECODE_CONTEXTS) -> dict[str, Any]:
    """A ``rotaq compile`` folder: ort -> its optimized ONNX; tvm -> the compiled buckets."""
    from rotaq.backends.artifact import read_metadata

    folder = _artifact_model(src)
    if folder is None:
        raise RotaqError(f"{src}: --backend {backend} needs a `rotaq compile` folder")
    meta = read_metadata(folder)
    if meta["backend"] == "ort":
        res = _bench_ort(os.path.join(folder, meta["model_file"]), tokens, repeats, warmup,
                         threads, progress)
        res["model"] = folder
        return res
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
    from rotaq.backends import tvm as tb

    model = tb.load(folder)
    files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
    size = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    timings = {}
    for n in tqdm(tokens, desc="bench", unit="len", file=sys.stderr, disable=not progress,
                  leave=False):
        feeds = model.graph.sample_feeds(n)  # as compiled: only token axes take n
        with stage(f"timing {n} tokens ({warmup} + {repeats} runs)"):
            timings[str(n)] = time_calls(lambda f=feeds: model.graph.run(f), warmup, repeats)
    res = {"model": folder, "backend": "tvm", "tvm_version": meta.get("tvm_version"),
           "target": meta.get("target"), "threads": threads, "tokens": timings,
           "size_bytes": size, "size_mib": round(size / 2**20, 2), "files": files,
           "optimized_ops": None}
    if model.graph.decode_vms:  # a cache graph compiled with decode steps
        from rotaq.backends.tvm_decode import TvmCacheRunner

        runner = TvmCacheRunner(model.graph)
        top = max(model.graph.buckets(), default=0)  # the longest prompt the artefact runs
        fit = [int(c) for c in contexts if int(c) <= top]
        res["decode"] = {str(c): _time_decode(runner, c, warmup, repeats) for c in fit}
        if len(fit) < len(contexts):
            res["decode_skipped"] = (
                f"contexts {[int(c) for c in contexts if int(c) > top]} need a prompt longer "
                f"than the longest compiled length ({top}); compile with --tokens up to the "
                "context")
            log.warning("bench: %s", res["decode_skipped"])
    res["peak_rss_mib"] = peak_rss_mib()
    return res


# ---- entry point ----------------------------------------------------------------------------
def bench(model_or_path: Model | str, backend: str = "ort", tokens: Sequence[int] = (1, 16, 512),
          repeats: int = 20, warmup: int = 3, threads: int = 2,
          progress: bool = True, contexts: Sequence[int] = DECODE_CONTEXTS) -> dict[str, Any]:
    """Median / p90 latency (ms) of a warm batch-1 forward pass for each token count.

    ``model_or_path``: a Model, an .onnx/.pt2 file, a model directory or a built-in name (for
    ``backend="ort"`` a built-in is run from its cached ONNX export). Keys: ``model``,
    ``backend``, ``threads``, ``tokens`` ({"n": {median_ms, p90_ms, min_ms, mean_ms}}),
    ``size_bytes`` / ``size_mib`` (MiB = 2**20 bytes; the .onnx plus its external data, or the
    .pt2, or for an in-memory torch model its weight bytes), ``files``, ``optimized_ops`` (op type -> count in
    ORT's optimized graph, None for torch or when it could not be written).

    ORT also reports ``peak_rss_mib`` (this process's peak) and ``kv_cache``. A decoder with a
    KV cache (``past_key_values.*`` inputs) is timed as it generates: ``tokens`` are prefills
    from an empty past, and ``decode`` gives, for each context in ``contexts``, the latency of
    single-token steps after prefilling that many tokens (``median_ms``, ``tokens_per_s``, ...).
    """
    tokens = [int(n) for n in tokens]
    if not tokens or min(tokens) < 1:
        raise RotaqError(f"token counts must be positive integers, got {tokens}")
    if not contexts or min(int(c) for c in contexts) < 1:
        raise RotaqError(f"decode contexts must be positive integers, got {list(contexts)}")
    if repeats < 1 or warmup < 0 or threads < 1:
        raise RotaqError(f"need repeats >= 1, warmup >= 0, threads >= 1 (got {repeats}, "
                         f"{warmup}, {threads})")
    if backend == "tvm" or (backend == "ort" and _artifact_model(model_or_path)):
        return _bench_artifact(model_or_path, backend, tokens, repeats, warmup, threads,
                               progress, [int(c) for c in contexts])
    if backend == "ort":
        return _bench_ort(model_or_path, tokens, repeats, warmup, threads, progress,
                          [int(c) for c in contexts])
    if backend == "torch":
        return _bench_torch(model_or_path, tokens, repeats, warmup, threads, progress)
    raise RotaqError(f"backend must be 'ort', 'torch' or 'tvm', not '{backend}'")
