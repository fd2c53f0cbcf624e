"""Builtin text corpora and token windows: ``lee`` (gensim's Lee news articles) and ``wiki``
(articles extracted from gensim's shortened Wikipedia dump, cached as plain text), or a text file.
Keep calibration and evaluation text disjoint, e.g. calibrate on ``lee`` and evaluate on
``wiki``."""

from __future__ import annotations

import bz2
import importlib.util
import itertools
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rotaq.assets_cache import CACHE_FORMAT, INSTALL_MODELS, cache_dir, file_lock
from rotaq.errors import LoadError, MissingDependencyError
from rotaq.files import atomic_file

logger = logging.getLogger(__name__)

_GENSIM_DATA = ("test", "test_data")
_LEE_FILE = "lee_background.cor"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_CACHE_NAME = f"enwiki-shortened-articles-v{CACHE_FORMAT}.txt"
_WIKI_MIN_CHARS = 500  # pages shorter than this (stubs, disambiguations) are skipped


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



_TEXT_MEMO: dict[str, str] = {}


def _gensim_data_file(name: str) -> Path:
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"package 'gensim' is not installed; run: pip install gensim (or {INSTALL_MODELS})"
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
    with file_lock(cache_dir() / f".{_WIKI_CACHE_NAME}.lock"):
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

