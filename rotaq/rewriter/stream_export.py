"""Decoder-only causal LMs (Hugging Face directories) captured to ONNX without the weights
in memory.

The model is built from its config with parameters on no real storage (accelerate's
``init_empty_weights``; buffers such as rotary ``inv_freq`` stay real), each parameter then
given an uninitialized CPU tensor that nothing ever reads (the pages are never touched, so
they cost no memory). The same KV-cache wrapper as :mod:`rotaq.rewriter.kv_capture` is
captured with torch.export and exported by ``torch.onnx.export`` without its optimizer (which
would fold weight transposes by reading them); each weight initializer is then replaced by a
lazy tensor reading that weight from the safetensors files (``safe_open``) when it is needed,
converted to the graph's dtype, a ``Transpose`` of a weight read only by it becoming a lazy
transposed weight. onnxscript's optimizer then runs with its folding size limits (no weight
is large enough to fold). The result is written tensor by tensor: memory holds one weight.

The graph's dtype is the compute dtype asked (default fp32, what rotaq's other captures use).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import numpy as np
import onnx_ir as oir

from rotaq.errors import LoadError
from rotaq.progress import stage

log = logging.getLogger(__name__)
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # plain full-attention decoders, tested


class Unsupported(Exception):
    """The directory cannot take the streaming route (the caller uses the torch one)."""


def _weights_index(path: str) -> dict[str, str]:
    """safetensors key -> file, from ``model.safetensors(.index.json)``."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise Unsupported("no safetensors weights")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def check(path: str) -> Any:
    """The config of a directory the streaming route supports; :class:`Unsupported` says why
    not."""
    try:
        import accelerate  # noqa: F401
        from transformers import AutoConfig
    except ImportError as err:
        raise Unsupported(f"needs accelerate ({err})") from err
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(cfg, "model_type", None) not in FAMILIES:
        raise Unsupported(f"model type {getattr(cfg, 'model_type', None)!r}")
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        raise Unsupported("sliding-window attention")
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        raise Unsupported("layers other than full attention")
    if getattr(cfg, "quantization_config", None):
        raise Unsupported("a quantized checkpoint")
    return cfg


def _empty_model(cfg: Any, dtype: Any) -> Any:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    out_emb = m.get_output_embeddings()
    if getattr(cfg, "tie_word_embeddings", False) and out_emb is not None:
        out_emb.weight = m.get_input_embeddings().weight  # one tensor, as from_pretrained ties
    fresh: dict[int, torch.nn.Parameter] = {}
    for mod in m.modules():  # tied parameters stay one object
        for k, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in fresh:
                    fresh[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype),
                                                      requires_grad=False)
                mod._parameters[k] = fresh[id(p)]
    from rotaq.assets import disable_cache

    disable_cache(m)
    return m.eval()


def _dims(cfg: Any) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, int(hd)


def _weight(files: dict[str, str], key: str, dtype: oir.DataType, shape: tuple, name: str,
            transpose: bool) -> oir.LazyTensor:
    path = files[key]

    def read() -> oir.Tensor:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            t = f.get_tensor(key)
        arr = t.float().numpy() if t.dtype.is_floating_point else t.numpy()
        arr = np.ascontiguousarray(arr.T if transpose else arr).astype(dtype.numpy(), copy=False)
        return oir.Tensor(arr, dtype=dtype, name=name)

    return oir.LazyTensor(read, dtype=dtype, shape=oir.Shape(shape), name=name)


def _key_shapes(files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """safetensors key -> shape, read from the files' headers."""
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = tuple(int(d) for d in f.get_slice(k).get_shape())
    return out


def _attach(model: oir.Model, module: Any, files: dict[str, str]) -> dict[str, tuple[str, bool]]:
    """Parameters read lazily from safetensors (see module doc); buffers from the module.
    Returns initializer name -> (safetensors key, read transposed)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    names: dict[int, list[str]] = {}
    for n, p in params.items():
        names.setdefault(id(p), []).append(n)
    buffers = dict(module.named_buffers(remove_duplicate=False))
    sources: dict[str, tuple[str, bool]] = {}
    g = model.graph
    for name, v in list(g.initializers.items()):
        if name in buffers:
            v.const_value = oir.Tensor(buffers[name].detach().numpy().copy(), name=name)
            continue
        if name not in params:
            continue
        key = next((n for n in [name, *names[id(params[name])]] if n in files), None)
        if key is None:
            raise Unsupported(f"weight {name} not found in the safetensors files")
        dt = v.const_value.dtype
        shape = tuple(int(d) for d in params[name].shape)
        users = list(v.uses())
        perm = users[0].node.attributes.get("perm") if len(users) == 1 else None
        if (len(shape) == 2 and perm is not None and list(perm.value) == [1, 0]
                and users[0].node.op_type == "Transpose" and not v.is_graph_output()):
            node = users[0].node
            out = node.outputs[0]
            t = _weight(files, key, dt, shape[::-1], f"{name}.T", transpose=True)
            new = oir.val(f"{name}.T", const_value=t)
            g.register_initializer(new)
            out.replace_all_uses_with(new)
            g.remove(node, safe=True)
            g.initializers.pop(name)
            sources[f"{name}.T"] = (key, True)
        else:
            v.const_value = _weight(files, key, dt, shape, name, transpose=False)
            sources[name] = (key, False)
    return sources


def _capture(cfg: Any, files: dict[str, str], dtype: Any
             ) -> tuple[oir.Model, dict[str, tuple[str, bool]]]:
    """The decoder of config ``cfg`` captured as a cache graph (contract names), its weights
    lazy; with the initializers' (safetensors key, transposed)."""
    import torch

    from rotaq.rewriter import kv_capture
    from rotaq.rewriter.export_onnx import _contract_names

    dims = _dims(cfg)
    with stage(f"building {cfg.model_type} from its config (no weights, {dims[0]} layers)"):
        module = _empty_model(cfg, dtype)
    wrapped = kv_capture.wrapper(module, dims[0])
    ex = kv_capture.example_inputs(*dims, min(int(cfg.vocab_size), 1000), dtype)
    with stage("capturing with torch.export (weights not materialized)"), torch.no_grad():
        ep = torch.export.export(wrapped, (), {kv_capture.fx_name(k): v for k, v in ex.items()},
                                 dynamic_shapes=kv_capture.dynamic_shapes(list(ex)),
                                 strict=False)
    with stage("exporting to ONNX (weights read lazily from safetensors)"):
        reg = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = reg.level
        reg.setLevel(logging.ERROR)
        try:
            prog = torch.onnx.export(ep, (), dynamo=True, optimize=False, verbose=False)
        except Exception as err:  # the exporter raises many types
            raise Unsupported(f"ONNX export failed: {type(err).__name__}: {err}") from err
        finally:
            reg.setLevel(level)
        model = prog.model
        sources = _attach(model, module, files)
        del prog, ep, wrapped, module
        import onnxscript.optimizer

        model = onnxscript.optimizer.optimize(model)
        _contract_names(model.graph)
    return model, sources


def _few_layers(cfg: Any, n: int) -> Any:
    small = copy.deepcopy(cfg)
    small.num_hidden_layers = n
    if getattr(small, "layer_types", None):
        small.layer_types = list(small.layer_types)[:n]
    return small


def _stamped(path: str, cfg: Any, files: dict[str, str], dtype: Any) -> oir.Model | None:
    """The first :data:`stamp.CAPTURED` layers captured and stamped to all of them, or None
    (logged) when the blocks cannot be stamped."""
    from rotaq.rewriter import stamp

    n = _dims(cfg)[0]
    model, sources = _capture(_few_layers(cfg, stamp.CAPTURED), files, dtype)

    def weight(key: str, tr: bool, dt: oir.DataType, shape: tuple, name: str) -> oir.LazyTensor:
        return _weight(files, key, dt, shape, name, transpose=tr)

    try:
        with stage(f"stamping block {stamp.CAPTURED - 1} for layers {stamp.CAPTURED}..{n - 1}"):
            added = stamp.stamp(model, n, sources, _key_shapes(files), weight)
    except stamp.CannotStamp as err:
        log.warning("%s: its decoder blocks cannot be stamped (%s); exporting all %d layers",
                    path, err, n)
        return None
    log.info("%s: %d layers captured, %d nodes stamped for the other %d", path,
             stamp.CAPTURED, added, n - stamp.CAPTURED)
    return model


def export(path: str, out: str, metadata: dict[str, str] | None = None, dtype: Any = None,
           stamp: bool = True) -> None:
    """Capture the HF directory ``path`` as a KV-cache ONNX graph written to ``out``
    (atomically; external data beside it), weights streamed from its safetensors files.
    With ``stamp`` (and more layers than it captures) the first layers are captured and
    stamped (:mod:`rotaq.rewriter.stamp`), else all are. Raises :class:`Unsupported` for a
    model this route does not take."""
    import torch

    from rotaq.rewriter import kv_capture
    from rotaq.rewriter import stamp as stamping
    from rotaq.rewriter.export_onnx import sigterm_raises
    from rotaq.rewriter.onnx import OnnxGraph

    dtype = dtype or torch.float32
    cfg = check(path)
    files = _weights_index(path)
    dims = _dims(cfg)
    with sigterm_raises():
        model = None
        if stamp and dims[0] > stamping.CAPTURED:
            model = _stamped(path, cfg, files, dtype)
        if model is None:
            model, _ = _capture(cfg, files, dtype)
        g = OnnxGraph(model)
        g.metadata.update(kv_capture.metadata(*dims))
        g.metadata.update(metadata or {})
        g.save(out)


def is_supported(path: str) -> bool:
    try:
        check(path)
        _weights_index(path)
    except (Unsupported, LoadError, OSError, ValueError) as err:
        log.info("%s: streaming capture not used (%s)", path, err)
        return False
    return True
