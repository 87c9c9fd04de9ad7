"""Deterministic samplers driven by a :class:`~stepdistill.teachers.base.Teacher` (or any
callable with the same ``predict`` signature, such as a student wrapper).

They take their timesteps / sigmas from a diffusers scheduler object -- the same object an
exported pipeline samples with -- and do the update with :mod:`stepdistill.schedule`, so they
reproduce the stock diffusers pipelines step for step:

- :func:`ddim_sample`: DDIM (eta = 0) for VP teachers, as ``DDIMScheduler.step``.
- :func:`euler_flow_sample`: Euler on the flow ODE, as ``FlowMatchEulerDiscreteScheduler.step``.

and the student's scheduler: :func:`make_student_scheduler` builds the scheduler a K-step
student is trained for and exported with from the teacher's, :func:`student_timesteps` reads its
timesteps back (what the exported pipeline's ``set_timesteps(K)`` gives). The student-side loop
over such a scheduler is :class:`~stepdistill.distillers.student.StudentSampler`.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from .errors import StepdistillError
from .schedule import VPSchedule


# -- schedulers ---------------------------------------------------------------------------------
def make_student_scheduler(teacher_scheduler, num_steps: int, init_timestep: int | None = None):
    """The scheduler a ``num_steps``-step student is trained for and exported with.

    VP teachers (DDPM/DDIM/... configs) get a ``DDIMScheduler`` with the teacher's noise
    schedule and ``timestep_spacing="trailing"``, so sampling starts at the last training
    timestep (``num_steps=1`` -> ``[T-1]``; 4 -> ``[999, 749, 499, 249]`` for T = 1000).
    Flow-matching teachers keep their ``FlowMatchEulerDiscreteScheduler`` config, whose
    sigmas already start at pure noise.

    ``init_timestep`` (one-step students of VP teachers; ``student.init_timestep``): the one step
    runs at that timestep instead -- a trailing ``DDIMScheduler`` on the teacher's noise schedule cut
    after ``init_timestep`` (its betas as ``trained_betas``, ``num_train_timesteps = init_timestep +
    1``) gives ``set_timesteps(1) == [init_timestep]`` with the teacher's alpha_bar there, and its
    step returns the x0 estimate, so a stock ``DDIMPipeline`` / ``StableDiffusionPipeline`` with
    ``num_inference_steps=1`` runs the generator exactly as trained; asked for more steps, it stays
    on the teacher's timesteps below ``init_timestep`` (the student was trained for one).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise StepdistillError(f"num_steps must be a positive integer; got {num_steps!r}")
    if init_timestep is not None:
        train_steps = teacher_scheduler.config.num_train_timesteps
        if num_steps != 1 or isinstance(teacher_scheduler, FlowMatchEulerDiscreteScheduler):
            raise StepdistillError("student.init_timestep is for one-step students (student.num_steps: 1) of VP (DDPM / DDIM) "
                                   f"teachers; this run has num_steps={num_steps} and a {type(teacher_scheduler).__name__}")
        if not 0 < init_timestep < train_steps:
            raise StepdistillError(f"student.init_timestep must lie in (0, {train_steps}); got {init_timestep}")
        betas = teacher_scheduler.betas[: int(init_timestep) + 1]  # after any zero-SNR rescaling: not rescaled again
        return DDIMScheduler.from_config(teacher_scheduler.config, timestep_spacing="trailing", num_train_timesteps=int(init_timestep) + 1,
                                         trained_betas=betas.tolist(), rescale_betas_zero_snr=False)
    if isinstance(teacher_scheduler, FlowMatchEulerDiscreteScheduler):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(teacher_scheduler.config)
    else:
        scheduler = DDIMScheduler.from_config(teacher_scheduler.config, timestep_spacing="trailing")
    train_steps = scheduler.config.num_train_timesteps
    if num_steps > train_steps:
        raise StepdistillError(f"num_steps={num_steps} exceeds the teacher's {train_steps} training timesteps")
    return scheduler


def student_timesteps(scheduler, num_steps: int, **set_timesteps_kwargs: Any) -> torch.Tensor:
    """The timesteps ``scheduler.set_timesteps(num_steps)`` samples at, in sampling order.

    ``scheduler`` is left untouched (a copy is set). Extra keyword arguments go to
    ``set_timesteps`` (``mu=`` for Flux-style dynamic shifting).
    """
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(num_steps, device="cpu", **set_timesteps_kwargs)
    return probe.timesteps.clone()


def ddim_prev_timestep(scheduler, t: int) -> int:
    """The timestep DDIMScheduler steps to from ``t`` (negative: the final, clean one)."""
    return int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


@torch.no_grad()
def ddim_sample(
    teacher,
    cond,
    noise: torch.Tensor,
    scheduler,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """DDIM (eta = 0): x_prev = alpha_prev * x0 + sigma_prev * eps, with x0 / eps from the teacher.

    ``scheduler`` is a DDIM-compatible diffusers scheduler; its config decides the spacing,
    ``clip_sample`` and the final alpha (``set_alpha_to_one``), exactly as DDIMScheduler does.
    """
    schedule: VPSchedule = teacher.schedule
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    cfg = scheduler.config
    final_alpha_bar = 1.0 if cfg.get("set_alpha_to_one", True) else float(schedule.alphas_cumprod[0])
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="DDIM")):
        t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x0, eps = teacher.predict_x0_eps(x, t_batch, cond, guidance_scale=guidance_scale)
        if cfg.get("clip_sample", False):  # as DDIMScheduler: clip x0, keep the unclipped eps
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        prev = ddim_prev_timestep(scheduler, int(t))
        ab_prev = torch.tensor(final_alpha_bar if prev < 0 else float(schedule.alphas_cumprod[prev]), dtype=torch.float64)
        x = ab_prev.sqrt().float() * x0 + (1 - ab_prev).sqrt().float() * eps
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def euler_flow_sample(
    teacher,
    cond,
    noise: torch.Tensor,
    scheduler,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    mu: float | None = None,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    sigmas=None,
) -> torch.Tensor:
    """Euler on dx/dsigma = u (velocity u = eps - x0) over the scheduler's sigmas.

    ``sigmas`` (optional) are custom sigmas handed to ``scheduler.set_timesteps`` before its
    shift, as FluxPipeline does (``np.linspace(1, 1 / n, n)``; see FluxTeacher.sampler_kwargs).
    """
    kwargs = {"mu": mu} if mu is not None else {}
    if sigmas is not None:
        kwargs["sigmas"] = sigmas
    scheduler.set_timesteps(num_inference_steps, device=noise.device, **kwargs)
    sigmas = scheduler.sigmas.to(noise.device)
    x = noise
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="Euler")):
        t_batch = t.expand(x.shape[0]).to(x.device)
        u = teacher.predict(x, t_batch, cond, guidance_scale=guidance_scale, output="flow")
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * u.float()).to(noise.dtype)
        if callback is not None:
            callback(i, x)
    return x
