# Hybrid inference of a few-step student with its teacher (stepdistill).
#
# "Distilling Diversity and Control in Diffusion Models" (Gandikota & Bau, 2025): a distilled
# student loses sample diversity, and the diversity of a sample is decided in its first steps;
# running the TEACHER for the first k steps and the student for the rest restores it at the
# cost of k teacher evaluations.
#
# This file is self-contained: exported pipeline directories carry a copy of it, and
#   diffusers.DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)
# loads it without stepdistill installed. The directory holds both networks:
# - `unet`: the student (a diffusers `UNet2DModel`, `num_class_embeds = num_classes + 1`; the
#   last class index is the null class of classifier-free guidance);
# - `teacher_unet`: the teacher, same layout and the same parameterization (`prediction_type`);
# - `scheduler`: the student's (its K-step timesteps are the ones both networks run at).
#
# Step i of the K-step loop runs the teacher when i < teacher_steps, else the student; guidance
# `uncond + w * (cond - uncond)` (w = 1: none) with `teacher_guidance_scale` on teacher steps and
# `guidance_scale` on student steps. teacher_steps = 0 is the student alone, teacher_steps = K
# the teacher alone on the student's timesteps. Defaults (model_index.json): the number of steps,
# the student's guidance, teacher_steps and the teacher's guidance the directory was exported with.

from __future__ import annotations

from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class HybridClassConditionalPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "teacher_unet->unet"

    def __init__(
        self,
        unet: UNet2DModel,
        teacher_unet: UNet2DModel,
        scheduler,
        default_num_inference_steps: int = 4,
        default_guidance_scale: float = 1.0,
        default_teacher_steps: int = 1,
        default_teacher_guidance_scale: float = 1.0,
    ):
        super().__init__()
        self.register_modules(unet=unet, teacher_unet=teacher_unet, scheduler=scheduler)
        self.register_to_config(
            default_num_inference_steps=int(default_num_inference_steps),
            default_guidance_scale=float(default_guidance_scale),
            default_teacher_steps=int(default_teacher_steps),
            default_teacher_guidance_scale=float(default_teacher_guidance_scale),
        )

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1

    @property
    def null_class(self) -> int:
        return self.num_classes

    def _check_labels(self, class_labels) -> torch.Tensor:
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = torch.as_tensor(class_labels)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers; got {labels.dtype}")
        labels = labels.to(torch.long).reshape(-1)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class_labels must lie in [0, {self.num_classes}); got {labels.tolist()}")
        return labels

    def _guided(self, network, latents, t, labels, guidance_scale: float):
        """The network's output under CFG (one batched pass for both branches)."""
        guided = guidance_scale != 1.0
        model_in = torch.cat([latents, latents]) if guided else latents
        model_labels = torch.cat([torch.full_like(labels, self.null_class), labels]) if guided else labels
        if hasattr(self.scheduler, "scale_model_input"):  # flow schedulers feed the sample as it is
            model_in = self.scheduler.scale_model_input(model_in, t)
        t_batch = t.expand(model_in.shape[0]) if torch.is_tensor(t) else torch.full((model_in.shape[0],), t)
        out = network(model_in, t_batch.to(model_in.device), class_labels=model_labels).sample
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, List[int], torch.Tensor],
        guidance_scale: Optional[float] = None,
        teacher_steps: Optional[int] = None,
        teacher_guidance_scale: Optional[float] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
        eta: float = 0.0,
    ):
        """Sample one image per entry of ``class_labels``: the teacher for the first
        ``teacher_steps`` of ``num_inference_steps`` steps, the student for the rest.

        Returns an ``ImagePipelineOutput`` whose ``images`` are PIL images, a float array of
        shape (batch, height, width, channels) in [0, 1] ("np"), or a tensor of shape
        (batch, channels, height, width) in [0, 1] ("pt").
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt'; got {output_type!r}")
        cfg = self.config
        num_inference_steps = cfg.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = cfg.default_guidance_scale if guidance_scale is None else guidance_scale
        teacher_steps = cfg.default_teacher_steps if teacher_steps is None else teacher_steps
        teacher_guidance_scale = cfg.default_teacher_guidance_scale if teacher_guidance_scale is None else teacher_guidance_scale
        if not 0 <= int(teacher_steps) <= int(num_inference_steps):
            raise ValueError(f"teacher_steps must lie in [0, num_inference_steps={num_inference_steps}]; got {teacher_steps}")
        labels = self._check_labels(class_labels).to(self._execution_device)
        size = self.unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        shape = (labels.shape[0], self.unet.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
        latents = latents.to(self._execution_device) * getattr(self.scheduler, "init_noise_sigma", 1.0)

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        step_kwargs = {}
        parameters = _parameters(self.scheduler.step)
        if "eta" in parameters:
            step_kwargs["eta"] = eta
        if "generator" in parameters:
            step_kwargs["generator"] = generator
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            teacher = i < teacher_steps
            network = self.teacher_unet if teacher else self.unet
            out = self._guided(network, latents, t, labels, teacher_guidance_scale if teacher else guidance_scale)
            latents = self.scheduler.step(out, t, latents, **step_kwargs).prev_sample

        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result = images
        else:
            result = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


def _parameters(fn):
    import inspect

    return inspect.signature(fn).parameters
