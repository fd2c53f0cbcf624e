"""Scale benchmark (issue 12): wall time, peak RSS and CPU time of rotaq's stages on
SmolLM2-135M and on a synthetic ~1.6B Llama (bf16 safetensors, written by rotaq.synthetic).

Every stage is a subprocess run under ``/usr/bin/time -v``; its figures, the machine load
(``uptime``) before and after, the CPU and the git branch are printed and written to
benchmarks/results/scale.json and scale.md (a stage run again replaces its row; the others
keep theirs).

Run: python benchmarks/scale_bench.py [--only smollm2|synthetic] [--skip STAGE,...]
     [--work DIR] [--note TEXT]
     [--rewrite] (write the synthetic model again; ROTAQ_SCALE_MODEL=tiny: a small one)
Stages: smol-rotate (cold cache), smol-gptq, smol-ppl, smol-gptq-w1, smol-gptq-w2,
        syn-write, syn-rotate, syn-rtn, syn-gptq, syn-check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_bench import cpu_info  # the CPU description the benchmarks share

RESULTS = ROOT / "benchmarks" / "results"
GiB = 2**30
PPL_REF = 27.14  # README, quant table: w4a16-rotated on SmolLM2-135M (wiki, 8192 tokens, ORT)
CHECK_TOKENS = 32
MAX_RSS = [14 * GiB]  # --max-rss-gib


MODELS = {"1.6b": {}, "tiny": {"hidden": 256, "intermediate": 512, "layers": 2,
                                 "heads": 4, "kv_heads": 2}}


def _model() -> str:
    return os.environ.get("ROTAQ_SCALE_MODEL", "1.6b")


def _synthetic_dir() -> Path:
    return Path.home() / ".cache" / "rotaq" / "synthetic" / f"llama-{_model()}-bf16"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rotaq.cli", *args]


def _has_option(cmd: str, option: str) -> bool:
    out = subprocess.run(_cli(cmd, "--help"), check=False, capture_output=True, text=True, env=_env())
    return option in out.stdout


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _load() -> str:
    out = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout
    m = re.search(r"load average:\s*(.*)", out)
    return m.group(1).strip() if m else out.strip()


def _time_v(text: str) -> dict[str, float]:
    """Wall seconds, peak RSS bytes and user+sys seconds from ``/usr/bin/time -v``."""
    def field(label: str) -> str:
        lines = [ln for ln in text.splitlines() if label in ln]
        return lines[0].rsplit(": ", 1)[1].strip() if lines else "nan"

    wall = 0.0
    for part in field("Elapsed (wall clock) time").split(":"):
        wall = wall * 60 + float(part)
    return {"wall_s": round(wall, 1), "peak_rss": int(field("Maximum resident set size")) * 1024,
            "cpu_s": round(float(field("User time")) + float(field("System time")), 1)}


def _guarded(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``cmd``, killing its process tree when its total RSS passes ``MAX_RSS`` (the
    machine is shared: a stage that would exhaust its memory is stopped and reported)."""
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True,
                                start_new_session=True)
        killed = None
        while proc.poll() is None:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]
                rss = sum(p.memory_info().rss for p in tree)
            except psutil.Error:
                rss = 0
            if rss > MAX_RSS[0]:
                killed = rss
                for child in tree[1:]:  # /usr/bin/time itself stays, to report the figures
                    child.kill()
                proc.wait()
                break
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        stderr = err.read()
        if killed:
            stderr += f"\nkilled by the benchmark: RSS {killed / GiB:.1f} GiB > {MAX_RSS[0] / GiB:.0f} GiB"
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), stderr)


def _last_json(text: str) -> dict:
    start = text.rfind("\n{")
    for cand in ([text[start + 1:]] if start >= 0 else []) + [text]:
        try:
            d = json.loads(cand)
            return d if isinstance(d, dict) else {}
        except ValueError:
            continue
    return {}


def _summary(report: dict) -> dict:
    """The scalar figures of a CLI JSON report (verification, ppl)."""
    keep = ("max_rel_error", "tolerance", "verified", "ok", "seconds", "ppl", "input_tokens",
            "dtype", "tolerance_basis", "rel_rms_error")
    out = {k: report[k] for k in keep if k in report and not isinstance(report[k], (dict, list))}
    ver = report.get("verification")
    if isinstance(ver, dict):
        out.update({f"verification.{k}": v for k, v in ver.items()
                    if not isinstance(v, (dict, list))})
    return out


def run_stage(name: str, cmd: list[str], env: dict[str, str], targets: dict) -> dict:
    """Run ``cmd`` under /usr/bin/time -v and return its row."""
    tfile = Path(tempfile.mkstemp(prefix=f"scale-{name}-", suffix=".time")[1])
    load0 = _load()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    done = _guarded(["/usr/bin/time", "-v", "-o", str(tfile), *cmd], env)
    row = {"stage": name, "cmd": " ".join(cmd).replace(sys.executable, "python"),
           "rc": done.returncode, "load_before": load0, "load_after": _load(),
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
           **_time_v(tfile.read_text()), **_summary(_last_json(done.stdout))}
    tfile.unlink()
    if done.returncode != 0:
        tail = [ln for ln in done.stderr.strip().splitlines() if ln.strip()][-3:] or ["?"]
        row["error"] = " / ".join(ln.strip()[-200:] for ln in tail)
    row["targets"] = targets
    row["pass"] = _judge(row, targets)
    print(f"   wall {row['wall_s']} s, peak RSS {row['peak_rss'] / GiB:.2f} GiB, "
          f"cpu {row['cpu_s']} s, rc {row['rc']}, load {load0} -> {row['load_after']}"
          + (f", error: {row['error']}" if "error" in row else "")
          + (f", {row['pass']}" if targets else ""), flush=True)
    extra = {k: v for k, v in row.items() if k in ("max_rel_error", "tolerance", "ppl")
             or k.startswith("check.")}
    if extra:
        print(f"   {extra}", flush=True)
    return row


def _judge(row: dict, targets: dict) -> str:
    if not targets:
        return ""
    fails = []
    if row["rc"] != 0:
        fails.append(f"exit {row['rc']}")
    if "rss_gib" in targets and row["peak_rss"] > targets["rss_gib"] * GiB:
        fails.append(f"RSS > {targets['rss_gib']} GiB")
    if "wall_s" in targets and row["wall_s"] > targets["wall_s"]:
        fails.append(f"wall > {targets['wall_s']} s")
    if "ppl" in targets:
        ppl = row.get("ppl")
        if ppl is None or abs(ppl / targets["ppl"] - 1) > targets["ppl_rel"]:
            fails.append(f"ppl not within {targets['ppl_rel']:.1%} of {targets['ppl']}")
    return "FAIL: " + "; ".join(fails) if fails else "ok"


# ---- stages ---------------------------------------------------------------------------------
def smollm2_stages(work: Path, skip: set[str], workers: bool) -> list[dict]:
    rows = []
    cold = Path(tempfile.mkdtemp(prefix="rotaq-cold-cache-"))
    env = _env(ROTAQ_CACHE=str(cold))
    try:
        if "smol-rotate" not in skip:
            rows.append(run_stage(
                "smol-rotate", _cli("optimize", "smollm2-135m", "--recipe", "rotate", "-o",
                                    str(work / "smol-rotate.onnx"), "--json"),
                env, {"rss_gib": 1.5, "wall_s": 90}))
        gptq = ["--recipe", "w4a16-rotated", "--set", "calib_tokens=1024", "--json"]
        out = work / "smol-w4a16.onnx"
        if "smol-gptq" not in skip:  # the export is cached by smol-rotate when it ran
            rows.append(run_stage("smol-gptq", _cli("optimize", "smollm2-135m", *gptq, "-o",
                                                    str(out)), env, {"wall_s": 180}))
        if "smol-ppl" not in skip and out.is_file():
            rows.append(run_stage("smol-ppl", _cli("eval", str(out), "--task", "ppl", "--json"),
                                  env, {"ppl": PPL_REF, "ppl_rel": 0.005}))
        if workers:
            for n in (1, 2):
                if f"smol-gptq-w{n}" not in skip:
                    rows.append(run_stage(
                        f"smol-gptq-w{n}", _cli("optimize", "smollm2-135m", *gptq, "--workers",
                                                str(n), "-o", str(work / f"smol-w{n}.onnx")),
                        _env(), {}))  # the default (warm) cache: both timed alike
    finally:
        shutil.rmtree(cold, ignore_errors=True)
    return rows


def synthetic_stages(work: Path, skip: set[str], dtype_opt: bool, rewrite: bool) -> list[dict]:
    rows, src, env = [], _synthetic_dir(), _env()
    if "syn-write" not in skip or not src.is_dir():
        rows.append(run_stage("syn-write", [sys.executable, __file__, "--stage", "write"]
                              + (["--rewrite"] if rewrite else []), env, {"rss_gib": 1.0}))
    # fp32 and bf16 outputs: both streamed (captured and stamped in the output dtype)
    fp32 = ["--dtype", "fp32"] if dtype_opt else []
    if "syn-rotate" not in skip:
        rows.append(run_stage("syn-rotate", _cli("optimize", str(src), "--recipe", "rotate",
                                                 *fp32, "-o", str(work / "syn-rotate.onnx"),
                                                 "--json"), env, {"rss_gib": 3}))
    if "syn-rotate-bf16" not in skip and dtype_opt:  # the source's own dtype, streamed too
        rows.append(run_stage("syn-rotate-bf16", _cli("optimize", str(src), "--recipe",
                                                      "rotate", "--dtype", "bf16", "-o",
                                                      str(work / "syn-rotate-bf16.onnx"),
                                                      "--json"), env, {"rss_gib": 3}))
    if "syn-rtn" not in skip:
        rows.append(run_stage("syn-rtn", _cli("optimize", str(src), "--recipe", "w4a16-rotated",
                                              "--set", "method=rtn", *fp32, "-o",
                                              str(work / "syn-rtn.onnx"), "--json"),
                              env, {"rss_gib": 3}))
    if "syn-gptq" not in skip:
        rows.append(run_stage("syn-gptq", _cli("optimize", str(src), "--recipe", "w4a16-rotated",
                                               "--set", "calib_tokens=128", "--set",
                                               "calib_window=128", *fp32, "-o",
                                               str(work / "syn-gptq.onnx"), "--json"),
                              env, {"rss_gib": 4}))
    if "syn-check" not in skip:
        row = run_stage("syn-check", [sys.executable, __file__, "--stage", "check", "--work",
                                      str(work)], env, {})
        try:
            row.update(json.loads((work / "check.json").read_text()))
        except (OSError, ValueError):
            pass
        rows.append(row)
    return rows


def stage_write(rewrite: bool) -> None:
    from rotaq.synthetic import SyntheticLlama, write_llama

    cfg = SyntheticLlama(**MODELS[_model()])
    if rewrite:
        shutil.rmtree(_synthetic_dir(), ignore_errors=True)
    print(f"{cfg.num_parameters() / 1e9:.3f}B parameters, {cfg.nbytes() / GiB:.2f} GiB "
          f"{cfg.dtype}, {cfg.nbytes('float32') / GiB:.2f} GiB in float32")
    write_llama(_synthetic_dir(), cfg)


def _ort_logits(path: Path, ids) -> object:
    """Logits of an ONNX decoder on ``ids`` [1, seq] in ORT (empty KV cache where it has one)."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seq = ids.shape[1]
    feeds = {}
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids.astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, seq), types[i.type])
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(seq, dtype=types[i.type])[None]
        elif i.name.startswith("past"):
            shape = [1] + [d if isinstance(d, int) else 0 for d in i.shape[1:]]  # empty
            feeds[i.name] = np.zeros(shape, types[i.type])
        else:
            raise ValueError(f"unexpected input {i.name} {i.shape}")
    names = [o.name for o in sess.get_outputs()]
    out = sess.run([names[0] if "logits" not in names else "logits"], feeds)[0]
    return out.astype(np.float32)


def _blockwise_logits(path: Path, ids) -> object:
    """Logits of an ONNX decoder computed by rotaq block by block (one block's weights in
    memory at a time), as its verification runs it."""
    import numpy as np

    import rotaq
    from rotaq.rewriter.blocks import run_blockwise
    from rotaq.rewriter.kv_capture import token_feeds

    g = rotaq.load(str(path)).graph
    return np.asarray(run_blockwise(g, token_feeds(g, ids))[0], np.float32)


def stage_check(work: Path) -> None:
    """Each synthetic output in ORT vs the block-by-block float32 reference of the source."""
    import numpy as np

    from rotaq.synthetic import blockwise_logits

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, (1, CHECK_TOKENS))
    t0 = time.time()
    ref = blockwise_logits(_synthetic_dir(), ids).numpy()
    res = {"check.reference_s": round(time.time() - t0, 1), "check.tokens": CHECK_TOKENS}
    for name in ("syn-rotate", "syn-rtn", "syn-gptq"):
        path = work / f"{name}.onnx"
        if not path.is_file():
            continue
        data = sum(f.stat().st_size for f in work.glob(f"{name}.onnx*"))
        try:
            out = _ort_logits(path, ids)
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
            top1 = float((out.argmax(-1) == ref.argmax(-1)).mean())
            res[f"check.{name}"] = {"bytes": data, "max_rel_error": err, "top1_agreement": top1}
            if name != "syn-rotate":  # lossy: the file in ORT vs rotaq's block-by-block run of it
                own = _blockwise_logits(path, ids)
                res[f"check.{name}"]["vs_own_blockwise"] = float(
                    np.abs(out - own).max() / np.abs(own).max())
        except Exception as exc:  # noqa: BLE001  reported, not fatal: the other outputs are still checked
            res[f"check.{name}"] = {"bytes": data, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(name, res[f"check.{name}"], flush=True)
    (work / "check.json").write_text(json.dumps(res, indent=1))


# ---- results --------------------------------------------------------------------------------
def _git() -> dict:
    def g(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, check=False, capture_output=True, text=True).stdout.strip()
    return {"branch": g("rev-parse", "--abbrev-ref", "HEAD"), "commit": g("rev-parse", "--short",
                                                                          "HEAD")}


def write_results(rows: list[dict], note: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    jpath = RESULTS / "scale.json"
    try:
        old = json.loads(jpath.read_text())
    except (OSError, ValueError):
        old = {"rows": []}
    fresh = {r["stage"] for r in rows}
    meta = {"cpu": cpu_info(), **_git(), "note": note}
    for r in rows:
        r.update({"git": f"{meta['branch']}@{meta['commit']}", "note": note})
    order = ["smol-rotate", "smol-gptq", "smol-ppl", "smol-gptq-w1", "smol-gptq-w2",
             "syn-write", "syn-rotate", "syn-rotate-bf16", "syn-rtn", "syn-gptq", "syn-check"]
    all_rows = [r for r in old["rows"] if r["stage"] not in fresh] + rows
    all_rows.sort(key=lambda r: order.index(r["stage"]) if r["stage"] in order else 99)
    jpath.write_text(json.dumps({"cpu": meta["cpu"], "rows": all_rows}, indent=1))
    cpu = meta["cpu"]
    lines = [(f"CPU: {cpu['model']}, {cpu['cores']} cores; int8-relevant flags: "
             f"{', '.join(cpu['int8_flags']) or 'none'}. Each stage is a subprocess under "
             "/usr/bin/time -v; load = 1/5/15-min load averages before the stage (the machine "
             "is shared). SmolLM2-135M rotate starts from an empty ROTAQ_CACHE (cold: builtin "
             "conversion + export); smol-gptq reuses that cache. Synthetic: a Llama with random "
             "weights (hidden 2048, MLP 8192, 24 layers, 16/8 heads, SmolLM2 vocabulary, tied "
             "embeddings), 1.62B parameters, bf16 safetensors (3.0 GiB; 6.0 GiB in fp32)."), "",
             "| stage | wall s | peak RSS GiB | CPU s | target | result | figures | load | git |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in all_rows:
        t = r.get("targets") or {}
        tgt = ", ".join(f"{k.replace('_gib', ' GiB').replace('_s', ' s')} {v}" for k, v in
                        t.items() if k != "ppl_rel") + (f" +-{t['ppl_rel']:.1%}" if
                                                          "ppl_rel" in t else "")
        figs = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()
                if k in ("max_rel_error", "tolerance", "ppl") or k.startswith("check.")}
        if r.get("error"):
            figs["error"] = r["error"]
        fig = "; ".join(f"{k}: {json.dumps(v) if isinstance(v, dict) else v}"
                        for k, v in figs.items()).replace("|", "/")
        lines.append(f"| {r['stage']} | {r['wall_s']} | {r['peak_rss'] / GiB:.2f} | "
                     f"{r['cpu_s']} | {tgt} | {r.get('pass', '')} | {fig} | {r['load_before']} | "
                     f"{r['git']} {r.get('note', '')} |")
    lines += ["", "Commands:", ""] + [f"- {r['stage']}: `{r['cmd']}`" for r in all_rows]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'scale.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("smollm2", "synthetic"))
    ap.add_argument("--skip", default="", help="comma-separated stage names")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "rotaq-scale-bench"))
    ap.add_argument("--note", default="", help="e.g. the branches merged for this run")
    ap.add_argument("--rewrite", action="store_true",
                    help="write the synthetic model again (default: reused when present)")
    ap.add_argument("--stage", choices=("write", "check"), help=argparse.SUPPRESS)
    ap.add_argument("--max-rss-gib", type=float, default=14.0,
                    help="kill a stage whose processes pass this RSS (default 14)")
    args = ap.parse_args()
    MAX_RSS[0] = int(args.max_rss_gib * GiB)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage == "write":
        return stage_write(args.rewrite)
    if args.stage == "check":
        return stage_check(work)
    skip = {s for s in args.skip.split(",") if s}
    print(f"CPU {cpu_info()}, load {_load()}", flush=True)
    rows: list[dict] = []
    try:
        if args.only in (None, "smollm2"):
            rows += smollm2_stages(work, skip, _has_option("optimize", "--workers"))
        if args.only in (None, "synthetic"):
            rows += synthetic_stages(work, skip, _has_option("optimize", "--dtype"), args.rewrite)
    finally:
        if rows:
            write_results(rows, args.note)


if __name__ == "__main__":
    main()
