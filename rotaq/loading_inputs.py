"""The verification sample inputs of a loaded graph: Wikipedia text through its tokenizer
(``--tokenizer`` or the one the model records), else the graph's own example inputs (.pt2), else
synthetic inputs drawn with the verification seed. Used by :mod:`rotaq.loading` and
:mod:`rotaq.loading_stream`."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from rotaq.errors import LoadError
from rotaq.inputs import describe
from rotaq.model import Model


def as_numpy(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Tensors or arrays by name as numpy arrays."""
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            for k, v in inputs.items()}


def sample_for(g: Any, source: dict, seq_len: int) -> tuple[dict[str, np.ndarray], dict]:
    """Verification inputs: Wikipedia text when the tokenizer is known, else the graph's own
    example inputs (.pt2) or synthetic ones drawn with the verification seed."""
    from rotaq.inputs import VERIFY_SEED

    tok_dir = source.get("tokenizer")
    if tok_dir and os.path.isdir(tok_dir):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
        feeds, info = text_sample(tok, source.get("kind", "causal-lm"), seq_len)
        names = set(g.input_names)
        feeds = {k: v for k, v in cache_feeds(g, feeds).items() if k in names}
        info["shapes"] = {k: list(v.shape) for k, v in feeds.items()}
        return feeds, info
    from rotaq.decoder_io import is_cache_graph

    if getattr(g, "ir", "") == "fx":  # one row, dynamic first dim
        dyn = g.dynamic_batch_inputs()
        feeds = {k: v[:1] if k in dyn else v for k, v in as_numpy(g.example_inputs).items()}
        if is_cache_graph(g):  # the captured tokens as a prefill (the pasts were random)
            feeds = cache_feeds(g, {"input_ids": feeds["input_ids"]})
        return feeds, describe(feeds, "example_inputs")
    return synthetic_sample(g, seq_len, VERIFY_SEED)


def cache_feeds(g: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Token feeds made full-prefill feeds of a cache graph (empty pasts, mask, positions)."""
    from rotaq.decoder_io import complete_feeds

    return complete_feeds(g, feeds)


def synthetic_sample(g: Any, seq_len: int, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Synthetic verification inputs of ``g`` drawn with ``seed``, and their description."""
    from rotaq.inputs import VERIFY_ROWS, batch_capacity, synthetic

    # a graph with a fixed batch size verifies on one batch of it (tools run it as is)
    rows = VERIFY_ROWS if batch_capacity(g) is None else 1
    feeds = synthetic(g, seed, rows=rows, seq_len=seq_len)
    return feeds, describe(feeds, "synthetic", seed=seed)


def text_sample(tok: Any, kind: str, seq_len: int) -> tuple[dict[str, np.ndarray], dict]:
    """The first ``seq_len`` tokens of the verification text (never the calibration text)."""
    from rotaq import assets
    from rotaq.inputs import VERIFY_TEXT

    feeds = assets.sample_inputs(tok, kind, seq_len=seq_len, corpus=VERIFY_TEXT)
    special = 2 if kind == assets.KIND_ENCODER and feeds["input_ids"][0, 0] == getattr(
        tok, "cls_token_id", None) else 0
    tokens = int(feeds["input_ids"].size) - special * len(feeds["input_ids"])
    return feeds, describe(feeds, "text", text=VERIFY_TEXT, tokens=tokens)


def use_tokenizer(model: Model, tok_dir: str, seq_len: int) -> None:
    """Real-text sample inputs from a Hugging Face tokenizer directory (``--tokenizer``)."""
    from rotaq.inputs import input_specs, token_vocab

    if not os.path.isdir(tok_dir):
        raise LoadError(f"--tokenizer {tok_dir}: not a directory (give a Hugging Face tokenizer "
                        "folder, with tokenizer.json or tokenizer_config.json)")
    specs = input_specs(model.graph)
    if "input_ids" not in specs:
        raise LoadError(f"--tokenizer: the model has no input_ids input (its inputs: "
                        f"{', '.join(specs)}); give its inputs with --inputs FILE.npz")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
    except Exception as err:  # transformers raises OSError, ValueError, ...
        raise LoadError(f"--tokenizer {tok_dir}: not a loadable tokenizer: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                        ) from err
    kind = model.source.get("kind")
    if kind not in ("causal-lm", "encoder"):
        wrapped = getattr(tok, "cls_token_id", None) is not None and "attention_mask" in specs
        kind = "encoder" if wrapped else "causal-lm"
    fixed = specs["input_ids"][1][1:2]
    if fixed and isinstance(fixed[0], int):
        seq_len = fixed[0]
    feeds, info = text_sample(tok, kind, seq_len)
    ids = feeds["input_ids"]
    rows = token_vocab(model.graph)
    if rows is not None and int(ids.max()) >= rows:
        raise LoadError(f"--tokenizer {tok_dir}: token id {int(ids.max())} is outside the "
                        f"model's embedding ({rows} rows): not this model's tokenizer")
    feeds = model.token_feeds(ids)
    feeds = {k: v for k, v in feeds.items() if k in specs}
    missing = [k for k in specs if k not in feeds]
    if missing:
        raise LoadError(f"--tokenizer: cannot build input '{missing[0]}' from text; give the "
                        "inputs with --inputs FILE.npz")
    model.source.update(tokenizer=os.path.abspath(tok_dir), kind=kind)
    info["shapes"] = {k: list(v.shape) for k, v in feeds.items()}
    model.sample_inputs = feeds
    model.inputs_info["verify"] = info
