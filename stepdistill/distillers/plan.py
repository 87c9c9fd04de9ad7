"""``stepdistill plan RECIPE``: the memory a distillation recipe needs, per role, before any weight
is loaded -- the recipe's method decides the roles, the teacher directory's ``config.json`` files
decide the networks (built on the meta device by :mod:`stepdistill.planning`), and the recipe's
``training:`` / ``memory:`` / LoRA settings decide how each is held.

Roles: each method's class declares its own (``method_role_specs``, in its family file, with a
:class:`~stepdistill.planning.recipe_roles.RolePlanner`: the teacher, the trained copies, the
encoders; docs/memory.md); this module never branches on a method's name.

The verdict for each GPU size names the cheapest recipe change that fits, as ``--set`` options,
trying one lever at a time in the order of what they cost the run, then stacking them:
releasing the encoders, a bf16 frozen teacher, gradient checkpointing, a LoRA fake score, a LoRA
student, and gradient accumulation (a smaller micro-batch at the same global batch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..config import merge
from ..errors import RecipeError
from ..planning import RoleSpec, Workload, estimate_memory
from ..planning.recipe_roles import TeacherConfigs, read_teacher_configs
from ..planning.report import GIB, GPU_SIZES_GIB, DEFAULT_HEADROOM, Change, PlanReport, Verdict
from .recipe import DistillRecipe
from .registry import method_class

DEFAULT_LORA_RANK = 64  # what the LoRA levers suggest


def recipe_roles(recipe: DistillRecipe, configs: TeacherConfigs) -> list[RoleSpec]:
    """The roles of ``recipe``'s run as its method's class declares them (``plan_roles``)."""
    return method_class(recipe.method).plan_roles(recipe, configs)


# -- levers: recipe changes, cheapest first ------------------------------------------------------
@dataclass(frozen=True)
class Lever:
    name: str
    sets: Callable[[Any, TeacherConfigs], dict[str, Any]]  # --set key -> value; empty: does not apply


def _release(recipe, configs):
    return {"memory.release_encoders": True} if configs.components and not recipe.memory.release_encoders else {}


def _bf16_teacher(recipe, configs):
    if recipe.memory.teacher_dtype is not None:
        return {}
    sets = {"memory.teacher_dtype": "bf16"}
    if recipe.training.mixed_precision == "no":
        sets["training.mixed_precision"] = "bf16"
    return sets


def _checkpointing(recipe, configs):
    return {} if recipe.memory.gradient_checkpointing else {"memory.gradient_checkpointing": True}


def _lora_fake_score(recipe, configs):
    fake = getattr(recipe, "fake_score", None)
    return {"fake_score.lora_rank": DEFAULT_LORA_RANK} if fake is not None and fake.lora_rank == 0 else {}


def _lora_student(recipe, configs):
    if recipe.student.lora_rank > 0:
        return {}
    return {"student.lora_rank": DEFAULT_LORA_RANK, **method_class(recipe.method).lora_student_sets}


LEVERS = (
    Lever("release encoders", _release),
    Lever("bf16 frozen teacher", _bf16_teacher),
    Lever("gradient checkpointing", _checkpointing),
    Lever("LoRA fake score", _lora_fake_score),
    Lever("LoRA student", _lora_student),
)


def _nested(sets: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sets.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _set_args(sets: Mapping[str, Any]) -> str:
    def text(v):
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"--set {k}={text(v)}" for k, v in sets.items())


# -- the plan --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecipePlan:
    recipe: DistillRecipe
    configs: TeacherConfigs
    specs: tuple[RoleSpec, ...]
    report: PlanReport
    height: int
    width: int
    micro_batch: int
    num_processes: int

    @property
    def peak(self) -> int:
        return self.report.peak

    def __str__(self) -> str:
        r, c = self.recipe, self.configs
        mp = r.training.mixed_precision
        head = (f"stepdistill plan: {r.method} of {c.family} teacher {c.path}: {self.height}x{self.width} px, "
                f"micro-batch {self.micro_batch} per process ({r.training.batch_size} global, "
                f"{r.training.gradient_accumulation_steps} accumulation step(s), {self.num_processes} process(es)), "
                f"mixed precision {mp}")
        return head + "\n" + str(self.report)


def _workload_args(recipe: DistillRecipe, configs: TeacherConfigs, num_processes: int):
    t = recipe.teacher
    size = configs.default_size()
    height, width = t.height or size, t.width or size
    latents = _cached_latent_size(recipe)
    if latents is not None:  # consistency distillation trains at its real latents' resolution
        height, width = latents[0] * configs.vae_scale_factor, latents[1] * configs.vae_scale_factor
    micro = recipe.training.batch_size // (recipe.training.gradient_accumulation_steps * num_processes)
    if micro < 1:
        raise RecipeError(f"training.batch_size {recipe.training.batch_size} is smaller than gradient_accumulation_steps x processes")
    f = configs.vae_scale_factor
    return height, width, micro, Workload(micro, height // f, width // f, configs.text_tokens)


def _cached_latent_size(recipe: DistillRecipe) -> tuple[int, int] | None:
    """(h, w) of the recipe's latent cache (its header only), when it exists and the method trains at its resolution."""
    if not method_class(recipe.method).trains_at_data_resolution or not recipe.data.latents or not os.path.exists(recipe.data.latents):
        return None
    from ..data import ShardedTensors

    shape = ShardedTensors(recipe.data.latents).shape("latents")
    return int(shape[-2]), int(shape[-1])


def plan_recipe(recipe: DistillRecipe, *, gpus: Sequence[float] = GPU_SIZES_GIB, headroom: float = DEFAULT_HEADROOM,
                num_processes: int = 1, configs: TeacherConfigs | None = None, cache: dict | None = None) -> RecipePlan:
    """The memory table of ``recipe`` (see the module docstring) and a verdict per GPU size.
    ``configs``: the teacher's (default: read from ``teacher.path``); ``cache``: a dict shared by
    plans of recipe variants, so each network configuration is measured once."""
    from .registry import load_distill_recipe

    if configs is None:
        from ..teachers import resolve_teacher_path

        if not recipe.teacher.path:
            raise RecipeError("teacher.path is required: a diffusers pipeline directory (its config files are enough)")
        path = recipe.teacher.config or resolve_teacher_path(recipe.teacher.path)
        configs = read_teacher_configs(path)
    cache = {} if cache is None else cache

    def estimate(r):
        _, _, _, workload = _workload_args(r, configs, num_processes)
        return estimate_memory(recipe_roles(r, configs), workload, cache)

    height, width, micro, _ = _workload_args(recipe, configs, num_processes)
    base = estimate(recipe)
    from ..config import to_dict

    def changed(sets: Mapping[str, Any]):
        return load_distill_recipe(merge(to_dict(recipe), _nested(sets)))

    verdicts = []
    for gib in gpus:
        budget = gib * GIB / headroom
        if base.peak <= budget:
            verdicts.append(Verdict(gib, True))
            continue
        verdicts.append(Verdict(gib, False, _cheapest_change(recipe, configs, budget, estimate, changed)))
    report = PlanReport(estimate=base, headroom=headroom, verdicts=tuple(verdicts))
    return RecipePlan(recipe, configs, tuple(recipe_roles(recipe, configs)), report, height, width, micro, num_processes)


def _cheapest_change(recipe, configs, budget, estimate, changed) -> Change | None:
    """The first lever that fits alone; else the levers stacked in order; then, alone or stacked,
    gradient accumulation (micro-batch halved until it fits, same global batch)."""

    def attempt(names, sets):
        r = changed(sets)
        result = estimate(r)
        return Change(tuple(names), (_set_args(sets),), result) if result.peak <= budget else None

    def with_accumulation(names, sets):
        r = changed(sets)
        steps = r.training.gradient_accumulation_steps
        while r.training.batch_size % (steps * 2) == 0:
            steps *= 2
            found = attempt(names + ["gradient accumulation"], {**sets, "training.gradient_accumulation_steps": steps})
            if found is not None:
                return found
        return None

    for lever in LEVERS:
        sets = lever.sets(recipe, configs)
        if sets and (found := attempt([lever.name], sets)) is not None:
            return found
    if (found := with_accumulation([], {})) is not None:
        return found
    names, stacked, peak = [], {}, estimate(recipe).peak
    for lever in LEVERS:
        sets = lever.sets(changed(stacked), configs)
        if not sets:
            continue
        result = estimate(changed({**stacked, **sets}))
        if result.peak > 0.99 * peak:  # saves (almost) nothing on top of the others: not part of the change
            continue
        names, stacked, peak = names + [lever.name], {**stacked, **sets}, result.peak
        if (found := attempt(names, stacked)) is not None:
            return found
    return with_accumulation(names, stacked)


__all__ = ["LEVERS", "RecipePlan", "TeacherConfigs", "plan_recipe", "read_teacher_configs", "recipe_roles"]
