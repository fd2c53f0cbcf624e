"""Dtype policy: a model is rewritten in its own dtype (fp32, fp16 or bf16).

- The *source* dtype: an HF directory's ``config.json`` ``torch_dtype`` / ``dtype`` (else its
  safetensors headers), a torch module's parameters, a captured graph's float weights.
- The *output* dtype: ``--dtype`` / ``dtype=`` when given, else the source's.
- The verification tolerance of an exact rewrite follows the dtype: an fp16/bf16 model is judged
  against its own rounding noise ``e0``, measured on the sample inputs (the model run in its
  dtype vs its fp32 copy): ``max(recipe tolerance, NOISE_FACTOR x e0)``.

Weight folds are done in float64 per tensor by the passes; the adapters' setters write each new
tensor back in the dtype of the one it replaces (a single rounding). The dtype names and
conversions are :mod:`rotaq.floats` (re-exported here).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from rotaq.errors import LoadError
from rotaq.floats import (  # noqa: F401 (re-exported: the dtype names and conversions)
    BFLOAT16,
    FLOAT16,
    FLOAT32,
    canonical,
    hf_source_dtype,
    is_float,
    module_dtype,
    numpy_dtype,
    onnx_dtype,
    output_dtype,
    tensor_from_numpy,
    tensor_to_numpy,
    torch_dtype,
)

log = logging.getLogger(__name__)

# An exact rewrite of an fp16/bf16 model is held to NOISE_FACTOR x e0, e0 being the model's own
# rounding noise (its low-precision run vs its fp32 copy). The rewrite and the original each carry
# their own rounding (up to ~2 e0 apart) and the rewritten weights are rounded once more. Measured
# rewrite error / e0 for `rotate`: at most 2.83 (fp16 tiny bert/llama/qwen2/gpt2, 8 input draws
# each), 1.67 (fp16 SmolLM2), <= 0.46 for bf16 and Cast-fed weights; a 1% error in one norm scale
# still exceeds the bound twice over (tests/rewriter/test_onnx_realworld.py).
NOISE_FACTOR = 4.0


def capture_bound(dtype: str) -> float:
    """Max relative error allowed between a captured graph and the module it was captured from,
    both run in ``dtype`` (kernels differ in summation order: a few units of the dtype's eps)."""
    return {FLOAT16: 4e-3, BFLOAT16: 3e-2}.get(canonical(dtype), 1e-3)


def graph_dtype(graph: Any) -> str:
    """The dtype of a captured graph: its float weights' commonest dtype (FX); the coarsest
    fp16/bf16 dtype among its linears' weights as stored, else float32 (ONNX)."""
    if graph.ir == "onnx":
        from rotaq.rewriter.onnx_dtype import LOW, low_precision

        low, _ = low_precision(graph)
        return LOW[low] if low is not None else FLOAT32
    return module_dtype(graph.gm)


# ---------------------------------------------------------------------------- conversions
def convert_module(module: Any, dtype: str) -> Any:
    """``module`` in ``dtype``: the module itself when already so, else a converted copy (the
    caller's module is never modified)."""
    import copy

    if module_dtype(module) == canonical(dtype):
        return module
    log.info("converting %s to %s (a copy)", type(module).__name__, canonical(dtype))
    return copy.deepcopy(module).to(torch_dtype(dtype))


def convert_graph(graph: Any, dtype: str) -> Any:
    """A captured graph in ``dtype``: itself when already so; an fp16/bf16 graph widened to
    fp32 exactly. Narrowing a captured graph is refused (which ops must stay fp32 is the
    model's choice, made when it is captured): convert the torch model instead."""
    src, want = graph_dtype(graph), canonical(dtype)
    if src == want:
        return graph
    if want != FLOAT32:
        raise LoadError(f"--dtype {want}: a captured {src} {graph.ir.upper()} graph cannot be "
                        f"converted to {want}; give the torch module, Hugging Face directory "
                        "or built-in name with --dtype instead")
    if graph.ir == "onnx":
        from rotaq.rewriter.onnx import OnnxGraph
        from rotaq.rewriter.onnx_dtype import convert_float

        out = OnnxGraph(convert_float(graph.model), source=graph.source)
        out.metadata = dict(graph.metadata)
        return out
    return fx_float32(graph)


def fx_float32(graph: Any) -> Any:
    """An fp32 copy of an FX graph: every fp16/bf16 weight, constant and dtype argument (casts,
    factory ops) in fp32; feed it fp32 arrays (complete a cache graph's feeds first). Computes the same function with
    less rounding (fp16/bf16 values are exact in fp32)."""
    import torch

    low = (torch.float16, torch.bfloat16)
    copy = graph.clone()
    gm = copy.gm

    def widen(a: Any) -> Any:
        if isinstance(a, torch.dtype) and a in low:
            return torch.float32
        if isinstance(a, (list, tuple)):
            return type(a)(widen(x) for x in a)
        return a

    for n in gm.graph.nodes:
        n.args = widen(n.args)
        n.kwargs = {k: widen(v) for k, v in n.kwargs.items()}
    for mod in gm.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dtype in low:
                setattr(mod, name, torch.nn.Parameter(p.detach().float(), requires_grad=False))
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.dtype in low:
                mod.register_buffer(name, b.float())
        for name, v in list(vars(mod).items()):  # plain tensor constants (get_attr targets)
            if isinstance(v, torch.Tensor) and v.dtype in low:
                setattr(mod, name, v.float())
    gm.recompile()
    copy._touch()
    return copy


# ---------------------------------------------------------------------------- tolerance
def rounding_noise(graph: Any, feeds: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """``{"dtype", "e0", "method"}``: the max relative error of ``graph`` run in its fp16/bf16
    dtype against its fp32 copy on ``feeds``; None for an fp32 graph or when not measurable.
    ONNX: :func:`rotaq.rewriter.onnx_noise.rounding_noise` (emulated where ORT's CPU provider
    has no kernel); FX: torch runs both natively."""
    if graph.ir == "onnx":
        from rotaq.rewriter.onnx_noise import rounding_noise as onnx_noise

        return onnx_noise(graph, feeds)
    dt = graph_dtype(graph)
    if dt == FLOAT32:
        return None
    from rotaq.compare import max_rel_error
    from rotaq.decoder_io import complete_feeds

    feeds = complete_feeds(graph, feeds)
    wide = {k: np.asarray(v, np.float32) if is_float(v) else v for k, v in feeds.items()}
    try:
        ref = fx_float32(graph).run(wide)
        lp = graph.run(feeds)
    except Exception as err:  # noqa: BLE001 - torch raises many types; the bound falls back
        log.warning("%s rounding noise not measurable (%s: %s)", dt, type(err).__name__, err)
        return None
    if not all(np.isfinite(np.asarray(a, np.float64)).all() for a in [*ref, *lp]):
        log.warning("%s rounding noise not measurable (non-finite outputs)", dt)
        return None
    e0 = max_rel_error(ref, lp)
    log.info("%s rounding noise e0=%.3g (native)", dt, e0)
    return {"dtype": dt, "e0": e0, "method": "native"}



def tolerance(graph: Any, feeds: dict[str, np.ndarray], tol: float | None
              ) -> tuple[float | None, str, dict | None]:
    """(bound, why, noise) for an exact rewrite: the recipe tolerance for an fp32 model; for an
    fp16/bf16 one ``max(tol, NOISE_FACTOR x e0)``, e0 measured on one batch of ``feeds``."""
    noise = None
    if tol is not None and graph_dtype(graph) != "float32":  # fp32: nothing to measure
        from rotaq.inputs import chunks

        noise = rounding_noise(graph, next(chunks(graph, feeds)))
    if noise is None:
        return tol, "fp32 recipe tolerance", None
    dt, e0 = noise["dtype"], noise["e0"]
    how = f"{dt} rounding noise x {NOISE_FACTOR:g}, measured e0={e0:.3g} ({noise['method']})"
    if NOISE_FACTOR * e0 <= tol:
        return tol, f"recipe tolerance (>= {how})", noise
    return NOISE_FACTOR * e0, how, noise


# ---------------------------------------------------------------------------- loading
def load_in_dtype(load: Any, src: Any, dtype: Any) -> Any:
    """``load(src, dtype)`` (a :class:`~rotaq.model.Model`) in the output dtype: a torch module
    converted before capture (a copy), an HF directory / built-in loaded in it, a captured
    graph widened after; ``inputs_info["dtype"]`` records the source and output dtypes."""
    import torch

    from rotaq import assets
    from rotaq.model import Model

    want = canonical(dtype)
    source = None
    if isinstance(src, Model) and "dtype" in src.inputs_info:  # already loaded: keep its record
        source = src.inputs_info["dtype"]["source"]
        if want is None or want == graph_dtype(src.graph):
            return src
    if isinstance(src, torch.nn.Module):
        source = module_dtype(src)
        if want is not None:
            src = convert_module(src, want)
    elif isinstance(src, (str, os.PathLike)) and (
            os.path.isdir(src) or os.fspath(src) in assets.BUILTIN_MODELS):
        path = src if os.path.isdir(src) else assets.builtin_model_dir(os.fspath(src))
        source = hf_source_dtype(path)
        return _record(load(src, output_dtype(source, want)), source)
    model = load(src, None)
    if source is None or isinstance(src, Model):
        source = source or graph_dtype(model.graph)
        if want is not None and want != graph_dtype(model.graph):
            feeds = {k: np.asarray(v, np.float32) if is_float(v) else v
                     for k, v in model.sample_inputs.items()}  # widened: fp32 feeds
            model = Model(convert_graph(model.graph, want), feeds, dict(model.source),
                          model.calibration, dict(model.inputs_info))
    return _record(model, source)


def _record(model: Any, source: str) -> Any:
    model.inputs_info["dtype"] = {"source": source, "output": graph_dtype(model.graph)}
    return model
