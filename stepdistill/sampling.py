"""Deterministic samplers driven by a :class:`~stepdistill.teachers.base.Teacher` (or any
callable with the same ``predict`` signature, such as a student wrapper).

They take their timesteps / sigmas from a diffusers scheduler object -- the same object an
exported pipeline samples with -- and do the update with :mod:`stepdistill.schedule`, so they
reproduce the stock diffusers pipelines step for step:

- :func:`ddim_sample`: DDIM (eta = 0) for VP teachers, as ``DDIMScheduler.step``.
- :func:`euler_flow_sample`: Euler on the flow ODE, as ``FlowMatchEulerDiscreteScheduler.step``.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .schedule import VPSchedule


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
