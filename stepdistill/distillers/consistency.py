"""The consistency-distillation family: LCM, LCM-LoRA and phased consistency (PCM / Hyper-SD).

Notation (Song et al. 2023; Luo et al. 2023, "Latent Consistency Models"; Wang et al. 2024,
"Phased Consistency Model"):

- the teacher's ODE-solver grid ``t_0 > t_1 > ... > t_{N-1}`` is the timesteps of its own
  DDIM-trailing scheduler at ``N = num_solver_steps`` steps (LCM's "skipping step" k = T / N;
  for T = 1000, N = 50: 999, 979, ..., 19), followed by the clean end (alpha = 1, sigma = 0);
- one distillation step picks ``t = t_n`` and its grid successor ``s = t_{n+1}``::

      x_t   = alpha_t x0 + sigma_t eps                                 (forward diffusion)
      x̂_s  = alpha_s x̂0_w + sigma_s ε̂_w,  (x̂0_w, ε̂_w) from the
              teacher's CFG output uncond + w (cond - uncond)             (LCM eq. 8: DDIM / Euler solver)
      L     = d( f_θ(x_t, t, w), f_θ⁻(x̂_s, s, w) )                      (LCM eq. 9)

  with θ⁻ the EMA target network (LCM-LoRA: the online weights under stop-gradient), and d the
  L2 or pseudo-Huber distance sqrt(|a - b|² + c²) - c (elementwise, as LCM's scripts);
- **LCM** parameterizes f_θ(x, t) = c_skip(t) x + c_out(t) x̂0_θ(x, t) with the boundary scalings
  of diffusers' ``LCMScheduler`` (c_skip(0) = 1, c_out(0) = 0; ``timestep_scaling`` = 10), taken
  from that scheduler object -- the one the student is exported with. Flow-matching teachers
  (Flux) export a ``FlowMatchLCMScheduler``, whose step takes f_θ = x̂0_θ = x - sigma u_θ (no
  scalings: the grid's last point is not the clean end, which the loss handles by its target);
  their grid is the pipeline's own shifted sigmas (``mu``, ``sigmas``) at the training resolution,
  and the Euler step of eq. 8 is the same DDIM step written in (x̂0, ε̂);
- **PCM** splits the trajectory into K phases whose edges are the timesteps of the exported
  K-step DDIM-trailing scheduler (plus the clean end); f_θ(x, t) is the DDIM jump from t to the
  edge below t, ``alpha_e x̂0_θ + sigma_e ε̂_θ`` (PCM eq. 6), so the K-step DDIM sampler of the
  exported pipeline IS the student's consistency function. The target is x̂_s itself when s is
  an edge, else f_θ⁻(x̂_s, s), which maps to the same edge. Every phase edge must lie on the
  solver grid: K must divide N.

Guidance: w in the project's convention (uncond + w (cond - uncond); w = 1: none). w is drawn
uniformly from ``guidance_range`` per sample. A UNet2DConditionModel student can take w as an
embedding (``w_embedding: true``; ``time_cond_proj_dim``), fed exactly as diffusers' pipelines
feed it: ``get_guidance_scale_embedding(guidance_scale - 1)``, so the stock pipeline's
``guidance_scale`` argument drives it (and the pipeline then runs no CFG of its own). Students
without the embedding have the teacher's guidance at one w baked in; their pipeline runs at
guidance_scale 1.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..config import EMAConfig, bounded
from ..errors import RecipeError
from ..sampling import make_student_scheduler, student_timesteps
from ..training.trainer import Role, StepContext
from .base import Distiller, RunData
from .common import add_lora, lora_disabled
from .guidance_input import GuidanceInput, cfg_output, check_guidance, w_conditioned_copy
from .recipe import DistillRecipe, lora_targets
from .student import StudentSampler, denoiser_name, pipeline_timestep_kwargs, with_network

END = -1  # the clean end of the trajectory: alpha = 1, sigma = 0


# =============================================================================================
# Recipe: the shared sections (recipe.py) plus `consistency:`
# =============================================================================================
@dataclass
class ConsistencySection:
    num_solver_steps: int = bounded(50, ge=1)  # N: teacher DDIM/Euler grid (LCM's original_inference_steps); PCM: K phases = student.num_steps
    guidance_range: tuple[float, float] = bounded((1.0, 1.0), ge=1)  # w ~ U[lo, hi]; uncond + w (cond - uncond)
    w_embedding: bool = False  # feed w to the student (UNet2DConditionModel time_cond_proj_dim)
    w_embedding_dim: int = bounded(256, ge=2)
    loss: Literal["l2", "huber"] = "huber"
    huber_c: float = bounded(0.001, gt=0)

    def validate(self) -> None:
        lo, hi = self.guidance_range
        if lo > hi:
            raise RecipeError(f"guidance_range must be [lo, hi] with 1 <= lo <= hi; got {[lo, hi]}")
        if self.w_embedding_dim % 2:
            raise RecipeError(f"w_embedding_dim must be even (a sinusoidal embedding); got {self.w_embedding_dim}")


@dataclass
class ConsistencyRecipe(DistillRecipe):
    consistency: ConsistencySection = field(default_factory=ConsistencySection)
    ema: EMAConfig | None = field(default_factory=lambda: EMAConfig(decay=0.95))  # the target θ⁻ (LCM: mu = 0.95)


# =============================================================================================
# Schedules of the student: solver grid, export scheduler, phase edges
# =============================================================================================
def export_scheduler(teacher_scheduler, phased: bool, num_solver_steps: int, num_steps: int):
    """The scheduler the student is trained for and exported with: LCM's (``LCMScheduler`` for VP
    teachers, ``FlowMatchLCMScheduler`` for flow matching), or for PCM (``phased``) the K-step
    DDIM-trailing / flow Euler scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, LCMScheduler

    if phased:
        return make_student_scheduler(teacher_scheduler, num_steps)
    if isinstance(teacher_scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchLCMScheduler.from_config(teacher_scheduler.config)
    return LCMScheduler.from_config(teacher_scheduler.config, original_inference_steps=num_solver_steps)


def solver_grid(teacher_scheduler, num_solver_steps: int, **kwargs) -> torch.Tensor:
    """t_0 > ... > t_{N-1}: the teacher's own N-step grid (DDIM trailing / flow sigmas)."""
    return student_timesteps(make_student_scheduler(teacher_scheduler, num_solver_steps), num_solver_steps, **kwargs).float()


def phase_edges(scheduler, num_phases: int, grid: torch.Tensor, num_solver_steps: int, **kwargs) -> torch.Tensor:
    """The K phase edges (the exported K-step timesteps) followed by END; each must be on the grid."""
    edges = student_timesteps(scheduler, num_phases, **kwargs).float()
    on_grid = all(bool((grid - e).abs().min() < 1e-3) for e in edges)
    if num_solver_steps % num_phases or not on_grid:
        raise RecipeError(
            f"student.num_steps={num_phases} (PCM phases) does not divide the teacher's solver schedule "
            f"(num_solver_steps={num_solver_steps}): the phase edges {edges.tolist()} must lie on its grid"
        )
    return torch.cat([edges, torch.tensor([float(END)])])


# =============================================================================================
# The method
# =============================================================================================
def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


class ConsistencyDistillation(Distiller):
    """LCM / LCM-LoRA / PCM consistency distillation of ``teacher`` on the recipe's real data
    (clean samples in the network's space -- images, or VAE latents -- with their conditions)."""

    export_from_ema = False  # the EMA is LCM's target network θ⁻; the online student is exported
    recipe_class = ConsistencyRecipe
    trains_at_data_resolution = True  # a latent cache's resolution, not teacher.height / width
    lora_student_sets = {"ema": None}  # LCM-LoRA has no target network
    phased: bool = False  # PCM: K phases, each sample mapped to its phase edge

    def __init__(self, teacher, recipe: ConsistencyRecipe, data: RunData | None):
        super().__init__(teacher, recipe, data)
        self.section = s = recipe.consistency
        if data is not None and self.real is None:
            raise RecipeError(f"{recipe.method}: consistency distillation trains on real data: set data.images (or data.latents for latent teachers)")
        lo, hi = s.guidance_range
        if lo != hi and not s.w_embedding:
            raise RecipeError(
                f"consistency.guidance_range {[lo, hi]} spans several w but w_embedding is off: the student could not "
                "tell them apart; set w_embedding: true or a single w ([w, w])"
            )
        if self.real is not None and self.real.latents is not None:
            self.shape = tuple(int(n) for n in self.real.latents.shape("latents")[1:])  # the training resolution (Flux's grid depends on it)
        if self.num_steps > s.num_solver_steps:
            raise RecipeError(f"student.num_steps ({self.num_steps}) exceeds consistency.num_solver_steps ({s.num_solver_steps}): "
                              "the student samples on the solver grid")
        self.scheduler = export_scheduler(teacher.scheduler, self.phased, s.num_solver_steps, self.num_steps)
        self.sampler = StudentSampler(self.scheduler, self.num_steps, self.timestep_kwargs)
        self.grid = solver_grid(teacher.scheduler, s.num_solver_steps, **self.timestep_kwargs(s.num_solver_steps))
        self.edges = None
        if self.phased:
            self.edges = phase_edges(self.scheduler, self.num_steps, self.grid, s.num_solver_steps, **self.timestep_kwargs(self.num_steps))
        else:
            exported = self.sampler.timesteps.float()
            if any(bool((self.grid - t).abs().min() > 1e-3) for t in exported):
                hint = (" (flow teachers: Flux needs student.num_steps to divide num_solver_steps; SD3, whose pipeline passes "
                        "no sigmas, needs num_steps - 1 to divide num_solver_steps - 1)") if self.schedule.kind == "flow" else ""
                raise RecipeError(f"the exported {self.num_steps}-step timesteps {exported.tolist()} are not on the solver grid{hint}")
        self.sampler.check_timesteps(recipe.student.timesteps)

        network = getattr(teacher, denoiser_name(teacher))
        self.w_input = None
        # LCM-LoRA without a w-embedding: the LoRA goes on the teacher's own frozen weights (no
        # second copy in memory); the teacher's solver step runs them with the adapter disabled.
        self.shares_teacher_weights = recipe.student.lora_rank > 0 and not s.w_embedding
        if s.w_embedding:
            if teacher.family == "flux":  # its transformer's own guidance input carries the embedded guidance
                raise RecipeError("consistency.w_embedding needs a UNet (time_cond_proj_dim); a Flux teacher's student keeps "
                                  "its embedded guidance: use a fixed guidance (guidance_range [w, w]), or method: guidance")
            student = w_conditioned_copy(network, s.w_embedding_dim)
            self.w_input = GuidanceInput.attach(student)
        else:
            student = network if self.shares_teacher_weights else copy.deepcopy(network)
        self.ema = recipe.ema
        if recipe.student.lora_rank > 0:
            add_lora(student, recipe.student.lora_rank, lora_targets(self.family, recipe.student.lora_target_modules), what="student")
            self.ema = None  # LCM-LoRA: no target network
        else:
            student.requires_grad_(True)
        self.student = student.train()

    def method_roles(self) -> dict[str, Role]:
        opts = self.optimizer_configs(("student",), "consistency distillation")
        return {"student": Role(self.student, optimizer=opts["student"], ema=self.ema)}

    def timestep_kwargs(self, num_steps: int) -> dict:
        """``set_timesteps`` arguments of the stock pipeline at this resolution (Flux: mu, sigmas)."""
        return pipeline_timestep_kwargs(self.teacher, self.shape, num_steps)

    # -- guidance of the exported student ---------------------------------------------------------
    @property
    def trained_guidance_range(self):
        return tuple(self.section.guidance_range) if self.w_input is not None else None

    @property
    def export_guidance_scale(self) -> float:
        return self.section.guidance_range[0] if self.w_input is not None else 1.0

    def guidance_input(self, w: torch.Tensor):
        if self.w_input is None:
            return contextlib.nullcontext()
        check_guidance(float(w.reshape(-1)[0]), self.section.guidance_range)
        return self.w_input.at(w)

    # -- pieces --------------------------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor):
        """alpha, sigma at timesteps t (END -> 1, 0)."""
        a, s = self.schedule.alpha_sigma(t.clamp(min=0))
        clean = t < 0
        return torch.where(clean, torch.ones_like(a), a), torch.where(clean, torch.zeros_like(s), s)

    def _bc(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.device, torch.float32)

    def teacher_weights(self):
        """Context in which the teacher's network is the teacher: its LoRA (the student) disabled when they share weights."""
        return lora_disabled(self.student) if self.shares_teacher_weights else contextlib.nullcontext()

    @torch.no_grad()
    def solver_step(self, x_t, t, s, cond, w):
        """x̂_s: one DDIM (VP) / Euler (flow) step of the teacher's CFG-guided ODE from t to s (LCM eq. 8)."""
        with self.teacher_weights():
            guided = cfg_output(self.teacher, x_t, t, cond, w)
        x0, eps = self.schedule.to_x0_eps(guided, x_t.float(), t, self.prediction_type)
        a, sg = self.alpha_sigma(s)
        return self._bc(a, x0) * x0 + self._bc(sg, x0) * eps

    def consistency_fn(self, network: nn.Module, x, t, cond, w) -> torch.Tensor:
        """f_θ(x, t, w): LCM's boundary-scaled x0 estimate, or PCM's DDIM jump to the phase edge."""
        with self.w_input.at(w) if self.w_input is not None else contextlib.nullcontext():
            raw = with_network(self.teacher, network).guided_output(x, t, cond, 1.0).float()
        x0, eps = self.schedule.to_x0_eps(raw, x.float(), t, self.prediction_type)
        if self.phased:
            a, sg = self.alpha_sigma(self.edge_below(t))
            return self._bc(a, x) * x0 + self._bc(sg, x) * eps  # PCM eq. 6
        if hasattr(self.scheduler, "get_scalings_for_boundary_condition_discrete"):
            c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition_discrete(t.float())
            return self._bc(c_skip, x) * x.float() + self._bc(c_out, x) * x0  # LCM eq. 3-4
        return x0

    def edge_below(self, t: torch.Tensor) -> torch.Tensor:
        """The PCM phase edge a sample at t is mapped to: the largest edge strictly below t."""
        edges = self.edges.to(t.device)
        below = edges[None, :] < t.float()[:, None] - 1e-3
        return torch.where(below, edges[None, :], torch.full_like(below, -1e9, dtype=edges.dtype)).max(dim=1).values

    def distance(self, a, b) -> torch.Tensor:
        if self.section.loss == "huber":
            return pseudo_huber(a, b, self.section.huber_c)
        return torch.mean((a.float() - b.float()) ** 2)

    def target_network(self, ctx: StepContext) -> nn.Module:
        return ctx.ema("student") if "student" in ctx.trainer.emas else ctx.unwrap("student")

    # -- one step ------------------------------------------------------------------------------
    def training_step(self, ctx: StepContext) -> dict[str, Any]:
        flips = ctx.rand() < 0.5 if self.real.random_flip else None
        x0, cond = self.real.batch(ctx.sample_indices(len(self.real)), ctx.device, flips=flips)
        n = ctx.randint(0, len(self.grid))
        grid = self.grid.to(ctx.device)
        next_grid = torch.cat([grid[1:], torch.tensor([float(END)], device=ctx.device)])
        t, s = grid[n], next_grid[n]
        lo, hi = self.section.guidance_range
        w = lo + (hi - lo) * ctx.rand()
        eps = ctx.randn(*x0.shape[1:])
        x_t = self.schedule.add_noise(x0, eps, t)
        t_in = t.round().long() if self.schedule.kind == "vp" else t
        s_in = s.round().long() if self.schedule.kind == "vp" else s

        x_s = self.solver_step(x_t, t_in, s_in, cond, w)
        with torch.no_grad():
            target = self.consistency_fn(self.target_network(ctx), x_s, s_in.clamp(min=0), cond, w)
            # s is the trajectory's end (LCM) or a phase edge (PCM): the target is x̂_s itself
            at_boundary = s < 0 if self.edges is None else (self.edges.to(ctx.device)[None, :] - s[:, None]).abs().min(1).values < 1e-3
            target = torch.where(self._bc(at_boundary.float(), x_s) > 0, x_s, target)
        pred = self.consistency_fn(ctx.model("student"), x_t, t_in, cond, w)
        loss = self.distance(pred, target)
        ctx.step_role("student", loss)
        return {"loss": loss}

    def export_variants(self) -> dict[str, Any]:
        """Extra pipeline directories of the same network with another scheduler: TCD sampling of
        an LCM student of a VP pixel teacher (``pipeline_tcd``; the pipeline's ``eta`` is TCD's gamma)."""
        from diffusers import TCDScheduler

        if self.phased or self.schedule.kind != "vp" or self.w_input is not None or self.family != "pixel":
            return {}
        return {"pipeline_tcd": TCDScheduler.from_config(self.scheduler.config)}


    # -- the memory plan --------------------------------------------------------------------------
    @classmethod
    def method_role_specs(cls, plan) -> list:
        """The frozen teacher and the student: full (with its EMA, the target network), a
        w-conditioned copy, or LCM-LoRA's adapters on the teacher's own weights (no EMA)."""
        s, lora = plan.recipe.consistency, plan.recipe.student.lora_rank
        config = {**plan.configs.denoiser, "time_cond_proj_dim": s.w_embedding_dim} if s.w_embedding else None
        shares = "teacher" if (lora > 0 and not s.w_embedding) else None  # LCM-LoRA: on the teacher's weights
        return [plan.teacher(), plan.student(shares=shares, config=config, ema=plan.recipe.ema is not None and lora == 0)]


class LCM(ConsistencyDistillation):
    """LCM / LCM-LoRA (Luo et al. 2023): one consistency function over the whole trajectory."""

    description = "latent consistency distillation (LCM)"


class PCM(ConsistencyDistillation):
    """PCM (Wang et al. 2024): the trajectory split into K phases, consistency within each."""

    description = "phased consistency distillation (PCM)"
    phased = True


__all__ = [
    "ConsistencyDistillation",
    "ConsistencyRecipe",
    "ConsistencySection",
    "LCM",
    "PCM",
    "export_scheduler",
    "phase_edges",
    "solver_grid",
]
