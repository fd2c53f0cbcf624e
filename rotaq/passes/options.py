"""Pass options: shared option groups and the conversion of option values to their fields' types.

Options are dataclass fields, so the same flat names serve Python (``Quantize(w_bits=4)``),
recipe files (``{"pass": "quantize", "w_bits": 4}``) and the command line (``--set w_bits=4``).
Groups that several passes share are mixins here (:class:`Calibrated`, :class:`Selected`): a
pass lists them as bases and keeps the flat names; a pass may redeclare a field to change its
default (``calib_tokens: int = 256``).

:func:`coerce` converts a value to the field's annotated type: ``int``, ``float``, ``bool``,
``str``, ``Literal[...]`` (the value must be one of the choices), ``X | None`` (``none`` or
``null`` from the command line) and ``tuple[T, ...]`` (comma-separated on the command line).
Values from recipe files and Python are checked, not converted (except int -> float).
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from rotaq.errors import RewriteError, RotaqError


@dataclass(frozen=True)
class Selected:
    """Which linears a pass rewrites: regexes on their names (module paths); the head and MoE
    routers are left out unless named by ``include``."""

    include: str = ""
    exclude: str = ""

    def selected(self, a: Any) -> list[str]:
        """The linear keys of analysis ``a`` these options select, in graph order; none is an
        error naming the pass."""
        keys = select_linears(a, self.include, self.exclude)
        if not keys:
            raise RewriteError(f"{getattr(self, 'name', 'pass')}: no linear matches the "
                               "include/exclude filters")
        return keys


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


@dataclass(frozen=True)
class Calibrated:
    """Calibration text (a built-in name or a file), token budget and window length."""

    calib_text: str = "lee"
    calib_tokens: int = 2048
    calib_window: int = 256


def option_types(cls: type) -> dict[str, Any]:
    """The resolved type hint of every option (dataclass field) of pass class ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def describe(hint: Any) -> str:
    """A type hint as a user reads it: ``int``, ``one of rtn, gptq``, ``int or none``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else describe(a) for a in args)
    if origin is tuple:
        return f"a comma-separated list of {describe(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def coerce(pass_name: str, option: str, hint: Any, value: Any) -> Any:
    """``value`` as the type ``hint`` of option ``option``; a :class:`RotaqError` naming the
    pass, the option and what it expects otherwise."""
    try:
        return _coerce(hint, value)
    except (TypeError, ValueError) as err:
        raise RotaqError(f"pass '{pass_name}': option {option} expects {describe(hint)}, got "
                         f"{value!r}") from err


def _coerce(hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    text = isinstance(value, str)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        none_text = text and value.lower() in ("none", "null") and str not in args
        if type(None) in args and (value is None or none_text):
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(a, value)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin is Literal:
        for choice in args:
            try:
                got = _coerce(type(choice), value)
            except (TypeError, ValueError):
                continue
            if got == choice:
                return choice
        raise ValueError(value)
    if origin is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()] if text else value
        if not isinstance(items, (list, tuple)):
            raise TypeError(value)
        item = args[0] if args else Any
        return tuple(_coerce(item, v) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text and value.lower() in ("1", "true", "yes", "on"):
            return True
        if text and value.lower() in ("0", "false", "no", "off"):
            return False
        raise TypeError(value)
    if hint in (int, float):  # from text, or a number of that kind (an int is a float too)
        kind = numbers.Integral if hint is int else numbers.Real
        if text or (isinstance(value, kind) and not isinstance(value, bool)):
            return hint(value)
        raise TypeError(value)
    if hint is str:
        if not text:
            raise TypeError(value)
        return value
    return value
