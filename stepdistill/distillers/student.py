"""Few-step students: a copy of the teacher's network, run by the teacher's own adapter, sampled
with the scheduler it is exported with, and written as a stock diffusers artefact.

- :func:`with_network`: the teacher's adapter (encoders, VAE, parameterization, CFG) running
  another network in place of its denoiser -- so a student (or a fake score) is called exactly
  like the teacher, for every family.
- :class:`StudentSampler`: the student's K-step sampling loop, driven by the ``scheduler``
  object that export writes (its ``set_timesteps(K)`` / ``scale_model_input`` / ``step``), used
  for backward simulation during training and for evaluation samples. There is no second list
  of timesteps.
- :func:`save_student_pipeline`: a pipeline directory -- our ``ClassConditionalPipeline`` for
  class-conditional pixel teachers, a stock ``DDIMPipeline`` / ``DDPMPipeline`` for
  unconditional ones, the family's stock pipeline (``teacher.build_pipeline``) otherwise.
- :func:`save_student_lora`: a LoRA student as a diffusers LoRA file (``load_lora_weights``)
  plus its scheduler, for the untouched teacher pipeline.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import StepdistillError
from ..sampling import make_student_scheduler, student_timesteps
from ..teachers.base import PreparedNetwork, denoiser_name, with_network  # noqa: F401 (re-exported)


def pipeline_timestep_kwargs(teacher, sample_shape, num_steps: int) -> dict:
    """What the family's stock pipeline passes to ``scheduler.set_timesteps`` besides the step
    count: nothing for VP teachers; ``mu`` (resolution shift) and ``sigmas`` for Flux."""
    kwargs = teacher.sampler_kwargs(sample_shape, num_steps) if hasattr(teacher, "sampler_kwargs") else {}
    return {k: v for k, v in kwargs.items() if v is not None}


class StudentSampler:
    """The K-step sampler of a student: the exported scheduler's own loop.

    ``timestep_kwargs(steps)`` gives what the stock pipeline passes to ``set_timesteps`` besides
    the step count (Flux: ``mu`` and ``sigmas``).
    """

    def __init__(self, scheduler, num_steps: int, timestep_kwargs: Callable[[int], Mapping[str, Any]] | None = None):
        self.scheduler = scheduler
        self.num_steps = num_steps
        self.timestep_kwargs = timestep_kwargs or (lambda steps: {})
        self.timesteps = student_timesteps(scheduler, num_steps, **self.timestep_kwargs(num_steps))
        self._takes_generator = "generator" in inspect.signature(scheduler.step).parameters

    @classmethod
    def for_teacher(cls, teacher, num_steps: int, sample_shape, scheduler=None) -> "StudentSampler":
        """``scheduler`` defaults to :func:`~stepdistill.sampling.make_student_scheduler`'s."""
        scheduler = scheduler if scheduler is not None else make_student_scheduler(teacher.scheduler, num_steps)
        return cls(scheduler, num_steps, lambda steps: pipeline_timestep_kwargs(teacher, sample_shape, steps))

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

    def step_levels(self, schedule, num_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What each step of the ``num_steps``-step loop does: (the timestep it feeds the network,
        alpha and sigma of the sample it writes). ``DDIMScheduler.step`` writes at the timestep
        ``num_train_timesteps // K`` below (past 0: its final alpha, 1 with ``set_alpha_to_one``);
        ``FlowMatchEulerDiscreteScheduler.step`` at the next sigma of its list (the last is 0).
        Every step reads its (x0, eps) at its own timestep, as both schedulers do."""
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        from ..sampling import ddim_prev_timestep

        steps = num_steps or self.num_steps
        probe = copy.deepcopy(self.scheduler)
        probe.set_timesteps(steps, device="cpu", **self.timestep_kwargs(steps))
        labels = probe.timesteps.clone()
        if isinstance(probe, FlowMatchEulerDiscreteScheduler):
            sigma = probe.sigmas[1 : steps + 1].float()
            return labels, 1.0 - sigma, sigma
        if isinstance(probe, DDIMScheduler):
            prev = torch.tensor([ddim_prev_timestep(probe, int(t)) for t in labels])
            alpha_bar = torch.where(prev >= 0, schedule.alpha_bar(prev.clamp(min=0)), torch.tensor(float(probe.final_alpha_cumprod), dtype=torch.float64))
            return labels, alpha_bar.sqrt().float(), (1 - alpha_bar).sqrt().float()
        raise StepdistillError(f"{type(probe).__name__}: step levels are defined for DDIMScheduler and FlowMatchEulerDiscreteScheduler students")

    def start_level(self, schedule) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha and sigma the loop treats its starting noise as (the first timestep's)."""
        alpha, sigma = schedule.alpha_sigma(self.timesteps[:1])
        return alpha.reshape(()).float(), sigma.reshape(()).float()

    @torch.no_grad()
    def rollout(self, adapter, noise: torch.Tensor, cond, num_steps: int, *, total_steps: int | None = None,
                guidance_scale: float = 1.0, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Inputs the student sees at steps 0..num_steps of a ``total_steps``-step run (default K):
        ``[x_T, x_{t_1}, ...]`` from its own earlier steps, computed as the pipeline computes them."""
        total = total_steps or self.num_steps
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(total, device=noise.device, **self.timestep_kwargs(total))
        scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)  # flow schedulers have none
        extra = {"generator": generator} if self._takes_generator else {}
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        inputs = [x]
        for t in scheduler.timesteps[:num_steps]:
            out = adapter.guided_output(scale(x, t), t, cond, guidance_scale)
            x = scheduler.step(out, t, x, **extra, return_dict=False)[0]
            inputs.append(x)
        return inputs

    @torch.no_grad()
    def sample(self, adapter, noise: torch.Tensor, cond, num_steps: int | None = None, **kwargs) -> torch.Tensor:
        steps = num_steps or self.num_steps
        return self.rollout(adapter, noise, cond, steps, total_steps=steps, **kwargs)[-1]


# -- export -----------------------------------------------------------------------------------
def save_student_pipeline(
    teacher,
    network: nn.Module,
    scheduler,
    num_steps: int,
    output_dir: str | os.PathLike,
    *,
    guidance_scale: float = 1.0,
    trained_guidance_range: tuple[float, float] | None = None,
    metrics=None,
    metrics_command: str | None = None,
    model_card_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the student as a pipeline directory with the scheduler it was trained for.

    ``guidance_scale``: the pipeline's default (a w-conditioned student's w; baked-in students 1).
    """
    from ..export import write_pipeline_directory, save_class_conditional_pipeline, save_unconditional_pipeline

    model_card_info = _with_base_model(teacher, model_card_info)
    card = dict(metrics=metrics, metrics_command=metrics_command, model_card_info=model_card_info, overwrite=overwrite)
    if teacher.family == "pixel":
        if getattr(network.config, "num_class_embeds", None) is not None:
            return save_class_conditional_pipeline(
                network, scheduler, output_dir, num_inference_steps=num_steps, guidance_scale=guidance_scale,
                trained_guidance_range=trained_guidance_range, **card,
            )
        return save_unconditional_pipeline(network, scheduler, output_dir, num_inference_steps=num_steps, **card)
    pipe = teacher.build_pipeline(network, scheduler)
    return write_pipeline_directory(output_dir, overwrite, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True),
                            num_inference_steps=num_steps, guidance_scale=_pipeline_guidance(teacher, guidance_scale, trained_guidance_range),
                            model_card_info=model_card_info, metrics=metrics, metrics_command=metrics_command)


def save_adapter_pipeline(teacher, network: nn.Module, scheduler, num_steps: int, output_dir: str | os.PathLike, *,
                          guidance_scale: float = 1.0, trained_guidance_range=None, **card) -> Path:
    """LoRA adapters on a pixel teacher's untouched network (adapter guidance distillation): the
    teacher as a ``ClassConditionalPipeline`` directory (its base weights, unmerged) with the adapters
    next to it in ``pytorch_lora_weights.safetensors``::

        pipe = DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)   # the teacher, with CFG
        pipe.load_lora_weights(dir)          # guidance_scale now drives the adapters: one pass per step
        pipe.disable_lora()                  # the teacher again
    """
    from peft.utils import get_peft_model_state_dict

    from ..export import save_class_conditional_pipeline
    from .common import has_lora, lora_config, merge_lora

    if teacher.family != "pixel" or not has_lora(network):
        raise StepdistillError("save_adapter_pipeline writes LoRA adapters of a class-conditional pixel teacher")
    lora = (get_peft_model_state_dict(network), lora_config(network))
    return save_class_conditional_pipeline(merge_lora(network, merge=False), scheduler, output_dir, num_inference_steps=num_steps,
                                           guidance_scale=guidance_scale, trained_guidance_range=trained_guidance_range, lora=lora, **card)


def save_student_lora(
    teacher,
    network: nn.Module,
    scheduler,
    output_dir: str | os.PathLike,
    *,
    num_steps: int,
    guidance_scale: float = 1.0,
    metrics=None,
    metrics_command: str | None = None,
    model_card_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """A LoRA student as ``pytorch_lora_weights.safetensors`` (diffusers format) plus its scheduler
    under ``scheduler/``, for the stock teacher pipeline, and a model card whose snippet loads the
    teacher (``base_model``; default: the directory the teacher was loaded from)::

        pipe.scheduler = <SchedulerClass>.from_pretrained(dir, subfolder="scheduler")
        pipe.load_lora_weights(dir)
    """
    from peft.utils import get_peft_model_state_dict

    from ..export import write_pipeline_directory
    from .common import has_lora

    if not has_lora(network):
        raise StepdistillError("save_student_lora: this student has no LoRA (student.lora_rank is 0)")
    model_card_info = _with_base_model(teacher, model_card_info)
    pipeline_cls = type(teacher.build_pipeline(network, scheduler))
    layers = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(network).items()}

    def build(tmp: Path) -> None:
        # unet_lora_layers (SD / SDXL) or transformer_lora_layers (Flux, SD3)
        pipeline_cls.save_lora_weights(tmp, **{f"{denoiser_name(teacher)}_lora_layers": layers}, safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")

    return write_pipeline_directory(output_dir, overwrite, build, num_inference_steps=num_steps,
                            guidance_scale=_pipeline_guidance(teacher, guidance_scale), base_pipeline=pipeline_cls.__name__,
                            model_card_info=model_card_info, metrics=metrics, metrics_command=metrics_command)


def _with_base_model(teacher, model_card_info):
    """The card fields with ``base_model`` defaulting to the path the teacher was loaded from, as
    it was given (diffusers records it as the denoiser's ``_name_or_path``; empty for a teacher
    built in memory)."""
    from ..model_card import ModelCardInfo

    info = ModelCardInfo.coerce(model_card_info)
    loaded_from = getattr(teacher.denoiser.config, "_name_or_path", None)
    return info if info.base_model or not loaded_from else dataclasses.replace(info, base_model=loaded_from)


def _pipeline_guidance(teacher, guidance_scale: float, trained_guidance_range=None) -> float:
    """The ``guidance_scale`` the family's stock pipeline is called with: FluxPipeline's is FLUX.1-dev's
    embedded guidance, which the student was trained with (a w-conditioned Flux student reads it as
    its w); the others' is the student's own w."""
    if teacher.family == "flux" and trained_guidance_range is None:
        return teacher.embedded_guidance_scale if teacher.uses_embedded_guidance else 1.0
    return guidance_scale


__all__ = [
    "StudentSampler",
    "denoiser_name",
    "save_adapter_pipeline",
    "pipeline_timestep_kwargs",
    "save_student_lora",
    "save_student_pipeline",
    "with_network",
]
