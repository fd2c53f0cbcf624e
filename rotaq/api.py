"""``rotaq.optimize``: run a recipe on a model, verify it, report."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from rotaq.errors import LoadError, VerificationError
from rotaq.inputs import describe
from rotaq.loading import load
from rotaq.model import Model, max_rel_error, rel_rms_error
from rotaq.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    model: Model
    report: dict[str, Any]
    reference: list = field(default_factory=list, repr=False)
    exact: bool = False

    def save(self, path: str) -> dict[str, Any]:
        """Write the model (atomically), reload the written file, run it on the sample inputs
        and record its error against the original in the report (``verify[<runtime>]``)."""
        self.model.save(path)
        written = load(path)
        written.sample_inputs = self.model.sample_inputs
        out = written.run()
        err = max_rel_error(self.reference, out)
        runtime = "ort" if written.ir == "onnx" else "torch"
        self.report["verify"][runtime] = err
        self.report["max_rel_error"] = max(self.report["verify"].values())
        self.report["rel_rms_error"] = max(self.report.get("rel_rms_error", 0.0),
                                           rel_rms_error(self.reference, out))
        self.report["output"] = os.path.abspath(path)
        tol = self.report["tolerance"]
        if self.exact and tol is not None and err > tol:
            _remove_output(path)
            raise VerificationError(f"{path}: written model differs from the original by "
                                    f"{err:.3g} (max relative error) > tolerance {tol:g}")
        return self.report


def _remove_output(path: str) -> None:
    for p in (path, path + ".data", os.path.splitext(path)[0] + ".onnx.data"):
        if os.path.exists(p):
            os.unlink(p)


def _reference(src: Model) -> list:
    """The original's outputs on the sample inputs; synthetic inputs a model cannot run on
    (e.g. a length its Reshape or Pad rejects) are a user problem: ask for real ones."""
    try:
        return src.run()
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
             verify_inputs: Any = None, tokenizer: str | None = None) -> OptimizeResult:
    """Apply ``recipe`` (a built-in name, a JSON path or a :class:`Recipe`) to ``model``.

    The original model is not modified. With ``verify`` the rewritten model is run on the
    sample inputs beside the original; an exact recipe whose max relative error exceeds the
    recipe's tolerance raises :class:`VerificationError`. ``inputs`` / ``verify_inputs`` /
    ``tokenizer`` are passed to :func:`rotaq.load` (user calibration and verification data);
    calibration never uses the verification inputs. The report names both sets
    (``verify_inputs``, ``calibration_inputs``).
    """
    src = load(model, example_inputs, inputs=inputs, verify_inputs=verify_inputs,
               tokenizer=tokenizer)
    rec = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    if options:
        rec = rec.with_options(options)
    passes = rec.build()
    exact = all(getattr(p, "exact", False) for p in passes)
    reference = _reference(src) if verify else []
    work = src.clone()
    work.inputs_info["calibration_used"] = []  # the sets this run's passes calibrate on
    t0 = time.perf_counter()
    pass_reports = []
    for p in passes:
        t = time.perf_counter()
        log.info("running pass %s", p.name)
        res = p(work)
        work = res.model
        pass_reports.append({"pass": p.name, "modified": res.modified, "stats": res.stats,
                             "seconds": round(time.perf_counter() - t, 3)})
    report: dict[str, Any] = {
        "model": src.source.get("name", ""), "ir": src.ir, "recipe": rec.to_dict(),
        "passes": pass_reports, "seconds": round(time.perf_counter() - t0, 3),
        "exact": exact, "tolerance": rec.tolerance, "verify": {},
        "verify_inputs": src.inputs_info.get("verify") or describe(src.sample_inputs, "given"),
        "calibration_inputs": work.inputs_info.get("calibration_used", []),
    }
    if verify:
        out = work.run()
        err = max_rel_error(reference, out)
        runtime = "ort" if work.ir == "onnx" else "torch"
        report["verify"][runtime] = err
        report["max_rel_error"] = err
        report["rel_rms_error"] = rel_rms_error(reference, out)
        if exact and rec.tolerance is not None and err > rec.tolerance:
            raise VerificationError(f"recipe '{rec.name}' is exact but changed the outputs by "
                                    f"{err:.3g} (max relative error) > tolerance {rec.tolerance:g}")
    return OptimizeResult(work, report, reference, exact)
