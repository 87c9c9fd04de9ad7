"""The distiller registry: a recipe's top-level ``method:`` -> the class that runs it.

The registry is a table of contents only: each entry names a method and where its class lives
(``"module:Class"``, imported lazily so ``stepdistill --help`` stays instant). Everything else
-- the recipe format, the description, the memory plan, ``--make-pairs``, the export -- the
class declares (:class:`~stepdistill.distillers.base.MethodDeclaration`;
docs/adding_a_method.md). A new method registers itself with :func:`register_method`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..config import check_override_keys, from_dict, load_yaml, merge, parse_set_overrides
from ..errors import RecipeError


@dataclass(frozen=True)
class MethodEntry:
    name: str
    target: str  # "absolute.module.path:ClassName"

    def load(self):
        """The method's class (a MethodDeclaration)."""
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, target: str) -> None:
    """Register method ``name`` (a recipe's ``method:``) as the class at ``"module:Class"``."""
    if ":" not in target:
        raise ValueError(f"register_method: target must be 'module:Class'; got {target!r}")
    METHODS[name] = MethodEntry(name, target)


BUILT_IN = {  # method -> its class in stepdistill.distillers (one file per family)
    "dmd": "distribution_matching:DMD", "dmd2": "distribution_matching:DMD2",
    "lcm": "consistency:LCM", "pcm": "consistency:PCM",
    "progressive": "progressive:ProgressiveDistillation", "reflow": "reflow:ReflowDistillation",
    "sds": "score_distillation:SDS", "vsd": "score_distillation:VSD", "sid": "score_distillation:SiD", "sida": "score_distillation:SiDA",
    "guidance": "guidance:GuidanceDistillation", "agd": "guidance:AdapterGuidanceDistillation",
}
for _name, _target in BUILT_IN.items():
    register_method(_name, "stepdistill.distillers." + _target)


def method_entry(name: Any) -> MethodEntry:
    if not isinstance(name, str) or name not in METHODS:
        listing = ", ".join(sorted(METHODS))
        if name is None:
            raise RecipeError(f"missing required field 'method' (one of: {listing})")
        raise RecipeError(f"field 'method' must be one of {listing}; got {name!r}")
    return METHODS[name]


def method_class(name: Any):
    """The class registered as ``name`` (a RecipeError naming the registered ones otherwise)."""
    return method_entry(name).load()


def load_distill_recipe(
    path: str | os.PathLike | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    set_items: Sequence[str] | None = None,
):
    """Read and validate a distillation recipe (a YAML path or an already parsed mapping).

    ``overrides``: nested dict merged over the file; ``set_items``: ``--set key.sub=value``
    strings, checked key by key against the method's schema and validated exactly like the file.
    """
    where = "recipe" if isinstance(path, Mapping) else os.fspath(path)
    data = dict(path) if isinstance(path, Mapping) else load_yaml(path)
    try:
        if overrides:
            data = merge(data, overrides)
        sets = parse_set_overrides(set_items)
        data = merge(data, sets)
        cls = method_class(data.get("method")).recipe_class
        check_override_keys(cls, sets)
        return from_dict(cls, data)
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a distillation recipe (``stepdistill schema``): ``method``
    names a registered method, and the method's recipe class (the shared sections plus its own,
    :func:`~stepdistill.config.json_schema`) applies, so a key of another method's section is an
    unknown key there too."""
    from ..config import JSON_SCHEMA_DIALECT, json_schema

    by_class: dict[type, list[str]] = {}
    for name in sorted(METHODS):
        by_class.setdefault(METHODS[name].load().recipe_class, []).append(name)
    branches = []
    for cls, names in by_class.items():
        schema = json_schema(cls)
        del schema["$schema"]
        schema["properties"]["method"] = {"enum": names, "description": "; ".join(f"{n}: {METHODS[n].load().description}" for n in names)}
        branches.append({"if": {"properties": {"method": {"enum": names}}, "required": ["method"]}, "then": schema})
    return {"$schema": JSON_SCHEMA_DIALECT, "title": "stepdistill distillation recipe", "type": "object", "required": ["method"],
            "properties": {"method": {"enum": sorted(METHODS), "description": "the distillation method (stepdistill/distillers/registry.py)"}},
            "allOf": branches}


__all__ = ["METHODS", "MethodEntry", "load_distill_recipe", "method_class", "method_entry", "recipe_schema", "register_method"]
