"""Recipes: a pipeline of passes written in a JSON file (built-ins live in rotaq/recipes/)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from rotaq.errors import RotaqError
from rotaq.passes.base import make_pass, pass_names, pass_options


@dataclass
class Recipe:
    """``passes``: list of ``{"pass": NAME, **options}``; ``tolerance``: the verification bound
    (max relative output error) that an exact recipe must meet."""

    name: str
    passes: list[dict[str, Any]]
    tolerance: float | None = 1e-4
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, name_or_path: str) -> Recipe:
        """A built-in name (``rotate``), a pass name, or a recipe JSON file. A name without a
        path separator and without a ``.json`` suffix is always a built-in (a file or folder of
        that name in the current directory does not shadow it: write ``./NAME`` for a file)."""
        seps = [os.sep] + ([os.altsep] if os.altsep else [])
        if any(c in name_or_path for c in seps) or name_or_path.lower().endswith(".json"):
            if os.path.isdir(name_or_path):
                raise RotaqError(f"recipe {name_or_path}: is a directory, not a recipe file")
            try:
                with open(name_or_path, encoding="utf-8") as f:
                    data = json.load(f)
            except FileNotFoundError as err:
                raise RotaqError(f"recipe {name_or_path}: no such file") from err
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise RotaqError(f"recipe {name_or_path}: not valid JSON: {err}") from err
        else:
            files = resources.files("rotaq.recipes")
            path = files / f"{name_or_path}.json"
            if not path.is_file() and name_or_path in pass_names():
                return cls.for_pass(name_or_path)
            if not path.is_file():
                hint = (f"; for the file in this directory write ./{name_or_path}"
                        if os.path.isfile(name_or_path) else "")
                raise RotaqError(f"unknown recipe '{name_or_path}' (built-in: "
                                 f"{', '.join(builtin_recipes())}; a pass name: "
                                 f"{', '.join(pass_names())}; or give a .json path{hint})")
            data = json.loads(path.read_text(encoding="utf-8"))
        return cls.from_dict(data, default_name=os.path.basename(name_or_path))

    @classmethod
    def for_pass(cls, name: str) -> Recipe:
        """A one-pass recipe (``--recipe lowrank --set ratio=0.3``): verified against 1e-4 if
        the pass is exact, unbounded otherwise."""
        exact = make_pass(name, {}).exact
        return cls(name, [{"pass": name}], 1e-4 if exact else None,
                   f"the {name} pass with its default options")

    @classmethod
    def from_dict(cls, data: dict[str, Any], default_name: str = "recipe") -> Recipe:
        if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
            raise RotaqError("a recipe is a JSON object with a 'passes' list")
        for p in data["passes"]:
            if not isinstance(p, dict) or "pass" not in p:
                raise RotaqError(f"recipe pass entries need a 'pass' key: {p!r}")
        name = data.get("name", default_name)
        unknown = sorted(set(data) - set(RECIPE_KEYS))
        if unknown:
            raise RotaqError(f"recipe '{name}': unknown key {', '.join(map(repr, unknown))} "
                             f"(valid keys: {', '.join(RECIPE_KEYS)})")
        tol = data.get("tolerance", 1e-4)
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                                or not tol > 0):
            raise RotaqError(f"recipe '{name}': tolerance must be a positive number or null, "
                             f"got {tol!r}")
        if not isinstance(data.get("description", ""), str) or not isinstance(name, str):
            raise RotaqError(f"recipe '{name}': name and description must be strings")
        return cls(name, [dict(p) for p in data["passes"]],
                   None if tol is None else float(tol), data.get("description", ""), {})

    def with_options(self, options: dict[str, Any]) -> Recipe:
        """Override pass options: ``{"seed": 1}`` sets it on every pass that has it,
        ``{"rotate.seed": 1}`` on the named pass only."""
        known = set(pass_names())
        opts = {p["pass"]: pass_options(p["pass"]) for p in self.passes if p["pass"] in known}
        passes = [dict(p) for p in self.passes]
        for key, value in options.items():
            target, _, opt = key.rpartition(".")
            hit = False
            for p in passes:
                if (not target or target == p["pass"]) and opt in opts.get(p["pass"], ()):
                    p[opt] = value
                    hit = True
            if not hit:
                valid = "; ".join(f"{name}: {', '.join(sorted(o))}" for name, o in opts.items())
                raise RotaqError(f"option '{key}' matches no pass of recipe '{self.name}' "
                                 f"(options: {valid})")
        return Recipe(self.name, passes, self.tolerance, self.description, dict(self.extra))

    def build(self) -> list:
        return [make_pass(p["pass"], {k: v for k, v in p.items() if k != "pass"})
                for p in self.passes]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passes": self.passes, "tolerance": self.tolerance,
                "description": self.description}


RECIPE_KEYS = ("name", "description", "tolerance", "passes")


def builtin_recipes() -> list[str]:
    files = resources.files("rotaq.recipes")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))
