"""Progressive distillation: halve the sampler's step count, stage after stage.

Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models" (Algorithm 2).

A stage distils a 2N-step deterministic sampler (the teacher's DDIM / flow Euler at N_0 = 2N
steps for the first stage, the previous stage's student afterwards) into an N-step student,
initialised from that sampler's network. One recipe runs every stage, N_0 -> N_0/2 -> ... ->
``student.num_steps``, and exports every stage's student (``RUN_DIR/stage_08/pipeline``: a
stock pipeline sampling 8 steps).

One training step of a stage, at step i of the student's N-step sampler (its timesteps t_i are
the exported scheduler's, so the student is trained exactly where it samples)::

    x ~ data,  eps ~ N(0, I),  z = alpha_t x + sigma_t eps                 (t = t_i)
    z'  = alpha_t' x̂(z, t) + sigma_t' ε̂(z, t)                              (teacher DDIM step to the 2N-step grid's midpoint t')
    z'' = alpha_t'' x̂(z', t') + sigma_t'' ε̂(z', t')                        (second teacher step, to where the student's step lands, t'')
    x̃  = (z'' - (sigma_t''/sigma_t) z) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)   (Alg. 2: one student DDIM step from z lands on z'')
    L   = w(lambda_t) || x̂_θ(z, t) - x̃ ||^2

with (x̂, ε̂) read from a network's output by :mod:`stepdistill.schedule`, the teacher under its
CFG ``uncond + w (cond - uncond)`` in the first stage (later stages distil the previous student,
whose guidance is baked in), and a DDIM step written as ``alpha_s x̂ + sigma_s ε̂`` -- for flow
teachers the same line is the Euler step of the flow ODE. t' and t'' are where the stock
schedulers' ``step`` writes its sample (:meth:`StudentSampler.step_levels`): DDIMScheduler the
timestep ``T // K`` below, FlowMatchEulerDiscreteScheduler the next sigma.

Weighting (Salimans & Ho §4): ``snr_plus_one`` w = (alpha^2 + sigma^2) / sigma^2 (for VP schedules
exactly the v-prediction MSE) or ``truncated_snr`` w = max(alpha^2 / sigma^2, 1).

Parameterisation: an eps-prediction student must divide by alpha_t to give x̂, which is
ill-posed at the lowest SNR where a 1-step student starts; students predict v (or x0, or the
flow velocity) -- the teacher's own parameterisation unless it is eps, then v
(``progressive.prediction_type``). The exported scheduler carries it, so the stock pipeline
reads the student's output correctly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

import torch
from torch import nn

from ..errors import RecipeError
from ..sampling import make_student_scheduler
from ..schedule import canonical_prediction_type
from ..training.trainer import Role, StepContext
from .base import Distiller, RunData, StagedDistillation
from .recipe import DistillRecipe
from .student import StudentSampler, denoiser_name, pipeline_timestep_kwargs, with_network


# =============================================================================================
# Recipe: the shared sections (recipe.py) plus `progressive:`
# =============================================================================================
@dataclass
class ProgressiveSection:
    teacher_steps: int = 64  # N_0: the teacher's DDIM / flow-Euler step count the first stage distils (N_0 = student.num_steps x 2^stages)
    stage_max_steps: list[int] = field(default_factory=list)  # training steps of each stage, first to last; empty: training.max_steps each
    prediction_type: Optional[str] = None  # the students' parameterisation; None: the teacher's own, v_prediction for an eps teacher
    loss_weighting: Literal["snr_plus_one", "truncated_snr"] = "snr_plus_one"


@dataclass
class ProgressiveRecipe(DistillRecipe):
    progressive: ProgressiveSection = field(default_factory=ProgressiveSection)


def stage_step_counts(teacher_steps: int, num_steps: int) -> list[int]:
    """The students' step counts, one per stage: N_0 / 2, N_0 / 4, ..., ``num_steps``."""
    counts, n = [], teacher_steps
    while n > num_steps and n % 2 == 0:
        n //= 2
        counts.append(n)
    if not counts or counts[-1] != num_steps:
        raise RecipeError(f"progressive.teacher_steps ({teacher_steps}) must be student.num_steps ({num_steps}) times a power of 2 (at least 2x)")
    return counts


def student_prediction_type(teacher, requested: str | None) -> str:
    """What the students predict: ``requested``, else the teacher's own unless it is eps (then v)."""
    if teacher.schedule.kind == "flow":
        if requested not in (None, "flow"):
            raise RecipeError(f"progressive.prediction_type {requested!r}: a flow-matching teacher's students predict the flow velocity (leave it unset)")
        return "flow"
    if requested is None:
        return "v_prediction" if teacher.prediction_type == "epsilon" else teacher.prediction_type
    try:
        kind = canonical_prediction_type(requested)
    except ValueError as exc:
        raise RecipeError(f"progressive.prediction_type: {exc}") from None
    if kind == "flow":
        raise RecipeError("progressive.prediction_type 'flow' is for flow-matching teachers; this teacher has a VP schedule")
    return kind


def student_scheduler(teacher, num_steps: int, prediction_type: str):
    """The exported scheduler (:func:`~stepdistill.sampling.make_student_scheduler`) with the students' parameterisation."""
    scheduler = make_student_scheduler(teacher.scheduler, num_steps)
    if teacher.schedule.kind == "vp" and scheduler.config.prediction_type != prediction_type:
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    return scheduler


# =============================================================================================
# One stage: a 2N-step sampler -> an N-step student
# =============================================================================================
class ProgressiveStage(Distiller):
    """One halving. Roles: "student" (EMA; exported), "teacher" (frozen adapter: encoders, VAE,
    the first stage's network), "previous_student" (frozen; the 2N-step network of later stages)."""

    export_from_ema = True

    def __init__(self, teacher, recipe: ProgressiveRecipe, data: RunData | None, previous: nn.Module | None = None):
        super().__init__(teacher, recipe, data)
        s = recipe.progressive
        n = self.num_steps
        self.description = f"progressive distillation (Salimans & Ho): {2 * n} -> {n} steps"
        if data is not None and self.real is None:
            raise RecipeError("progressive distillation trains on real data: set data.images (or data.latents for latent teachers)")
        if recipe.student.lora_rank > 0:
            raise RecipeError("progressive distillation trains full students (each stage starts from the previous stage's whole network): "
                              "set student.lora_rank to 0")
        if self.real is not None and self.real.latents is not None:
            self.shape = tuple(int(k) for k in self.real.latents.shape("latents")[1:])  # the training resolution (Flux's grid depends on it)
        self.prediction = student_prediction_type(teacher, s.prediction_type)
        self.guidance_scale = recipe.teacher.guidance_scale if previous is None else 1.0
        self.weighting = s.loss_weighting

        self.scheduler = student_scheduler(teacher, n, self.prediction)
        kwargs = lambda steps: pipeline_timestep_kwargs(teacher, self.shape, steps)  # noqa: E731
        self.sampler = StudentSampler(self.scheduler, n, kwargs)
        self.sampler.check_timesteps(recipe.student.timesteps)
        two_n = StudentSampler(student_scheduler(teacher, 2 * n, self.prediction), 2 * n, kwargs)
        self.timesteps, self.alpha_out, self.sigma_out = self.sampler.step_levels(self.schedule)
        labels, alpha, sigma = two_n.step_levels(self.schedule)
        if not torch.allclose(labels[0::2].double(), self.timesteps.double(), atol=1e-3):
            raise RecipeError(f"the {n}-step timesteps {self.timesteps.tolist()} are not every other one of the {2 * n}-step timesteps "
                              f"{labels.tolist()}: this scheduler's grids do not nest, so one student step cannot stand for two teacher steps")
        self.alpha_mid, self.sigma_mid, self.mid_timesteps = alpha[0::2], sigma[0::2], labels[1::2]

        network = previous if previous is not None else getattr(teacher, denoiser_name(teacher))
        self.previous = previous
        self.student = copy.deepcopy(network).requires_grad_(True).train()

    # -- roles --------------------------------------------------------------------------------
    def method_roles(self) -> dict[str, Role]:
        opts = self.optimizer_configs(("student",), "progressive distillation")
        roles = {"student": Role(self.student, optimizer=opts["student"], ema=self.recipe.ema)}
        if self.previous is not None and self.previous is not getattr(self.teacher, denoiser_name(self.teacher)):
            roles["previous_student"] = Role(self.previous)  # (a rebuild for export stands the teacher's network in: the teacher role's)
        return roles

    # -- pieces -------------------------------------------------------------------------------
    def x0_eps(self, network, x_t, t, cond, prediction_type: str):
        """(x̂, ε̂) of ``network`` (the teacher's adapter running it, no CFG: students have it baked in) at (x_t, t)."""
        raw = with_network(self.teacher, network).guided_output(x_t, t, cond, 1.0)
        return self.schedule.to_x0_eps(raw.float(), x_t.float(), t, prediction_type)

    @torch.no_grad()
    def two_teacher_steps(self, ctx: StepContext, z, i, cond) -> torch.Tensor:
        """z'' : two DDIM steps of the 2N-step sampler from z at t_i (Alg. 2)."""
        def teacher(x_t, t):
            if self.previous is None:
                return self.teacher.predict_x0_eps(x_t, t, cond, guidance_scale=self.guidance_scale)
            return self.x0_eps(ctx.model("previous_student"), x_t, t, cond, self.prediction)

        x0, eps = teacher(z, self.timesteps.to(ctx.device)[i])
        z_mid = self._at(self.alpha_mid, i, z) * x0 + self._at(self.sigma_mid, i, z) * eps
        x0, eps = teacher(z_mid, self.mid_timesteps.to(ctx.device)[i])
        return self._at(self.alpha_out, i, z) * x0 + self._at(self.sigma_out, i, z) * eps

    @staticmethod
    def _at(values: torch.Tensor, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample ``values[i]`` broadcast against ``like``."""
        return values.to(like.device, torch.float32)[i].reshape(-1, *([1] * (like.ndim - 1)))

    def loss_weight(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        snr = (alpha / sigma) ** 2
        return snr + 1 if self.weighting == "snr_plus_one" else snr.clamp(min=1.0)

    # -- one step -----------------------------------------------------------------------------
    def training_step(self, ctx: StepContext) -> dict[str, Any]:
        flips = ctx.rand() < 0.5 if self.real.random_flip else None
        x, cond = self.real.batch(ctx.sample_indices(len(self.real)), ctx.device, flips=flips)
        i = ctx.randint(0, self.num_steps)
        t = self.timesteps.to(ctx.device)[i]
        eps = ctx.randn(*x.shape[1:])
        z = self.schedule.add_noise(x.float(), eps, t)
        z_out = self.two_teacher_steps(ctx, z, i, cond)
        alpha, sigma = (v.to(ctx.device).float() for v in self.schedule.alpha_sigma(t))
        ratio = self._at(self.sigma_out, i, z) / sigma.reshape(-1, *([1] * (z.ndim - 1)))
        target = (z_out - ratio * z) / (self._at(self.alpha_out, i, z) - ratio * alpha.reshape(ratio.shape))  # x̃
        x0_student, _ = self.x0_eps(ctx.model("student"), z, t, cond, self.prediction)
        per_sample = (x0_student - target).pow(2).flatten(1).mean(dim=1)
        loss = (self.loss_weight(alpha, sigma) * per_sample).mean()
        ctx.step_role("student", loss)
        return {"loss": loss, "x0_mse": per_sample.mean()}


# =============================================================================================
# The staged method: every halving in one recipe
# =============================================================================================
class ProgressiveDistillation(StagedDistillation):
    """Progressive distillation (Salimans & Ho 2022): halve the step count stage after stage."""

    description = "progressive distillation (Salimans & Ho): halve the step count stage after stage"
    recipe_class = ProgressiveRecipe
    trains_at_data_resolution = True  # a latent cache's resolution, not teacher.height / width

    @classmethod
    def method_role_specs(cls, plan) -> list:
        """A stage's peak: the frozen teacher (its network the first stage's 2N-step sampler), the
        full student with its EMA and, from the second stage on, the previous stage's student
        (frozen: the 2N-step sampler)."""
        s = plan.recipe.progressive
        roles = [plan.teacher(), plan.student(lora=False)]
        if len(stage_step_counts(s.teacher_steps, plan.recipe.student.num_steps)) > 1:
            roles.append(plan.teacher(name="previous_student"))
        return roles

    def __init__(self, teacher, recipe: ProgressiveRecipe, data: RunData | None):
        super().__init__(teacher, recipe, data)
        s = recipe.progressive
        self.step_counts = stage_step_counts(s.teacher_steps, recipe.student.num_steps)
        if s.stage_max_steps and len(s.stage_max_steps) != len(self.step_counts):
            raise RecipeError(f"progressive.stage_max_steps has {len(s.stage_max_steps)} entries for {len(self.step_counts)} stages "
                              f"({s.teacher_steps} -> {' -> '.join(map(str, self.step_counts))} steps)")
        self.stage_names = [f"stage_{n:02d}" for n in self.step_counts]
        student_prediction_type(teacher, s.prediction_type)  # bad input fails before any stage trains

    def stage_training(self, index: int):
        steps = self.recipe.progressive.stage_max_steps
        return replace(self.recipe.training, max_steps=steps[index]) if steps else self.recipe.training

    def build_stage(self, index: int, previous: nn.Module | None) -> ProgressiveStage:
        last = index == len(self.step_counts) - 1
        student = replace(self.recipe.student, num_steps=self.step_counts[index], timesteps=self.recipe.student.timesteps if last else None)
        recipe = replace(self.recipe, student=student, training=self.stage_training(index))
        if previous is None and index > 0:  # rebuilding a finished run for export: the architecture is the teacher's
            previous = getattr(self.teacher, denoiser_name(self.teacher))
        return ProgressiveStage(self.teacher, recipe, self.data, previous=previous)


__all__ = [
    "ProgressiveDistillation",
    "ProgressiveRecipe",
    "ProgressiveSection",
    "ProgressiveStage",
    "stage_step_counts",
    "student_prediction_type",
    "student_scheduler",
]
