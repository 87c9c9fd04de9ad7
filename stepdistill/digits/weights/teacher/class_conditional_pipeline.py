# A class-conditional pixel-space diffusion pipeline (stepdistill).
#
# This file is self-contained: exported pipeline directories carry a copy of it, and
#   diffusers.DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)
# loads it without stepdistill installed. Calling convention follows diffusers' DiTPipeline.
#
# Conventions:
# - `unet` is a diffusers `UNet2DModel` with `num_class_embeds = num_classes + 1`; the last
#   class index is the null class ("no label") used for classifier-free guidance.
# - guidance: `uncond + guidance_scale * (cond - uncond)`; guidance_scale = 1 means no guidance.
#   A UNet whose config has `time_cond_proj_dim` (a w-conditioned consistency student, e.g.
#   `unet/guidance_unet_2d.py`) takes the guidance scale as an input instead, exactly as
#   diffusers' LCM pipelines feed it: `timestep_cond = embedding(guidance_scale - 1)`, one pass,
#   no CFG. `trained_guidance_range` (model_index.json) is the range of w it was trained on: a
#   guidance_scale outside it warns.
# - the scheduler's `prediction_type` says what the network predicts; any diffusers scheduler
#   with `set_timesteps` / `step` works (DDIM, DDPM, LCM, TCD, Euler, ...), flow-matching ones
#   (FlowMatchEulerDiscreteScheduler: the network predicts the velocity) included.
# - `default_num_inference_steps` / `default_guidance_scale` (stored in model_index.json) are
#   what a call without those arguments uses: a 2-step student samples 2 steps by default.
# - LoRA adapters of the UNet load as in diffusers' pipelines: `pipe.load_lora_weights(dir)`
#   reads `pytorch_lora_weights.safetensors` (diffusers' format: keys `unet.<module>.lora_A.weight`,
#   the peft LoraConfig in the safetensors metadata, as `save_lora_weights` writes it), and
#   `disable_lora()` / `enable_lora()` / `unload_lora_weights()` switch them off, on, or remove
#   them (the UNet's own weights are never changed). A *guidance adapter* (adapter guidance
#   distillation; the file's metadata says `"guidance_adapter": "guidance_scale - 1"`) is driven by
#   `guidance_scale`: the adapters run at strength `guidance_scale - 1` (none at 1, where the
#   UNet is the untouched conditional model) in one pass per step, no CFG; switched off, the
#   pipeline is the untouched model with CFG again.

from __future__ import annotations

import json
import os
import warnings
from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, StableDiffusionPipeline, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the peft LoraConfig
GUIDANCE_ADAPTER_KEY = "guidance_adapter"  # metadata: this LoRA's strength is guidance_scale - 1


class ClassConditionalPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler,
        default_num_inference_steps: int = 50,
        default_guidance_scale: float = 1.0,
        trained_guidance_range: Optional[List[float]] = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(
            default_num_inference_steps=int(default_num_inference_steps),
            default_guidance_scale=float(default_guidance_scale),
            trained_guidance_range=None if trained_guidance_range is None else [float(w) for w in trained_guidance_range],
        )

    @property
    def num_classes(self) -> int:
        if self.unet.config.num_class_embeds is None:
            raise ValueError("this UNet has no class embedding (num_class_embeds is None): use DDIMPipeline for unconditional models")
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

    # -- LoRA adapters (diffusers' load_lora_weights API, for a UNet2DModel) --------------------
    def load_lora_weights(self, pretrained_model_name_or_path: str, weight_name: str = LORA_WEIGHT_NAME, adapter_name: str = "default"):
        """Inject the UNet LoRA saved in ``pretrained_model_name_or_path`` (a directory holding
        ``weight_name``, or the file itself) as adapter ``adapter_name``."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors import safe_open

        path = pretrained_model_name_or_path
        path = os.path.join(path, weight_name) if os.path.isdir(path) else path
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k[len("unet."):]: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")}
        if not state or LORA_METADATA_KEY not in metadata:
            raise ValueError(f"{path} holds no UNet LoRA with its config ({LORA_METADATA_KEY} metadata)")
        config = {k[len("unet."):]: v for k, v in json.loads(metadata[LORA_METADATA_KEY]).items() if k.startswith("unet.")}
        inject_adapter_in_model(LoraConfig(**config), self.unet, adapter_name=adapter_name)
        unexpected = set_peft_model_state_dict(self.unet, state, adapter_name=adapter_name).unexpected_keys
        if unexpected:
            raise ValueError(f"{path}: LoRA weights for modules this UNet lacks: {unexpected[:3]}")
        self.unet.requires_grad_(False)
        guidance = metadata.get(GUIDANCE_ADAPTER_KEY)
        self._guidance_adapters = {**getattr(self, "_guidance_adapters", {}), adapter_name: guidance is not None}
        self.enable_lora()

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.unet.modules() if isinstance(m, LoraLayer)]

    def disable_lora(self):
        """Run the UNet's own weights (a guidance adapter's pipeline samples with CFG again)."""
        for layer in self._lora_layers():
            layer.enable_adapters(False)

    def enable_lora(self):
        for layer in self._lora_layers():
            layer.enable_adapters(True)

    def unload_lora_weights(self):
        """Remove every LoRA: the UNet is its own untouched modules again."""
        from peft.tuners.lora import LoraLayer

        for name, module in list(self.unet.named_modules()):
            if isinstance(module, LoraLayer):
                parent, _, child = name.rpartition(".")
                setattr(self.unet.get_submodule(parent) if parent else self.unet, child, module.get_base_layer())
        self._guidance_adapters = {}

    @property
    def guidance_adapter_active(self) -> bool:
        """A loaded guidance adapter is switched on: ``guidance_scale`` drives it, no CFG."""
        layers = self._lora_layers()
        active = any(getattr(self, "_guidance_adapters", {}).values())
        return active and bool(layers) and not layers[0].disable_adapters

    def _set_guidance_strength(self, strength: float):
        for layer in self._lora_layers():
            for name, is_guidance in self._guidance_adapters.items():
                if is_guidance and name in layer.scaling:
                    layer.set_scale(name, strength)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, List[int], torch.Tensor],
        guidance_scale: Optional[float] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
        eta: float = 0.0,
    ):
        """Sample one image per entry of ``class_labels`` (ints in ``[0, num_classes)``).

        ``num_inference_steps`` / ``guidance_scale`` default to the values the directory was
        exported with (``default_num_inference_steps`` / ``default_guidance_scale``).
        Returns an ``ImagePipelineOutput`` whose ``images`` are PIL images, a float array of
        shape (batch, height, width, channels) in [0, 1] ("np"), or a tensor of shape
        (batch, channels, height, width) in [0, 1] ("pt").
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt'; got {output_type!r}")
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        labels = self._check_labels(class_labels).to(self._execution_device)
        batch = labels.shape[0]
        size = self.unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        shape = (batch, self.unet.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
        latents = latents.to(self._execution_device) * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at sigma 1

        timestep_cond = None
        cond_dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        adapters = self.guidance_adapter_active
        trained = getattr(self.config, "trained_guidance_range", None)
        if (cond_dim is not None or adapters) and trained and not trained[0] - 1e-6 <= float(guidance_scale) <= trained[1] + 1e-6:
            warnings.warn(
                f"guidance_scale {guidance_scale:g} is outside the range [{trained[0]:g}, {trained[1]:g}] this "
                f"student's {'w-embedding' if cond_dim is not None else 'guidance adapter'} was trained on: expect off-distribution samples",
                UserWarning,
                stacklevel=2,
            )
        if cond_dim is not None:  # the student takes w itself: one pass, no CFG
            w = torch.full((batch,), float(guidance_scale) - 1.0)
            timestep_cond = StableDiffusionPipeline.get_guidance_scale_embedding(self, w, embedding_dim=cond_dim)
            timestep_cond = timestep_cond.to(self._execution_device, self.unet.dtype)
        if adapters:  # the adapters carry the guidance: strength w - 1, one pass, no CFG
            self._set_guidance_strength(float(guidance_scale) - 1.0)
        guided = guidance_scale != 1.0 and timestep_cond is None and not adapters
        if guided:
            null = torch.full_like(labels, self.null_class)
            model_labels = torch.cat([null, labels])
        else:
            model_labels = labels

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        step_kwargs = {}
        if "eta" in _parameters(self.scheduler.step):
            step_kwargs["eta"] = eta
        if "generator" in _parameters(self.scheduler.step):
            step_kwargs["generator"] = generator
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents, latents]) if guided else latents
            if hasattr(self.scheduler, "scale_model_input"):  # flow schedulers feed the sample as it is
                model_in = self.scheduler.scale_model_input(model_in, t)
            t_batch = t.expand(model_in.shape[0]) if torch.is_tensor(t) else torch.full((model_in.shape[0],), t)
            extra = {} if timestep_cond is None else {"timestep_cond": timestep_cond}
            out = self.unet(model_in, t_batch.to(model_in.device), class_labels=model_labels, **extra).sample
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
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
