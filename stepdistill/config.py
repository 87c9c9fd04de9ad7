"""Recipes: YAML files under ``configs/``, validated on load into typed dataclasses.

A recipe is a dataclass whose fields are sections (themselves dataclasses) or plain values.
:func:`from_dict` checks a parsed mapping against it and raises a one-line
:class:`~stepdistill.errors.RecipeError` for

- an unknown key: names the key, its section and the nearest valid key (``difflib``);
- a wrong type: names the field and the type it expects;
- a missing required field (a dataclass field without a default): names it;
- a number out of its range (fields declared with :func:`bounded`; NaN and infinities never
  pass) or sections whose fields disagree (a section's ``validate()`` method): names the field.

Supported field types: ``int``, ``float`` (ints are accepted), ``str``, ``bool``, ``Literal[...]``,
``Optional[...]``, ``list[T]``, ``tuple[T, ...]`` / ``tuple[A, B]``, ``dict[str, T]`` and nested
dataclasses. A distiller recipe adds its own section by writing one more dataclass, e.g.::

    @dataclass
    class DMD2Section:
        fake_score_updates_per_generator_update: int = 5
        guidance_scale: float = 4.5

    @dataclass
    class DMD2Recipe:
        teacher: str
        dmd2: DMD2Section = field(default_factory=DMD2Section)
        training: TrainingConfig = field(default_factory=TrainingConfig)
        optimizers: dict[str, OptimizerConfig] = field(default_factory=dict)

    recipe = load_recipe("configs/dmd2_digits.yaml", DMD2Recipe)

Sections shared by every training recipe live here: :class:`TrainingConfig`,
:class:`OptimizerConfig`, :class:`EMAConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union

import yaml

from .errors import RecipeError

T = TypeVar("T")


class RecipeLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true / false are booleans, so ``mixed_precision: no``
    (or ``--set training.mixed_precision=no``) stays the string "no"."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


# --------------------------------------------------------------------------------------------
# Numeric ranges
# --------------------------------------------------------------------------------------------
def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A recipe field whose number (or each number of its list) must lie in a range, checked on
    load: ``steps: int = bounded(100, ge=1)``."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    metadata = {"range": {k: v for k, v in bounds.items() if v is not None}}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_RANGE_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_RANGE_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def _check_range(value: Any, bounds: Mapping[str, float], path: str) -> None:
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_range(item, bounds, f"{path}[{i}]")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if not all(_RANGE_OK[k](value, b) for k, b in bounds.items()):
        wanted = " and ".join(f"{_RANGE_TEXT[k]} {b:g}" for k, b in bounds.items())
        raise RecipeError(f"field '{path}' must be {wanted}; got {value!r}")


# --------------------------------------------------------------------------------------------
# Sections shared by every training recipe
# --------------------------------------------------------------------------------------------
@dataclass
class OptimizerConfig:
    """AdamW for one role. ``lr_scheduler``: "constant" or "cosine", both after ``warmup_steps``."""

    lr: float = bounded(1e-4, ge=0)
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0, lt=1)
    weight_decay: float = bounded(0.0, ge=0)
    eps: float = bounded(1e-8, ge=0)
    warmup_steps: int = bounded(0, ge=0)
    lr_scheduler: Literal["constant", "cosine"] = "constant"


@dataclass
class EMAConfig:
    """Exponential moving average of a role's weights, updated after each of its optimizer steps.

    The effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the usual
    warm-up, so early averages are not dominated by the initialization).
    """

    decay: float = bounded(0.999, ge=0, lt=1)


@dataclass
class TrainingConfig:
    """What the :class:`~stepdistill.training.Trainer` needs; every distiller recipe embeds it.

    ``batch_size`` is the GLOBAL batch of one optimizer step, summed over processes and
    gradient-accumulation micro-steps; it must divide evenly among them.

    ``seed``: every random draw of the run is a function of it (role construction, data order,
    noise, timesteps, dropout): the same recipe and seed give bitwise-identical weights on CPU.
    ``deterministic``: also use PyTorch's deterministic algorithms (GPU kernels with atomics,
    some backward passes; cuBLAS with a fixed workspace): bitwise-identical runs on GPU too, at
    a speed cost that depends on the model (the affected ops run their slower deterministic
    kernels; ops without one raise an error naming themselves). CPU kernels are deterministic
    already. ``max_skipped_steps``: steps with a non-finite loss or gradient are skipped (no
    role updates from that point of the step on) and counted; one more than this stops the run.
    """

    max_steps: int = bounded(1000, ge=1)
    batch_size: int = bounded(128, ge=1)
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_accumulation_steps: int = bounded(1, ge=1)
    max_grad_norm: Optional[float] = bounded(1.0, gt=0)
    log_every: int = bounded(50, ge=1)
    eval_every: int = bounded(0, ge=0)  # 0: evaluate only at the end
    checkpoint_every: int = bounded(500, ge=1)
    keep_checkpoints: int = bounded(2, ge=0)  # 0: keep every checkpoint
    num_eval_samples: int = bounded(100, ge=1)
    max_skipped_steps: int = bounded(10, ge=0)  # 0: stop at the first non-finite loss or gradient
    deterministic: bool = False

    def validate(self) -> None:
        if self.batch_size % self.gradient_accumulation_steps:
            raise RecipeError(f"batch_size ({self.batch_size}) must be divisible by gradient_accumulation_steps "
                              f"({self.gradient_accumulation_steps})")


# --------------------------------------------------------------------------------------------
# Validation
#
# Why a hand-written validator and not pydantic v2 (issue 23; pydantic's `extra="forbid"`,
# `Field(ge=...)` and `Literal` would cover the same checks): the recipes are plain dataclasses
# that the rest of the code builds, copies with `dataclasses.replace` (staged methods), walks
# with `dataclasses.fields` (`--set` key checks, `to_dict` for run.json, the memory planner) and
# that a method extends with one more dataclass. This module is ~250 lines with no dependency,
# and its messages are what users read: one line naming the key, its section and the nearest
# valid key (difflib) -- pydantic reports `extra_forbidden` without a suggestion and in several
# lines, so we would wrap its errors and keep most of this code anyway. It also accepts YAML 1.1's
# `1e-4` string as a float, and checks ranges on every item of a list. The JSON Schema that
# editors read (`stepdistill schema`) is derived from the same dataclasses: :func:`json_schema`.
# --------------------------------------------------------------------------------------------
def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    with open(path) as f:
        try:
            data = parse_yaml(f.read())
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def load_recipe(path: str | os.PathLike, recipe_cls: type[T], overrides: Mapping[str, Any] | None = None,
                set_items: Sequence[str] | None = None) -> T:
    """Read a YAML recipe, apply ``overrides`` (nested dicts, merged key by key) and ``--set
    key.sub=value`` strings (each key checked against ``recipe_cls``), validate it; any error is one
    line that starts with the file's path."""
    data = load_yaml(path)
    try:
        sets = parse_set_overrides(set_items)
        data = merge(merge(data, overrides or {}), sets)
        check_override_keys(recipe_cls, sets)
        return from_dict(recipe_cls, data)
    except RecipeError as exc:
        raise RecipeError(f"{os.fspath(path)}: {exc}") from None


def parse_set_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``--set key.sub=value`` items -> nested overrides for :func:`merge`.

    Values are parsed as YAML (``10`` -> int, ``null`` -> None, ``[1, 2]`` -> list, ``abc`` -> str),
    so the result is validated exactly like the same value written in the file.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise RecipeError(f"--set takes KEY.SUB=VALUE (e.g. training.max_steps=100); got {item!r}")
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {item}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item}: '{part}' was already set to a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def check_override_keys(recipe_cls: type, overrides: Mapping[str, Any], where: str = "") -> None:
    """Name an unknown ``--set`` key as such (the whole path, its section, the nearest valid key)."""
    hints = typing.get_type_hints(recipe_cls)
    fields = {f.name for f in dataclasses.fields(recipe_cls)}
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            section = f"section '{where}'" if where else "the top level"
            raise RecipeError(f"--set {path}: unknown key {key!r} in {section}{_suggestion(str(key), fields)}")
        hint = _dataclass_of(hints[key])
        if hint is not None and isinstance(value, Mapping):
            check_override_keys(hint, value, path)


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (also through Optional[...]), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(recipe: Any) -> dict[str, Any]:
    """A validated recipe back to plain YAML-able data (tuples become lists)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(recipe)


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Validate ``data`` against the dataclass ``cls``; ``where`` is the section path for messages."""
    section = f"section '{where}'" if where else "the top level"
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping (section {cls.__name__}), got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise RecipeError(f"unknown key {key!r} in {section}{_suggestion(str(key), fields)}")
    values = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            values[name] = _check(data[name], hints[name], path)
            if "range" in f.metadata:
                _check_range(values[name], f.metadata["range"], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing required field '{path}' ({_type_name(hints[name])})")
    recipe = cls(**values)
    if hasattr(recipe, "validate"):  # a section's rules across its fields
        try:
            recipe.validate()
        except RecipeError as exc:
            raise RecipeError(f"{where}: {exc}" if where else str(exc)) from None
    return recipe


def _suggestion(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid keys: {', '.join(valid)}"


def _check(value: Any, hint: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        sections = [a for a in options if dataclasses.is_dataclass(a)]
        if isinstance(value, Mapping) and len(sections) == 1:
            return _check(value, sections[0], path)  # an optional section: its own error names the key
        for option in options:
            try:
                return _check(value, option, path)
            except RecipeError:
                continue
        raise _type_error(path, hint, value)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise RecipeError(f"field '{path}' must be one of {choices}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, hint, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RecipeError(f"field '{path}' expects {len(args)} values ({_type_name(hint)}); got {len(value)}")
            return tuple(_check(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        checked = [_check(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(path, hint, value)
        key_t, val_t = args if args else (Any, Any)
        return {_check(k, key_t, path): _check(v, val_t, f"{path}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(path, hint, value)
        if not math.isfinite(value):
            raise RecipeError(f"field '{path}' must be a finite number; got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, hint, value)
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise _type_error(path, hint, value)
        return value
    raise TypeError(f"recipe field '{path}' has an unsupported annotation {hint!r}")  # a bug, not user input


# --------------------------------------------------------------------------------------------
# JSON Schema of a recipe (draft 2020-12), from the dataclasses the validator reads
# --------------------------------------------------------------------------------------------
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_RANGE_KEYWORDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the recipe dataclass ``cls``: what :func:`from_dict`
    accepts, for editors that complete and check YAML. Types (``Literal`` -> ``enum``,
    ``Optional`` -> or null, tuples -> fixed-length arrays), :func:`bounded` ranges ->
    ``minimum`` / ``maximum`` / ``exclusive*`` (on every item of a list), required fields,
    defaults, each field's comment as its description, and ``additionalProperties: false`` on
    every section, so a typo'd key is an error. (A section's ``validate()`` rules across fields
    are not expressed.)"""
    return {"$schema": JSON_SCHEMA_DIALECT, **_object_schema(cls)}


def _object_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        schema = _type_schema(hints[f.name])
        if "range" in f.metadata:
            schema = _with_range(schema, f.metadata["range"])
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if not dataclasses.is_dataclass(default):  # a section's defaults are its fields'
                schema["default"] = to_dict({"v": default})["v"]
        if f.name in comments:
            schema["description"] = comments[f.name]
        properties[f.name] = schema
    out: dict[str, Any] = {"title": cls.__name__, "type": "object", "properties": properties, "additionalProperties": False}
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):  # not the dataclass-made signature
        out["description"] = " ".join(cls.__doc__.split("\n\n")[0].split())
    if required:
        out["required"] = required
    return out


def _type_schema(hint: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _object_schema(hint)
    if origin in (Union, types.UnionType):
        options = [_type_schema(a) for a in args if a is not type(None)]
        if type(None) in args and len(options) == 1 and isinstance(options[0].get("type"), str):
            return {**options[0], "type": [options[0]["type"], "null"]}  # Optional[X]: X's keywords hold for X only
        if type(None) in args and len(options) == 1 and "enum" in options[0]:
            return {"enum": [*options[0]["enum"], None]}
        if type(None) in args:
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return {"type": "array", "prefixItems": [_type_schema(a) for a in args], "items": False,
                    "minItems": len(args), "maxItems": len(args)}
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1]) if args else {}}
    simple = {float: "number", int: "integer", str: "string", bool: "boolean"}
    if hint in simple:
        return {"type": simple[hint]}
    if hint is Any:
        return {}
    raise TypeError(f"no JSON Schema for the recipe annotation {hint!r}")  # a bug, as in _check


def _with_range(schema: dict[str, Any], bounds: Mapping[str, float]) -> dict[str, Any]:
    """``bounds`` on the numbers of ``schema``: itself, each item of an array, each branch of anyOf."""
    schema = dict(schema)
    kinds = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
    if "number" in kinds or "integer" in kinds:
        schema.update({_RANGE_KEYWORDS[k]: v for k, v in bounds.items()})
    elif "array" in kinds:
        if "prefixItems" in schema:
            schema["prefixItems"] = [_with_range(s, bounds) for s in schema["prefixItems"]]
        elif isinstance(schema.get("items"), dict):
            schema["items"] = _with_range(schema["items"], bounds)
    elif "anyOf" in schema:
        schema["anyOf"] = [_with_range(s, bounds) for s in schema["anyOf"]]
    return schema


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


def _field_comments(cls: type) -> dict[str, str]:
    """The comment at the end of each field's line in the class source (none when it has no source)."""
    import inspect

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2) for m in map(_FIELD_COMMENT.match, lines) if m}


def _type_error(path: str, hint: Any, value: Any) -> RecipeError:
    return RecipeError(f"field '{path}' expects {_type_name(hint)}; got {_describe(value)}")


def _describe(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return f"a mapping ({hint.__name__})"
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        suffix = " or null" if type(None) in args else ""
        return " or ".join(names) + suffix
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values [{', '.join(_type_name(a) for a in args)}]"
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if origin is dict:
        return f"a mapping of {_type_name(args[1]) if args else 'values'}"
    if hint is float:
        return "a number (float)"
    return getattr(hint, "__name__", str(hint))


__all__ = [
    "bounded",
    "check_override_keys",
    "parse_set_overrides",
    "EMAConfig",
    "OptimizerConfig",
    "TrainingConfig",
    "from_dict",
    "json_schema",
    "load_recipe",
    "load_yaml",
    "merge",
    "to_dict",
]
