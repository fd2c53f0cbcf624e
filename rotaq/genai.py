"""A generation-ready folder: ``model.onnx`` (+ ``model.onnx.data``), ``genai_config.json``,
``config.json`` and the tokenizer files, which ``onnxruntime_genai.Model(DIR)`` and Optimum's
``ORTModelForCausalLM`` load as they are.

Every path inside is relative, so the folder can be copied elsewhere. It is written to a
temporary folder beside the destination and renamed into place. The destination must be new,
empty, or an earlier generation folder (one holding ``genai_config.json``); anything else is
refused rather than overwritten. onnxruntime-genai itself is needed only to run the folder
(``pip install rotaq[genai]``), never to write it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

from rotaq import tags
from rotaq.decoder_io import CacheSpec, cache_spec, cache_spec_of_model
from rotaq.errors import MissingDependencyError, RotaqError
from rotaq.files import atomic_dir
from rotaq.model import TOKENIZER_SUFFIX

log = logging.getLogger(__name__)

__all__ = ["import_genai", "is_folder_target", "is_genai_folder", "write_genai_folder"]

MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
# model types onnxruntime-genai runs as plain decoder-only LLMs (src/models/model_type.h)
_GENAI_TYPES = {"chatglm", "decoder", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2",
                "gptoss", "granite", "internlm2", "llama", "mistral", "nemotron", "olmo", "phi",
                "phimoe", "phi3", "phi3small", "qwen2", "qwen3", "smollm3"}
_SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def import_genai() -> Any:
    """``onnxruntime_genai``, or a clear error naming the extra that installs it."""
    try:
        import onnxruntime_genai as og
    except ImportError as err:
        raise MissingDependencyError("onnxruntime-genai is not installed: pip install "
                                     "'rotaq[genai]' (or pip install onnxruntime-genai)") from err
    return og


def is_folder_target(out: str) -> bool:
    """``-o DIR/`` (a trailing separator) or an existing directory names a folder target (one
    named like a file, ``x.onnx``, is still refused as a directory where a file should go)."""
    if out.endswith(("/", os.sep)):
        return True
    return os.path.isdir(out) and not out.lower().endswith((".onnx", ".pt2"))


def is_genai_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


# ---- config ---------------------------------------------------------------------------------
def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise RotaqError(f"cannot read {path}: {err}") from err


def _hf_config(hf_config: Any, tokenizer_dir: str | None) -> dict[str, Any]:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hf_config is not None and not isinstance(hf_config, (str, os.PathLike)):
        return hf_config.to_dict()  # a transformers PretrainedConfig
    path = os.fspath(hf_config) if hf_config is not None else tokenizer_dir
    if path and os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not path or not os.path.isfile(path):
        raise RotaqError(f"no Hugging Face config.json for the genai folder (looked in "
                         f"{path or 'nowhere'}): pass hf_config")
    return _read_json(path)


def _first_id(v: Any) -> Any:
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def _special_ids(cfg: dict[str, Any], folder: str | None) -> dict[str, Any]:
    ids = {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    gen = os.path.join(folder, "generation_config.json") if folder else None
    if gen and os.path.isfile(gen):  # chat models end a turn with the token named here
        g = _read_json(gen)
        ids.update({k: g[k] for k in ids if g.get(k) is not None})
    if ids["eos_token_id"] is None:
        raise RotaqError("the model's config names no eos_token_id: generation would not stop")
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = _first_id(ids["eos_token_id"])
    if ids["bos_token_id"] is None:
        ids["bos_token_id"] = _first_id(ids["eos_token_id"])
    return {k: _first_id(v) if k != "eos_token_id" else v for k, v in ids.items()}


def genai_config(spec: CacheSpec, cfg: dict[str, Any], share_buffer: bool,
                 tokenizer_dir: str | None = None) -> dict[str, Any]:
    """The ``genai_config.json`` for a cache graph with ``spec`` and Hugging Face config
    ``cfg`` (heads, hidden size, vocabulary, context length, special ids, search defaults)."""
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
    if not heads or not hidden or not cfg.get("vocab_size"):
        raise RotaqError("the Hugging Face config lacks num_attention_heads, hidden_size or "
                         "vocab_size")
    for key, want in (("num_key_value_heads", spec.kv_heads), ("num_hidden_layers",
                                                               spec.num_layers)):
        if cfg.get(key) not in (None, want):
            raise RotaqError(f"config.json says {key}={cfg[key]} but the graph's cache has "
                             f"{want}: the config belongs to another model")
    mtype = str(cfg.get("model_type", "")).lower()
    inputs = {"input_ids": "input_ids"}
    for name in ("attention_mask", "position_ids"):
        if name in spec.inputs:
            inputs[name] = name
    inputs.update(past_key_names="past_key_values.%d.key",
                  past_value_names="past_key_values.%d.value")
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
              "length_penalty": 1.0, "max_length": int(context), "min_length": 0,
              "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
              "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    gen = os.path.join(tokenizer_dir, "generation_config.json") if tokenizer_dir else None
    if gen and os.path.isfile(gen):
        g = _read_json(gen)
        search.update({k: g[k] for k in _SEARCH_KEYS if g.get(k) is not None})
    return {
        "model": {
            **_special_ids(cfg, tokenizer_dir),
            "context_length": int(context),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": spec.head_dim,
                "hidden_size": int(hidden),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": int(heads),
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.kv_heads,
            },
            "type": mtype if mtype in _GENAI_TYPES else "decoder",
            "vocab_size": int(cfg["vocab_size"]),
        },
        "search": search,
    }


def _graph_facts(path: str) -> tuple[bool, int | None]:
    """(uses GroupQueryAttention, the logits' vocabulary size when fixed). GQA (the model
    builder's graphs) can read and write one shared past/present buffer of the context length."""
    import onnx

    g = onnx.load(path, load_external_data=False).graph
    gqa = any(n.op_type == "GroupQueryAttention" for n in g.node)
    vocab = None
    for o in g.output:
        dims = o.type.tensor_type.shape.dim
        if o.name == "logits" and dims and dims[-1].HasField("dim_value"):
            vocab = int(dims[-1].dim_value)
    return gqa, vocab


# ---- writing --------------------------------------------------------------------------------
def _check_target(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RotaqError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not is_genai_folder(out_dir):
        raise RotaqError(f"{out_dir}: directory is not empty and is not a generation folder "
                         f"(no {CONFIG_FILE}); refusing to replace it")
    parent = os.path.dirname(os.path.abspath(out_dir.rstrip("/" + os.sep)))
    if not os.path.isdir(parent):
        raise RotaqError(f"{out_dir}: folder {parent} does not exist")


def _write_model(model_or_path: Any, dest: str) -> CacheSpec:
    """``dest`` (model.onnx, external data beside it under a relative name); the cache spec."""
    import onnx

    if isinstance(model_or_path, (str, os.PathLike)):
        src = os.fspath(model_or_path)
        spec = cache_spec(src)
        proto = onnx.load(src)  # with its external data
        onnx.save_model(proto, dest, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=MODEL_FILE + ".data", size_threshold=1024)
        return spec
    spec = cache_spec_of_model(model_or_path)  # raises "this graph has no KV cache" first
    model_or_path.save(dest, tokenizer=False)
    return spec


def _set_metadata(path: str, spec: CacheSpec) -> None:
    """rotaq.* cache metadata, and the tokenizer recorded as the folder itself."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.update(tags.cache_metadata(spec.num_layers, spec.kv_heads, spec.head_dim))
    meta[tags.TOKENIZER] = "."
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save_model(proto, path)  # tensors keep their external-data references


def write_genai_folder(model_or_onnx_path: Any, out_dir: str, tokenizer_dir: str,
                       hf_config: Any = None, *, save: Any = None) -> list[str]:
    """Write the generation folder ``out_dir`` for a cache graph (a rotaq Model or an .onnx
    path) with the tokenizer of ``tokenizer_dir`` and the Hugging Face config ``hf_config`` (a
    dict, a transformers config, a config.json path or a folder; default
    ``tokenizer_dir/config.json``). ``save(path)``, when given, writes the Model's model.onnx
    (e.g. ``OptimizeResult.save``, which also verifies the written file). Returns the files
    written (absolute paths)."""
    from transformers import AutoTokenizer

    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_target(out_dir)
    cfg = _hf_config(hf_config, tokenizer_dir)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as err:
        raise RotaqError(f"cannot load a tokenizer from {tokenizer_dir}: "
                         f"{type(err).__name__}") from err
    with atomic_dir(out_dir, prefix=".rotaq-genai-") as tmp:
        model_path = os.path.join(tmp, MODEL_FILE)
        if save is None:
            spec = _write_model(model_or_onnx_path, model_path)
        else:
            spec = cache_spec_of_model(model_or_onnx_path)
            save(model_path)
            shutil.rmtree(model_path + TOKENIZER_SUFFIX, ignore_errors=True)  # the folder has it
        _set_metadata(model_path, spec)
        gqa, vocab = _graph_facts(model_path)
        if vocab and cfg.get("vocab_size") not in (None, vocab):
            raise RotaqError(f"config.json says vocab_size={cfg['vocab_size']} but the graph's "
                             f"logits have {vocab}: the config belongs to another model")
        conf = genai_config(spec, cfg, gqa, tokenizer_dir)
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(conf, f, indent=4)
        hf = {**cfg, "use_cache": True}
        hf.pop("quantization_config", None)  # the weights here are what the graph holds
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
        tok.save_pretrained(tmp)
        gen = os.path.join(tokenizer_dir, "generation_config.json")
        if os.path.isfile(gen):
            shutil.copyfile(gen, os.path.join(tmp, "generation_config.json"))
    log.info("wrote generation folder %s", out_dir)
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir))


# ---- rotaq optimize -o DIR/ -----------------------------------------------------------------
def check_decoder(model: Any, src: str, out_dir: str) -> None:
    """Before any pass runs: ``out_dir`` is a usable folder target and ``model`` has a cache."""
    from rotaq.decoder_io import has_cache

    out = os.path.abspath(out_dir.rstrip("/" + os.sep))
    if os.path.exists(src) and os.path.commonpath([out, os.path.abspath(src)]) == out:
        raise RotaqError(f"{out_dir}: refusing to overwrite the input model (it is in that "
                         "folder)")
    _check_target(os.path.abspath(out_dir))
    if not has_cache(model.graph.input_names):
        what = "is a directory; " if not out_dir.endswith(("/", os.sep)) else ""
        raise RotaqError(f"{out_dir}: {what}a folder output is a generation folder, which needs a "
                         f"decoder with a KV cache; {src} has no past_key_values inputs "
                         f"(inputs {model.graph.input_names[:4]}): write a .onnx file instead")
    _config_source(model)  # a tokenizer and a config.json are known


def _config_source(model: Any) -> tuple[str, str]:
    """(tokenizer folder, folder holding config.json) recorded for ``model``."""
    from rotaq import assets

    tok = model.source.get("tokenizer")
    name = model.source.get("name", "")
    cands = [tok, name if os.path.isdir(name) else None]
    if name in assets.BUILTIN_MODELS:
        cands.append(str(assets.builtin_model_dir(name)))
    cfg = next((c for c in cands if c and os.path.isfile(os.path.join(c, "config.json"))), None)
    if not tok or not os.path.isdir(tok):
        raise RotaqError(f"no tokenizer is known for {name or 'this model'}: a generation "
                         "folder needs one (pass --tokenizer DIR)")
    if cfg is None:
        raise RotaqError(f"no Hugging Face config.json is known for {name or 'this model'} "
                         "(looked beside its tokenizer): a generation folder needs one")
    return tok, cfg


def save_folder(res: Any, out_dir: str) -> dict[str, Any]:
    """Write ``res.model`` (an OptimizeResult's) as a generation folder: its model.onnx is
    written and verified by ``res.save`` (which raises VerificationError, leaving nothing,
    when an exact recipe's written model is off), then the folder is completed and renamed
    into place. Returns the report, with ``output`` the folder and ``files`` its files."""
    from rotaq.api import file_sizes

    tok, cfg = _config_source(res.model)
    files = write_genai_folder(res.model, out_dir, tok, cfg, save=res.save)
    res.report["output"] = os.path.abspath(out_dir)
    res.report["files"] = file_sizes(files)
    return res.report
