"""Pass protocol, result type and registry.

A pass is a frozen dataclass with a kebab-case ``name`` and ``__call__(model) -> PassResult``.
Its fields are its options: the same names are used in Python, in recipe files and on the
command line (``--set field=value``).
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rotaq.errors import RotaqError

if TYPE_CHECKING:
    from rotaq.model import Model

_REGISTRY: dict[str, type] = {}


@dataclass
class PassResult:
    model: Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


def register(cls: type) -> type:
    """Class decorator: make a pass available to recipes under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def pass_names() -> list[str]:
    _load_builtin_passes()
    return sorted(_REGISTRY)


def make_pass(name: str, options: dict[str, Any]) -> Callable:
    """Build a registered pass from its name and option dict, validating option names/types."""
    _load_builtin_passes()
    if name not in _REGISTRY:
        raise RotaqError(f"unknown pass '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    cls = _REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(options) - set(fields))
    if bad:
        raise RotaqError(f"pass '{name}' has no option {', '.join(bad)} "
                         f"(options: {', '.join(sorted(fields))})")
    values = {k: _coerce(fields[k], v, name) for k, v in options.items()}
    for k, why in getattr(cls, "unset_options", {}).items():
        # an option whose default means "not set" (rank=0): giving that value is a mistake
        if k in values and values[k] == fields[k].default:
            raise RotaqError(f"pass '{name}': {k}={values[k]!r} means 'not set' ({why}); give "
                             f"a value >= 1 or leave {k} out")
    return cls(**values)


def select_linears(a: Any, include: str = "", exclude: str = "", head: bool = False) -> list[str]:
    """Linear keys of analysis ``a`` in graph order, filtered by regexes on their names (module
    paths); the head and MoE routers are left out unless ``head`` or ``include`` names them."""
    heads = set(a.residual.head) | set(getattr(a, "routers", ()))  # MoE routers stay float
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    out = []
    for key, lin in a.linears.items():
        name = lin.name or key
        if key in heads and not head and not (inc and inc.search(name)):
            continue
        if inc and not inc.search(name):
            continue
        if exc and exc.search(name):
            continue
        out.append(key)
    return out


def _coerce(f: dataclasses.Field, value: Any, pass_name: str) -> Any:
    """Options from the command line arrive as strings; convert them to the field's type."""
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if not isinstance(value, str) or typ == "str":  # from a recipe file or Python: check it
        ok = {"int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str)}
        if typ in ok and not ok[typ](value):
            raise RotaqError(f"pass '{pass_name}': option {f.name} expects {typ}, got "
                             f"{value!r}")
        return float(value) if typ == "float" else int(value) if typ == "int" else value
    try:
        if typ == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ == "int":
            return int(value)
        if typ == "float":
            return float(value)
    except ValueError as err:
        raise RotaqError(f"pass '{pass_name}': option {f.name} expects {typ}, got '{value}'") from err
    return value


def _load_builtin_passes() -> None:
    from rotaq.passes import (  # noqa: F401  (they register themselves)
        int8_outliers,
        kron_transform,
        lowrank,
        quantize,
        rotate,
        structured,
    )
