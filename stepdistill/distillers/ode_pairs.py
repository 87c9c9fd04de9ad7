"""Teacher ODE couplings and how straight an ODE path is: shared by DMD's regression loss and reflow.

- :func:`ode_sample`: a network's deterministic sample from noise z -- DDIM (eta = 0: the
  probability-flow ODE of a VP teacher, on the teacher's own scheduler) or Euler on the flow
  ODE (flow-matching teachers, as their stock pipeline sets the sigmas);
- :func:`make_ode_pairs`: N couplings (z, sample(z)) cached as safetensors ``{noise, sample,
  condition_index}``: DMD's regression data, reflow's training couplings;
- :func:`path_deviation`: how far an ODE path bends away from the straight path between its
  ends (Liu et al. 2022, "Flow Straight and Fast": straightness).

A path sampled with the exported scheduler's loop visits x_0 = z (noise), x_1, ..., x_M (the
sample), x_k at the noise level (alpha_k, sigma_k) the loop writes it at. The *straight path*
between the ends is ``alpha_k x_M + sigma_k x_0``: for flow matching (alpha = 1 - sigma) the
straight line from z to the sample; for a VP schedule the path along which one DDIM step is
exact (a DDIM path whose x0 prediction never changes). The deviation is

    S = mean over intermediate k, samples and elements of (x_k - (alpha_k x_M + sigma_k x_0))^2

0 for a straight path; reflow lowers it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Mapping

import torch

from ..errors import RecipeError


@torch.no_grad()
def ode_sample(teacher, cond, noise: torch.Tensor, steps: int, guidance_scale: float = 1.0) -> torch.Tensor:
    """The deterministic ``steps``-step sample of ``teacher`` (or a student adapter) from ``noise``:
    DDIM on the teacher's own scheduler for VP schedules, Euler on the flow ODE otherwise."""
    from ..sampling import ddim_sample, euler_flow_sample

    scheduler = copy.deepcopy(teacher.scheduler)
    if teacher.schedule.kind == "vp":
        return ddim_sample(teacher, cond, noise, scheduler, steps, guidance_scale)
    kwargs = teacher.sampler_kwargs(tuple(noise.shape[1:]), steps) if hasattr(teacher, "sampler_kwargs") else {}
    return euler_flow_sample(teacher, cond, noise, scheduler, steps, guidance_scale, **kwargs)


@torch.no_grad()
def make_ode_pairs(teacher, pool, num_pairs: int, output: str | os.PathLike, *, steps: int, guidance_scale: float = 1.0,
                   shape: tuple[int, ...] | None = None, seed: int = 0, batch_size: int = 256) -> Path:
    """Noise z ~ N(0, I) and the ``steps``-step deterministic sample from z (guidance ``uncond + w
    (cond - uncond)``), conditions cycling through ``pool``; written to ``output`` (safetensors)."""
    from ..atomic import save_safetensors

    if num_pairs < 1:
        raise RecipeError(f"the number of ODE pairs must be >= 1; got {num_pairs}")
    shape = tuple(shape or teacher.sample_shape())
    device = teacher.device
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_pairs, *shape, generator=g)
    idx = torch.arange(num_pairs) % len(pool)
    samples = []
    for start in range(0, num_pairs, batch_size):
        sl = slice(start, start + batch_size)
        cond = pool.index(idx[sl].to(device))
        samples.append(ode_sample(teacher, cond, noise[sl].to(device), steps, guidance_scale).float().cpu())
    save_safetensors({"noise": noise, "sample": torch.cat(samples), "condition_index": idx}, output)
    return Path(output)


def load_ode_pairs(path: str | os.PathLike, what: str = "ODE pairs") -> Mapping[str, torch.Tensor]:
    """A cache written by :func:`make_ode_pairs` (a one-line error when it is missing or malformed)."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise RecipeError(f"{what} not found: {path} (make them with `stepdistill distill RECIPE --make-pairs N`)")
    pairs = load_file(os.fspath(path))
    missing = {"noise", "sample", "condition_index"} - set(pairs)
    if missing or pairs["noise"].shape != pairs["sample"].shape:
        raise RecipeError(f"{path} is not an ODE-pairs file (need noise, sample, condition_index of matching shapes)")
    return pairs


@torch.no_grad()
def ode_path(adapter, sampler, noise: torch.Tensor, cond, num_steps: int, guidance_scale: float = 1.0):
    """The points x_0 = noise, ..., x_M of the ``num_steps``-step loop of ``sampler`` (a
    :class:`~stepdistill.distillers.student.StudentSampler`) and the (alpha, sigma) of each."""
    points = sampler.rollout(adapter, noise, cond, num_steps, total_steps=num_steps, guidance_scale=guidance_scale)
    _, alpha, sigma = sampler.step_levels(adapter.schedule, num_steps)
    start_alpha, start_sigma = sampler.start_level(adapter.schedule)
    return points, torch.cat([start_alpha.reshape(1), alpha]), torch.cat([start_sigma.reshape(1), sigma])


@torch.no_grad()
def path_deviation(adapter, sampler, noise: torch.Tensor, cond, num_steps: int, guidance_scale: float = 1.0) -> float:
    """S: the mean squared deviation of the intermediate points of the ODE path from the straight
    path between its ends (see the module docstring); 0 for a straight path."""
    points, alpha, sigma = ode_path(adapter, sampler, noise, cond, num_steps, guidance_scale)
    start, end = points[0].float(), points[-1].float()
    total, count = 0.0, 0
    for k in range(1, len(points) - 1):
        straight = float(alpha[k]) * end + float(sigma[k]) * start
        total += float((points[k].float() - straight).pow(2).mean())
        count += 1
    if count == 0:
        raise RecipeError("path deviation needs at least 2 ODE steps")
    return total / count


__all__ = ["load_ode_pairs", "make_ode_pairs", "ode_path", "ode_sample", "path_deviation"]
