"""The pass base class, its result type and the registry.

A pass is a frozen dataclass deriving from :class:`Pass`, with a kebab-case ``name`` and a
:meth:`Pass.call` that rewrites a :class:`~rotaq.model.Model`. Its fields are its options: the
same flat names are used in Python, in recipe files and on the command line (``--set
field=value``); option groups shared by several passes are mixins in :mod:`rotaq.passes.options`.

:meth:`Pass.__call__` wraps :meth:`Pass.call`: it checks :meth:`Pass.requires` first, names the
pass in every error, checks the result, computes ``modified`` from the graph's edit counter (a
pass that found nothing to do reports ``False``, whatever it claims) and records the pass in
``model.source["passes"]`` (saved with the model, so a later run knows what ran before).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from rotaq.errors import MatchError, RotaqError
from rotaq.passes.options import coerce, option_types

if TYPE_CHECKING:
    from rotaq.model import Model

# the built-in passes, imported when first asked for (module, class)
BUILTIN: dict[str, tuple[str, str]] = {
    "rotate": ("rotaq.passes.rotate", "Rotate"),
    "quantize": ("rotaq.passes.quantize", "Quantize"),
    "lowrank": ("rotaq.passes.lowrank", "LowRank"),
    "structured": ("rotaq.passes.structured", "Structured"),
    "kron-transform": ("rotaq.passes.kron_transform", "KronTransform"),
    "int8-outliers": ("rotaq.passes.int8_outliers", "Int8Outliers"),
    "spin": ("rotaq.passes.spin", "Spin"),
}
_REGISTRY: dict[str, type] = {}


@dataclass
class PassResult:
    model: Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass(abc.ABC):
    """Base class of rotaq's passes (subclasses are frozen dataclasses; see the module doc).

    ``exact``: the rewrite keeps the model's function (verified against the recipe's
    tolerance). ``unset_options``: options whose default means "not set" (``rank=0``), with
    why; giving that value explicitly is refused."""

    name: ClassVar[str]
    exact: ClassVar[bool] = False
    unset_options: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        # every option is checked against its type hint, however the pass was built
        for k, hint in option_types(type(self)).items():
            object.__setattr__(self, k, coerce(self.name, k, hint, getattr(self, k)))
        self.validate()

    def validate(self) -> None:
        """Checks of option values beyond their types (raise RewriteError naming the pass)."""

    def requires(self) -> tuple[str, ...]:
        """What the model must offer before this pass runs, checked by :meth:`__call__`:
        ``"linears"`` (the analysis finds a linear), ``"residual"`` (a residual stream),
        ``"pre-norm"``, ``"before:NAME"`` (pass NAME has not run on this model yet),
        ``"after:NAME"`` (it has)."""
        return ()

    @abc.abstractmethod
    def call(self, model: Model) -> PassResult:
        """Rewrite ``model`` in place; the result's ``modified`` is recomputed by the caller."""

    def __call__(self, model: Model) -> PassResult:
        self._check_requires(model)
        graph = model.graph
        before = getattr(graph, "edits", 0)
        try:
            res = self.call(model)
        except RotaqError as err:
            msg = str(err)
            if msg.startswith(f"{self.name}:") or type(err).__init__ is not Exception.__init__:
                raise
            raise type(err)(f"{self.name}: {msg}") from err
        if not isinstance(res, PassResult):
            raise TypeError(f"pass '{self.name}' returned {type(res).__name__}, not PassResult")
        out = res.model.graph
        res.modified = out is not graph or getattr(out, "edits", 0) != before
        done = [p for p in res.model.source.get("passes", "").split(",") if p]
        res.model.source["passes"] = ",".join(done + [self.name])
        return res

    def _check_requires(self, model: Model) -> None:
        ran = {p for p in model.source.get("passes", "").split(",") if p}
        a = None  # the analysis, computed once when a structural requirement asks for it
        for req in self.requires():
            kind, _, other = req.partition(":")
            if kind == "before" and other in ran:
                raise RotaqError(f"{self.name}: must run before {other}, which this model has "
                                 f"already been through (passes so far: "
                                 f"{model.source['passes']})")
            if kind == "after" and other not in ran:
                raise RotaqError(f"{self.name}: must run after {other} (put {other} first in "
                                 "the recipe)")
            if kind in ("before", "after"):
                continue
            a = a or model.analysis()
            if kind == "linears" and not a.linears:
                raise MatchError(f"{self.name}: the model has no linear layer to rewrite")
            if kind == "residual" and not a.residual.blocks:
                raise MatchError(f"{self.name}: no residual stream was found")
            if kind == "pre-norm" and not a.pre_norm:
                raise MatchError(f"{self.name}: needs a pre-norm model; this one is "
                                 f"{a.residual.structure}")
            if kind not in ("linears", "residual", "pre-norm"):
                raise ValueError(f"pass '{self.name}': unknown requirement {req!r}")


def register(cls: type) -> type:
    """Class decorator: make a pass (a :class:`Pass` subclass) available to recipes under
    ``cls.name``; for passes outside rotaq (the built-ins are listed in ``BUILTIN``)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"{cls!r} is not a Pass subclass")
    _REGISTRY[cls.name] = cls
    return cls


def pass_class(name: str) -> type:
    """The pass class registered as ``name``."""
    if name not in _REGISTRY and name in BUILTIN:
        module, attr = BUILTIN[name]
        _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    if name not in _REGISTRY:
        raise RotaqError(f"unknown pass '{name}' (known: {', '.join(pass_names())})")
    return _REGISTRY[name]


def pass_names() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTRY))


def pass_options(name: str) -> dict[str, Any]:
    """Option name -> type hint of pass ``name``."""
    return option_types(pass_class(name))


def make_pass(name: str, options: dict[str, Any]) -> Callable:
    """Build a registered pass from its name and option dict, validating option names/types."""
    cls = pass_class(name)
    fields = option_types(cls)
    bad = sorted(set(options) - set(fields))
    if bad:
        raise RotaqError(f"pass '{name}' has no option {', '.join(bad)} "
                         f"(options: {', '.join(sorted(fields))})")
    values = {k: coerce(name, k, fields[k], v) for k, v in options.items()}
    defaults = {f: getattr(cls, f, None) for f in cls.unset_options}
    for k, why in cls.unset_options.items():
        # an option whose default means "not set" (rank=0): giving that value is a mistake
        if k in values and values[k] == defaults[k]:
            raise RotaqError(f"pass '{name}': {k}={values[k]!r} means 'not set' ({why}); give "
                             f"a value >= 1 or leave {k} out")
    return cls(**values)
