"""``rotaq.optimize``: run a recipe on a model, verify it, report."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from rotaq.errors import VerificationError
from rotaq.loading import load
from rotaq.model import TOKENIZER_SUFFIX, Model, max_rel_error
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
            err = max_rel_error(self.reference, written.run())
        self.report["verify"]["written"] = {"runtime": runtime, "max_rel_error": err}
        self.report["max_rel_error"] = max(self.report["max_rel_error"], err)
        _judge(self.report)
        tol = self.report["tolerance"]
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


def _judge(report: dict[str, Any]) -> None:
    """``verify.passed``: max_rel_error within the recipe's tolerance (None without one)."""
    tol = report["tolerance"]
    report["verify"]["passed"] = None if tol is None else bool(report["max_rel_error"] <= tol)


def _remove_output(path: str) -> None:
    for p in (path, path + ".data", os.path.splitext(path)[0] + ".onnx.data"):
        if os.path.exists(p):
            os.unlink(p)
    if os.path.isdir(path + TOKENIZER_SUFFIX):
        shutil.rmtree(path + TOKENIZER_SUFFIX, ignore_errors=True)


def optimize(model: Any, recipe: str | Recipe = "rotate", *, options: dict[str, Any] | None = None,
             verify: bool = True, example_inputs: Any = None) -> OptimizeResult:
    """Apply ``recipe`` (a built-in name, a JSON path or a :class:`Recipe`) to ``model``.

    The original model is not modified. With ``verify`` the rewritten model is run on the
    sample inputs beside the original; an exact recipe whose max relative error exceeds the
    recipe's tolerance raises :class:`VerificationError`.
    """
    src = load(model, example_inputs)
    rec = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    if options:
        rec = rec.with_options(options)
    passes = rec.build()
    exact = all(getattr(p, "exact", False) for p in passes)
    reference = []
    if verify:
        with stage("running the original on the sample inputs"):
            reference = src.run()
    work = src.clone()
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
        "exact": exact, "tolerance": rec.tolerance,
        "verify": {"rewrite": None, "written": None, "passed": None}, "max_rel_error": None,
    }
    if verify:
        runtime = "ort" if work.ir == "onnx" else "torch"
        with stage(f"verifying the rewrite in {_RUNTIME_NAMES[runtime]}"):
            err = max_rel_error(reference, work.run())
        report["verify"]["rewrite"] = {"runtime": runtime, "max_rel_error": err}
        report["max_rel_error"] = err
        _judge(report)
        report["verify_inputs"] = {k: list(v.shape) for k, v in src.sample_inputs.items()}
        if exact and rec.tolerance is not None and err > rec.tolerance:
            raise VerificationError(f"recipe '{rec.name}' is exact but changed the outputs by "
                                    f"{err:.3g} (max relative error) > tolerance {rec.tolerance:g}")
    return OptimizeResult(work, report, reference, exact)
