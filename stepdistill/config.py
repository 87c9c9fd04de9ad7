"""Recipes: YAML files under ``configs/``, validated on load into typed dataclasses.

A recipe is a dataclass whose fields are sections (themselves dataclasses) or plain values.
:func:`from_dict` checks a parsed mapping against it and raises a one-line
:class:`~stepdistill.errors.RecipeError` for

- an unknown key: names the key, its section and the nearest valid key (``difflib``);
- a wrong type: names the field and the type it expects;
- a missing required field (a dataclass field without a default): names it.

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
# Sections shared by every training recipe
# --------------------------------------------------------------------------------------------
@dataclass
class OptimizerConfig:
    """AdamW for one role. ``lr_scheduler``: "constant" or "cosine", both after ``warmup_steps``."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_scheduler: Literal["constant", "cosine"] = "constant"


@dataclass
class EMAConfig:
    """Exponential moving average of a role's weights, updated after each of its optimizer steps.

    The effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the usual
    warm-up, so early averages are not dominated by the initialization).
    """

    decay: float = 0.999


@dataclass
class TrainingConfig:
    """What the :class:`~stepdistill.training.Trainer` needs; every distiller recipe embeds it.

    ``batch_size`` is the GLOBAL batch of one optimizer step, summed over processes and
    gradient-accumulation micro-steps; it must divide evenly among them.
    """

    max_steps: int = 1000
    batch_size: int = 128
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_accumulation_steps: int = 1
    max_grad_norm: Optional[float] = 1.0
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_eval_samples: int = 100


# --------------------------------------------------------------------------------------------
# Validation
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


def load_recipe(path: str | os.PathLike, recipe_cls: type[T], overrides: Mapping[str, Any] | None = None) -> T:
    """Read a YAML recipe, apply ``overrides`` (nested dicts, merged key by key), validate it."""
    data = load_yaml(path)
    if overrides:
        data = merge(data, overrides)
    try:
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
            raise RecipeError(f"--set {path}: unknown key '{key}' in {section}{_suggestion(str(key), fields)}")
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
            raise RecipeError(f"unknown key '{key}' in {section}{_suggestion(str(key), fields)}")
    values = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            values[name] = _check(data[name], hints[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing required field '{path}' ({_type_name(hints[name])})")
    return cls(**values)


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
    "check_override_keys",
    "parse_set_overrides",
    "EMAConfig",
    "OptimizerConfig",
    "TrainingConfig",
    "from_dict",
    "load_recipe",
    "load_yaml",
    "merge",
    "to_dict",
]
