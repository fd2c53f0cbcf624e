"""Building TVM executables: one bucket, or every bucket of an artefact into one library.

Each bucket (a prefill length, a decode context) is its own static-shape Relax function; for
one library they are imported separately, their functions renamed with the bucket's tag
(``main_512``, ``qmatmul_int4_512``, ...), merged into one IRModule and compiled once: one
``lib.so`` (or one CUDA source) holds every bucket, and the VM calls ``main_<tag>``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def cpu_cores() -> int:
    """Physical cores this process may run on (Linux sysfs topology of its CPU affinity; the
    CPU count elsewhere). TVM's own default is half the logical CPUs on x86 (it assumes two
    hyperthreads per core): on a 2-vCPU machine with one thread per core, one thread."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return max(os.cpu_count() or 1, 1)
    cores = set()
    for c in cpus:
        try:
            topo = f"/sys/devices/system/cpu/cpu{c}/topology/"
            with open(topo + "core_id") as a, open(topo + "physical_package_id") as b:
                cores.add((a.read().strip(), b.read().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(len(cores), 1)


KERNEL_FEATURES = ("avx512f", "avx512vnni")  # what rotaq's CPU kernels specialize for


def cpu_features(target: Any) -> frozenset[str]:
    """The :data:`KERNEL_FEATURES` an llvm target's CPU has (its ``mcpu``; none, or another
    target kind: none): ``avx512f`` picks the register tiles of the matmul kernels,
    ``avx512vnni`` the int8 prefill kernel of :mod:`tvm_vnni`."""
    if target.kind.name != "llvm" or not target.attrs.get("mcpu"):
        return frozenset()
    from tvm.target import codegen

    have = codegen.llvm_get_cpu_features(target)
    return frozenset(f for f in KERNEL_FEATURES if f in have)


def cpu_front_passes(target: Any) -> list:
    """TVM's CPU pipeline up to the PrimFuncs it schedules and compiles: library dispatch,
    legalization and fusion (what tuning extracts its tasks from and applies its database
    after)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)


def pipeline(target: Any, database: Any = None, stats: dict | None = None) -> Any:
    """The Relax pipeline: TVM's default on CPU; on CUDA, legalization, fusion and dlight's
    GPU rules (guarded, :func:`tvm_kernels.gpu_rules`) between TVM's CUDA passes. With a
    MetaSchedule ``database`` (CPU), its best schedules replace the PrimFuncs it has records
    for, after fusion (:mod:`rotaq.backends.tvm_tune`); ``stats`` gets the number of PrimFuncs
    marked scheduled before (``scheduled``) and after (``tuned``)."""
    import tvm
    from tvm import relax

    if target.kind.name != "cuda" and database is not None:
        from tvm.relax.backend.cpu_generic import pipeline as cpu

        def _count(key: str) -> Any:
            @tvm.transform.module_pass(opt_level=0)
            def _pass(mod: Any, _ctx: Any) -> Any:  # PrimFuncs marked scheduled
                if stats is not None:
                    stats[key] = sum(1 for _, f in mod.functions_items()
                                     if f.attrs and f.attrs.get("tirx.is_scheduled", False))
                return mod

            return _pass

        @tvm.transform.module_pass(opt_level=0)
        def _tuned(mod: Any, _ctx: Any) -> Any:
            with target, database:
                return tvm.transform.Sequential(
                    cpu_front_passes(target)
                    + [_count("scheduled"), relax.transform.MetaScheduleApplyDatabase(),
                       _count("tuned")]
                    + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)

        return _tuned
    if target.kind.name != "cuda":
        return relax.get_default_pipeline(target)
    from tvm.relax.backend.cuda import pipeline as cp
    from tvm.s_tir import dlight as dl

    from rotaq.backends.tvm_kernels import gpu_rules

    @tvm.transform.module_pass(opt_level=0)
    def _gpu(mod: Any, _ctx: Any) -> Any:
        legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(), relax.transform.FuseOps(),
                    relax.transform.FuseTIR(), dl.ApplyDefaultSchedule(*gpu_rules())]
        with target:
            return tvm.transform.Sequential(
                cp.library_dispatch_passes(target) + legalize + cp.dataflow_lower_passes(target)
                + cp.finalize_passes(target))(mod)

    return _gpu


def import_bucket(onnx_path: str, shapes: dict[str, list[int]], target: Any,
                  edit: Any = None) -> tuple[Any, list[str], list[np.ndarray], dict]:
    """Specialize to static input ``shapes`` (after ``edit(proto)``) and import for ``target``
    (its :func:`cpu_features` pick the kernels): (Relax module, input names, params, stats)."""
    import onnx

    from rotaq.backends.tvm_import import import_onnx, specialize

    proto = onnx.load(onnx_path)
    if edit is not None:
        edit(proto)
    proto = specialize(proto, shapes)
    return import_onnx(proto, cpu=target.kind.name == "llvm", features=cpu_features(target))


def compile_module(mod: Any, target: Any, database: Any = None, stats: dict | None = None
                   ) -> Any:
    """Build ``mod`` for ``target`` (applying a MetaSchedule ``database`` when given)."""
    import tvm

    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target=target,
                           relax_pipeline=pipeline(target, database, stats))


def merge(mods: list[tuple[str, Any]]) -> Any:
    """One IRModule of bucket modules ``(tag, module)``: every global function renamed
    ``<name>_<tag>`` (the entry ``main`` becomes ``main_<tag>``), references rewritten."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Rename(PyExprMutator):
        def __init__(self, names: dict[str, Any]):
            super().__init__()
            self.names = names

        def visit_global_var_(self, op: Any) -> Any:
            return self.names.get(op.name_hint, op)

    merged = tvm.IRModule()
    for tag, mod in mods:  # callees first: adding a function gives its GlobalVar a type
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                merged[f"{gv.name_hint}_{tag}"] = _symbol(func, f"{gv.name_hint}_{tag}")
    for tag, mod in mods:
        names = {}
        for gv in mod.get_global_vars():
            if not isinstance(mod[gv], relax.Function):
                new = merged.get_global_var(f"{gv.name_hint}_{tag}")
                relax.expr._update_type(new, gv.ty)  # the callee's type, as add_func set it
                names[gv.name_hint] = new
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                new = f"{gv.name_hint}_{tag}"
                merged[new] = _symbol(_Rename(names).visit_expr(func), new)
    return merged


def _symbol(func: Any, name: str) -> Any:
    if func.attrs is not None and "global_symbol" in func.attrs:
        return func.with_attr("global_symbol", name)
    return func
