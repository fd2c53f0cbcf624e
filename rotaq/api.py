"""``rotaq.optimize``: run a recipe on a model, verify it, report."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from rotaq.dtypes import NOISE_FACTOR, graph_dtype
from rotaq.dtypes import tolerance as _dtype_tolerance
from rotaq.errors import LoadError, MatchError, RotaqError, VerificationError
from rotaq.inputs import describe
from rotaq.loading import load
from rotaq.model import TOKENIZER_SUFFIX, Model, max_rel_error, rel_rms_error
from rotaq.progress import stage
from rotaq.recipe import Recipe
from rotaq.version import __version__

log = logging.getLogger(__name__)
REPORT_SCHEMA = 1  # bump when a key of the optimize report changes meaning or goes away


@dataclass
class OptimizeResult:
    model: Model
    report: dict[str, Any]
    reference: list = field(default_factory=list, repr=False)
    exact: bool = False

    def save(self, path: str) -> dict[str, Any]:
        """Write the model (atomically), reload the written file, run it on the sample inputs
        and record its error against the original in the report (``verify["written"]``)."""
        files = self.model.save(path)
        self.report["output"] = os.path.abspath(path)
        self.report["files"] = file_sizes(files)
        if not self.reference:  # optimize(..., verify=False): nothing to compare with
            return self.report
        runtime = "ort" if path.lower().endswith(".onnx") else "torch"
        with stage(f"verifying {os.path.basename(path)} in {_RUNTIME_NAMES[runtime]}"):
            written = load(path)
            written.sample_inputs = self.model.sample_inputs
            out = written.run()
            compare = (self.report["verify"]["rewrite"] or {}).get("presents_compared", False)
            err, rms, detail = _errors(written, self.reference, out, compare)
        self.report["rel_rms_error"] = max(self.report.get("rel_rms_error") or 0.0, rms)
        self.report["verify"]["written"] = {"runtime": runtime, "max_rel_error": err, **detail}
        self.report["max_rel_error"] = max(self.report["max_rel_error"], err)
        _judge(self.report)
        tol = self.report.get("tolerance_used", self.report["tolerance"])
        if self.exact and tol is not None and err > tol:
            _remove_output(path)
            raise VerificationError(f"{path}: written model differs from the original by "
                                    f"{err:.3g} (max relative error) > tolerance {tol:g}")
        return self.report


_RUNTIME_NAMES = {"ort": "ONNX Runtime", "torch": "PyTorch"}


def file_sizes(paths: list[str]) -> list[dict[str, Any]]:
    """``[{"path": absolute path, "bytes": size}]``; a folder counts the files inside it."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(p) for f in fs)
        else:
            size = os.path.getsize(p)
        out.append({"path": os.path.abspath(p), "bytes": size})
    return out


def _errors(model: Model, ref: list, out: list, compare_presents: bool
            ) -> tuple[float, float, dict[str, Any]]:
    """(max relative error, relative RMS error, details) of ``out`` against ``ref``.

    A KV-cache graph runs its sample inputs as a prefill then decode steps fed the presents it
    returned (:meth:`Model.run`), so the logits check the cache the model writes and then reads.
    The error is that of the logits; the presents are compared too (``presents_max_rel_error``)
    and count only when ``compare_presents``: an exact recipe that leaves what the
    cache stores unchanged. A rotation of what it stores (V/O, online Q/K) or its quantization
    makes the presents the new model's own state, legitimately different."""
    from rotaq.decoder_io import is_cache_graph

    if not is_cache_graph(model.graph):
        return max_rel_error(ref, out), rel_rms_error(ref, out), {}
    logits = max_rel_error(ref[:1], out[:1])
    presents = max_rel_error(ref[1:], out[1:])
    err = max(logits, presents) if compare_presents else logits
    detail = {"logits_max_rel_error": logits, "presents_max_rel_error": presents,
              "presents_compared": bool(compare_presents)}
    return err, rel_rms_error(ref[:1], out[:1]), detail


def _judge(report: dict[str, Any]) -> None:
    """``verify.passed``: max_rel_error within the tolerance used (the recipe's, or for an
    fp16/bf16 model the one derived from its rounding noise); None without one."""
    tol = report.get("tolerance_used", report["tolerance"])
    report["verify"]["passed"] = None if tol is None else bool(report["max_rel_error"] <= tol)


def _remove_output(path: str) -> None:
    for p in (path, path + ".data", os.path.splitext(path)[0] + ".onnx.data"):
        if os.path.exists(p):
            os.unlink(p)
    if os.path.isdir(path + TOKENIZER_SUFFIX):
        shutil.rmtree(path + TOKENIZER_SUFFIX, ignore_errors=True)


def _reference(src: Model) -> list:
    """The original's outputs on the sample inputs; synthetic inputs a model cannot run on
    (e.g. a length its Reshape or Pad rejects) are a user problem: ask for real ones."""
    try:
        return src.run()
    except RotaqError:  # already a message for the user
        raise
    except Exception as err:  # ORT / torch raise many types here
        info = src.inputs_info.get("verify", {})
        if info.get("source") != "synthetic":
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(f"the model fails on synthetic sample inputs {info.get('shapes')} "
                        f"({msg[:200]}); give valid inputs with --inputs FILE.npz "
                        "(Python: inputs=...)") from err


def optimize(model: Any, recipe: str | Recipe = "rotate", *, options: dict[str, Any] | None = None,
             verify: bool = True, example_inputs: Any = None, inputs: Any = None,
             verify_inputs: Any = None, tokenizer: str | None = None,
             kv_cache: bool = True, dtype: str | None = None) -> OptimizeResult:
    """Apply ``recipe`` (a built-in name, a JSON path or a :class:`Recipe`) to ``model``.

    The original model is not modified. With ``verify`` the rewritten model is run on the
    sample inputs beside the original; an exact recipe whose max relative error exceeds the
    recipe's tolerance raises :class:`VerificationError`. ``inputs`` / ``verify_inputs`` /
    ``tokenizer`` are passed to :func:`rotaq.load` (user calibration and verification data);
    calibration never uses the verification inputs. The report names both sets
    (``verify_inputs``, ``calibration_inputs``). ``kv_cache`` and ``dtype`` (the output dtype,
    fp32 / fp16 / bf16; default: the source's) as in :func:`rotaq.load`. An exact recipe on an
    fp16/bf16 model is verified against the model's own measured rounding noise
    (:func:`rotaq.dtypes.tolerance`); the report's ``dtype`` and ``tolerance_basis`` say so.
    """
    src = load(model, example_inputs, inputs=inputs, verify_inputs=verify_inputs,
               tokenizer=tokenizer, kv_cache=kv_cache, dtype=dtype)
    rec = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    if options:
        rec = rec.with_options(options)
    passes = rec.build()
    exact = all(p.exact for p in passes)
    if not verify and hasattr(src.graph, "check_unverified"):
        src.graph.check_unverified()
    needs = any(getattr(p, "needs_linears", True) for p in passes)  # all built-in passes do
    if needs and not src.analysis().linears:
        raise MatchError(f"no linear found in {src.source.get('name') or 'the model'} (a linear "
                         "is a MatMul/Gemm/aten.linear with a constant 2-D weight): recipe "
                         f"'{rec.name}' has nothing to rewrite")
    reference = []
    if verify:
        with stage("running the original on the sample inputs"):
            reference = _reference(src)
        _free_sessions(src)  # one model's session in memory at a time
    tol, basis, noise = _tolerance(src, rec.tolerance) if verify and exact else (
        rec.tolerance, "recipe tolerance", None)
    work = src.clone()
    work.inputs_info["calibration_used"] = []  # the sets this run's passes calibrate on
    t0 = time.perf_counter()
    pass_reports = []
    for p in passes:
        t = time.perf_counter()
        with stage(f"pass {p.name}"):
            res = p(work)
        work = res.model
        pass_reports.append({"pass": p.name, "modified": res.modified, "stats": res.stats,
                             "seconds": round(time.perf_counter() - t, 3)})
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA, "rotaq_version": __version__,
        "model": src.source.get("name", ""), "ir": src.ir, "recipe": rec.to_dict(),
        "passes": pass_reports, "seconds": round(time.perf_counter() - t0, 3),
        "exact": exact, "tolerance": rec.tolerance, "tolerance_used": tol,
        "tolerance_basis": basis, "dtype": _dtype_report(src, work),
        "verify": {"rewrite": None, "written": None, "passed": None}, "max_rel_error": None,
        "rel_rms_error": None,
        "verify_inputs": src.inputs_info.get("verify") or describe(src.sample_inputs, "given"),
        "calibration_inputs": work.inputs_info.get("calibration_used", []),
    }
    if noise is not None:
        report["rounding_noise"] = {**noise, "factor": NOISE_FACTOR}
    if verify:
        runtime = "ort" if work.ir == "onnx" else "torch"
        from rotaq.decoder_io import is_cache_graph

        cache = [p["stats"]["kv_cache"] for p in pass_reports if "kv_cache" in p["stats"]]
        # presents compared when they should not change
        compare = is_cache_graph(work.graph) and exact and all(c == "unchanged" for c in cache)
        with stage(f"verifying the rewrite in {_RUNTIME_NAMES[runtime]}"):
            out = work.run()
            err, rms, detail = _errors(work, reference, out, compare)
        _free_sessions(work)
        report["verify"]["rewrite"] = {"runtime": runtime, "max_rel_error": err, **detail}
        report["max_rel_error"] = err
        _judge(report)
        report["rel_rms_error"] = rms
        if exact and tol is not None and err > tol:
            raise VerificationError(f"recipe '{rec.name}' is exact but changed the outputs by "
                                    f"{err:.3g} (max relative error) > tolerance {tol:.3g} "
                                    f"({basis})")
    return OptimizeResult(work, report, reference, exact)


def _free_sessions(model: Model) -> None:
    free = getattr(model.graph, "free_sessions", None)
    if free is not None:
        free()


def _tolerance(src: Model, tol: float | None) -> tuple[float | None, str, dict | None]:
    """(bound, why, noise): the recipe tolerance for an fp32 model; for an fp16/bf16 one
    max(tolerance, NOISE_FACTOR x e0) with e0 its measured rounding noise
    (:func:`rotaq.dtypes.tolerance`)."""
    return _dtype_tolerance(src.graph, src.sample_inputs, tol)


def _dtype_report(src: Model, work: Model) -> dict[str, str]:
    """The source dtype (before a ``dtype=`` conversion at load) and the output's."""
    info = src.inputs_info.get("dtype") or {}
    out = graph_dtype(src.graph)  # the rewrite writes every tensor in the dtype it replaces
    return {"source": info.get("source", out), "output": out}
