"""TVM backend: compile a (rewritten) ONNX model to a CPU or CUDA artefact and run it.

``compile_tvm(model, out_dir, target="llvm")`` specializes the graph to each token count in
``tokens`` (static shapes: batch 1, ``n`` tokens; a cache graph also to one-token decode steps
over fixed contexts, :mod:`rotaq.backends.tvm_decode`), imports each into Relax with rotaq's
kernels (:mod:`rotaq.backends.tvm_import`), merges them into one module
(:mod:`rotaq.backends.tvm_build`: entry ``main_<bucket>``), builds one library and writes the
artefact atomically::

    DIR/metadata.json   backend, target, inputs/outputs, buckets, versions, source
    DIR/lib.so          the compiled Relax VM executable of every bucket (llvm)
    DIR/cuda.cu         the generated CUDA source (cuda; compiled with nvcc when a GPU runs it)
    DIR/params.npz      parameters (deduplicated across buckets)
    DIR/tuning/         the MetaSchedule database applied (``tune`` / ``tune_db`` only)

Only token inputs are specialized per bucket: each input's token axis (``pad_axes`` in the
metadata; by default axis 1 of integer inputs named ``*ids`` / ``*mask``, overridden with
``pad_axes={"name": axis or None}`` / ``--pad-axis NAME:AXIS``) is set to ``n``; every other
input keeps its shape (fixed dims as in the model, symbolic ones from the model's sample inputs),
e.g. a decoder's ``encoder_hidden_states`` or Whisper's mel features. A model without token
inputs is compiled once, with static shapes (``tokens`` is then empty).

``load(DIR)`` returns a :class:`rotaq.model.Model` whose graph is a :class:`TvmGraph`: feeds of
``n`` tokens run on the smallest bucket ``>= n``, their token axes padded at the end with zeros
(causal models: later positions cannot change earlier ones; encoders: padding is masked out by
a zero attention mask) and outputs whose axis 1 has the bucket's length are cut back to ``n``
positions; every other input must have the shape it was compiled for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from rotaq.backends.artifact_io import header, read_metadata, replace_dir, work_dir, write_metadata
from rotaq.backends.tvm_io import host_array, in_bounds
from rotaq.errors import MissingDependencyError, RotaqError
from rotaq.progress import stage

log = logging.getLogger(__name__)

TVM_PINS = "apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0"
DEFAULT_TOKENS = (1, 16, 512)
__all__ = ["DEFAULT_TOKENS", "TvmGraph", "compile_tvm", "load", "require_tvm"]


def require_tvm() -> Any:
    """Import ``tvm`` or raise :class:`MissingDependencyError` saying how to install it.

    TVM's thread pool pins its workers to cores unless ``TVM_BIND_THREADS=0``; on a machine
    whose cores other processes share, a pinned worker waits for its core and every parallel
    kernel waits for it (the online Hadamard at 512 rows: 7.9 ms pinned, 0.63 ms unpinned on 2
    shared cores), so rotaq turns pinning off unless the variable is set; ``TVM_NUM_THREADS``
    defaults to the physical cores (:func:`tvm_build.cpu_cores`)."""
    from rotaq.backends.tvm_build import cpu_cores

    os.environ.setdefault("TVM_BIND_THREADS", "0")  # read when the thread pool starts
    os.environ.setdefault("TVM_NUM_THREADS", str(cpu_cores()))  # TVM's default: half
    try:
        import tvm
    except ImportError as err:
        raise MissingDependencyError(
            f"the TVM backend needs the 'apache-tvm' package ({err}): install it with "
            f"`pip install 'rotaq[tvm]'` (pins {TVM_PINS})") from err
    return tvm


def make_target(target: str | dict) -> Any:
    """``llvm`` (the host CPU: LLVM's name for it, e.g. ``znver4``, so the code uses its vector
    units; plain x86-64 would be SSE2 only), ``llvm:CPU`` (an LLVM CPU name, ``generic`` for a
    portable baseline), ``cuda`` (sm_80), ``cuda:sm_90``; dicts go to ``tvm.target.Target``."""
    tvm = require_tvm()
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if target == "llvm" or target.startswith("llvm:"):
        cpu = target.split(":", 1)[1] if ":" in target else host_cpu()
        spec = {"kind": "llvm", "num-cores": max(os.cpu_count() or 1, 1)}
        if cpu != "generic":
            from tvm.target import codegen

            if not codegen.llvm_is_valid_cpu(cpu, codegen.llvm_get_system_triple()):
                raise RotaqError(f"--target {target}: {cpu!r} is not a CPU LLVM knows")
            spec["mcpu"] = cpu
        return tvm.target.Target(spec)
    if target.startswith("cuda"):
        arch = target.split(":", 1)[1] if ":" in target else "sm_80"
        return tvm.target.Target({"kind": "cuda", "arch": arch},
                                 host={"kind": "llvm"})
    raise RotaqError(f"--target must be llvm, llvm:CPU, cuda or cuda:sm_XX, not {target!r}")


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (``generic`` when LLVM does not know it)."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu() or "generic")


def has_avx512(target: Any) -> bool:
    """Whether an llvm target's CPU (its ``mcpu``; none: generic x86-64) has AVX-512."""
    from rotaq.backends.tvm_build import cpu_features

    return "avx512f" in cpu_features(target)


_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "amx", "popcnt", "neon", "sve",
                 "dotprod", "i8mm", "bf16", "fp16", "fullfp16")


def missing_cpu_features(cpu: str | None) -> list[str]:
    """Instruction-set features code compiled for LLVM CPU ``cpu`` may use that this machine
    lacks (tuning flags are ignored); empty for ``None`` / ``generic``."""
    if not cpu or cpu == "generic":
        return []
    tvm = require_tvm()
    from tvm.target import codegen

    def isa(name: str) -> set[str]:
        feats = codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": name}))
        return {f for f in feats if f.startswith(_ISA_PREFIXES)}

    return sorted(isa(cpu) - isa(host_cpu()))


# ---- compile ----------------------------------------------------------------------------------
def _onnx_source(model: Any, tmp: str) -> tuple[str, dict[str, str], dict[str, tuple]]:
    """(ONNX path, source, sample input shapes) of ``model``."""
    from rotaq.loading import load
    from rotaq.model import Model

    if isinstance(model, str) and model.lower().endswith(".onnx") and os.path.isfile(model):
        m = load(model)
        path = os.path.abspath(model)
    else:
        m = model if isinstance(model, Model) else load(model, ir="onnx")
        path = os.path.join(tmp, "model.onnx")
        m.save(path, tokenizer=False)
    return path, dict(m.source), {k: np.shape(v) for k, v in m.sample_inputs.items()}


def build_bucket(onnx_path: str, shapes: dict[str, list[int]], target: Any, edit: Any = None
                 ) -> tuple[Any, list[str], list[np.ndarray], dict]:
    """Specialize to static input ``shapes`` (after ``edit(proto)``), import and build one
    bucket on its own: (executable, input names, params, stats); its entry is ``main``."""
    from rotaq.backends import tvm_build as B

    mod, names, params, stats = B.import_bucket(onnx_path, shapes, target, edit)
    return B.compile_module(mod, target), names, params, stats


def compile_tvm(model: Any, out_dir: str, target: str | dict = "llvm",
                tokens: tuple[int, ...] | list[int] = DEFAULT_TOKENS,
                progress: bool = True,
                pad_axes: dict[str, int | None] | None = None,
                decode: tuple[int, ...] | list[int] | None = None, tune: int = 0,
                tune_db: str | None = None) -> dict[str, Any]:
    """Compile ``model`` (a Model, an .onnx path or a built-in name) for each token count and
    write the artefact to ``out_dir`` (atomically). ``pad_axes``: input name -> token axis
    (``None``: no token axis) where the default rule (see the module doc) is wrong. A cache
    graph is also compiled for one-token decode steps over each context in ``decode``
    (default :data:`tvm_decode.DEFAULT_CONTEXTS`; ``()``: none). ``tune``: MetaSchedule trials
    (in total) for the default-lowered PrimFuncs, ``tune_db``: a database (folder) to start from
    or apply; the database used is saved in ``DIR/tuning/`` (:mod:`tvm_tune`). Returns the
    metadata."""
    tvm = require_tvm()
    tgt = make_target(target)
    tokens = sorted({int(t) for t in tokens})
    if not tokens or tokens[0] < 1:
        raise RotaqError(f"token counts must be positive, got {tokens}")
    with work_dir(out_dir, ".rotaq-tvm-") as work:
        import onnx

        from rotaq.backends.tvm_graph import index_bounds
        from rotaq.backends.tvm_import import pad_axes as find_axes
        from rotaq.backends.tvm_import import static_shapes

        onnx_path, source, sample = _onnx_source(model, work)
        proto = onnx.load(onnx_path, load_external_data=False)
        axes = find_axes(proto, pad_axes)
        if not axes:  # nothing to pad: one build with the model's own shapes
            log.info("no token input: compiling once with static shapes")
            tokens = []
        from rotaq.backends import tvm_decode as D

        store: dict[str, np.ndarray] = {}
        buckets, steps = {}, {}
        contexts = sorted(set(D.DEFAULT_CONTEXTS if decode is None else decode))
        jobs = [("prefill", n, static_shapes(proto, n, axes, sample)) for n in tokens or [0]]
        if D.is_cache_proto(proto) and tokens:
            one = static_shapes(proto, 1, axes, sample)
            jobs += [("decode", c, D.decode_shapes(one, c)) for c in contexts]
        from rotaq.backends import tvm_build as B

        t0, mods = time.perf_counter(), []
        for kind, n, shapes in tqdm(jobs, desc="tvm import", unit="bucket", file=sys.stderr,
                                    disable=not progress, leave=False):
            what = f"{n} tokens" if kind == "prefill" else f"decode over {n} cached"
            with stage(f"TVM: importing for {what}"):
                mod, names, params, stats = B.import_bucket(
                    onnx_path, shapes, tgt, D.slice_presents if kind == "decode" else None)
            keys = []
            for arr in params:
                key = hashlib.sha1(arr.tobytes() + str(arr.shape).encode() +
                                   str(arr.dtype).encode()).hexdigest()[:16]
                store.setdefault(key, arr)
                keys.append(key)
            tag = f"{n}" if kind == "prefill" else f"decode_{n}"
            mods.append((tag, mod))
            entry = {"params": keys, "stats": stats, "input_shapes": shapes,
                     "function": f"main_{tag}"}
            (buckets if kind == "prefill" else steps)[str(n)] = entry
            log.info("%s %d imported (%s)", kind, n, stats)
        merged, db, tuning, built = B.merge(mods), None, None, {}
        if tune or tune_db:
            from rotaq.backends import tvm_tune as TT

            if tune_db:
                TT.copy_db(TT.db_dir(tune_db), os.path.join(work, "tuning"))
            tuning = TT.tune(merged, tgt, tune, os.path.join(work, "tuning"), True) \
                if tune else {"trials": 0, "database": "tuning"}
            tuning["from"] = os.path.abspath(tune_db) if tune_db else None
            db = TT.open_db(os.path.join(work, "tuning"))
        with stage(f"TVM: compiling {len(mods)} buckets into one library ({tgt.kind.name})"):
            ex = B.compile_module(merged, tgt, db, built)
        if tuning is not None:
            tuning["applied"] = built.get("tuned", 0) - built.get("scheduled", 0)
        for entry in [*buckets.values(), *steps.values()]:
            if tgt.kind.name == "llvm":
                entry["lib"] = "lib.so"
            else:
                entry["cuda_source"] = "cuda.cu"
        if tgt.kind.name == "llvm":
            ex.export_library(os.path.join(work, "lib.so"))
        else:
            with open(os.path.join(work, "cuda.cu"), "w") as f:
                f.write(cuda_source(ex))
        np.savez(os.path.join(work, "params.npz"), **store)
        from onnx import helper

        from rotaq.model import portable_source

        source = portable_source(source, work)

        meta = {
            **header("tvm", str(tgt), tgt.kind.name), "tvm_version": tvm.__version__,
            "mcpu": str(tgt.attrs.get("mcpu", "")) or None,
            "inputs": [i.name for i in proto.graph.input],
            "outputs": [o.name for o in proto.graph.output],
            "input_names": names, "tokens": tokens, "pad_axes": axes,
            "input_dtypes": {i.name: str(helper.tensor_dtype_to_np_dtype(
                i.type.tensor_type.elem_type)) for i in proto.graph.input},
            "padding_exact": not any(nd.op_type == "DynamicQuantizeLinear"
                                     for nd in proto.graph.node), "buckets": buckets, "source": source,
            "index_bounds": index_bounds(proto),
            "decode": steps, "onnx_metadata": {p.key: p.value for p in proto.metadata_props},
            "input_dims": {i.name: [d.dim_value if d.HasField("dim_value") else None
                                    for d in i.type.tensor_type.shape.dim]
                           for i in proto.graph.input},
            "compile_seconds": round(time.perf_counter() - t0, 2), "tuning": tuning,
        }
        write_metadata(work, meta)
        for leftover in ("model.onnx", "model.onnx.data"):
            p = os.path.join(work, leftover)
            if os.path.exists(p):
                os.unlink(p)
        replace_dir(work, out_dir)
        return meta


def cuda_source(ex: Any) -> str:
    """The CUDA C source inside a built executable."""
    mods = [ex.mod] if hasattr(ex, "mod") else []
    seen = []
    while mods:
        m = mods.pop()
        seen.append(m)
        mods.extend(getattr(m, "imports", []))
    for m in seen:
        if getattr(m, "kind", "") == "cuda" or "cuda" in str(getattr(m, "type_key", "")):
            return m.inspect_source()
    for m in seen:
        try:
            src = m.inspect_source()
        except Exception:  # noqa: BLE001, S112 - modules without a source
            continue
        if "__global__" in src:
            return src
    raise RotaqError("no CUDA module in the built executable")


# ---- load / run -------------------------------------------------------------------------------
class TvmGraph:
    """Runs a compiled artefact: ``run(feeds) -> list of outputs`` like the other IRs."""

    ir = "tvm"

    def __init__(self, folder: str, meta: dict[str, Any]):
        tvm = require_tvm()
        from tvm import relax

        if meta.get("target_kind") != "llvm":
            raise RotaqError(f"{folder}: compiled for {meta.get('target')}; only llvm artefacts "
                             "run here (a CUDA artefact holds its source for a GPU machine)")
        missing = missing_cpu_features(meta.get("mcpu"))
        if missing:
            raise RotaqError(f"{folder}: compiled for CPU {meta['mcpu']}, whose instructions "
                             f"{', '.join(missing)} this machine ({host_cpu()}) lacks: "
                             "recompile here, or with --target llvm:generic for any x86-64")
        self.folder, self.meta = folder, meta
        self.input_names = list(meta["inputs"])
        self.output_names = list(meta["outputs"])
        self.metadata: dict[str, str] = dict(meta.get("onnx_metadata") or {})
        self.source = folder
        dev = tvm.cpu()
        with np.load(os.path.join(folder, "params.npz")) as z:
            store = {k: tvm.runtime.tensor(z[k], dev) for k in z.files}
        libs: dict[str, Any] = {}

        def entry_fn(entry: dict) -> Any:
            """The entry function of a bucket (one library for all, or one per bucket in
            artefacts written before rotaq merged them)."""
            if entry["lib"] not in libs:
                lib = tvm.runtime.load_module(os.path.join(folder, entry["lib"]))
                libs[entry["lib"]] = relax.VirtualMachine(lib, dev)
            return libs[entry["lib"]][entry.get("function", "main")]

        self._vms = {int(n): entry_fn(e) for n, e in meta["buckets"].items()}
        self._params = {int(n): [store[k] for k in e["params"]]
                        for n, e in meta["buckets"].items()}
        steps = meta.get("decode") or {}
        self.decode_vms = {int(c): entry_fn(e) for c, e in steps.items()}
        self.decode_shapes = {int(c): e["input_shapes"] for c, e in steps.items()}
        self._decode_params = {int(c): [store[k] for k in e["params"]] for c, e in steps.items()}
        self._order = list(meta.get("input_names") or self.input_names)
        # artefacts from before pad_axes was recorded padded axis 1 of every input
        self.pad_axes: dict[str, int] = dict(meta.get("pad_axes", {k: 1 for k in
                                                                  self.input_names}))
        self._shapes = {int(n): e.get("input_shapes") for n, e in meta["buckets"].items()}
        self._tvm = tvm

    def buckets(self) -> list[int]:
        return sorted(self._vms)

    def input_specs(self) -> dict[str, tuple[np.dtype, list[int | None]]]:
        """Input name -> (dtype, dims as in the source graph; None: symbolic)."""
        dtypes, dims = self.meta.get("input_dtypes") or {}, self.meta.get("input_dims") or {}
        return {k: (np.dtype(dtypes.get(k, "int64")), list(dims[k])) for k in dims}

    def run_decode(self, ctx: int, feeds: dict[str, np.ndarray], cache: dict[str, Any]
                   ) -> list[np.ndarray]:
        """One decode step over ``ctx`` cache slots: ``feeds`` (ids, positions, mask) plus
        ``cache`` (past name -> TVM tensor, used in place)."""
        args = [cache[k] if k in cache else self._tvm.runtime.tensor(np.ascontiguousarray(
            self._in_bounds(k, feeds[k]))) for k in self._order]
        res = self.decode_vms[ctx](*args, *self._decode_params[ctx])
        return [host_array(r) for r in (list(res) if not hasattr(res, "numpy") else [res])]

    def sample_feeds(self, n: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Feeds of ``n`` tokens shaped as compiled: integer inputs all ones (token 1, mask 1),
        float inputs seeded standard normal."""
        b = self._bucket(n) if self.pad_axes else self.buckets()[0]
        shapes = self._shapes[b] or {k: [1, b] for k in self.input_names}
        dtypes = self.meta.get("input_dtypes") or {}
        rng, feeds = np.random.default_rng(seed), {}
        for name in self.input_names:
            shape = list(shapes[name])
            if name in self.pad_axes:
                shape[self.pad_axes[name]] = n
            dtype = np.dtype(dtypes.get(name, "int64"))
            feeds[name] = (np.ones(shape, dtype) if np.issubdtype(dtype, np.integer) else
                           rng.standard_normal(shape).astype(dtype))
        return feeds

    def _in_bounds(self, name: str, a: Any) -> np.ndarray:
        return in_bounds(name, a, (self.meta.get("index_bounds") or {}).get(name))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [k for k in self._order if k not in feeds]
        if missing:
            raise RotaqError(f"the TVM artefact needs inputs {', '.join(missing)}")
        first = np.asarray(feeds[self._order[0]])
        if first.ndim < 1:
            raise RotaqError(f"the TVM artefact runs batched inputs; got {first.shape}")
        compiled = {int(s[self._order[0]][0]) for s in self._shapes.values()
                    if s and s.get(self._order[0])}
        if first.shape[0] == 1 or first.shape[0] in compiled:  # one call, as compiled (no
            return self._run1(feeds)  # concatenate: 2048 tokens of SmolLM2 logits are 400 MB)
        rows = [self._run1({k: np.asarray(v)[i : i + 1] for k, v in feeds.items()})
                for i in range(first.shape[0])]
        return [np.concatenate([r[j] for r in rows]) for j in range(len(rows[0]))]

    def _tokens(self, feeds: dict[str, np.ndarray]) -> int | None:
        """The token count of ``feeds`` (None: the artefact has no token input)."""
        lens = {k: np.shape(feeds[k])[a] for k, a in self.pad_axes.items()
                if k in feeds and np.ndim(feeds[k]) > a}
        if len(set(lens.values())) > 1:
            raise RotaqError(f"token inputs of different lengths {lens}: one call runs one "
                             "token count (pad them to one length)")
        return next(iter(lens.values()), None)

    def _bucket(self, n: int) -> int:
        if n in self._vms:
            return n
        fit = [b for b in self.buckets() if b >= n]
        if not fit or not self.meta.get("padding_exact", True):
            why = ("more than the largest compiled length" if not fit else
                   "not a compiled length, and padding would change this model's per-tensor "
                   "activation scales")
            raise RotaqError(f"{n} tokens is {why} ({self.buckets()}): compile with "
                             f"--tokens including {n}")
        return fit[0]

    def _run1(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = self._tokens(feeds)
        b = self.buckets()[0] if n is None else self._bucket(n)
        args = []
        for name in self._order:
            a = np.asarray(feeds[name])
            axis = self.pad_axes.get(name)
            if n is not None and axis is not None and b > n:
                widths = [(0, 0)] * a.ndim
                widths[axis] = (0, b - n)
                a = np.pad(a, widths)  # token 0 / mask 0
            want = (self._shapes.get(b) or {}).get(name)
            if want is not None and list(a.shape) != list(want):
                raise RotaqError(f"input {name!r} has shape {list(a.shape)}; the artefact was "
                                 f"compiled for {list(want)} (token axes: {self.pad_axes})")
            args.append(self._tvm.runtime.tensor(np.ascontiguousarray(self._in_bounds(name, a))))
        res = self._vms[b](*args, *self._params[b])
        res = list(res) if not hasattr(res, "numpy") else [res]
        out = []
        for r in res:
            arr = host_array(r)
            if n is not None and b > n and arr.ndim >= 2 and arr.shape[1] == b:
                arr = arr[:, :n]
            out.append(arr)
        return out


def load(folder: str) -> Any:
    """The compiled artefact in ``folder`` as a :class:`rotaq.model.Model` (graph: TvmGraph)."""
    from rotaq.model import Model

    meta = read_metadata(folder)
    if meta.get("backend") != "tvm":
        raise RotaqError(f"{folder} is a {meta.get('backend')} artefact, not tvm")
    graph = TvmGraph(os.path.abspath(folder), meta)
    from rotaq.model import resolve_source

    source = resolve_source(meta.get("source") or {}, os.path.abspath(folder))
    sample = graph.sample_feeds(min(graph.buckets()[-1], 16))
    return Model(graph, sample, source)
