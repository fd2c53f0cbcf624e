"""Outlier statistics of the inputs of every linear, on calibration text.

For a linear input X [tokens, channels]:
- ``max_rms``: the worst token's max|x| / rms(x) (what a per-token quantizer's range must span);
- ``kurtosis``: E[(x - mean)^4] / var^2 over all entries (3 for a Gaussian);
- ``channel_max``: max|x| per channel (for plots).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from rotaq.model import Model
from rotaq.passes.calib import calibration_feeds, capture

log = logging.getLogger(__name__)


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
