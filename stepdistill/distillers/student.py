"""Few-step students: a copy of the teacher's network, run by the teacher's own adapter, sampled
with the scheduler it is exported with.

- :func:`with_network`: the teacher's adapter (encoders, VAE, parameterization, CFG) running
  another network in place of its denoiser -- so a student (or a fake score) is called exactly
  like the teacher, for every family.
- :class:`StudentSampler`: the student's K-step sampling loop, driven by the ``scheduler``
  object that export writes (its ``set_timesteps(K)`` / ``step``), used both for backward
  simulation during training and for evaluation samples. There is no second list of timesteps.
- :func:`save_student_pipeline`: export as a drop-in diffusers pipeline directory
  (ClassConditionalPipeline for digits, StableDiffusion(XL)Pipeline, FluxPipeline).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import StepdistillError
from ..export import make_student_scheduler, student_timesteps


def denoiser_name(teacher) -> str:
    """The attribute holding the teacher's denoising network ("unet" or "transformer")."""
    for name in ("unet", "transformer"):
        if isinstance(getattr(teacher, name, None), nn.Module):
            return name
    raise StepdistillError(f"{type(teacher).__name__} has no 'unet' or 'transformer' network")


def pipeline_timestep_kwargs(teacher, sample_shape, num_steps: int) -> dict:
    """What the family's stock pipeline passes to ``scheduler.set_timesteps`` besides the step
    count: nothing for VP teachers; ``mu`` (resolution shift) and ``sigmas`` for Flux."""
    kwargs = teacher.sampler_kwargs(sample_shape, num_steps) if hasattr(teacher, "sampler_kwargs") else {}
    return {k: v for k, v in kwargs.items() if v is not None}


def with_network(teacher, network: nn.Module):
    """A shallow copy of the teacher adapter whose denoiser is ``network`` (everything else shared)."""
    clone = copy.copy(teacher)
    clone._modules = dict(teacher._modules)
    clone._modules[denoiser_name(teacher)] = network
    return clone


class StudentSampler:
    """The K-step sampler of a student: the exported scheduler's own loop.

    ``scheduler`` comes from :func:`~stepdistill.export.make_student_scheduler`; ``set_timesteps_kwargs``
    are what the stock pipeline passes besides the step count (Flux: ``mu`` and ``sigmas``).
    """

    def __init__(self, scheduler, num_steps: int, set_timesteps_kwargs: Mapping[str, Any] | None = None):
        self.scheduler = scheduler
        self.num_steps = num_steps
        self.kwargs = dict(set_timesteps_kwargs or {})
        self.timesteps = student_timesteps(scheduler, num_steps, **self.kwargs)

    @classmethod
    def for_teacher(cls, teacher, num_steps: int, sample_shape) -> "StudentSampler":
        scheduler = make_student_scheduler(teacher.scheduler, num_steps)
        return cls(scheduler, num_steps, pipeline_timestep_kwargs(teacher, sample_shape, num_steps))

    def check_timesteps(self, expected) -> None:
        """A recipe that writes its timesteps down must agree with the exported scheduler."""
        if expected is None:
            return
        want = [float(t) for t in expected]
        have = [float(t) for t in self.timesteps]
        if len(want) != len(have) or any(abs(a - b) > 1e-3 for a, b in zip(want, have)):
            raise StepdistillError(
                f"student.timesteps {want} do not match the exported scheduler's timesteps {have} "
                f"({type(self.scheduler).__name__}.set_timesteps({self.num_steps})); remove them or fix them"
            )

    def _fresh(self, device):
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(self.num_steps, device=device, **self.kwargs)
        return scheduler

    @torch.no_grad()
    def rollout(self, adapter, noise: torch.Tensor, cond, num_steps: int) -> list[torch.Tensor]:
        """Inputs the student sees at steps 0..num_steps: ``[x_T, x_{t_1}, ...]`` from its own
        earlier steps (guidance off), computed with ``scheduler.step`` as the pipeline does."""
        scheduler = self._fresh(noise.device)
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        inputs = [x]
        for t in scheduler.timesteps[:num_steps]:
            out = adapter.guided_output(x, t, cond, 1.0)
            x = scheduler.step(out, t, x, return_dict=False)[0]
            inputs.append(x)
        return inputs

    @torch.no_grad()
    def sample(self, adapter, noise: torch.Tensor, cond) -> torch.Tensor:
        return self.rollout(adapter, noise, cond, self.num_steps)[-1]


# -- export -----------------------------------------------------------------------------------
def save_student_pipeline(
    teacher,
    network: nn.Module,
    sampler: StudentSampler,
    output_dir: str | os.PathLike,
    *,
    metrics=None,
    metrics_command: str | None = None,
    model_card_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the student as the teacher family's stock pipeline with the student's scheduler."""
    from ..export import _write_directory, save_class_conditional_pipeline
    from ..model_card import PipelineUsage

    scheduler, steps = sampler.scheduler, sampler.num_steps
    if teacher.family == "pixel":
        return save_class_conditional_pipeline(
            network, scheduler, output_dir, num_inference_steps=steps, guidance_scale=1.0, metrics=metrics,
            metrics_command=metrics_command, model_card_info=model_card_info, overwrite=overwrite,
        )
    pipe = build_pipeline(teacher, network, scheduler)
    # FluxPipeline's guidance_scale is FLUX.1-dev's embedded guidance, which the student was trained with.
    guidance = getattr(teacher, "embedded_guidance_scale", 1.0) if teacher.family == "flux" else 1.0
    usage = PipelineUsage(pipeline_class=type(pipe).__name__, num_inference_steps=steps, guidance_scale=guidance)

    def build(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)

    return _write_directory(output_dir, overwrite, build, usage, model_card_info, metrics, metrics_command)


def build_pipeline(teacher, network: nn.Module, scheduler):
    """The stock diffusers pipeline object of the teacher's family around ``network``."""
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = {name: getattr(teacher, name) for name in teacher.component_names}
    parts[denoiser_name(teacher)] = network
    parts["scheduler"] = scheduler
    if teacher.family == "sd":
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if teacher.family == "sdxl":
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt, add_watermarker=False)
    if teacher.family == "flux":
        return FluxPipeline(**parts)
    raise StepdistillError(f"no stock pipeline export for teacher family {teacher.family!r}")


__all__ = ["StudentSampler", "build_pipeline", "denoiser_name", "pipeline_timestep_kwargs", "save_student_pipeline", "with_network"]
