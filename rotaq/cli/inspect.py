"""``rotaq inspect``: linears, attention, norms and the residual stream of a model, and with
``--stats`` / ``--plot`` the input statistics of each linear."""

from __future__ import annotations

import argparse
import os
from typing import Any

from rotaq.cli.common import add_input_args, add_stats_args, emit, input_options
from rotaq.errors import RotaqError
from rotaq.progress import stage


def _print_inspect(d: dict[str, Any]) -> None:
    print(f"model: {d['model']}  ({d['ir']})")
    quant = sum(1 for x in d["linears"] if x.get("quantized"))
    print(f"linears: {d['num_linears']}" + (f" ({quant} already quantized)" if quant else ""))
    kinds: dict[str, int] = {}
    for n in d["norms"]:
        kinds[n["kind"]] = kinds.get(n["kind"], 0) + 1
    skip = sum(1 for n in d["norms"] if n.get("residual_add"))
    print("norms: " + ", ".join(f"{v} {'RMSNorm' if k == 'rms' else 'LayerNorm'}"
                                for k, v in kinds.items())
          + (f" ({skip} with the residual add fused in)" if skip else ""))
    if d["attention"]:
        a0 = d["attention"][0]
        print(f"attention: {len(d['attention'])} sites ({a0['kind']}), {a0['num_heads']} heads, "
              f"{a0['num_kv_heads']} KV heads, head size {a0['head_dim']}")
    if d.get("experts"):
        e0 = d["experts"][0]
        print(f"MoE experts: {len(d['experts'])} grouped weights x {e0['num_experts']} experts; "
              f"routers (kept in float): {len(d['routers'])}")
    r = d["residual"]
    print(f"residual stream: {d['structure']}, {r['blocks']} blocks, embedding "
          f"{r['embedding']}, final norm {r['final_norm']}, head "
          f"{', '.join(map(str, r['head'])) or 'none'}")
    for i, b in enumerate(d.get("block_structure", [])):
        before = ", ".join(b["norm_before"]) or "no norm"
        after = f"; norm on the sublayer output: {', '.join(b['norm_after_sublayer'])}" \
            if b["norm_after_sublayer"] else ""
        print(f"  block {i}: reads through {before}{after}; writers "
              f"{', '.join(b['writers'])}{' (parallel)' if b['parallel'] else ''}")
    if "unmatched" in d:
        print(f"not matched ({len(d['unmatched'])}):")
        for u in d["unmatched"]:
            print(f"  {u['kind']:9s} {u['reason']}")
    if "stats" in d:
        _print_stats(d)


def _print_stats(d: dict[str, Any]) -> None:
    """Per-linear input statistics, before and (with --recipe) after, side by side."""
    after = {r["key"]: r for r in d.get("stats_after", [])}
    rec = d.get("stats_recipe")
    print(f"\ninput statistics of each linear ({d['stats_tokens']} tokens of {d['stats_text']}"
          + (f"; before -> after recipe {rec}" if rec else "") + ")")
    if after:
        print(f"{'linear':44s} {'max/RMS before':>14s} {'after':>7s} {'kurtosis before':>16s} "
              f"{'after':>7s}")
    else:
        print(f"{'linear':44s} {'max/RMS':>8s} {'kurtosis':>9s}")
    for row in d["stats"]:
        name = row["name"] if len(row["name"]) <= 44 else "..." + row["name"][-41:]
        a = after.get(row["key"])
        if a:
            print(f"{name:44s} {row['max_rms']:14.1f} {a['max_rms']:7.1f} "
                  f"{row['kurtosis']:16.1f} {a['kurtosis']:7.1f}")
        else:
            print(f"{name:44s} {row['max_rms']:8.1f} {row['kurtosis']:9.1f}")
    if d.get("stats_summary"):
        print(f"\nworst per role: {'role':10s} {'linears':>7s} {'max/RMS before':>14s} "
              f"{'after':>6s} {'factor':>7s} {'kurtosis before':>15s} {'after':>6s}")
        for r in d["stats_summary"]:
            print(f"{'':16s}{r['role']:10s} {r['linears']:7d} {r['max_rms_before']:14.1f} "
                  f"{r['max_rms_after']:6.1f} {r['factor']:6.1f}x {r['kurtosis_before']:15.1f} "
                  f"{r['kurtosis_after']:6.1f}")
    if "plot" in d:
        print(f"\nplot of the input channels of {d['plot']['layer']}: {d['plot']['file']}")


def cmd_inspect(args: argparse.Namespace) -> int:
    import rotaq
    from rotaq.eval import stats as st

    if args.plot:  # checked before the statistics run
        _check_plot_path(args.plot)
    model = rotaq.load(args.model, ir="onnx" if args.onnx else "fx", **input_options(args))
    data = rotaq.inspect(model, explain=args.explain)
    if args.stats or args.plot:
        names = {k: s.name or s.key for k, s in model.analysis().linears.items()}
        layer = _pick_layer(names, args.layer) if args.layer else None
        feeds = st.calibration_feeds(model, args.text, args.tokens, args.window)
        with stage(f"input statistics of {len(names)} linears"):
            before = st.activation_stats(model, feeds)
        data["stats"] = st.summarize(before)
        data["stats_text"], data["stats_tokens"] = args.text, _feed_tokens(feeds)
        after = None
        if args.recipe:
            res = rotaq.optimize(model, args.recipe)
            with stage(f"input statistics after {args.recipe}"):
                after = st.activation_stats(res.model, feeds)
            data["stats_after"] = st.summarize(after)
            data["stats_recipe"] = args.recipe
            data["stats_summary"] = st.worst_by_role(model.analysis(), before, after)
        if args.plot:
            key = layer or max(before, key=lambda k: before[k]["max_rms"])
            title = f"{data['model']}: input of {before[key]['name']}"
            st.plot_channels(before[key], after[key] if after else None, args.plot, title,
                             recipe=args.recipe)
            data["plot"] = {"file": os.path.abspath(args.plot), "layer": before[key]["name"]}
    emit(data, args.json, _print_inspect)
    return 0


def _feed_tokens(feeds: dict[str, Any]) -> int:
    ids = feeds.get("input_ids")
    return int(ids.size) if ids is not None else 0


def _pick_layer(names: dict[str, str], layer: str) -> str:
    """The key of the linear ``layer`` names (its key, its name, or a unique part of a name)."""
    if layer in names:
        return layer
    hits = [k for k, v in names.items() if v == layer] or \
        [k for k, v in names.items() if layer in v]
    if not hits:
        raise RotaqError(f"--layer '{layer}' matches no linear (try a name from `rotaq inspect "
                         "--stats`)")
    if len(hits) > 1:
        some = ", ".join(f"{k} ({names[k]})" for k in hits[:4])
        raise RotaqError(f"--layer '{layer}' matches {len(hits)} linears: {some}"
                         f"{', ...' if len(hits) > 4 else ''}; give one key or full name")
    return hits[0]


def _check_plot_path(path: str) -> None:
    """Before the statistics run: the plot's folder must exist and the name must be free."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise RotaqError(f"--plot {path}: is a directory (give a file name, e.g. p.png)")
    if not os.path.isdir(folder):
        raise RotaqError(f"--plot {path}: folder {os.path.dirname(path) or folder} does not "
                         "exist")
    if not os.access(folder, os.W_OK):
        raise RotaqError(f"--plot {path}: folder {folder} is not writable")



def add_command(sub: Any, model_help: str) -> None:
    """Add ``inspect`` to the ``rotaq`` command's subparsers."""
    sp = sub.add_parser("inspect", help="show linears, attention, norms and the residual stream")
    sp.add_argument("model", help=model_help)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("--onnx", action="store_true", help="inspect the ONNX form of a torch model")
    sp.add_argument("--explain", action="store_true",
                    help="also say why each candidate linear, matmul, norm or attention was not "
                         "matched")
    sp.add_argument("--stats", action="store_true",
                    help="per-linear input max/RMS ratio and kurtosis on calibration text")
    sp.add_argument("--recipe", default=None,
                    help="with --stats/--plot: also measure after this recipe (e.g. rotate)")
    sp.add_argument("--plot", default=None, metavar="FILE.png",
                    help="draw per-channel input magnitudes of one linear (before/after --recipe)")
    sp.add_argument("--layer", default=None,
                    help="linear to plot (name or key; default: the worst max/RMS)")
    add_stats_args(sp)
    add_input_args(sp)
    sp.set_defaults(func=cmd_inspect)
