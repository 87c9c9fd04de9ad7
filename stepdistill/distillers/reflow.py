"""Reflow and InstaFlow: straighten the teacher's ODE, then distil it to one step.

Liu, Gong & Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow" (reflow); Liu et al. 2024, "InstaFlow: One Step is Enough for High-Quality
Diffusion-Based Text-to-Image Generation" (reflow, then one-step distillation).

Two stages in one recipe (a :class:`~.base.StagedDistillation`), each exported as a stock pipeline:

1. ``reflow`` -- couplings (z, y = ODE_teacher(z)): noise and the teacher's deterministic sample
   from it (:func:`.ode_pairs.make_ode_pairs`: Euler on the flow ODE of a flow-matching teacher,
   DDIM -- the probability-flow ODE -- of a VP teacher; the same cache DMD's regression loss
   reads), with the teacher's CFG ``uncond + w (cond - uncond)``. The student, initialised from
   the teacher, learns the straight path between the two ends of each coupling::

       t ~ U[0, T),  x_t = alpha_t y + sigma_t z
       L = || f_θ(x_t, t) - target(y, z, t) ||^2                 (reflow objective)

   with the target in the network's parameterisation (:mod:`stepdistill.schedule`): the flow
   velocity z - y for flow matching -- Liu et al.'s E || (X_1 - X_0) - v(X_t, t) ||^2 -- and
   its VP counterpart (v = alpha z - sigma y, eps = z, x0 = y), which makes the DDIM path of
   a VP model straight in DDIM's coordinates. Exported at ``reflow.num_steps`` steps.
   Straightness (:func:`.ode_pairs.path_deviation`) of the teacher's ODE and of the reflowed
   model's, from the same noise, goes to ``RUN_DIR/straightness.json``.

2. ``one_step`` -- couplings of the straightened flow (z, y' = ODE_reflow(z)) and a one-step
   student G initialised from it, G(z) = one step of the exported scheduler from z::

       L = || G(z) - y' ||^2                                       (InstaFlow's distillation)

   (InstaFlow uses LPIPS; we use MSE: there is no LPIPS network offline, as for DMD's regression.)
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError
from ..sampling import make_student_scheduler
from ..training.trainer import Role, StepContext
from .base import Distiller, RunData, StagedDistillation
from .ode_pairs import load_ode_pairs, make_ode_pairs, path_deviation
from .recipe import DistillRecipe
from .student import StudentSampler, denoiser_name, with_network

STRAIGHTNESS_FILE = "straightness.json"


# =============================================================================================
# Recipe: the shared sections (recipe.py) plus `reflow:`
# =============================================================================================
@dataclass
class ReflowSection:
    pairs: Optional[str] = None  # teacher couplings (safetensors, `--make-pairs N`); None: made at the start in RUN_DIR/teacher_pairs.safetensors
    num_pairs: int = 2000  # couplings made at the start of the run (each stage) when none are cached
    pair_steps: int = 50  # teacher ODE steps of a coupling
    num_steps: int = 2  # the straightened flow's exported step count (stage `reflow`)
    distill_pair_steps: int = 20  # ODE steps of the straightened flow behind the one-step targets
    stage_max_steps: list[int] = field(default_factory=list)  # [reflow, one_step] training steps; empty: training.max_steps each
    straightness_samples: int = 256  # noise draws of the straightness measurement
    straightness_steps: int = 16  # ODE steps of the straightness measurement


@dataclass
class ReflowRecipe(DistillRecipe):
    reflow: ReflowSection = field(default_factory=ReflowSection)


# =============================================================================================
# The stages
# =============================================================================================
class _CouplingStage(Distiller):
    """A student trained on cached couplings (z, y); roles "student" (EMA, exported) and "teacher"
    (frozen: encoders, VAE)."""

    export_from_ema = True

    def __init__(self, teacher, recipe: ReflowRecipe, data: RunData | None, network: nn.Module,
                 pairs: Mapping[str, torch.Tensor] | None):
        super().__init__(teacher, recipe, data)
        if recipe.student.lora_rank > 0:
            raise RecipeError("reflow trains full students (the one-step stage starts from the reflowed network): set student.lora_rank to 0")
        self.pairs = pairs
        if pairs is not None:
            self.shape = tuple(int(k) for k in pairs["noise"].shape[1:])
        self.scheduler = make_student_scheduler(teacher.scheduler, self.num_steps)
        self.sampler = StudentSampler.for_teacher(teacher, self.num_steps, self.shape, scheduler=self.scheduler)
        self.sampler.check_timesteps(recipe.student.timesteps)
        self.student = copy.deepcopy(network).requires_grad_(True).train()

    def method_roles(self) -> dict[str, Role]:
        opts = self.optimizer_configs(("student",), "reflow")
        return {"student": Role(self.student, optimizer=opts["student"], ema=self.recipe.ema)}

    def coupling_batch(self, ctx: StepContext):
        idx = ctx.sample_indices(len(self.pairs["noise"]))
        z = self.pairs["noise"][idx].to(ctx.device)
        y = self.pairs["sample"][idx].to(ctx.device)
        return z, y, self.pool.index(self.pairs["condition_index"][idx].to(ctx.device))


class ReflowStage(_CouplingStage):
    """Stage 1: the straightened flow, trained on the teacher's couplings."""

    description = "reflow (rectified flow on the teacher's ODE couplings)"

    def train_timesteps(self, ctx: StepContext) -> torch.Tensor:
        """t ~ U[0, T): integers for VP schedules, sigma x T with sigma ~ U[0, 1) for flow matching."""
        T = self.schedule.num_train_timesteps
        return ctx.randint(0, T) if self.schedule.kind == "vp" else ctx.rand() * T

    def training_step(self, ctx: StepContext) -> dict[str, Any]:
        z, y, cond = self.coupling_batch(ctx)
        t = self.train_timesteps(ctx)
        x_t = self.schedule.add_noise(y, z, t)
        target = self.schedule.from_x0_eps(y, z, t, self.prediction_type)  # flow: z - y
        out = with_network(self.teacher, ctx.model("student")).guided_output(x_t, t, cond, 1.0)
        loss = F.mse_loss(out.float(), target.float())
        ctx.step_role("student", loss)
        return {"loss": loss}


class OneStepStage(_CouplingStage):
    """Stage 2: one step of the exported scheduler from z onto the straightened flow's sample."""

    description = "InstaFlow one-step distillation of the reflowed model"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_steps != 1:
            raise RecipeError(f"reflow distils the straightened flow to one step: student.num_steps must be 1; got {self.num_steps}")
        self.timestep, self.alpha_out, self.sigma_out = self.sampler.step_levels(self.schedule)

    def one_step(self, network, z, cond) -> torch.Tensor:
        """G(z): the exported scheduler's single step from z (DDIM / flow Euler: alpha x̂ + sigma ε̂)."""
        x = z * getattr(self.scheduler, "init_noise_sigma", 1.0)
        t = self.timestep.to(z.device).expand(z.shape[0])
        raw = with_network(self.teacher, network).guided_output(x, t, cond, 1.0)
        x0, eps = self.schedule.to_x0_eps(raw.float(), x.float(), t, self.prediction_type)
        return float(self.alpha_out[0]) * x0 + float(self.sigma_out[0]) * eps

    def training_step(self, ctx: StepContext) -> dict[str, Any]:
        z, y, cond = self.coupling_batch(ctx)
        loss = F.mse_loss(self.one_step(ctx.model("student"), z, cond), y.float())
        ctx.step_role("student", loss)
        return {"loss": loss}


# =============================================================================================
# The staged method
# =============================================================================================
class ReflowDistillation(StagedDistillation):
    """Reflow / InstaFlow (Liu et al. 2023): straighten the teacher's ODE on its couplings, then
    distil the straightened flow to one step."""

    description = "reflow / InstaFlow: straighten the teacher's ODE on its couplings, then distil it to one step"
    recipe_class = ReflowRecipe
    stage_names = ["reflow", "one_step"]
    caches_pairs = True

    @classmethod
    def method_role_specs(cls, plan) -> list:
        """Each stage: the full student (with its EMA) trained on cached couplings next to the
        frozen teacher (the couplings are made before training, with the teacher's CFG)."""
        return [plan.teacher(), plan.student(lora=False)]

    @classmethod
    def make_pairs(cls, recipe: ReflowRecipe, teacher, pool, num_pairs: int) -> Path:
        """``stepdistill distill RECIPE --make-pairs N``: the teacher couplings at ``reflow.pairs``."""
        if not recipe.reflow.pairs:
            raise RecipeError("reflow.pairs names no file to write the couplings to")
        return make_ode_pairs(teacher, pool, num_pairs, recipe.reflow.pairs, steps=recipe.reflow.pair_steps,
                              guidance_scale=recipe.teacher.guidance_scale,
                              shape=teacher.sample_shape(recipe.teacher.height, recipe.teacher.width), seed=recipe.training.seed)

    def __init__(self, teacher, recipe: ReflowRecipe, data: RunData | None):
        super().__init__(teacher, recipe, data)
        r = recipe.reflow
        if r.stage_max_steps and len(r.stage_max_steps) != 2:
            raise RecipeError(f"reflow.stage_max_steps takes 2 entries (reflow, one_step); got {r.stage_max_steps}")
        if recipe.student.num_steps != 1:
            raise RecipeError(f"reflow distils the straightened flow to one step: student.num_steps must be 1; got {recipe.student.num_steps}")
        if r.num_pairs < 1 or r.pair_steps < 1 or r.distill_pair_steps < 1 or r.num_steps < 1:
            raise RecipeError("reflow: num_pairs, pair_steps, distill_pair_steps and num_steps must be >= 1")

    def stage_training(self, index: int):
        steps = self.recipe.reflow.stage_max_steps
        return replace(self.recipe.training, max_steps=steps[index]) if steps else self.recipe.training

    def _stage_recipe(self, index: int) -> ReflowRecipe:
        steps = self.recipe.reflow.num_steps if index == 0 else 1
        student = replace(self.recipe.student, num_steps=steps, timesteps=self.recipe.student.timesteps if index == 1 else None)
        return replace(self.recipe, student=student, training=self.stage_training(index))

    def _shape(self) -> tuple[int, ...]:
        return tuple(self.teacher.sample_shape(self.recipe.teacher.height, self.recipe.teacher.width))

    def pairs_path(self, which: str) -> Path:
        """Where a coupling cache lives: the recipe's ``reflow.pairs`` (teacher), else the run directory."""
        if which == "teacher" and self.recipe.reflow.pairs:
            return Path(self.recipe.reflow.pairs)
        if self.run_dir is None:
            raise RecipeError("reflow: no run directory to cache the ODE couplings in")
        return self.run_dir / f"{which}_pairs.safetensors"

    def couplings(self, which: str, adapter, steps: int, guidance_scale: float) -> Mapping[str, torch.Tensor]:
        """The cached couplings ``which`` ("teacher" / "reflow"), made on the main process when missing."""
        from ..training.trainer import run_state

        path = self.pairs_path(which)
        state = run_state()
        if not path.is_file() and state.is_main_process:
            make_ode_pairs(adapter, self.data.pool, self.recipe.reflow.num_pairs, path, steps=steps,
                           guidance_scale=guidance_scale, shape=self._shape(), seed=self.recipe.training.seed)
        state.wait_for_everyone()
        return load_ode_pairs(path, f"reflow {which} couplings")

    def build_stage(self, index: int, previous: nn.Module | None) -> _CouplingStage:
        r, recipe = self.recipe.reflow, self._stage_recipe(index)
        network = previous if previous is not None else getattr(self.teacher, denoiser_name(self.teacher))
        if index == 0:
            pairs = self.couplings("teacher", self.teacher, r.pair_steps, self.recipe.teacher.guidance_scale) if self.data is not None else None
            return ReflowStage(self.teacher, recipe, self.data, network, pairs)
        pairs = None
        if self.data is not None:  # the straightened flow's couplings (its guidance is baked in)
            pairs = self.couplings("reflow", with_network(self.teacher, network), r.distill_pair_steps, 1.0)
        return OneStepStage(self.teacher, recipe, self.data, network, pairs)

    def after_stage(self, index: int, method: Distiller, network: nn.Module, stage_dir) -> None:
        """After the reflow stage: straightness of the teacher's ODE and of the reflowed model's."""
        if index != 0:
            return
        result = measure_straightness(self.teacher, network, self.data.pool, self.recipe, self._shape())
        (Path(stage_dir).parent / STRAIGHTNESS_FILE).write_text(json.dumps(result, indent=2) + "\n")
        print(f"straightness (mean squared deviation from the straight path, {result['steps']} ODE steps, "
              f"{result['samples']} samples): teacher {result['teacher']:.5f}, reflowed {result['reflowed']:.5f}", flush=True)


@torch.no_grad()
def measure_straightness(teacher, network: nn.Module, pool, recipe: ReflowRecipe, shape) -> dict:
    """:func:`.ode_pairs.path_deviation` of the teacher (with its CFG) and of the reflowed
    ``network`` from the same noise and conditions, on the ``straightness_steps``-step sampler."""
    r = recipe.reflow
    steps, n = r.straightness_steps, r.straightness_samples
    sampler = StudentSampler.for_teacher(teacher, steps, shape)
    device = teacher.device
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(recipe.training.seed + 1)).to(device)
    cond = pool.index((torch.arange(n) % len(pool)).to(device))
    before = path_deviation(teacher, sampler, noise, cond, steps, recipe.teacher.guidance_scale)
    after = path_deviation(with_network(teacher, network.to(device)), sampler, noise, cond, steps, 1.0)
    return {"teacher": before, "reflowed": after, "steps": steps, "samples": n, "guidance_scale": recipe.teacher.guidance_scale,
            "definition": "mean over intermediate ODE points, samples and elements of (x_k - (alpha_k x_end + sigma_k x_start))^2"}


__all__ = [
    "OneStepStage",
    "ReflowDistillation",
    "ReflowRecipe",
    "ReflowSection",
    "ReflowStage",
    "STRAIGHTNESS_FILE",
    "measure_straightness",
]
