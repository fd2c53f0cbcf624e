"""Optional MetaSchedule tuning of the TVM backend (``rotaq compile --tune N``).

rotaq's own kernels (the quantized / plain matmul, the online Hadamard, fused attention) carry
hand schedules; everything else (norms, RoPE, elementwise chains, the cache Concat) is TVM's
default lowering: one serial loop nest per fused PrimFunc. :func:`tune` legalizes and fuses
the merged module as the CPU pipeline does, extracts the PrimFuncs with no parallel,
vectorized or unrolled loop (the default-lowered ones; identical functions of several buckets
are one task, weighted by their call count) and runs MetaSchedule's evolutionary search on
them, ``trials`` measured candidates in total across the tasks, records in a JSON database
(``DIR/tuning/database_workload.json`` + ``database_tuning_record.json``).
:func:`tvm_build.compile_module` applies a database (``MetaScheduleApplyDatabase`` after
fusion): a PrimFunc with a record gets its best schedule, any other keeps its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from rotaq.errors import RotaqError

log = logging.getLogger(__name__)

DB_FILES = ("database_workload.json", "database_tuning_record.json")


def check(trials: int, db: str | None, backend: str, target: str) -> None:
    """Refuse bad ``--tune`` / ``--tune-db`` values (:class:`RotaqError`, exit 2) before any
    work."""
    if trials < 0:
        raise RotaqError(f"--tune expects a number of trials >= 0 (0: no tuning), got {trials}")
    if not trials and db is None:
        return
    if backend != "tvm" or not str(target).startswith("llvm"):
        raise RotaqError("--tune / --tune-db need --backend tvm with an llvm target "
                         "(candidates are measured on this machine's CPU)")
    if db is not None:
        db_dir(db)


def db_dir(path: str) -> str:
    """The folder holding a tuning database: ``path`` itself or its ``tuning/`` (an artefact
    folder); :class:`RotaqError` when neither holds both JSON files."""
    for cand in (path, os.path.join(path, "tuning")):
        if all(os.path.isfile(os.path.join(cand, f)) for f in DB_FILES):
            return cand
    raise RotaqError(f"--tune-db {path}: no MetaSchedule database there (expected "
                     f"{' and '.join(DB_FILES)} in it or in its tuning/ folder)")


def open_db(folder: str) -> Any:
    """The JSON database in ``folder`` (created when missing)."""
    from tvm.s_tir import meta_schedule as ms

    os.makedirs(folder, exist_ok=True)
    return ms.database.JSONDatabase(*(os.path.join(folder, f) for f in DB_FILES),
                                    allow_missing=True, module_equality="structural")


def copy_db(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for f in DB_FILES:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


def lowered(mod: Any, target: Any) -> Any:
    """``mod`` after the CPU pipeline's dispatch, legalization and fusion passes: the PrimFuncs
    the build schedules and compiles."""
    import tvm

    from rotaq.backends.tvm_build import cpu_front_passes

    with target:
        return tvm.transform.Sequential(cpu_front_passes(target))(mod)


def hand_scheduled(func: Any) -> bool:
    """Whether a PrimFunc has a loop that is not serial (a schedule was applied to it): its
    TVMScript names a parallel, vectorized or unrolled loop (or it is marked scheduled)."""
    if func.attrs and func.attrs.get("tirx.is_scheduled", False):
        return True
    text = func.script()
    return any(f"T.{kind}(" in text for kind in ("parallel", "vectorized", "unroll"))


def work(task: Any) -> float:
    """A task's estimated cost per model run: calls x max(FLOPs, elements its buffers hold)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    func = task.dispatched[0]["main"]
    elems = 0
    for buf in func.params:
        n = 1
        for d in getattr(buf, "shape", None) or []:
            n *= int(d) if hasattr(d, "value") or isinstance(d, int) else 1
        elems += n
    return float(task.weight) * max(float(estimate_tir_flops(task.dispatched[0])), elems)


def tunable_tasks(mod: Any, target: Any) -> list[Any]:
    """MetaSchedule tasks of the default-lowered PrimFuncs of ``mod`` (a lowered module), the
    costliest first (:func:`work`)."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(mod, target, module_equality="structural")
    keep = [t for t in tasks if not hand_scheduled(t.dispatched[0]["main"])]
    log.info("%d of %d PrimFuncs are default-lowered (tunable)", len(keep), len(tasks))
    return sorted(keep, key=work, reverse=True)


def _progress_callback(total: int, enabled: bool) -> Any:
    """A measure callback printing ``tuning: i/total trials`` lines to stderr (at most one
    every 10 s, and the last)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    t0 = time.perf_counter()

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        done, shown = 0, 0.0

        def apply(self, task_scheduler: Any, task_id: int, candidates: Any, builds: Any,
                  runs: Any) -> None:
            self.done += len(candidates)
            ok = sum(1 for r in runs if r.error_msg is None)
            name = task_scheduler.tasks_[task_id].ctx.task_name
            now = time.perf_counter() - t0
            if enabled and (now - self.shown >= 10 or self.done >= total):
                self.shown = now
                print(f"tuning: {self.done}/{total} trials ({now:.0f} s), "
                      f"task {task_id} {name}: {ok}/{len(candidates)} ran", file=sys.stderr,
                      flush=True)

    return _Progress()


def _builder() -> Any:
    """A MetaSchedule builder compiling candidates in this process. TVM's LocalBuilder starts
    fresh worker processes for every batch and each imports ``tvm.s_tir.tensor_intrin`` (30 s
    on 2 shared cores, more than its 30 s timeout: every candidate failed); the candidates
    here are small loop nests that LLVM compiles in milliseconds."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import local_builder as lb

    @derived_object
    class _InProcess(ms.builder.PyBuilder):
        def build(self, inputs: list) -> list:
            out = []
            for inp in inputs:
                try:
                    import tvm
                    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(inp.mod)
                    path = lb.default_export(tvm.tirx.build(mod, target=inp.target))
                    out.append(ms.builder.BuilderResult(path, None))
                except Exception as err:  # noqa: BLE001 - a failed candidate, not a failed tune
                    out.append(ms.builder.BuilderResult(None, f"build failed: {err}"))
            return out

    return _InProcess()


def _search(per_iter: int) -> Any:
    """Evolutionary search sized to the rounds: a population of 8 candidates per measured one
    (TVM's default, 512, spends ~10 s per round on 2 cores before measuring anything)."""
    from tvm.s_tir import meta_schedule as ms

    pop = max(32, min(512, 8 * per_iter))
    return ms.search_strategy.EvolutionarySearch(
        population_size=pop, init_min_unmeasured=min(50, pop // 2), genetic_num_iters=2)


def tune(mod: Any, target: Any, trials: int, db_folder: str, progress: bool = True,
         seed: int = 0) -> dict[str, Any]:
    """Tune the default-lowered PrimFuncs of ``mod`` (a Relax module before the pipeline) for
    ``target`` with ``trials`` measured candidates in total, adding records to the JSON
    database in ``db_folder``. Returns a summary (tasks, trials, seconds, records)."""
    if target.kind.name != "llvm":
        raise RotaqError("--tune measures candidates on this machine: it needs an llvm target")
    from tvm.s_tir import meta_schedule as ms

    t0 = time.perf_counter()
    low = lowered(mod, target)
    log.info("lowered for tuning in %.1f s", time.perf_counter() - t0)
    tasks = tunable_tasks(low, target)
    log.info("tasks extracted in %.1f s", time.perf_counter() - t0)
    summary = {"trials": trials, "tunable": len(tasks), "database": "tuning"}
    if not tasks:
        log.warning("--tune: no default-lowered PrimFunc to tune")
        return {**summary, "seconds": 0.0, "records": 0}
    per_iter = max(4, min(64, trials // len(tasks)))
    tasks = tasks[: max(1, trials // per_iter)]  # the costliest, each measured at least once
    summary["tasks"] = len(tasks)
    if progress:
        print(f"tuning the {len(tasks)} costliest of {summary['tunable']} default-lowered "
              f"PrimFuncs, {trials} trials in total ({per_iter} per round)", file=sys.stderr,
              flush=True)
    db = open_db(db_folder)
    cores = max(1, (os.cpu_count() or 1))
    contexts, weights = [], []
    for i, task in enumerate(tasks):
        contexts.append(ms.TuneContext(
            mod=task.dispatched[0], target=target, space_generator="post-order-apply",
            search_strategy=_search(per_iter), task_name=task.task_name,
            rand_state=seed + i, num_threads=cores).clone())
        weights.append(float(task.weight))
    try:
        import xgboost  # noqa: F401

        cost_model = "xgb"
    except ImportError:  # MetaSchedule's learned model needs xgboost; without it, random
        cost_model = "random"
    shown = _progress_callback(trials, progress)
    callbacks = [*ms.MeasureCallback.create("default"), shown]
    with tempfile.TemporaryDirectory(prefix="rotaq-tune-") as logs:
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=logs,
                      max_trials_global=trials, num_trials_per_iter=per_iter,
                      builder=_builder(),
                      runner=ms.runner.LocalRunner(), database=db, cost_model=cost_model,
                      measure_callbacks=callbacks, task_scheduler="gradient")
    records = sum(1 for t in tasks
                  if db.query_tuning_record(t.dispatched[0], target, "main") is not None)
    seconds = round(time.perf_counter() - t0, 1)
    if progress:  # a task whose design space is small ends before its share of the trials
        print(f"tuning: done, {shown.done} candidates measured in {seconds} s, best schedules "
              f"for {records} of {len(tasks)} functions", file=sys.stderr, flush=True)
    return {**summary, "seconds": seconds, "records": records, "measured": shown.done,
            "cost_model": cost_model}
