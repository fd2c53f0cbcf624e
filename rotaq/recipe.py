"""Recipes: a pipeline of passes written in a JSON file (built-ins live in rotaq/recipes/)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from rotaq.errors import RotaqError
from rotaq.passes.base import make_pass, pass_names


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
        """A built-in name (``rotate``) or a path to a recipe JSON file."""
        if os.path.exists(name_or_path):
            try:
                with open(name_or_path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise RotaqError(f"recipe {name_or_path}: not valid JSON: {err}") from err
        else:
            files = resources.files("rotaq.recipes")
            path = files / f"{name_or_path}.json"
            if not path.is_file() and name_or_path in pass_names():
                return cls.for_pass(name_or_path)
            if not path.is_file():
                raise RotaqError(f"unknown recipe '{name_or_path}' (built-in: "
                                 f"{', '.join(builtin_recipes())}; a pass name: "
                                 f"{', '.join(pass_names())}; or give a .json path)")
            data = json.loads(path.read_text(encoding="utf-8"))
        return cls.from_dict(data, default_name=os.path.basename(name_or_path))

    @classmethod
    def for_pass(cls, name: str) -> Recipe:
        """A one-pass recipe (``--recipe lowrank --set ratio=0.3``): verified against 1e-4 if
        the pass is exact, unbounded otherwise."""
        exact = getattr(make_pass(name, {}), "exact", False)
        return cls(name, [{"pass": name}], 1e-4 if exact else None,
                   f"the {name} pass with its default options")

    @classmethod
    def from_dict(cls, data: dict[str, Any], default_name: str = "recipe") -> Recipe:
        if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
            raise RotaqError("a recipe is a JSON object with a 'passes' list")
        for p in data["passes"]:
            if not isinstance(p, dict) or "pass" not in p:
                raise RotaqError(f"recipe pass entries need a 'pass' key: {p!r}")
        known = {"name", "passes", "tolerance", "description"}
        return cls(data.get("name", default_name), [dict(p) for p in data["passes"]],
                   data.get("tolerance", 1e-4), data.get("description", ""),
                   {k: v for k, v in data.items() if k not in known})

    def with_options(self, options: dict[str, Any]) -> Recipe:
        """Override pass options: ``{"seed": 1}`` sets it on every pass that has it,
        ``{"rotate.seed": 1}`` on the named pass only."""
        import dataclasses

        from rotaq.passes.base import _REGISTRY, _load_builtin_passes

        _load_builtin_passes()
        passes = [dict(p) for p in self.passes]
        for key, value in options.items():
            target, _, opt = key.rpartition(".")
            hit = False
            for p in passes:
                cls = _REGISTRY.get(p["pass"])
                names = {f.name for f in dataclasses.fields(cls)} if cls else set()
                if (not target or target == p["pass"]) and opt in names:
                    p[opt] = value
                    hit = True
            if not hit:
                raise RotaqError(f"option '{key}' matches no pass of recipe '{self.name}'")
        return Recipe(self.name, passes, self.tolerance, self.description, dict(self.extra))

    def build(self) -> list:
        return [make_pass(p["pass"], {k: v for k, v in p.items() if k != "pass"})
                for p in self.passes]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passes": self.passes, "tolerance": self.tolerance,
                "description": self.description}


def builtin_recipes() -> list[str]:
    files = resources.files("rotaq.recipes")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))
