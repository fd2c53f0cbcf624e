"""Refuse a ``.pt2`` archive that would run code while ``torch.export.load`` reads it.

``torch.export.load`` (torch 2.13: ``torch/export/pt2_archive/_package.py`` and
``torch/_export/serde/serialize.py``) executes content of the file in these places:

- weights and tensor constants marked ``use_pickle`` are read with
  ``torch.load(weights_only=False)``; legacy ``data/weights/<model>.pt`` files, the sample
  inputs and the old (pre-archive) format go through ``torch.load(weights_only=True)`` and
  fall back to ``weights_only=False`` when that fails;
- custom-class and opaque constants are unpickled (``torch._C._pickle_load_obj``,
  ``pickle.loads``); ``data/aotinductor/`` holds shared libraries that are loaded;
- symbolic shape expressions (``expr_str``) go through ``sympy.sympify``, which ``eval``s;
- a node target is resolved by ``getattr`` from ``torch``/``math``/``_operator`` and any callable
  is accepted (``torch.os.system`` included) and called when the graph runs;
- parameter names and the keyword names in the input treespec are pasted, unescaped, into the
  Python source that ``torch.fx`` generates and ``exec``s for ``ExportedProgram.module()``.

:func:`check_pt2` reads the archive with torch's own reader (so it sees the records torch will
see) and refuses each of these unless the content is plain data: pickles must load with
``weights_only=True`` and reference only tensor-rebuild globals, expressions are restricted to
numbers, shape symbols and sympy's arithmetic, targets must be registered operators, names
must be dotted identifiers. Archives written by ``torch.export.save`` for ordinary models
(rotaq's own outputs included) pass unchanged.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickletools
import re
import warnings
import zipfile
from typing import Any

import torch

from rotaq.errors import LoadError

_NAME = re.compile(r"[A-Za-z0-9_.]*\Z")  # FQNs (layers.0.mlp.weight) and graph value names
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NAME_KEYS = {"name", "as_name", "parameter_name", "buffer_name", "tensor_constant_name",
              "custom_obj_name", "user_input_name", "fqn", "arg_name"}
# sympy expressions torch writes: numbers, shape symbols (s0, u3, ps12), sympy arithmetic
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][-+]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|"
                    r"'([A-Za-z0-9.+-]*)'|\"([A-Za-z0-9.+-]*)\"|"
                    r"(\*\*|//|[<>=!]=|[-+*/%(),<>~&|=]))")
_SYMBOL = re.compile(r"[a-z]+\d+\Z")  # never a Python builtin: letters then digits
_NUMBER = re.compile(r"[-+]?\d+\.?\d*(?:[eE][-+]?\d+)?\Z")
_SYMPY_NAMES = {
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Max", "Min", "Abs", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "floor", "ceiling", "sqrt", "oo",
    "int_oo", "nan", "zoo", "True", "False", "Integer", "Rational", "Float", "OpaqueUnaryFn_sqrt",
    # srepr form (torch writes Mul(Integer(2), Symbol('s0', positive=True, integer=True)))
    "Add", "Mul", "Pow", "Symbol", "Equality", "Unequality", "StrictLessThan", "LessThan",
    "StrictGreaterThan", "GreaterThan", "BooleanTrue", "BooleanFalse", "true", "false", "Half",
    "One", "Zero", "NegativeOne", "Infinity", "NegativeInfinity", "IntInfinity",
    "NegativeIntInfinity", "precision", "positive", "negative", "integer", "nonnegative",
    "nonpositive", "real", "finite", "nonzero", "zero", "even", "odd", "rational",
    "extended_real", "commutative",
}
_OPERATOR_OK = {"getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg",
                "pos", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_",
                "lshift", "rshift", "abs", "invert", "trunc"}
_TORCH_SYM_OK = {"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum",
                 "sym_sqrt", "_sym_sqrt"}
# higher-order ops that only run the graphs they are given
_HOP_OK = {"cond", "while_loop", "while_loop_stack_output", "map_impl", "scan",
           "associative_scan", "invoke_subgraph", "flex_attention", "auto_functionalized",
           "auto_functionalized_v2", "with_effects", "wrap", "wrap_with_autocast",
           "wrap_with_set_grad_enabled", "tag_activation_checkpoint", "run_const_graph",
           "out_dtype", "hints_wrapper"}
# globals a pickled tensor (or a tuple/dict of them) needs
_PICKLE_GLOBALS = {("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"),
                   ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "Tensor"),
                   ("torch.nn.parameter", "Parameter"), ("builtins", "set"),
                   ("torch.serialization", "_get_layout")}
_PICKLE_REFUSED_OPS = {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "STACK_GLOBAL", "EXT1", "EXT2",
                       "EXT4"}


def check_pt2(path: str) -> None:
    """Raise :class:`LoadError` naming the first part of ``path`` that could run code."""
    from torch.export.pt2_archive import PT2ArchiveReader
    from torch.export.pt2_archive import constants as c

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        raise LoadError(f"{path}: not a .pt2 archive (torch.export.save writes a zip): "
                        f"{err}") from err
    if len(set(names)) != len(names):
        raise LoadError(f"{path}: refused: the zip lists the same entry twice")
    if "version" in names:  # would send torch.export.load down its legacy pickle path
        raise LoadError(f"{path}: refused: old-style (pre-2.7) export archive, written with "
                        "pickled state; re-export it with torch.export.save")
    try:
        reader = PT2ArchiveReader(path)
        records = set(reader.get_file_names())
    except Exception as err:  # torch raises RuntimeError/AssertionError for a non-archive
        raise LoadError(f"{path}: not a torch.export archive: {_first_line(err)}") from err
    if reader.read_string(c.ARCHIVE_VERSION_PATH) != c.ARCHIVE_VERSION_VALUE:
        raise LoadError(f"{path}: archive version "
                        f"{reader.read_string(c.ARCHIVE_VERSION_PATH)!r} is not the one this "
                        f"torch ({torch.__version__}) reads")
    if any(r.startswith(c.AOTINDUCTOR_DIR) for r in records):
        raise LoadError(f"{path}: refused: the archive holds AOTInductor native code, which "
                        "rotaq does not load")
    # torch deserializes every record under models/, naming it by cutting the format's prefix
    # and suffix lengths whatever the record ends with: do exactly the same
    prefix, suffix = c.MODELS_FILENAME_FORMAT.split("{}")
    programs = sorted(r for r in records if r.startswith(c.MODELS_DIR))
    if not programs:
        raise LoadError(f"{path}: the archive holds no exported program")
    for record in programs:
        model = record[len(prefix):len(record) - len(suffix)]
        _check_program(path, reader.read_bytes(record))
        # torch tests legacy files by exact name but reads records through miniz, whose
        # lookup ignores case: look every pickle up the way torch reads it
        for legacy in (f"{c.WEIGHTS_DIR}{model}.pt", f"{c.CONSTANTS_DIR}{model}.pt",
                       c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)):
            blob = _read(reader, legacy)
            if blob is not None:
                _check_pickle(path, legacy, blob)
        _check_payloads(path, reader, records, c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model),
                        c.WEIGHTS_DIR)
        _check_payloads(path, reader, records, c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model),
                        c.CONSTANTS_DIR)


def _first_line(err: BaseException) -> str:
    """``Type: first sentence`` (torch's messages carry paragraphs of advice)."""
    text = " ".join(str(err).split())
    cut = text.find(". ")
    return f"{type(err).__name__}: {text[:cut + 1] if 0 < cut else text}"


def _check_payloads(path: str, reader: Any, records: set[str], config: str, folder: str) -> None:
    from torch.export.pt2_archive import constants as c

    if config not in records:
        return
    try:
        entries = json.loads(reader.read_string(config))["config"]
        items = list(entries.items())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise LoadError(f"{path}: {config} is not a valid payload config: {err}") from err
    for fqn, meta in items:
        _check_name(path, fqn, config)
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise LoadError(f"{path}: {config}: entry {fqn!r} has no path_name")
        record = os.path.join(folder, meta["path_name"])  # as torch joins it
        if meta["path_name"].startswith((c.CUSTOM_OBJ_FILENAME_PREFIX,
                                         c.OPAQUE_OBJ_FILENAME_PREFIX)):
            raise LoadError(f"{path}: refused: constant {fqn!r} is a pickled Python object "
                            f"({record}); rotaq loads tensors only")
        if meta.get("use_pickle"):
            blob = _read(reader, record)
            if blob is None:
                raise LoadError(f"{path}: {config}: {record} is missing")
            _check_pickle(path, record, blob)


def _read(reader: Any, record: str) -> bytes | None:
    try:
        return reader.read_bytes(record)
    except RuntimeError:  # torch's "failed locating file"
        return None


def _check_pickle(path: str, record: str, blob: bytes) -> None:
    """A pickle is accepted only if it is tensor data: no global outside the tensor-rebuild
    set, no object-building opcode, and it loads with ``torch.load(weights_only=True)``."""
    refusal = f"{path}: refused: {record} is a pickle that is not plain tensor data"
    try:
        for pkl in _pickles(blob):
            for op, arg, _ in pickletools.genops(pkl):
                if op.name in _PICKLE_REFUSED_OPS:
                    raise LoadError(f"{refusal} (opcode {op.name}); loading it could run code")
                if op.name == "GLOBAL":
                    module, _, name = str(arg).partition(" ")
                    if not _pickle_global_ok(module, name):
                        raise LoadError(f"{refusal} (it calls {module}.{name}); loading it "
                                        "could run code")
    except LoadError:
        raise
    except Exception as err:  # a malformed pickle: pickletools raises ValueError and others
        raise LoadError(f"{refusal} (unreadable: {_first_line(err)})") from err
    try:
        torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except Exception as err:
        raise LoadError(f"{refusal} (torch.load(weights_only=True) refuses it: "
                        f"{_first_line(err)})") from err


def _pickles(blob: bytes) -> list[bytes]:
    """The pickle streams inside a ``torch.save`` payload (zip format or legacy)."""
    if zipfile.is_zipfile(io.BytesIO(blob)):
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            return [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
    out, f = [], io.BytesIO(blob)
    while f.tell() < len(blob):  # legacy torch.save: magic, protocol, sys info, object, keys
        start = f.tell()
        for op, _, _ in pickletools.genops(f):
            if op.name == "STOP":
                break
        out.append(blob[start:f.tell()])
        if len(out) == 5:  # the raw storages follow
            break
    return out


def _pickle_global_ok(module: str, name: str) -> bool:
    if (module, name) in _PICKLE_GLOBALS:
        return True
    if module == "torch._utils" and name.startswith("_rebuild_"):
        return True
    return module == "torch" and (name.endswith("Storage") or
                                  isinstance(getattr(torch, name, None), torch.dtype))


def _check_name(path: str, name: Any, where: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise LoadError(f"{path}: refused: {where} names {name!r}, not a dotted identifier "
                        "(torch would paste it into generated Python code)")


def _check_program(path: str, raw: bytes) -> None:
    try:
        program = json.loads(raw)
    except ValueError as err:
        raise LoadError(f"{path}: the exported program is not valid JSON: {err}") from err
    _walk(path, program)


def _walk(path: str, obj: Any) -> None:
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, list):
            stack.extend(o)
            continue
        if not isinstance(o, dict):
            continue
        is_node = "target" in o and "inputs" in o and "outputs" in o
        for k, v in o.items():
            if k == "metadata":  # stack traces, module paths: stored, never evaluated
                continue
            if k == "target" and is_node:
                _check_target(path, v)
            elif k == "expr_str":
                _check_expr(path, v)
            elif k == "in_spec" and isinstance(v, str):
                _check_treespec(path, v)
            elif (k in _NAME_KEYS or k == "target") and v is not None:
                _check_name(path, v, f"'{k}'")
            if isinstance(v, (dict, list)):
                stack.append(v)


def _check_target(path: str, target: Any) -> None:
    bad = LoadError(f"{path}: refused: graph calls {target!r}, which is not a registered "
                    "operator")
    if not isinstance(target, str):
        raise bad
    parts = target.split(".")
    if parts[0] == "_operator" and len(parts) == 2 and parts[1] in _OPERATOR_OK:
        return
    if parts[0] == "math" and len(parts) == 2 and callable(getattr(math, parts[1], None)):
        return
    if parts[0] == "torch" and len(parts) == 2 and parts[1] in _TORCH_SYM_OK:
        return
    if parts[:2] != ["torch", "ops"] or len(parts) < 4:
        raise bad
    obj: Any = torch.ops
    try:
        for p in parts[2:]:
            obj = getattr(obj, p)
    except (AttributeError, RuntimeError) as err:
        raise LoadError(f"{path}: graph calls {target!r}, an operator this torch does not "
                        "have (a custom op whose library is not loaded?)") from err
    if isinstance(obj, torch._ops.OpOverload):
        return
    if isinstance(obj, torch._ops.HigherOrderOperator) and obj.name() in _HOP_OK:
        return
    raise bad


def _check_expr(path: str, expr: Any) -> None:
    """Shape expressions are handed to ``sympy.sympify`` (an ``eval``): allow numbers, shape
    symbols, sympy's arithmetic functions and operators, nothing else (no quotes, no dots)."""
    ok = isinstance(expr, str) and len(expr) < 10_000
    pos = 0
    while ok and pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            ok = expr[pos:].strip() == ""
            break
        word, quoted = m.group(2), m.group(3) or m.group(4)
        if word is not None and not (_SYMBOL.match(word) or word in _SYMPY_NAMES):
            ok = False
        if quoted is not None and not (_SYMBOL.match(quoted) or _NUMBER.match(quoted)):
            ok = False
        pos = m.end()
    if not ok:
        raise LoadError(f"{path}: refused: symbolic shape expression {str(expr)[:60]!r} is not "
                        "plain arithmetic (torch evaluates it as Python)")


def _check_treespec(path: str, spec: str) -> None:
    """Keyword names of the inputs are pasted into generated code: identifiers only."""
    try:
        data = json.loads(spec)
    except ValueError as err:
        raise LoadError(f"{path}: a module signature is not valid JSON: {err}") from err
    stack = [data]
    while stack:
        o = stack.pop()
        if isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, dict):
            ctx = o.get("context")
            if isinstance(ctx, str):
                try:
                    ctx = json.loads(ctx)
                except ValueError:
                    pass
                for key in _strings(ctx):
                    if not _IDENT.match(key):
                        raise LoadError(f"{path}: refused: input/output name {key[:60]!r} is "
                                        "not an identifier (torch would paste it into "
                                        "generated Python code)")
            stack.extend(o.get("children_spec") or [])


def _strings(o: Any) -> list[str]:
    if isinstance(o, str):
        return [o]
    if isinstance(o, (list, tuple)):
        return [s for x in o for s in _strings(x)]
    if isinstance(o, dict):
        return [s for k, v in o.items() for s in _strings(k) + _strings(v)]
    return []


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def load_exported(path: str, extra_files: dict[str, Any]) -> torch.export.ExportedProgram:
    """``torch.export.load`` after :func:`check_pt2`. torch's own log of a failed
    deserialization (a traceback at WARNING) is kept off the console; its cause is named in
    the error instead."""
    try:
        check_pt2(path)
    except LoadError:
        raise
    except Exception as err:  # a malformed archive the checks did not foresee: refuse it
        raise LoadError(f"{path}: not a readable .pt2 archive: {_first_line(err)}") from err
    keep = _Keep()
    saved = {}
    for name in [n for n in logging.root.manager.loggerDict
                 if n.split(".")[:2] in (["torch", "export"], ["torch", "_export"])]:
        lg = logging.getLogger(name)
        saved[name] = lg.handlers[:], lg.propagate
        lg.handlers, lg.propagate = [keep], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(path, extra_files=extra_files)
    except Exception as err:
        causes = [r.exc_info[1] for r in keep.records if r.exc_info and r.exc_info[1]]
        cause = causes[0] if causes else err
        raise LoadError(f"{path}: not a readable ExportedProgram (.pt2): "
                        f"{_first_line(cause)}") from err
    finally:
        for name, (handlers, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers, lg.propagate = handlers, propagate
