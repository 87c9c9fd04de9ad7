"""Stable Diffusion XL teachers (``StableDiffusionXLPipeline`` checkpoints).

SDXL conditions on two CLIP text encoders: the penultimate hidden states of both, concatenated
(``encoder_hidden_states``), and the projected pooled embedding of the second
(``text_embeds``); plus the micro-conditioning ``time_ids`` = (original height, original width,
crop top, crop left, target height, target width), all in ``added_cond_kwargs``.

All three live in ``Conditioning.cond`` / ``uncond`` as batched tensors, so the base class's
CFG doubling (uncond first, as the pipeline) concatenates them correctly. ``time_ids`` are put
there only when :meth:`encode` is given sizes; otherwise :meth:`model_output` derives the
pipeline's defaults from the latent size: original = target = (H, W) * vae_scale_factor, crop (0, 0).

The CFG null branch follows the pipeline's ``force_zeros_for_empty_prompt`` (True for SDXL
base): zero embeddings rather than the encoded empty prompt.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .base import Conditioning
from .latent import LatentTeacher, load_single_file_pipeline
from .text import TextEmbeddingCache, clip_penultimate_and_pooled


class StableDiffusionXLTeacher(LatentTeacher):
    family = "sdxl"
    denoiser_name = "unet"
    pipeline_class_name = "StableDiffusionXLPipeline"
    component_names = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        scheduler,
        force_zeros_for_empty_prompt: bool = True,
        text_cache: TextEmbeddingCache | None = None,
    ):
        super().__init__(vae, scheduler, text_cache)
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self._freeze()

    @property
    def denoiser(self):
        return self.unet

    def _pipeline_kwargs(self):
        return {"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt, "add_watermarker": False}

    @classmethod
    def _pipeline_options(cls, options):
        return {"force_zeros_for_empty_prompt": bool(options.get("force_zeros_for_empty_prompt", True))}

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        config: str | os.PathLike | None = None,
        original_config: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ) -> "StableDiffusionXLTeacher":
        """An original-format SDXL checkpoint (e.g. ``sd_xl_base_1.0.safetensors``); offline, pass
        ``config`` (a local diffusers SDXL directory) or ``original_config``."""
        from diffusers import StableDiffusionXLPipeline

        pipe = load_single_file_pipeline(
            StableDiffusionXLPipeline, path, config=config, original_config=original_config,
            torch_dtype=torch_dtype, allow_pickle=allow_pickle,
        )
        return cls.from_pipeline(pipe, **kwargs)

    # -- conditions ---------------------------------------------------------------------------
    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden_1, _ = clip_penultimate_and_pooled(self.text_encoder, self.tokenizer, prompts)
        hidden_2, pooled = clip_penultimate_and_pooled(self.text_encoder_2, self.tokenizer_2, prompts)
        hidden = torch.cat([hidden_1, hidden_2], dim=-1).to(self.text_encoder_2.dtype)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}

    def _uncond_like(self, cond):
        if self.force_zeros_for_empty_prompt:
            return {k: torch.zeros_like(v) for k, v in cond.items()}
        return super()._uncond_like(cond)

    def encode(
        self,
        prompts: str | Sequence[str] | None,
        batch_size: int | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> Conditioning:
        """Prompts -> Conditioning. Give ``original_size`` / ``target_size`` (pixels, (H, W)) or a
        crop to fix SDXL's micro-conditioning; without sizes it follows the sampled resolution."""
        conditioning = super().encode(prompts, batch_size)
        if original_size is not None or target_size is not None or tuple(crops_coords_top_left) != (0, 0):
            if original_size is None or target_size is None:
                raise ValueError("pass both original_size and target_size (pixels, (height, width))")
            batch = conditioning.batch_size
            time_ids = self.time_ids(original_size, crops_coords_top_left, target_size, batch)
            conditioning.cond["time_ids"] = time_ids
            conditioning.uncond["time_ids"] = time_ids.clone()
        return conditioning

    def time_ids(self, original_size, crops_coords_top_left, target_size, batch_size: int) -> torch.Tensor:
        """SDXL's ``add_time_ids``: [batch, 6] = original (H, W) + crop (top, left) + target (H, W)."""
        values = list(original_size) + list(crops_coords_top_left) + list(target_size)
        dtype = self.text_encoder_2.dtype
        return torch.tensor([values], dtype=dtype, device=self.device).repeat(batch_size, 1)

    # -- network ------------------------------------------------------------------------------
    def model_output(self, x_t, t, cond, extra):
        time_ids = cond.get("time_ids")
        if time_ids is None:
            size = (x_t.shape[-2] * self.vae_scale_factor, x_t.shape[-1] * self.vae_scale_factor)
            time_ids = self.time_ids(size, (0, 0), size, x_t.shape[0])
        hidden = cond["encoder_hidden_states"]
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids.to(hidden.dtype)}
        return self.unet(x_t.to(self.unet.dtype), t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    def sample_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """Latent (C, H, W) for an image of ``height`` x ``width`` pixels (default: 1024 for SDXL base)."""
        height, width = self._default_size(height, width, self.unet.config.sample_size)
        return (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)


__all__ = ["StableDiffusionXLTeacher"]
