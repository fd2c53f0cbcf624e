"""Outlier statistics of the inputs of every linear, on calibration text.

For a linear input X [tokens, channels]:
- ``max_rms``: the worst token's max|x| / rms(x) (what a per-token quantizer's range must span);
- ``kurtosis``: E[(x - mean)^4] / var^2 over all entries (3 for a Gaussian);
- ``channel_max``: max|x| per channel (for plots).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from rotaq.errors import RewriteError, RotaqError
from rotaq.model import Model

log = logging.getLogger(__name__)


def calibration_feeds(model: Model, corpus: str = "lee", n_tokens: int = 512,
                      window: int = 128) -> dict[str, np.ndarray]:
    """Calibration inputs, never the verification ones: the user's calibration rows when given,
    else ``n_tokens`` of ``corpus`` text in windows of ``window`` tokens (windows that overlap
    the verification text are skipped), else synthetic inputs drawn with the calibration seed.
    The set used is recorded in ``model.inputs_info["calibration_used"]``."""
    import time

    from rotaq import inputs as inp

    t0 = time.perf_counter()
    tok_dir = model.source.get("tokenizer")
    if model.calibration is not None:
        from rotaq.rewriter.kv_capture import complete_feeds

        feeds = complete_feeds(model.graph, model.calibration)  # cache graph: empty pasts
        info = model.inputs_info.get("calibration") or inp.describe(feeds, "user")
    elif tok_dir and os.path.isdir(tok_dir) and "input_ids" in model.graph.input_names:
        feeds, info = _text_feeds(model, tok_dir, corpus, n_tokens, window)
    else:
        log.warning("no tokenizer and no calibration inputs for this model: calibrating on "
                    "synthetic inputs (seed %d); give --inputs FILE.npz or --tokenizer DIR for "
                    "real data", inp.CALIB_SEED)
        feeds = inp.synthetic_calibration(model.graph, n_tokens, window)
        info = inp.describe(feeds, "synthetic", seed=inp.CALIB_SEED)
        _check_runs(model, feeds)
    dup = inp.overlap(feeds, model.sample_inputs)
    if dup:
        log.warning("%d calibration sample(s) equal verification samples", dup)
        info = {**info, "rows_also_in_verify": dup}
    used = model.inputs_info.setdefault("calibration_used", [])
    if info not in used:
        used.append(info)
    log.info("calibration inputs: %s %s (%.1f s)", info["source"], info["shapes"],
             time.perf_counter() - t0)
    return feeds


def _check_runs(model: Model, feeds: dict[str, np.ndarray]) -> None:
    """Synthetic calibration inputs the model cannot run on: ask for real ones."""
    from rotaq import inputs as inp

    first = next(inp.chunks(model.graph, feeds, 1))
    try:
        model.graph.run(first)
    except RotaqError:
        raise
    except Exception as err:  # ORT / torch raise many types here
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RewriteError(f"the model fails on synthetic calibration inputs "
                           f"{inp.describe(first, '')['shapes']} ({msg[:200]}); give valid "
                           "inputs with --inputs FILE.npz (Python: inputs=...)") from err


def _text_feeds(model: Model, tok_dir: str, corpus: str, n_tokens: int, window: int
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from transformers import AutoTokenizer

    from rotaq import assets
    from rotaq import inputs as inp

    fixed = inp.input_specs(model.graph)["input_ids"][1][1:2]
    if fixed and isinstance(fixed[0], int):  # a graph with a fixed sequence length
        window = fixed[0]
    verify = model.inputs_info.get("verify", {})
    skip = 0
    if verify.get("source") == "text" and verify.get("text") == corpus:
        skip = -(-int(verify.get("tokens", 0)) // window)  # whole windows covering them
    tok = AutoTokenizer.from_pretrained(tok_dir)
    windows = assets.token_windows(tok, corpus, n_tokens + skip * window, window)[skip:]
    if not windows:
        raise RewriteError(f"calibration text '{corpus}' has fewer than {window} tokens "
                           "beyond the verification text")
    feeds = model.token_feeds(np.asarray(windows))
    feeds = {k: v for k, v in feeds.items() if k in set(model.graph.input_names)}
    info = inp.describe(feeds, "text", text=corpus, tokens=len(windows) * window,
                        skipped_tokens=skip * window or None)
    return feeds, info


def input_stats(x: np.ndarray) -> dict[str, Any]:
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    rms = np.sqrt(np.mean(x * x, axis=1)) + 1e-30
    centered = x - x.mean()
    var = float(np.mean(centered ** 2)) + 1e-30
    return {
        "max_rms": float(np.max(np.max(np.abs(x), axis=1) / rms)),
        "kurtosis": float(np.mean(centered ** 4) / var ** 2),
        "channel_max": np.max(np.abs(x), axis=0),
    }


def activation_stats(model: Model, feeds: dict[str, np.ndarray] | None = None,
                     keys: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per linear (by key): ``name``, ``max_rms``, ``kurtosis``, ``channel_max``."""
    a = model.analysis()
    feeds = feeds if feeds is not None else calibration_feeds(model)
    sites = [a.linears[k] for k in (keys or list(a.linears))]
    values = sorted({s.input for s in sites})
    from rotaq.passes.calib import capture

    caught = capture(model, feeds, values)
    out = {}
    for s in sites:
        st = input_stats(caught[s.input])
        st["name"] = s.name or s.key
        out[s.key] = st
    return out


def linear_roles(a: Any) -> dict[str, set[str]]:
    """Linear keys by structural role: attention inputs, attention output, MLP inputs, MLP
    outputs (residual writers other than o_proj), head."""
    att = a.attention
    qkv = {k for s in att for k in (s.q_proj, s.k_proj, s.v_proj) if k}
    o_projs = {s.o_proj for s in att if s.o_proj}
    readers = {r for b in a.residual.blocks for r in b.readers}
    writers = {w for b in a.residual.blocks for w in b.writers}
    return {"q/k/v": qkv, "o_proj": o_projs, "gate/up": readers - qkv,
            "down_proj": writers - o_projs, "head": set(a.residual.head)}


def worst_by_role(a: Any, before: dict, after: dict) -> list[dict[str, Any]]:
    """Per role: the worst max/RMS and kurtosis of the linear inputs, before and after."""
    rows = []
    for role, keys in linear_roles(a).items():
        keys = [k for k in keys if k in before and k in after]
        if not keys:
            continue
        wb = max(before[k]["max_rms"] for k in keys)
        wa = max(after[k]["max_rms"] for k in keys)
        rows.append({"role": role, "linears": len(keys), "max_rms_before": wb,
                     "max_rms_after": wa, "factor": wb / wa,
                     "kurtosis_before": max(before[k]["kurtosis"] for k in keys),
                     "kurtosis_after": max(after[k]["kurtosis"] for k in keys)})
    return rows


def summarize(stats: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON rows (channel magnitudes dropped)."""
    return [{"key": k, "name": v["name"], "max_rms": round(v["max_rms"], 3),
             "kurtosis": round(v["kurtosis"], 3)} for k, v in stats.items()]


def plot_channels(before: dict[str, Any], after: dict[str, Any] | None, path: str,
                  title: str, recipe: str | None = None) -> dict[str, Any]:
    """Per-channel max|x| of one linear's input, before (and after ``recipe``) as a PNG; both
    panels share one y scale, so the drop in the peaks is visible. Returns the figure's
    ``title`` and each panel's ``ylim``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if after is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(10, 3.2 * rows), squeeze=False, sharey=True)
    labels = [("original", before), (f"after {recipe}" if recipe else "rewritten", after)]
    for ax, (label, st) in zip(axes[:, 0], labels):
        if st is None:
            continue
        cm = st["channel_max"]
        ax.bar(np.arange(len(cm)), cm, width=1.0, color="tab:blue" if label == "original"
               else "tab:green")
        ax.set_title(f"{label}: max/RMS {st['max_rms']:.1f}, kurtosis {st['kurtosis']:.1f}")
        ax.set_xlabel("input channel")
        ax.set_ylabel("max |x|")
    full_title = f"{title} (recipe {recipe})" if recipe else title
    fig.suptitle(full_title)
    fig.tight_layout()
    drawn = {"title": full_title, "ylim": [tuple(ax.get_ylim()) for ax in axes[:, 0]]}
    from rotaq.files import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return drawn
