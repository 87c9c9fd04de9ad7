"""What every distiller shares, so a family file holds only its paper's method.

A :class:`Distiller` is a :class:`~stepdistill.training.TrainingMethod` built from a teacher,
a validated recipe (:mod:`.recipe`) and the run's data (:class:`RunData`). It owns the student
(``self.student``), the scheduler the student is exported with (``self.scheduler``, K =
``self.num_steps`` steps) and its sampling loop (``self.sampler``), and knows how to draw
evaluation samples and which network to export. Subclasses implement ``method_roles`` (their
own roles: student, fake score, GAN head ...) and ``training_step`` and set ``export_from_ema``
(DMD exports the EMA; LCM's EMA is its target network, so it exports the online student).

The teacher is placed one way: :meth:`Distiller.roles` is final and adds the frozen "teacher"
role itself (:meth:`Distiller.teacher_role`, which honours ``memory.release_encoders``). A
subclass that overrides ``roles`` is a TypeError when the class is defined; ``method_roles``
returning a "teacher" role, or the teacher (or its denoiser) as a frozen role, is a TypeError
when the roles are read.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import OptimizerConfig
from ..errors import RecipeError
from ..sampling import make_student_scheduler
from ..training.trainer import Role, Trainer, TrainingMethod
from .common import has_lora
from .recipe import DistillRecipe
from .run_data import ConditionPool, RealSamples, condition_kind, in_memory_samples
from .student import StudentSampler, denoiser_name, with_network


@dataclass
class RunData:
    """The conditions the student trains on and the real samples (None: data-free)."""

    pool: ConditionPool
    real: RealSamples | None = None

    @classmethod
    def in_memory(cls, teacher, x0: torch.Tensor | None = None, conditions=None, pool=None) -> "RunData":
        """From tensors you hold: ``x0`` real samples in the network's space with their
        ``conditions``; ``pool``: the training conditions (default: every class, the distinct
        captions, or the unconditional one)."""
        real = in_memory_samples(teacher, x0, conditions) if x0 is not None else None
        kind = condition_kind(teacher)
        if pool is None:
            pool = list(range(teacher.num_classes)) if kind == "class" else (real.captions if (kind == "text" and real) else None)
        return cls(pool=ConditionPool(teacher, pool), real=real)


class MethodDeclaration:
    """What a registered method's class declares (docs/adding_a_method.md). The registry,
    ``stepdistill plan``, ``bench overhead``, ``distill --make-pairs`` and the run driver read these
    and never branch on a method's name."""

    description: str = "step distillation"  # one line: `stepdistill schema`, the model card's method line
    recipe_class: type = DistillRecipe  # the recipe format: the shared sections plus the method's own
    # `stepdistill plan`'s "LoRA student" lever: what it sets besides student.lora_rank
    lora_student_sets: dict[str, Any] = {}
    # `stepdistill plan`: the run trains at its latent cache's resolution, not teacher.height / width
    trains_at_data_resolution: bool = False
    caches_pairs: bool = False  # trains on cached teacher ODE pairs: `distill --make-pairs N` (make_pairs)

    @classmethod
    def build(cls, teacher, recipe: DistillRecipe, data: RunData | None):
        """The method for a run (``data``: its conditions and real samples; None when a finished
        run is rebuilt for export)."""
        return cls(teacher, recipe, data)

    @classmethod
    def plan_roles(cls, recipe: DistillRecipe, configs) -> list:
        """The :class:`~stepdistill.planning.RoleSpec` s ``stepdistill plan`` sizes: the method's
        (:meth:`method_role_specs`) and the text encoders / VAE."""
        from ..planning.recipe_roles import RolePlanner
        from .recipe import lora_targets

        planner = RolePlanner(recipe, configs, lambda names: lora_targets(configs.family, names))
        return [*cls.method_role_specs(planner), *planner.encoders()]

    @classmethod
    def method_role_specs(cls, plan) -> list:
        """The teacher's denoiser and the method's own networks as RoleSpecs (``plan``: a
        :class:`~stepdistill.planning.recipe_roles.RolePlanner`), sized for the run's peak."""
        raise NotImplementedError(f"{cls.__name__} declares no memory plan (method_role_specs)")

    @classmethod
    def make_pairs(cls, recipe: DistillRecipe, teacher, pool, num_pairs: int):
        """``stepdistill distill RECIPE --make-pairs N``: cache N teacher ODE pairs where the recipe
        says; methods that train on none refuse."""
        raise RecipeError(f"--make-pairs is for methods that train on cached teacher ODE pairs; "
                          f"method '{recipe.method}' does not")


class Distiller(MethodDeclaration, TrainingMethod):
    export_from_ema: bool = True
    keeps_base: bool = False  # the student is LoRA adapters on the untouched teacher: exported as the adapter file, never merged
    one_step_generator: bool = False  # G from init_generator (DMD, score distillation): takes student.init_timestep

    def __init__(self, teacher, recipe: DistillRecipe, data: RunData | None):
        self.teacher = teacher
        self.recipe = recipe
        self.family = teacher.family
        self.schedule = teacher.schedule
        self.prediction_type = teacher.prediction_type
        self.condition_kind = condition_kind(teacher)
        self.shape = tuple(teacher.sample_shape(recipe.teacher.height, recipe.teacher.width))
        self.pool = data.pool if data is not None else None
        self.real = data.real if data is not None else None
        self.student: nn.Module
        self.scheduler = None  # set by subclasses: the scheduler the student is exported with
        self.num_steps = recipe.student.num_steps
        self.sampler: StudentSampler
        if recipe.student.init_timestep is not None and not self.one_step_generator:
            raise RecipeError(f"student.init_timestep is for the one-step generator families (dmd, dmd2, sds, vsd, sid, sida); "
                              f"method '{recipe.method}' does not use it")

    # -- where the frozen teacher lives ---------------------------------------------------------
    def teacher_on_device(self) -> nn.Module:
        """The part of the teacher the accelerator holds: all of it, or with
        ``memory.release_encoders`` its denoiser alone (plus the VAE when real images are
        VAE-encoded every step); text encoders then stay in host memory (stepdistill/distillers/memory.py)."""
        if not (self.recipe.memory.release_encoders and self.teacher.is_latent):
            return self.teacher
        parts = {"denoiser": getattr(self.teacher, denoiser_name(self.teacher))}
        if self.real is not None and self.real.dataset is not None:
            parts["vae"] = self.teacher.vae
        return nn.ModuleDict(parts)

    def optimizer_configs(self, trained: tuple[str, ...], method: str) -> dict[str, OptimizerConfig]:
        """The recipe's ``optimizers:`` settings of the roles this method trains (the defaults for a
        role the recipe leaves out); a role it does not train is a RecipeError naming ``method``."""
        opts = self.recipe.optimizers
        unknown = set(opts) - set(trained)
        if unknown:
            raise RecipeError(f"optimizers: unknown role(s) {sorted(unknown)} for {method}; its trained roles: {', '.join(trained)}")
        return {name: opts.get(name, OptimizerConfig()) for name in trained}

    def teacher_role(self, trained: bool = False) -> Role | None:
        """The frozen "teacher" role: :meth:`teacher_on_device`. ``trained``: a trained role runs
        on the teacher's own denoiser (a LoRA on its weights), which that role places; the
        teacher role then holds the rest of :meth:`teacher_on_device` (None when nothing is left)."""
        on_device = self.teacher_on_device()
        if not trained:
            return Role(on_device)
        denoiser = getattr(self.teacher, denoiser_name(self.teacher))
        rest = {name: module for name, module in on_device.named_children() if module is not denoiser}
        return Role(nn.ModuleDict(rest)) if rest else None

    # -- roles: the method's own, plus the teacher's, placed here only ----------------------------
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "roles" in vars(cls):
            raise TypeError(f"{cls.__name__} overrides Distiller.roles(): declare the method's own roles in method_roles(); "
                            "the base class adds the teacher's (teacher_role(), which honours memory.release_encoders)")

    def method_roles(self) -> dict[str, Role]:
        """The roles this method owns (student, fake score, GAN head, a previous stage's student ...),
        never the teacher's: :meth:`roles` adds that one."""
        raise NotImplementedError

    def roles(self) -> dict[str, Role]:
        """:meth:`method_roles` plus the frozen "teacher" role from :meth:`teacher_role`."""
        roles = dict(self.method_roles())
        denoiser = getattr(self.teacher, denoiser_name(self.teacher))
        if "teacher" in roles:
            raise TypeError(f"{type(self).__name__}.method_roles() returned a 'teacher' role: the base class builds it (teacher_role())")
        teacher_parts = {id(self.teacher), *(id(part) for part in self.teacher.children())}  # denoiser, text encoders, VAE
        for name, role in roles.items():
            if role.optimizer is None and any(id(m) in teacher_parts for m in role.module.modules()):
                raise TypeError(f"{type(self).__name__}.method_roles(): frozen role '{name}' holds the teacher or one of its "
                                "networks; the base class places them (teacher_role())")
        trained_on_teacher = any(m is denoiser for role in roles.values() if role.optimizer is not None for m in role.module.modules())
        teacher = self.teacher_role(trained=trained_on_teacher)
        if teacher is not None:
            roles["teacher"] = teacher
        return roles

    # -- guidance of the exported student -------------------------------------------------------
    @property
    def card_teacher_guidance_scale(self) -> float:
        """The teacher guidance the student learnt (the model card's): the recipe's real-score CFG."""
        return self.recipe.teacher.guidance_scale

    @property
    def export_guidance_scale(self) -> float:
        """The exported pipeline's default guidance (a w-conditioned student: its w)."""
        return 1.0

    @property
    def trained_guidance_range(self) -> tuple[float, float] | None:
        return None

    def guidance_input(self, w: torch.Tensor):
        """Context that feeds ``w`` to a w-conditioned student (a no-op otherwise)."""
        import contextlib

        return contextlib.nullcontext()

    # -- the student during training ------------------------------------------------------------
    def init_generator(self) -> nn.Module:
        """Set the exported scheduler's sampler (``self.sampler`` / ``self.scheduler``) for
        ``self.num_steps`` and return G initialised from the teacher: a full copy, or a LoRA
        (``student.lora_rank``) on a copy. Shared by the one-step generator families (DMD, score
        distillation)."""
        from .common import add_lora
        from .recipe import lora_targets

        recipe = self.recipe
        scheduler = make_student_scheduler(self.teacher.scheduler, self.num_steps, recipe.student.init_timestep)
        self.sampler = StudentSampler.for_teacher(self.teacher, self.num_steps, self.shape, scheduler=scheduler)
        self.sampler.check_timesteps(recipe.student.timesteps)
        self.scheduler = self.sampler.scheduler
        student = copy.deepcopy(getattr(self.teacher, denoiser_name(self.teacher))).requires_grad_(True)
        if recipe.student.lora_rank > 0:
            add_lora(student, recipe.student.lora_rank, lora_targets(self.family, recipe.student.lora_target_modules), what="student")
        return student

    def generate(self, ctx, noise: torch.Tensor, cond, k: torch.Tensor, grad: bool) -> torch.Tensor:
        """The student's x0 at step k of its K-step sampler: the input at step k comes from
        backward simulation (its own no-grad steps 0..k-1 with the exported scheduler), then one
        step with grad when ``grad``. One-step students: x0 = G(z) at the first timestep."""
        adapter = with_network(self.teacher, ctx.model("student"))
        timesteps = self.sampler.timesteps.to(ctx.device)
        if int(k.max()) == 0:
            x_in = noise * getattr(self.sampler.scheduler, "init_noise_sigma", 1.0)
        else:
            inputs = torch.stack(self.sampler.rollout(adapter, noise, cond, int(k.max())))  # [k_max + 1, B, ...]
            x_in = inputs[k, torch.arange(noise.shape[0], device=noise.device)]
        with torch.set_grad_enabled(grad):
            return adapter.predict(x_in, timesteps[k], cond, guidance_scale=1.0, output="x0")

    # -- sampling -------------------------------------------------------------------------------
    def sampling_network(self, trainer: Trainer) -> nn.Module:
        """The network evaluation samples and the export come from."""
        if self.export_from_ema and "student" in trainer.emas:
            return trainer.emas["student"].module
        return trainer.unwrap("student")

    @torch.no_grad()
    def sample(self, network: nn.Module, noise: torch.Tensor, cond, guidance_scale: float | None = None,
               num_steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The exported pipeline's loop with ``network`` (samples in the network's space)."""
        w = self.export_guidance_scale if guidance_scale is None else float(guidance_scale)
        adapter = with_network(self.teacher, network)
        if self.trained_guidance_range is not None:  # w-conditioned: w goes in, no CFG pass
            with self.guidance_input(torch.tensor(w)):
                return self.sampler.sample(adapter, noise, cond, num_steps, generator=generator)
        return self.sampler.sample(adapter, noise, cond, num_steps, guidance_scale=w, generator=generator)

    def evaluation_conditions(self, num_samples: int) -> tuple[Any, torch.Tensor]:
        """(encoded conditions, pool indices) cycling through the pool."""
        idx = torch.arange(num_samples) % len(self.pool)
        return self.pool.index(idx), idx

    def generate_samples(self, trainer: Trainer, num_samples: int, generator: torch.Generator):
        """Images in [-1, 1] (decoded for latent teachers) and their conditions: class labels, the
        prompts (a list of str) of a text-to-image teacher, None for an unconditional one."""
        device = trainer.accelerator.device
        network = self.sampling_network(trainer)
        noise = torch.randn(num_samples, *self.shape, generator=generator).to(device)
        out = []
        for start in range(0, num_samples, 256):
            idx = torch.arange(start, min(start + 256, num_samples)) % len(self.pool)
            # frozen weights stored in memory.teacher_dtype run under the training autocast
            with trainer.accelerator.autocast() if self.recipe.memory.teacher_dtype else contextlib.nullcontext():
                x = self.sample(network, noise[start : start + len(idx)], self.pool.index(idx.to(device)), generator=generator)
            x = self.teacher.vae_decode(x.float()) if self.teacher.is_latent else x
            out.append(x.float().clamp(-1, 1).cpu())
        labels = self.pool.raw(torch.arange(num_samples) % len(self.pool))
        return torch.cat(out), labels

    # -- export -----------------------------------------------------------------------------------
    def export_network(self, network: nn.Module) -> nn.Module:
        """A copy of the trained ``network`` as the stock class: hooks removed (LoRA kept)."""
        network = copy.deepcopy(network)
        network._forward_pre_hooks.clear()  # the stock pipeline feeds any extra input itself
        return network

    def export_variants(self) -> dict[str, Any]:
        """Extra pipeline directories next to the artefact: {name: another scheduler for the same network}."""
        return {}

    @property
    def lora_student(self) -> bool:
        return has_lora(self.student)

    @property
    def exports_lora_file(self) -> bool:
        """A LoRA student of a latent teacher whose stock pipeline loads LoRA files
        (``load_lora_weights``) is exported as one; others (pixel, DiT) as a merged pipeline."""
        if not (self.lora_student and self.teacher.is_latent):
            return False
        import diffusers

        return hasattr(getattr(diffusers, self.teacher.pipeline_class_name, None), "load_lora_weights")


class StagedDistillation(MethodDeclaration):
    """A recipe that trains several students one after another: progressive distillation's
    halvings (64 -> 32 -> ... -> 1 steps), reflow and then its one-step distillation.

    Each stage is a :class:`Distiller` trained by its own Trainer in ``run_dir/<stage name>/``
    (checkpoints, curve, samples, resume) and exported there as its own artefact
    (``run_dir/<stage name>/pipeline``); stage i + 1 is built from the network stage i exported
    (:meth:`build_stage`). ``stepdistill distill`` runs them in order (``--resume`` continues the
    first unfinished stage) and the end-of-run table has a row for every stage's student.
    """

    stage_names: list[str]

    def __init__(self, teacher, recipe: DistillRecipe, data: RunData | None):
        self.teacher = teacher
        self.recipe = recipe
        self.data = data
        self.run_dir = None  # the run directory, set by the run driver before the first stage is built

    def build_stage(self, index: int, previous: nn.Module | None) -> Distiller:
        """Stage ``index`` (its recipe's ``student.num_steps`` is the stage's own step count),
        starting from ``previous``: the network stage ``index - 1`` exported (None for the
        first stage, and when a finished run is rebuilt from its checkpoints for export)."""
        raise NotImplementedError

    def stage_training(self, index: int):
        """The TrainingConfig of stage ``index`` (default: the recipe's ``training`` section)."""
        return self.recipe.training

    def after_stage(self, index: int, method: Distiller, network: nn.Module, stage_dir) -> None:
        """Called on the main process after stage ``index`` is trained and exported (measurements)."""


__all__ = ["Distiller", "RunData", "StagedDistillation"]
