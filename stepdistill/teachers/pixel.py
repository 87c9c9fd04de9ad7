"""Pixel-space ``UNet2DModel`` teachers.

Two kinds of directory load here:

- stepdistill's class-conditional pipeline (the digits teacher and its students): a
  ``UNet2DModel`` with ``num_class_embeds = num_classes + 1``; the last class index is the
  *null class* used for classifier-free guidance (trained with label dropout).
- a stock unconditional ``DDPMPipeline`` / ``DDIMPipeline`` directory saved by anyone.

The scheduler decides the noise schedule: a VP (DDPM-type) schedule with ``beta_schedule``, or
``FlowMatchEulerDiscreteScheduler`` for a flow-matching pixel teacher (x_t = (1 - sigma) x0 +
sigma eps, the network predicts the velocity eps - x0 at timestep sigma * T; a ``DDPMPipeline``
samples it as it is, since that pipeline only calls ``scheduler.step``).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch
from diffusers import UNet2DModel

from ..errors import TeacherLoadError
from ..schedule import prediction_type_of, schedule_from_scheduler
from .base import Conditioning, Teacher


class PixelUNetTeacher(Teacher):
    family = "pixel"
    denoiser_name = "unet"
    is_latent = False

    def __init__(self, unet: UNet2DModel, scheduler, pipeline_class: str = "DDPMPipeline"):
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.pipeline_class = pipeline_class
        self.schedule = schedule_from_scheduler(scheduler)
        self.prediction_type = prediction_type_of(scheduler)

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> "PixelUNetTeacher":
        path = os.fspath(path)
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        class_name = index.get("_class_name")
        class_name = class_name[-1] if isinstance(class_name, (list, tuple)) else class_name
        scheduler = load_pixel_scheduler(path)
        try:
            unet = UNet2DModel.from_pretrained(path, subfolder="unet", torch_dtype=torch_dtype).eval()
        except (OSError, ValueError, EnvironmentError) as exc:
            raise TeacherLoadError(f"cannot load the UNet2DModel in {path}/unet: {str(exc).splitlines()[0]}") from None
        return cls(unet, scheduler, pipeline_class=class_name)

    # -- conditions ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        n = self.unet.config.num_class_embeds
        return None if n is None else n - 1

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def encode(self, conditions: Sequence[int] | torch.Tensor | None, batch_size: int | None = None) -> Conditioning:
        if self.num_classes is None:
            if conditions is not None:
                raise ValueError("this teacher is unconditional: pass conditions=None")
            return Conditioning()
        if conditions is None:
            raise ValueError(f"this teacher is class-conditional ({self.num_classes} classes): pass class labels")
        labels = torch.as_tensor(conditions, dtype=torch.long).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}); got {labels.tolist()}")
        null = torch.full_like(labels, self.null_class)
        return Conditioning(cond={"class_labels": labels}, uncond={"class_labels": null})

    # -- network ------------------------------------------------------------------------------
    def model_output(self, x_t, t, cond, extra):
        labels = cond.get("class_labels")
        return self.unet(x_t.to(self.unet.dtype), t, class_labels=labels).sample

    def sample_shape(self, height=None, width=None):
        size = self.unet.config.sample_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return (self.unet.config.in_channels, height or size[0], width or size[1])


def load_pixel_scheduler(path: str):
    """The scheduler of a pixel pipeline directory, if its noise schedule is one stepdistill
    distils: VP (DDPM-type: DDPM, DDIM, PNDM, DPM-Solver, Euler ... configs with ``beta_schedule``)
    or flow matching (``FlowMatchEulerDiscreteScheduler``). Variance-exploding (score SDE /
    Karras VE) and other flow schedulers are refused with a one-line error."""
    import diffusers

    config_path = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(config_path):
        raise TeacherLoadError(f"{path} has no scheduler/scheduler_config.json")
    with open(config_path) as f:
        config = json.load(f)
    name = config.get("_class_name")
    scheduler_cls = getattr(diffusers, str(name), None)
    if scheduler_cls is None:
        raise TeacherLoadError(f"{config_path}: unknown scheduler class {name!r}")
    flow = name == "FlowMatchEulerDiscreteScheduler"
    vp = "beta_schedule" in config and "FlowMatch" not in str(name) and config.get("prediction_type", "epsilon") in VP_PREDICTIONS
    if not (flow or vp):
        raise TeacherLoadError(
            f"{path}: scheduler {name} is not supported for pixel teachers: stepdistill distils VP (DDPM-type) noise "
            f"schedules with beta_schedule and prediction_type in {', '.join(VP_PREDICTIONS)} (DDPM, DDIM, PNDM, DPM-Solver, Euler ...) "
            "and flow matching with FlowMatchEulerDiscreteScheduler"
        )
    return scheduler_cls.from_config(config)


VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


__all__ = ["PixelUNetTeacher", "load_pixel_scheduler"]
