"""``stepdistill plan RECIPE``: the memory a distillation recipe needs, per role, before any weight
is loaded -- the recipe's method decides the roles, the teacher directory's ``config.json`` files
decide the networks (built on the meta device by :mod:`stepdistill.planning`), and the recipe's
``training:`` / ``memory:`` / LoRA settings decide how each is held.

Roles, as the distillers build them (docs/memory.md):

- ``teacher``: the frozen denoiser (``memory.teacher_dtype``, else fp32 as loaded);
- ``student``: a full copy (fp32 master weights, computed in ``training.mixed_precision``) with
  its EMA, or a LoRA -- for DMD on its own copy of the base, for LCM-LoRA on the teacher's weights;
- ``fake_score`` (DMD): a full copy, or a LoRA on the teacher's weights; with the GAN it also runs
  the real samples, planned as twice the batch (an upper bound: the real rows run the encoder
  alone, :meth:`~.fake_score.FakeScore.encode`), and the generator's GAN loss backpropagates
  through it; ``discriminator``: the GAN head on its bottleneck;
- ``text_encoder*``, ``vae``: frozen; in host memory with ``memory.release_encoders`` (the VAE
  stays on the GPU when real images are VAE-encoded every step).

The verdict for each GPU size names the cheapest recipe change that fits, as ``--set`` options,
trying one lever at a time in the order of what they cost the run, then stacking them:
releasing the encoders, a bf16 frozen teacher, gradient checkpointing, a LoRA fake score, a LoRA
student, and gradient accumulation (a smaller micro-batch at the same global batch).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..config import merge
from ..errors import RecipeError, StepdistillError
from ..planning import RoleSpec, Workload, estimate_memory
from ..planning.report import GIB, GPU_SIZES_GIB, DEFAULT_HEADROOM, Change, PlanReport, Verdict
from .recipe import DistillRecipe, lora_targets

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DEFAULT_LORA_RANK = 64  # what the LoRA levers suggest


# -- the teacher directory's configs ------------------------------------------------------------
@dataclass
class TeacherConfigs:
    """What the planner reads from a teacher directory: ``model_index.json`` and each component's
    ``config.json`` (no weights)."""

    path: str
    family: str
    denoiser_name: str
    denoiser: dict[str, Any]  # config.json of the denoiser (with _class_name)
    components: dict[str, dict[str, Any]]  # text encoders / vae: config.json with _class_name set
    text_tokens: int | None
    discriminator: Any = None  # (module factory, example inputs) of the GAN head, made on first use

    @property
    def vae_scale_factor(self) -> int:
        vae = self.components.get("vae")
        return 2 ** (len(vae["block_out_channels"]) - 1) if vae else 1

    def default_size(self) -> int:
        """Pixels the stock pipeline makes by default: the denoiser's ``sample_size`` latents
        (FluxPipeline: 128, its transformer config has none)."""
        size = 128 if self.family == "flux" else (self.denoiser.get("sample_size") or 64)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise StepdistillError(f"stepdistill plan reads config files only, and {path} is missing")
    with open(path) as f:
        return json.load(f)


def read_teacher_configs(path: str | os.PathLike) -> TeacherConfigs:
    """``model_index.json`` and the component configs of a diffusers pipeline directory."""
    from ..teachers import detect_family, teacher_class

    path = os.fspath(path)
    family = detect_family(path)
    index = _read_json(os.path.join(path, "model_index.json"))
    name = teacher_class(family).denoiser_name
    denoiser = {"_class_name": index[name][1], **_read_json(os.path.join(path, name, "config.json"))}
    components = {}
    for component in (*TEXT_ENCODERS, "vae"):
        entry = index.get(component)
        if entry and entry[0] is not None:
            components[component] = {**_read_json(os.path.join(path, component, "config.json")), "_class_name": entry[1]}
    return TeacherConfigs(path, family, name, denoiser, components, _text_tokens(path, family))


def _text_tokens(path: str, family: str) -> int | None:
    """Prompt tokens the denoiser attends to: the CLIP tokenizer's length (+ T5's 256 for SD3,
    512 T5 tokens for Flux, as the teacher adapters encode); None for class / unconditional teachers."""
    if family not in ("sd", "sdxl", "sd3", "flux"):
        return None
    if family == "flux":
        return 512
    tokenizer = os.path.join(path, "tokenizer", "tokenizer_config.json")
    clip = int(json.load(open(tokenizer)).get("model_max_length", 77)) if os.path.isfile(tokenizer) else 77
    clip = clip if clip < 10_000 else 77  # "no limit" sentinels
    return clip + 256 if family == "sd3" else clip


# -- roles of each method ------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    compute: torch.dtype  # training.mixed_precision (what autocast runs trained networks in)
    frozen: torch.dtype  # storage of frozen denoiser weights (memory.teacher_dtype, else fp32)


def _precision(recipe: DistillRecipe) -> Precision:
    frozen = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.memory.teacher_dtype or "", torch.float32)
    return Precision(DTYPES[recipe.training.mixed_precision], frozen)


def _frozen_weights(p: Precision) -> dict[str, Any]:
    """Frozen denoiser weights: stored in ``p.frozen``, computed in ``p.compute`` (autocast)."""
    return {"param_dtype": p.compute, "frozen_dtype": None if p.frozen == p.compute else p.frozen}


def _denoiser_role(configs: TeacherConfigs, name: str, **kwargs) -> RoleSpec:
    return RoleSpec(name, config=configs.denoiser, **kwargs)


def _trained(recipe: DistillRecipe, configs: TeacherConfigs, p: Precision, name: str, lora_rank: int, targets: Sequence[str],
             shares: str | None = None, **kwargs) -> RoleSpec:
    """A trained copy of the denoiser: full (fp32 master, autocast copy) or LoRA (on a frozen base)."""
    common = dict(gradient_checkpointing=recipe.memory.gradient_checkpointing, **kwargs)
    if lora_rank > 0:
        return _denoiser_role(configs, name, trainable="lora", lora_rank=lora_rank, lora_targets=tuple(lora_targets(configs.family, list(targets))),
                              shares_weights_with=shares, **_frozen_weights(p), **common)
    return _denoiser_role(configs, name, trainable="full", param_dtype=p.compute, **common)


def _encoder_roles(recipe: DistillRecipe, configs: TeacherConfigs) -> list[RoleSpec]:
    """Text encoders and the VAE: frozen, as loaded (fp32); in host memory when released."""
    release = recipe.memory.release_encoders
    roles = []
    for name, config in configs.components.items():
        on_host = release and not (name == "vae" and recipe.data.images and not recipe.data.latents)
        roles.append(RoleSpec(name, config=config, on_host=on_host))
    return roles


def dmd_roles(recipe, configs: TeacherConfigs) -> list[RoleSpec]:
    from .distribution_matching import gan_enabled

    p = _precision(recipe)
    gan = gan_enabled(recipe, bool(recipe.data.images or recipe.data.latents))
    student = _trained(recipe, configs, p, "student", recipe.student.lora_rank, recipe.student.lora_target_modules,
                       ema=recipe.ema is not None)
    fake = _trained(recipe, configs, p, "fake_score", recipe.fake_score.lora_rank, recipe.fake_score.lora_target_modules,
                    shares="teacher", batch_factor=2 if gan else 1,
                    backprop_from=("student",) if gan and recipe.dmd.gan_generator_weight > 0 else ())
    roles = [_denoiser_role(configs, "teacher", **_frozen_weights(p)), student, fake]
    if gan:
        roles.append(_discriminator_role(configs, p, backprop_from=("fake_score",) if recipe.dmd.gan_critic_weight > 0 else ()))
    return roles + _encoder_roles(recipe, configs)


def consistency_roles(recipe, configs: TeacherConfigs) -> list[RoleSpec]:
    p = _precision(recipe)
    s = recipe.consistency
    lora = recipe.student.lora_rank
    config = configs.denoiser
    if s.w_embedding:
        config = {**config, "time_cond_proj_dim": s.w_embedding_dim}
    shares = "teacher" if (lora > 0 and not s.w_embedding) else None  # LCM-LoRA: on the teacher's weights
    student = _trained(recipe, configs, p, "student", lora, recipe.student.lora_target_modules, shares=shares,
                       ema=recipe.ema is not None and lora == 0)
    if config is not configs.denoiser:
        student = dataclasses.replace(student, config=config)
    return [_denoiser_role(configs, "teacher", **_frozen_weights(p)), student, *_encoder_roles(recipe, configs)]


def score_distillation_roles(recipe, configs: TeacherConfigs) -> list[RoleSpec]:
    """SDS / VSD / SiD / SiDA: G, the frozen teacher and (not SDS) the fake score. SiD's generator
    loss is differentiated through both scores' forwards (their activations add to G's backward);
    SDS / VSD take their gradient without one. SiDA's fake score also runs the real samples (planned
    as 2x the batch: an upper bound, their pass stops at the bottleneck)."""
    p = _precision(recipe)
    through = ("student",) if recipe.method in ("sid", "sida") else ()
    student = _trained(recipe, configs, p, "student", recipe.student.lora_rank, recipe.student.lora_target_modules,
                       ema=recipe.ema is not None)
    roles = [_denoiser_role(configs, "teacher", backprop_from=through, **_frozen_weights(p)), student]
    if recipe.method != "sds":
        roles.append(_trained(recipe, configs, p, "fake_score", recipe.fake_score.lora_rank, recipe.fake_score.lora_target_modules,
                              shares="teacher", batch_factor=2 if recipe.method == "sida" else 1, backprop_from=through))
    return roles + _encoder_roles(recipe, configs)


def guidance_roles(recipe, configs: TeacherConfigs) -> list[RoleSpec]:
    """Guidance distillation: a full w-conditioned copy of the denoiser (the w input as
    ``w_conditioned_copy`` adds it) next to the frozen teacher. AGD: LoRA adapters on the teacher's
    own weights, no second copy. AGD's trajectory bank (host memory, ``guidance.trajectory_bank``
    states) is not planned."""
    p = _precision(recipe)
    if recipe.method == "agd":
        student = _trained(recipe, configs, p, "student", recipe.student.lora_rank, recipe.student.lora_target_modules,
                           shares="teacher", ema=recipe.ema is not None)
    else:
        w_input = ({"guidance_embeds": True} if configs.denoiser.get("_class_name") == "FluxTransformer2DModel"
                   else {"time_cond_proj_dim": recipe.guidance.w_embedding_dim})
        student = _trained(recipe, configs, p, "student", 0, (), ema=recipe.ema is not None)
        student = dataclasses.replace(student, config={**configs.denoiser, **w_input})
    return [_denoiser_role(configs, "teacher", **_frozen_weights(p)), student, *_encoder_roles(recipe, configs)]


def _discriminator_role(configs: TeacherConfigs, p: Precision, backprop_from=()) -> RoleSpec:
    """DMD2's GAN head on the fake score's bottleneck: its size and inputs from a meta forward of
    the denoiser (made once per teacher, so estimates of recipe variants share it)."""
    if configs.discriminator is None:
        configs.discriminator = _discriminator_parts(configs)
    factory, features = configs.discriminator
    return RoleSpec("discriminator", module_factory=factory, trainable="full", batch_factor=2, example_inputs=features,
                    backprop_from=backprop_from)  # fp32: the head upcasts its features


def _discriminator_parts(configs: TeacherConfigs):
    from ..planning import build_on_meta
    from ..planning.activations import example_inputs
    from .fake_score import DiscriminatorHead, bottleneck

    network = build_on_meta(RoleSpec("probe", config=configs.denoiser))
    module, channels, spatial = bottleneck(network)
    shapes: dict[tuple[int, int], torch.Size] = {}

    def feature_shape(h: int, w: int) -> torch.Size:
        if (h, w) not in shapes:
            def catch(m, args, out):  # returns None: the output is left as it is
                shapes[(h, w)] = (out[-1] if isinstance(out, (tuple, list)) else out).shape

            hook = module.register_forward_hook(catch)
            try:
                with torch.no_grad():
                    network(**example_inputs(network, 1, h, w, text_tokens=configs.text_tokens))
            finally:
                hook.remove()
        return shapes[(h, w)]

    def features(net, b, h, w, dtype):
        return {"features": torch.empty(b, *feature_shape(h, w)[1:], device="meta", dtype=dtype)}

    return (lambda: DiscriminatorHead(channels, spatial)), features


ROLE_PLANS: dict[str, Callable[[Any, TeacherConfigs], list[RoleSpec]]] = {
    "dmd": dmd_roles, "dmd2": dmd_roles, "lcm": consistency_roles, "pcm": consistency_roles,
    "sds": score_distillation_roles, "vsd": score_distillation_roles, "sid": score_distillation_roles, "sida": score_distillation_roles,
    "guidance": guidance_roles, "agd": guidance_roles,
}


def register_role_plan(method: str, roles: Callable[[Any, TeacherConfigs], list[RoleSpec]]) -> None:
    """Tell ``stepdistill plan`` which roles a distillation method holds (a new family adds a line)."""
    ROLE_PLANS[method] = roles


def recipe_roles(recipe: DistillRecipe, configs: TeacherConfigs) -> list[RoleSpec]:
    if recipe.method not in ROLE_PLANS:
        raise StepdistillError(f"stepdistill plan does not know the roles of method {recipe.method!r}; "
                               f"known: {', '.join(sorted(ROLE_PLANS))} (register_role_plan)")
    return ROLE_PLANS[recipe.method](recipe, configs)


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
    sets = {"student.lora_rank": DEFAULT_LORA_RANK}
    if getattr(recipe, "consistency", None) is not None:
        sets["ema"] = None  # LCM-LoRA has no target network
    return sets


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
    """(h, w) of the recipe's latent cache for LCM / PCM (its header only), when it exists."""
    if getattr(recipe, "consistency", None) is None or not recipe.data.latents or not os.path.exists(recipe.data.latents):
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


__all__ = ["LEVERS", "ROLE_PLANS", "RecipePlan", "TeacherConfigs", "plan_recipe", "read_teacher_configs", "recipe_roles", "register_role_plan"]
