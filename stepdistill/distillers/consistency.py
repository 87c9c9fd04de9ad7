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
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
from torch import nn

from ..config import EMAConfig, OptimizerConfig, TrainingConfig, load_recipe, to_dict
from ..errors import RecipeError, StepdistillError
from ..export import make_student_scheduler, student_timesteps
from ..training.trainer import Role, StepContext, Trainer, TrainingMethod
from .common import add_lora, check_finite, has_lora, merge_lora
from .student import build_pipeline, denoiser_name, pipeline_timestep_kwargs, with_network

END = -1  # the clean end of the trajectory: alpha = 1, sigma = 0


# =============================================================================================
# Recipe
# =============================================================================================
@dataclass
class ConsistencySection:
    method: Literal["lcm", "pcm"] = "lcm"
    num_solver_steps: int = 50  # N: teacher DDIM/Euler grid (LCM's original_inference_steps)
    num_inference_steps: int = 4  # LCM: the exported pipeline's default step count
    num_phases: int = 4  # PCM: K phases = the exported pipeline's step count
    guidance_range: tuple[float, float] = (1.0, 1.0)  # w ~ U[lo, hi]; uncond + w (cond - uncond)
    w_embedding: bool = False  # feed w to the student (UNet2DConditionModel time_cond_proj_dim)
    w_embedding_dim: int = 256
    loss: Literal["l2", "huber"] = "huber"
    huber_c: float = 0.001
    lora_rank: int = 0  # > 0: LCM-LoRA (a LoRA student, no target network)
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class ConsistencyDataSection:
    """Latent teachers: real samples as VAE latents with their prompts (digits: the training split)."""

    latents: Optional[str] = None  # safetensors {latents [N, C, h, w], prompt_index [N]} (distribution_matching.cache_real_latents)
    prompts: list[str] = field(default_factory=list)
    prompts_file: Optional[str] = None  # one prompt per line, appended to prompts


@dataclass
class ConsistencyRecipe:
    method: Literal["lcm", "pcm"] = "lcm"  # which distiller `stepdistill distill` runs
    teacher: str = "digits"  # "digits": the shipped digits teacher; else a diffusers pipeline directory
    consistency: ConsistencySection = field(default_factory=ConsistencySection)
    data: ConsistencyDataSection = field(default_factory=ConsistencyDataSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: Optional[EMAConfig] = field(default_factory=lambda: EMAConfig(decay=0.95))  # the target θ⁻


# =============================================================================================
# Schedules of the student: solver grid, export scheduler, phase edges
# =============================================================================================
def export_scheduler(teacher_scheduler, section: ConsistencySection):
    """The scheduler the student is trained for and exported with: LCM's (``LCMScheduler`` for VP
    teachers, ``FlowMatchLCMScheduler`` for flow matching), or for PCM the K-step DDIM-trailing /
    flow Euler scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, LCMScheduler

    if section.method == "pcm":
        return make_student_scheduler(teacher_scheduler, section.num_phases)
    if isinstance(teacher_scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchLCMScheduler.from_config(teacher_scheduler.config)
    return LCMScheduler.from_config(teacher_scheduler.config, original_inference_steps=section.num_solver_steps)


def solver_grid(teacher_scheduler, num_solver_steps: int, **kwargs) -> torch.Tensor:
    """t_0 > ... > t_{N-1}: the teacher's own N-step grid (DDIM trailing / flow sigmas)."""
    return student_timesteps(make_student_scheduler(teacher_scheduler, num_solver_steps), num_solver_steps, **kwargs).float()


def phase_edges(scheduler, num_phases: int, grid: torch.Tensor, num_solver_steps: int, **kwargs) -> torch.Tensor:
    """The K phase edges (the exported K-step timesteps) followed by END; each must be on the grid."""
    edges = student_timesteps(scheduler, num_phases, **kwargs).float()
    on_grid = all(bool((grid - e).abs().min() < 1e-3) for e in edges)
    if num_solver_steps % num_phases or not on_grid:
        raise RecipeError(
            f"consistency.num_phases={num_phases} does not divide the teacher's solver schedule "
            f"(num_solver_steps={num_solver_steps}): the phase edges {edges.tolist()} must lie on its grid"
        )
    return torch.cat([edges, torch.tensor([float(END)])])


# =============================================================================================
# Guidance embedding (diffusers' w-conditioned UNets)
# =============================================================================================
def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """What diffusers' SD/SDXL/LCM pipelines feed to ``time_cond_proj_dim``: the embedding of
    ``guidance_scale - 1`` (our w minus one = LCM's w'), computed by the stock pipeline's function."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, (w - 1).float(), embedding_dim=dim)


def check_guidance(guidance_scale: float, trained_range) -> None:
    """Warn when a w-conditioned student is asked for a w outside the range it was trained on."""
    lo, hi = trained_range
    if not lo - 1e-6 <= float(guidance_scale) <= hi + 1e-6:
        warnings.warn(
            f"guidance_scale {guidance_scale:g} is outside the range [{lo:g}, {hi:g}] this student's w-embedding was "
            "trained on: expect off-distribution samples",
            UserWarning,
            stacklevel=3,
        )


class _GuidanceInput:
    """Forward pre-hook that passes ``timestep_cond`` (the w-embedding) to a UNet: the teacher
    adapters call the student network exactly like the teacher, this adds the one extra input."""

    def __init__(self, dim: int):
        self.dim = dim
        self.w: torch.Tensor | None = None

    def __deepcopy__(self, memo):  # the EMA target's copy of the network shares the hook (and its w)
        return self

    def __call__(self, module, args, kwargs):
        if self.w is None:
            raise StepdistillError("a w-conditioned student was called without a guidance scale")
        x = args[0]
        w = self.w.to(x.device).reshape(-1)
        w = w.expand(x.shape[0]) if w.numel() == 1 else w.repeat(x.shape[0] // w.numel())
        kwargs["timestep_cond"] = guidance_embedding(w, self.dim).to(x.device, x.dtype)
        return args, kwargs

    @contextlib.contextmanager
    def at(self, w: torch.Tensor):
        self.w, old = w, self.w
        try:
            yield
        finally:
            self.w = old


def w_conditioned_copy(network: nn.Module, dim: int) -> nn.Module:
    """A copy of the teacher's UNet with ``time_cond_proj_dim = dim``, the teacher's weights and a
    zero-initialized w projection (so it starts as the teacher): a UNet2DConditionModel for SD /
    SDXL, our ``GuidanceUNet2DModel`` (UNet2DModel + the same input) for pixel teachers."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    from ..pipelines.guidance_unet_2d import GuidanceUNet2DModel

    if isinstance(network, UNet2DConditionModel):
        cls = UNet2DConditionModel
    elif isinstance(network, UNet2DModel):
        cls = GuidanceUNet2DModel
    else:
        raise RecipeError(
            f"consistency.w_embedding needs a UNet (UNet2DConditionModel / UNet2DModel); this teacher's network is "
            f"{type(network).__name__}: use a fixed guidance (guidance_range [w, w]) instead"
        )
    config = {k: v for k, v in network.config.items() if not k.startswith("_")}
    student = cls.from_config({**config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(network.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise StepdistillError(f"cannot copy the teacher into a w-conditioned UNet (missing {missing[:3]}, unexpected {unexpected[:3]})")
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(network.dtype)


# =============================================================================================
# The method
# =============================================================================================
def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


class ConsistencyDistillation(TrainingMethod):
    """LCM / LCM-LoRA / PCM consistency distillation of ``teacher`` on ``data``.

    ``data``: clean samples in the network's space ([N, C, H, W]: digits, or VAE latents);
    ``conditions``: their N class labels / prompts (None: unconditional).
    """

    def __init__(self, teacher, data: torch.Tensor, conditions, section: ConsistencySection,
                 optimizer: OptimizerConfig, ema: EMAConfig | None = EMAConfig(decay=0.95)):
        self.teacher = teacher
        self.section = s = section
        self.data = data
        self.conditions = conditions
        self.schedule = teacher.schedule
        self.prediction_type = teacher.prediction_type
        lo, hi = s.guidance_range
        if lo > hi or lo < 1.0:
            raise RecipeError(f"consistency.guidance_range must be [lo, hi] with 1 <= lo <= hi; got {[lo, hi]}")
        if lo != hi and not s.w_embedding:
            raise RecipeError(
                f"consistency.guidance_range {[lo, hi]} spans several w but w_embedding is off: the student could not "
                "tell them apart; set w_embedding: true or a single w ([w, w])"
            )
        self.shape = tuple(data.shape[1:])
        self.scheduler = export_scheduler(teacher.scheduler, s)
        self.num_steps = s.num_phases if s.method == "pcm" else s.num_inference_steps
        self.grid = solver_grid(teacher.scheduler, s.num_solver_steps, **self.timestep_kwargs(s.num_solver_steps))
        self.edges = None
        if s.method == "pcm":
            self.edges = phase_edges(self.scheduler, s.num_phases, self.grid, s.num_solver_steps, **self.timestep_kwargs(s.num_phases))
        if s.method == "lcm":
            exported = student_timesteps(self.scheduler, self.num_steps, **self.timestep_kwargs(self.num_steps)).float()
            if any(bool((self.grid - t).abs().min() > 1e-3) for t in exported):
                hint = " (flow teachers: num_inference_steps must divide num_solver_steps)" if self.schedule.kind == "flow" else ""
                raise RecipeError(f"the exported {self.num_steps}-step timesteps {exported.tolist()} are not on the solver grid{hint}")

        network = getattr(teacher, denoiser_name(teacher))
        self.w_input = None
        if s.w_embedding:
            student = w_conditioned_copy(network, s.w_embedding_dim)
            self.w_input = _GuidanceInput(s.w_embedding_dim)
            student.register_forward_pre_hook(self.w_input, with_kwargs=True)
        else:
            student = copy.deepcopy(network)
        if s.lora_rank > 0:
            add_lora(student, s.lora_rank, s.lora_target_modules, what="consistency")
            ema = None  # LCM-LoRA: no target network
        else:
            student.requires_grad_(True)
        self.student, self.optimizer, self.ema = student.train(), optimizer, ema

    def roles(self) -> dict[str, Role]:
        return {"student": Role(self.student, optimizer=self.optimizer, ema=self.ema), "teacher": Role(self.teacher)}

    def timestep_kwargs(self, num_steps: int) -> dict:
        """``set_timesteps`` arguments of the stock pipeline at this resolution (Flux: mu, sigmas)."""
        return pipeline_timestep_kwargs(self.teacher, self.shape, num_steps)

    # -- pieces --------------------------------------------------------------------------------
    def _cond_at(self, idx):
        if self.conditions is None:
            return None
        if torch.is_tensor(self.conditions):
            return self.conditions[torch.as_tensor(idx)]
        return [self.conditions[int(i)] for i in idx]

    def alpha_sigma(self, t: torch.Tensor):
        """alpha, sigma at timesteps t (END -> 1, 0)."""
        a, s = self.schedule.alpha_sigma(t.clamp(min=0))
        clean = t < 0
        return torch.where(clean, torch.ones_like(a), a), torch.where(clean, torch.zeros_like(s), s)

    def _bc(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.device, torch.float32)

    @torch.no_grad()
    def solver_step(self, x_t, t, s, cond, w):
        """x̂_s: one DDIM (VP) / Euler (flow) step of the teacher's CFG-guided ODE from t to s (LCM eq. 8)."""
        cond_out = self.teacher.guided_output(x_t, t, cond, 1.0).float()
        if bool((w != 1).any()):
            from ..teachers.base import Conditioning

            if cond.uncond is None:
                raise RecipeError("consistency.guidance_range above 1 needs a teacher with an unconditional branch (CFG)")
            uncond = Conditioning(cond=cond.uncond, extra=cond.extra)
            uncond_out = self.teacher.guided_output(x_t, t, uncond, 1.0).float()
            cond_out = uncond_out + self._bc(w, x_t) * (cond_out - uncond_out)
        x0, eps = self.schedule.to_x0_eps(cond_out, x_t.float(), t, self.prediction_type)
        a, sg = self.alpha_sigma(s)
        return self._bc(a, x0) * x0 + self._bc(sg, x0) * eps

    def consistency_fn(self, network: nn.Module, x, t, cond, w) -> torch.Tensor:
        """f_θ(x, t, w): LCM's boundary-scaled x0 estimate, or PCM's DDIM jump to the phase edge."""
        guard = self.w_input.at(w) if self.w_input is not None else contextlib.nullcontext()
        with guard:
            raw = with_network(self.teacher, network).guided_output(x, t, cond, 1.0).float()
        x0, eps = self.schedule.to_x0_eps(raw, x.float(), t, self.prediction_type)
        if self.section.method == "pcm":
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
        idx = ctx.sample_indices(len(self.data))
        x0 = self.data[idx.cpu()].to(ctx.device)
        cond = self.teacher.encode(self._cond_at(idx.cpu())).to(ctx.device)
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
        check_finite({"consistency": loss}, ctx.step)
        ctx.step_role("student", loss)
        return {"loss": loss}

    # -- sampling and export -------------------------------------------------------------------
    def sampling_network(self, trainer: Trainer) -> nn.Module:
        return trainer.unwrap("student")

    @torch.no_grad()
    def sample(self, network: nn.Module, noise: torch.Tensor, cond, guidance_scale: float = 1.0,
               num_steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The exported pipeline's loop: ``scheduler.set_timesteps(K)`` / ``step`` with the student."""
        import inspect

        if self.w_input is not None:
            check_guidance(guidance_scale, self.section.guidance_range)
        scheduler = copy.deepcopy(self.scheduler)
        steps = num_steps or self.num_steps
        scheduler.set_timesteps(steps, device=noise.device, **self.timestep_kwargs(steps))
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        adapter = with_network(self.teacher, network)
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)  # flow schedulers have none
        w = torch.tensor(float(guidance_scale))
        for t in scheduler.timesteps:
            guard = self.w_input.at(w) if self.w_input is not None else contextlib.nullcontext()
            with guard:
                out = adapter.guided_output(scale(x, t), t, cond, 1.0 if self.w_input is not None else guidance_scale)
            kwargs = {"generator": generator} if takes_generator else {}
            x = scheduler.step(out, t, x, **kwargs).prev_sample
        return x

    def generate_samples(self, trainer: Trainer, num_samples: int, generator: torch.Generator):
        if self.teacher.family != "pixel":
            return None
        device = trainer.accelerator.device
        labels = torch.arange(num_samples) % self.teacher.num_classes
        noise = torch.randn(num_samples, *self.teacher.sample_shape(), generator=generator).to(device)
        w = self.section.guidance_range[0] if self.w_input is not None else 1.0
        x = self.sample(self.sampling_network(trainer), noise, self.teacher.encode(labels).to(device), w, generator=generator)
        return x.clamp(-1, 1).cpu(), labels

    def export_network(self, trainer: Trainer) -> nn.Module:
        network = self.sampling_network(trainer)
        return merge_lora(network) if has_lora(network) else copy.deepcopy(network)


# =============================================================================================
# Export
# =============================================================================================
def save_consistency_pipeline(method: ConsistencyDistillation, network: nn.Module, output_dir, *, metrics=None,
                              metrics_command=None, model_card_info=None, overwrite=False, sampler: str = "trained") -> Path:
    """The student as a drop-in pipeline directory with its LCM / DDIM-trailing scheduler.

    ``sampler="tcd"``: a ``TCDScheduler`` with the same schedule and solver grid instead (TCD
    sampling of the consistency student; the pipeline's ``eta`` is TCD's gamma, 0 = deterministic).
    """
    from ..export import _write_directory, save_class_conditional_pipeline
    from ..model_card import PipelineUsage

    teacher, steps, scheduler = method.teacher, method.num_steps, method.scheduler
    if sampler == "tcd":
        from diffusers import TCDScheduler

        if method.section.method != "lcm" or method.schedule.kind != "vp":
            raise StepdistillError("TCD sampling is for LCM students of VP teachers")
        scheduler = TCDScheduler.from_config(scheduler.config)
    elif sampler != "trained":
        raise StepdistillError(f"sampler must be 'trained' or 'tcd'; got {sampler!r}")
    w = method.section.guidance_range[0] if method.w_input is not None else 1.0
    network = copy.deepcopy(network)
    network._forward_pre_hooks.clear()  # the stock pipeline feeds timestep_cond itself
    if teacher.family == "pixel":
        trained = method.section.guidance_range if method.w_input is not None else None
        return save_class_conditional_pipeline(
            network, scheduler, output_dir, num_inference_steps=steps, guidance_scale=w, trained_guidance_range=trained, metrics=metrics,
            metrics_command=metrics_command, model_card_info=model_card_info, overwrite=overwrite,
        )
    pipe = build_pipeline(teacher, network, scheduler)
    if teacher.family == "flux":  # FluxPipeline's guidance_scale is FLUX.1-dev's embedded guidance
        w = getattr(teacher, "embedded_guidance_scale", 1.0)
    usage = PipelineUsage(pipeline_class=type(pipe).__name__, num_inference_steps=steps, guidance_scale=w)
    return _write_directory(output_dir, overwrite, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True),
                            usage, model_card_info, metrics, metrics_command)


def save_lcm_lora(method: ConsistencyDistillation, network: nn.Module, output_dir: str | os.PathLike) -> Path:
    """LCM-LoRA export: ``pytorch_lora_weights.safetensors`` (diffusers format) plus the
    ``LCMScheduler`` config under ``scheduler/``, for the stock teacher pipeline::

        pipe.scheduler = LCMScheduler.from_pretrained(dir, subfolder="scheduler")
        pipe.load_lora_weights(dir)
    """
    from peft.utils import get_peft_model_state_dict

    if not has_lora(network):
        raise StepdistillError("save_lcm_lora: this student has no LoRA (consistency.lora_rank is 0)")
    pipeline_cls = type(build_pipeline(method.teacher, network, method.scheduler))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(network).items()}
    # unet_lora_layers (SD / SDXL) or transformer_lora_layers (Flux)
    pipeline_cls.save_lora_weights(out, **{f"{denoiser_name(method.teacher)}_lora_layers": layers}, safe_serialization=True)
    method.scheduler.save_pretrained(out / "scheduler")
    return out


# =============================================================================================
# From a recipe to a run (digits)
# =============================================================================================
CARD = {
    "title": "stepdistill consistency-distilled digits student",
    "description": "A few-step student of the stepdistill digits teacher, consistency-distilled (LCM / PCM).",
    "dataset": "scikit-learn digits (1,500 training images)",
    "license": "apache-2.0",
    "tags": ["digits", "class-conditional", "consistency-distillation"],
    "class_names": [str(i) for i in range(10)],
}


def training_data(teacher, recipe: ConsistencyRecipe):
    """(x0 in the network's space, their conditions): digits labels, or cached latents + prompts."""
    if teacher.family == "pixel":
        from ..digits.data import load_split

        data = load_split("train")
        return data.images, data.labels.long()
    d = recipe.data
    prompts = list(d.prompts)
    if d.prompts_file:
        if not os.path.isfile(d.prompts_file):
            raise RecipeError(f"data.prompts_file not found: {d.prompts_file}")
        prompts += [line.strip() for line in Path(d.prompts_file).read_text().splitlines() if line.strip()]
    if d.latents is None or not os.path.isfile(d.latents):
        raise RecipeError(f"data.latents: a latent teacher needs real latents (safetensors with latents, prompt_index); got {d.latents!r}")
    from safetensors.torch import load_file

    cached = load_file(d.latents)
    index = cached["prompt_index"].long()
    if not prompts or int(index.max()) >= len(prompts):
        raise RecipeError(f"data: prompt_index refers to {int(index.max()) + 1} prompts but the recipe lists {len(prompts)}")
    # the latents' size is the training resolution (Flux's solver grid depends on it); channels must match
    channels = teacher.sample_shape()[0]
    if cached["latents"].ndim != 4 or cached["latents"].shape[1] != channels:
        raise RecipeError(f"data.latents have shape {tuple(cached['latents'].shape[1:])}; this teacher's latents have {channels} channels [C, h, w]")
    return cached["latents"].float(), [prompts[i] for i in index.tolist()]


def distill(recipe_path: str | os.PathLike, output_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False,
            overrides: Mapping[str, Any] | None = None, progress: bool = True, evaluate: bool = True, bench: bool = True) -> Path:
    """Run an LCM / LCM-LoRA / PCM recipe; export to ``output_dir/pipeline`` (LoRA students:
    ``output_dir/lora``) and return that path."""
    from ..digits.bench import default_teacher_dir
    from ..export import export_info
    from ..teachers import load_teacher

    recipe = load_recipe(recipe_path, ConsistencyRecipe, overrides)
    if recipe.consistency.method != recipe.method:
        raise RecipeError(f"method: {recipe.method} but consistency.method: {recipe.consistency.method}; make them agree")
    path = default_teacher_dir() if recipe.teacher == "digits" else Path(recipe.teacher)
    if not (path / "model_index.json").is_file():
        raise StepdistillError(f"teacher {path} is not a diffusers pipeline directory (no model_index.json)")
    teacher = load_teacher(path)
    data, conditions = training_data(teacher, recipe)
    method = ConsistencyDistillation(teacher, data, conditions, recipe.consistency, recipe.optimizer, recipe.ema)
    evaluators = []
    if evaluate and teacher.family == "pixel":
        from ..evaluation import make_evaluator

        evaluators = [make_evaluator()]
    card = {**CARD, "method": recipe.method.upper()}
    if teacher.family != "pixel":
        card = {"title": f"stepdistill {recipe.method.upper()} student", "method": recipe.method.upper(), "license": "other",
                "description": f"A {method.num_steps}-step consistency-distilled student of {path}.", "tags": ["consistency-distillation"]}
    trainer = Trainer(
        method, recipe.training, output_dir, resume=resume, overwrite=overwrite,
        run_info={"recipe": to_dict(recipe), "recipe_path": os.fspath(recipe_path),
                  "export": export_info(method.scheduler, role="student", num_inference_steps=method.num_steps, model_card_info=card)},
        evaluators=evaluators, progress=progress,
    )
    began = time.perf_counter()
    final = trainer.train()
    minutes = (time.perf_counter() - began) / 60
    pipeline_dir = Path(output_dir) / "pipeline"
    if trainer.accelerator.is_main_process and recipe.consistency.lora_rank > 0:
        pipeline_dir = save_lcm_lora(method, method.sampling_network(trainer), Path(output_dir) / "lora")
    elif trainer.accelerator.is_main_process:
        metrics = None
        if final:
            metrics = {"model": f"{recipe.method.upper()} student", "steps": method.num_steps, "guidance_scale": 1.0,
                       "samples": recipe.training.num_eval_samples, **{k.removeprefix("eval/"): v for k, v in final.items()}}
        save_consistency_pipeline(method, method.export_network(trainer), pipeline_dir, metrics=metrics,
                                  metrics_command=f"stepdistill distill {os.fspath(recipe_path)} (evaluation at the last step)" if metrics else None,
                                  model_card_info=card, overwrite=True)
        if recipe.method == "lcm" and method.w_input is None and teacher.family == "pixel":
            save_consistency_pipeline(method, method.export_network(trainer), Path(output_dir) / "pipeline_tcd",
                                      model_card_info=card, overwrite=True, sampler="tcd")
        (Path(output_dir) / "train_minutes.txt").write_text(f"{minutes:.2f}\n")
        if bench and teacher.family == "pixel":
            from ..digits.bench import format_table, run_bench

            results = run_bench(pipeline_dir, Path(output_dir) / "bench", num_samples=2000, steps=(method.num_steps,),
                                guidance_scales=(1.0,), progress=progress)
            print(format_table(results))
    trainer.accelerator.wait_for_everyone()
    return pipeline_dir


__all__ = [
    "ConsistencyDistillation",
    "ConsistencyRecipe",
    "ConsistencySection",
    "check_guidance",
    "distill",
    "export_scheduler",
    "guidance_embedding",
    "phase_edges",
    "save_consistency_pipeline",
    "save_lcm_lora",
    "solver_grid",
]
