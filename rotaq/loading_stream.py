"""The streaming route of :func:`rotaq.load`: a decoder-only HF directory (or built-in) taken
to ONNX without its weights in memory (:mod:`rotaq.rewriter.stream_export`), cached under
the rotaq cache (a cache that cannot be written or read is skipped, never needed), and
loaded with its external data left on disk (:mod:`rotaq.rewriter.onnx_store`).

Used for ``ir="onnx"`` with the KV cache; the torch (FX) route stays for ``ir="fx"``
(``-o x.pt2``, torch modules, ``--no-kv-cache``) and for models this route does not take
(other families, sliding windows, no safetensors).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Any

import numpy as np

from rotaq.errors import LoadError
from rotaq.inputs import describe
from rotaq.model import Model

log = logging.getLogger(__name__)
STREAM_VERSION = "2"  # bump when the streaming capture changes (2: stamped blocks)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def hf_dir_of(src: Any) -> str | None:
    """The HF directory behind a built-in name or a directory path, else None."""
    if not isinstance(src, (str, os.PathLike)):
        return None
    path = os.fspath(src)
    from rotaq import assets

    if path in assets.BUILTIN_MODELS:
        if assets.BUILTIN_MODELS[path].kind != assets.KIND_CAUSAL_LM:
            return None
        return str(assets.builtin_model_dir(path))
    return path if os.path.isdir(path) else None


def streams(src: Any, kv: bool = True, dtype: str | None = None) -> bool:
    """Whether :func:`rotaq.load` with ``ir="onnx"`` takes the streaming route for ``src``:
    a supported decoder with its KV cache, captured in the output dtype ``dtype`` (fp32, fp16
    or bf16; None: the source's own)."""
    if not kv or os.environ.get("ROTAQ_NO_STREAM"):
        return False
    path = hf_dir_of(src)
    if path is None:
        return False
    from rotaq.rewriter.stream_export import is_supported

    return is_supported(path)


def _tag(path: str, dtype: str = "float32") -> str:
    import torch

    stamp = [] if dtype == "float32" else [dtype]  # fp32 keeps its cached captures
    for f in sorted(os.listdir(path)):
        if f.endswith((".safetensors", ".json")):
            st = os.stat(os.path.join(path, f))
            stamp.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    key = f"{os.path.abspath(path)}|{'|'.join(stamp)}|{torch.__version__}|{STREAM_VERSION}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def load_stream(src: str, seq_len: int, dtype: str | None = None) -> Model:
    """The streaming capture of built-in or directory ``src`` as a Model (ONNX form), its
    graph and weights in ``dtype`` (default: the source's own)."""
    from rotaq import assets
    from rotaq.dtypes import hf_source_dtype, output_dtype, torch_dtype
    from rotaq.rewriter import stream_export
    from rotaq.rewriter.onnx import OnnxGraph

    path = hf_dir_of(src)
    assert path is not None
    dt = output_dtype(hf_source_dtype(path), dtype)
    tdt = torch_dtype(dt)
    builtin = os.fspath(src) in assets.BUILTIN_MODELS
    name = os.fspath(src) if builtin else os.path.abspath(path)
    label = os.fspath(src) if builtin else os.path.basename(os.path.normpath(path))
    source = {"name": name, "kind": assets.KIND_CAUSAL_LM}
    if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        source["tokenizer"] = os.path.abspath(path)
    meta = {f"rotaq.{k}": str(v) for k, v in source.items()}
    graph = None
    try:
        folder = assets.cache_dir() / "exported"
        folder.mkdir(parents=True, exist_ok=True)
        cached = str(folder / f"{label}-stream-{_tag(path, dt)}.onnx")
    except OSError as err:
        log.warning("rotaq cache not writable (%s): capturing into a temporary folder", err)
        cached = None
    if cached and os.path.exists(cached):
        try:
            graph = OnnxGraph.load(cached)
        except LoadError as err:
            log.warning("cached capture %s unreadable (%s); capturing again", cached, err)
    if graph is None:
        if cached:
            try:
                stream_export.export(path, cached, meta, dtype=tdt)
                graph = OnnxGraph.load(cached)
            except OSError as err:
                log.warning("cannot write the cache %s (%s): using a temporary folder", cached,
                            err)
        if graph is None:
            tmp = tempfile.mkdtemp(prefix="rotaq-stream-")
            out = os.path.join(tmp, "model.onnx")
            stream_export.export(path, out, meta, dtype=tdt)
            graph = OnnxGraph.load(out)  # data files stay open: the folder may go
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    graph.metadata.update(meta)
    feeds, info = _sample(graph, source, seq_len)
    return Model(graph, feeds, source, inputs_info={"verify": info})


def _sample(g: Any, source: dict, seq_len: int) -> tuple[dict[str, np.ndarray], dict]:
    from rotaq.loading_inputs import sample_for

    if source.get("tokenizer"):
        return sample_for(g, source, seq_len)
    from rotaq.decoder_io import complete_feeds
    from rotaq.inputs import VERIFY_ROWS, VERIFY_SEED, token_vocab

    vocab = token_vocab(g) or 2
    ids = np.random.default_rng(VERIFY_SEED).integers(0, vocab, (VERIFY_ROWS, seq_len))
    feeds = complete_feeds(g, {"input_ids": ids.astype(np.int64)})
    return feeds, describe(feeds, "synthetic", seed=VERIFY_SEED)
