"""The distiller registry: a recipe's top-level ``method:`` -> the module that runs it.

Each entry names the module (imported lazily, so ``stepdistill --help`` stays instant), the
recipe class in it (the shared sections of :mod:`.recipe` plus the method's own) and the
``build(teacher, recipe, data)`` function that makes the :class:`~stepdistill.distillers.base.Distiller`. A new family registers
itself with :func:`register_method`.
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
    module: str  # absolute module path
    recipe: str  # recipe dataclass in the module
    build: str  # function (teacher, recipe, data: RunData | None) -> Distiller
    description: str

    def load(self, attr: str):
        return getattr(importlib.import_module(self.module), getattr(self, attr))


METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, module: str, recipe: str, build: str, description: str) -> None:
    METHODS[name] = MethodEntry(name, module, recipe, build, description)


_DM = "stepdistill.distillers.distribution_matching"
_CM = "stepdistill.distillers.consistency"
_GD = "stepdistill.distillers.guidance"
register_method("dmd", _DM, "DMDRecipe", "build", "DMD: distribution matching + regression on teacher ODE pairs")
register_method("dmd2", _DM, "DMDRecipe", "build", "DMD2: distribution matching, TTUR, GAN head, backward simulation")
register_method("lcm", _CM, "ConsistencyRecipe", "build", "LCM / LCM-LoRA: latent consistency distillation")
register_method("pcm", _CM, "ConsistencyRecipe", "build", "PCM: phased consistency distillation")
register_method("progressive", "stepdistill.distillers.progressive", "ProgressiveRecipe", "build",
                "progressive distillation: halve the step count stage after stage (64 -> 32 -> ... -> 1)")
register_method("reflow", "stepdistill.distillers.reflow", "ReflowRecipe", "build",
                "reflow / InstaFlow: straighten the teacher's ODE on its couplings, then distil it to one step")
_SD = "stepdistill.distillers.score_distillation"
register_method("sds", _SD, "ScoreDistillationRecipe", "build", "SDS: score distillation sampling as a generator loss (baseline)")
register_method("vsd", _SD, "ScoreDistillationRecipe", "build", "VSD / SwiftBrush: image-free variational score distillation")
register_method("sid", _SD, "ScoreDistillationRecipe", "build", "SiD: score identity distillation (data-free)")
register_method("sida", _SD, "ScoreDistillationRecipe", "build", "SiDA: SiD + adversarial loss on the fake score's encoder")
register_method("guidance", _GD, "GuidanceRecipe", "build", "guidance distillation: a w-conditioned student, one pass per step instead of CFG's two")
register_method("agd", _GD, "GuidanceRecipe", "build", "adapter guidance distillation: LoRA adapters at strength w - 1 on the frozen teacher")


def method_entry(name: Any) -> MethodEntry:
    if not isinstance(name, str) or name not in METHODS:
        listing = ", ".join(sorted(METHODS))
        if name is None:
            raise RecipeError(f"missing required field 'method' (one of: {listing})")
        raise RecipeError(f"field 'method' must be one of {listing}; got {name!r}")
    return METHODS[name]


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
        cls = method_entry(data.get("method")).load("recipe")
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
        by_class.setdefault(METHODS[name].load("recipe"), []).append(name)
    branches = []
    for cls, names in by_class.items():
        schema = json_schema(cls)
        del schema["$schema"]
        schema["properties"]["method"] = {"enum": names, "description": "; ".join(f"{n}: {METHODS[n].description}" for n in names)}
        branches.append({"if": {"properties": {"method": {"enum": names}}, "required": ["method"]}, "then": schema})
    return {"$schema": JSON_SCHEMA_DIALECT, "title": "stepdistill distillation recipe", "type": "object", "required": ["method"],
            "properties": {"method": {"enum": sorted(METHODS), "description": "the distillation method (stepdistill/distillers/registry.py)"}},
            "allOf": branches}


__all__ = ["METHODS", "MethodEntry", "load_distill_recipe", "method_entry", "recipe_schema", "register_method"]
