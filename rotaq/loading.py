"""``rotaq.load``: a torch module, an ExportedProgram, a .pt2 / .onnx file, a Hugging Face model
directory or a built-in model name, captured into a :class:`~rotaq.model.Model`."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import numpy as np

from rotaq import tags
from rotaq.errors import LoadError
from rotaq.inputs import describe
from rotaq.loading_inputs import as_numpy, cache_feeds, sample_for, text_sample, use_tokenizer
from rotaq.model import Model, resolve_source
from rotaq.progress import stage

log = logging.getLogger(__name__)
CAPTURE_VERSION = "2"  # bump when capture changes, to invalidate cached exports


def load(src: Any, example_inputs: Any = None, *, ir: str = "fx", seq_len: int = 32,
         inputs: Any = None, verify_inputs: Any = None, tokenizer: str | None = None,
         kv_cache: bool = True, dtype: str | None = None) -> Model:
    """Capture ``src`` as a Model.

    - ``torch.nn.Module`` (+ ``example_inputs``: dict of tensors, or a tuple for positional
      inputs): captured with torch.export (Hugging Face models with ``use_cache=False``);
    - ``torch.export.ExportedProgram``;
    - a path: ``.pt2``, ``.onnx`` (external data next to it), or a local HF model directory;
    - a built-in name (``smollm2-135m``, ``minilm-l6``).

    ``ir="onnx"`` gives the ONNX form of a torch source (exported once and cached for
    built-ins).

    A decoder-only causal LM (torch module fed tokens, HF directory, GGUF, built-in) is captured
    with its KV cache as explicit inputs/outputs (:mod:`rotaq.rewriter.kv_capture`); its sample
    and calibration inputs are full prefills (empty pasts). ``kv_cache=False`` captures it
    without (logits only, the whole prefix recomputed per token).

    Sample inputs (what rewrites are verified on) and calibration inputs never share a row (see
    :mod:`rotaq.inputs`): ``inputs`` (an .npz path or a dict of arrays keyed by input name,
    samples first) gives both, split last quarter / rest, or only calibration when
    ``verify_inputs`` is given too; ``tokenizer`` (a Hugging Face tokenizer directory) makes
    a model without rotaq metadata use real text.

    ``dtype`` (``fp32`` / ``fp16`` / ``bf16``) is the dtype the model is captured and rewritten
    in; default: the source's own (:mod:`rotaq.dtypes`). A torch source is converted before
    capture (a copy); a captured fp16/bf16 graph (.onnx / .pt2) can only be widened to fp32.
    """
    if example_inputs is None and inputs is not None and _is_module(src):
        from rotaq.inputs import read

        example_inputs = {k: v[:2] for k, v in read(inputs)[0].items()}  # capture shapes only
    from rotaq.dtypes import load_in_dtype

    model = load_in_dtype(lambda s, d: _load(s, example_inputs, ir, seq_len, kv_cache, d), src,
                          dtype)
    if inputs is None and verify_inputs is None and tokenizer is None:
        return model
    model = Model(model.graph, dict(model.sample_inputs), dict(model.source), model.calibration,
                  dict(model.inputs_info))
    if tokenizer is not None:
        use_tokenizer(model, tokenizer, seq_len)
    if inputs is not None or verify_inputs is not None:
        from rotaq.inputs import user_inputs

        calib, verify, info = user_inputs(model.graph, inputs, verify_inputs)
        if verify is not None:
            model.sample_inputs = verify
        if calib is not None:
            model.calibration = calib
        model.inputs_info.update(info)
    return model


def _is_module(src: Any) -> bool:
    import torch

    return isinstance(src, torch.nn.Module)


def _load(src: Any, example_inputs: Any, ir: str, seq_len: int, kv: bool = True,
          dtype: str | None = None) -> Model:
    import torch

    if isinstance(src, Model):
        return src
    if isinstance(src, torch.nn.Module):
        return _from_module(src, example_inputs, {"name": type(src).__name__}, ir, kv=kv)
    if isinstance(src, torch.export.ExportedProgram):
        from rotaq.rewriter.fx import FxGraph

        g = FxGraph.from_exported(src)
        feeds = as_numpy(g.example_inputs)
        return _maybe_onnx(Model(g, feeds, {"name": "ExportedProgram"},
                                 inputs_info={"verify": describe(feeds, "example_inputs")}), ir)
    if not isinstance(src, (str, os.PathLike)):
        raise LoadError(f"cannot load a {type(src).__name__}: give a torch module, an "
                        "ExportedProgram, a .pt2/.onnx path, a model directory or a built-in name")
    path = os.fspath(src)
    from rotaq import assets, loading_stream

    if ir == "onnx" and loading_stream.streams(path, kv, dtype):  # weights never all in memory
        return loading_stream.load_stream(path, seq_len, dtype)
    if os.path.isdir(path):
        return _from_hf(path, seq_len, ir, kv=kv, dtype=dtype)
    if path.lower().endswith(".gguf"):
        return _from_gguf(path, seq_len, ir, kv)
    if os.path.exists(path) or path.endswith((".onnx", ".pt2")):
        model = _from_file(path, seq_len)
        return _maybe_onnx(model, ir) if model.ir == "fx" else model
    if path in assets.BUILTIN_MODELS:
        return _from_builtin(path, seq_len, ir, kv, dtype)
    raise LoadError(f"{path}: no such file, directory or built-in model "
                    f"(built-in: {', '.join(assets.BUILTIN_MODELS)})")


def _from_module(module: Any, example_inputs: Any, source: dict, ir: str,
                 info: dict | None = None, kv: bool = True) -> Model:
    import torch

    from rotaq.rewriter.fx import FxGraph

    if example_inputs is None:
        raise LoadError("loading a torch module needs example_inputs (a dict of tensors)")
    if isinstance(example_inputs, (tuple, list)):
        import inspect

        names = list(inspect.signature(module.forward).parameters)
        example_inputs = dict(zip(names, example_inputs))
    inputs = {k: torch.as_tensor(v) for k, v in example_inputs.items()}
    from rotaq.assets import disable_cache

    disable_cache(module)  # every sub-config: encoder-decoder stacks hold their own copies
    g = _capture_with_cache(module, inputs) if kv else None
    if g is None:
        with stage(f"capturing {type(module).__name__} with torch.export"):
            g = FxGraph.from_module(module, inputs)
    feeds = as_numpy(inputs)  # the caller's example inputs verify (all their rows)
    if g.metadata.get(tags.KV_CACHE) == "1":
        from rotaq.rewriter import kv_capture

        feeds = kv_capture.complete_feeds(g, feeds)
    info = info or {"verify": describe(feeds, "example_inputs")}
    return _maybe_onnx(Model(g, feeds, dict(source), inputs_info=info), ir)


def _capture_with_cache(module: Any, inputs: dict[str, Any]) -> Any:
    """The cache graph of a decoder-only causal LM, checked against the module: its prefill
    logits must equal the module's no-cache logits; None (captured without a cache, with a
    warning saying why) for other models or when the capture fails."""
    import torch

    from rotaq.rewriter import kv_capture

    dims = kv_capture.cache_layout(module, inputs)
    if dims is None:
        return None
    name = type(module).__name__
    try:
        with stage(f"capturing {name} with its KV cache (torch.export)"):
            g = kv_capture.capture(module, dims, torch.as_tensor(inputs["input_ids"]))
        ids = torch.as_tensor(inputs["input_ids"])[:1, :16]
        with torch.no_grad():
            ref = module(input_ids=ids, use_cache=False).logits.float().numpy()
        out = g.run(kv_capture.token_feeds(g, ids.numpy()))[0]
        from rotaq.model import max_rel_error

        err = max_rel_error([ref], [np.asarray(out, np.float32)])
    except Exception as err:  # noqa: BLE001 - torch.export raises many types; fall back
        log.warning("%s: capture with a KV cache failed (%s: %s); captured without a cache",
                    name, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None
    from rotaq.dtypes import capture_bound, module_dtype

    if not err <= capture_bound(module_dtype(module)):
        log.warning("%s: the KV-cache graph's prefill differs from the model by %.3g; captured "
                    "without a cache", name, err)
        return None
    return g


def _maybe_onnx(model: Model, ir: str, cache_path: str | None = None) -> Model:
    if ir == "fx":
        return model
    if ir != "onnx":
        raise LoadError(f"ir must be 'fx' or 'onnx', not '{ir}'")
    import tempfile

    from rotaq.rewriter.onnx import OnnxGraph

    if cache_path is None:  # OnnxGraph.load reads the weights into memory: no file is kept
        with tempfile.TemporaryDirectory(prefix="rotaq-onnx-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            model.save(path, tokenizer=False)
            graph = OnnxGraph.load(path)
    else:
        if not os.path.exists(cache_path):
            model.save(cache_path, tokenizer=False)
        graph = OnnxGraph.load(cache_path)
    return Model(graph, model.sample_inputs, dict(model.source), model.calibration,
                 dict(model.inputs_info))


def _from_hf(path: str, seq_len: int, ir: str, name: str | None = None, kv: bool = True,
             dtype: str | None = None) -> Model:
    """A local Hugging Face directory: sample inputs from its tokenizer, or synthesized from
    its config when it has none (:mod:`rotaq.hf_inputs`). Encoder-decoders (T5, BART,
    Whisper, ...) are captured as one graph of the whole model, encoder inputs plus
    ``decoder_input_ids`` (teacher forcing), outputs: logits and the encoder's last state."""
    from rotaq import assets, hf_inputs

    with stage(f"loading the Hugging Face model in {path}"):
        module, tok, kind = assets.load_hf_model(path, tokenizer_required=False, dtype=dtype)
    feeds = hf_inputs.model_inputs(module, tok, kind, seq_len=seq_len)
    source = {"name": name or os.path.abspath(path), "kind": kind}
    if tok is not None and kind != assets.KIND_SEQ2SEQ and hf_inputs.main_input(module) == \
            "input_ids":  # a saved file's sample inputs can be rebuilt from the tokenizer
        source["tokenizer"] = os.path.abspath(path)
        feeds, info = text_sample(tok, kind, seq_len)  # verification text, not calibration's
    elif tok is not None and "input_ids" in feeds:  # seq2seq: calibration is synthetic
        info = describe(feeds, "text", text="lee")
    else:
        info = describe(feeds, "synthetic", seed=hf_inputs._SEED)
    try:
        return _from_module(module, feeds, source, ir, {"verify": info}, kv=kv)
    except LoadError as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(f"{path}: the {hf_inputs.family(module)} model "
                        f"({type(module).__name__}) cannot be captured: {why}") from err


def _from_gguf(path: str, seq_len: int, ir: str, kv: bool = True) -> Model:
    """A GGUF file: dequantized to fp32 by transformers (cached, :func:`assets.gguf_model_dir`)
    and captured like a model directory; the capture is cached too (GGUF models are LLMs
    whose torch.export takes minutes)."""
    import torch

    from rotaq import assets
    from rotaq.rewriter.fx import FxGraph

    hf_dir = assets.gguf_model_dir(path)
    tag = hashlib.sha1(f"{hf_dir.name}|{seq_len}|{torch.__version__}|{CAPTURE_VERSION}|kv{kv:d}"
                       .encode()).hexdigest()[:10]
    pt2 = hf_dir.parent / f"{hf_dir.name}-{tag}.pt2"
    name = os.path.abspath(path)
    if pt2.exists():
        try:
            g = FxGraph.load(str(pt2))
            source = tags.source_fields(g.metadata)
            source["name"] = name
            feeds, info = sample_for(g, source, seq_len)
            model = Model(g, feeds, source, inputs_info={"verify": info})
            return _maybe_onnx(model, ir, str(pt2.with_suffix(".onnx")) if ir == "onnx"
                               else None)
        except LoadError as err:
            log.warning("cached export %s unreadable (%s); capturing again", pt2, err)
    model = _from_hf(str(hf_dir), seq_len, "fx", name=name, kv=kv)
    model.source["gguf"] = name
    model.save(str(pt2), tokenizer=False)
    return _maybe_onnx(model, ir, str(pt2.with_suffix(".onnx")) if ir == "onnx" else None)


def _from_builtin(name: str, seq_len: int, ir: str, kv: bool = True, dtype: str | None = None
                  ) -> Model:
    """Built-ins are captured once; the ExportedProgram (and ONNX form) is cached."""
    import torch

    from rotaq import assets
    from rotaq.rewriter.fx import FxGraph

    folder = assets.cache_dir() / "exported"
    folder.mkdir(parents=True, exist_ok=True)
    dt = "" if dtype in (None, "float32") else f"|{dtype}"  # fp32 keeps its cached captures
    tag = hashlib.sha1(f"{name}|{torch.__version__}|{CAPTURE_VERSION}|kv{kv:d}{dt}".encode()
                       ).hexdigest()[:10]
    pt2 = folder / f"{name}-{tag}.pt2"
    tok_dir = str(assets.builtin_model_dir(name))
    kind = assets.BUILTIN_MODELS[name].kind
    source = {"name": name, "kind": kind, "tokenizer": tok_dir}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    feeds, info = text_sample(tok, kind, seq_len)
    model = None
    if pt2.exists():
        try:
            g = FxGraph.load(str(pt2))
            model = Model(g, cache_feeds(g, feeds), source, inputs_info={"verify": info})
        except LoadError as err:
            log.warning("cached export %s unreadable (%s); capturing again", pt2, err)
    if model is None:
        log.info("capturing %s with torch.export (cached at %s)", name, pt2)
        module, _, _ = assets.load_hf_model(name, dtype=dtype)
        model = _from_module(module, feeds, source, "fx", {"verify": info}, kv=kv)
        model.save(str(pt2), tokenizer=False)
    onnx_cache = str(folder / f"{name}-{tag}.onnx") if ir == "onnx" else None
    return _maybe_onnx(model, ir, onnx_cache)


def _from_file(path: str, seq_len: int) -> Model:
    ext = os.path.splitext(path)[1].lower()
    with stage(f"loading {path}"):
        g = _read_graph(path, ext)
    source = tags.source_fields(g.metadata)
    source = resolve_source(source, os.path.dirname(os.path.abspath(path)))
    source.setdefault("name", os.path.abspath(path))
    feeds, info = sample_for(g, source, seq_len)
    return Model(g, feeds, source, inputs_info={"verify": info})


def _read_graph(path: str, ext: str) -> Any:
    if ext == ".onnx":
        from rotaq.rewriter.onnx import OnnxGraph

        g = OnnxGraph.load(path)
    elif ext == ".pt2":
        from rotaq.rewriter.fx import FxGraph

        g = FxGraph.load(path)
    else:
        raise LoadError(f"{path}: unknown model file type '{ext}' (expected .onnx or .pt2)")
    return g
