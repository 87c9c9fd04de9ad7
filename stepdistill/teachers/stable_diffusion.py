"""Stable Diffusion 1.x / 2.x teachers (``StableDiffusionPipeline`` checkpoints).

The UNet predicts ``epsilon`` (SD 1.x, SD 2.x-base) or ``v_prediction`` (SD 2.x 768-v): the
scheduler config says which, and :mod:`stepdistill.schedule` converts. Conditions are the CLIP
text encoder's last hidden state; the CFG null branch is the empty prompt, as in the stock
pipeline without a negative prompt. ``predict`` works on VAE latents ``[B, 4, H/8, W/8]``
scaled by ``vae.config.scaling_factor``.
"""

from __future__ import annotations

import os

import torch

from .latent import LatentTeacher, load_single_file_pipeline
from .text import TextEmbeddingCache, clip_last_hidden_state


class StableDiffusionTeacher(LatentTeacher):
    family = "sd"
    denoiser_name = "unet"
    pipeline_class_name = "StableDiffusionPipeline"
    component_names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, text_cache: TextEmbeddingCache | None = None):
        super().__init__(vae, scheduler, text_cache)
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._freeze()

    @property
    def denoiser(self):
        return self.unet

    def _pipeline_kwargs(self):
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        config: str | os.PathLike | None = None,
        original_config: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ) -> "StableDiffusionTeacher":
        """An original-format (LDM) SD checkpoint, e.g. ``v1-5-pruned-emaonly.safetensors``.

        Offline, pass ``config`` (a local diffusers SD directory of the same architecture) or
        ``original_config`` (the LDM ``.yaml``). See :func:`~stepdistill.teachers.latent.load_single_file_pipeline`.
        """
        from diffusers import StableDiffusionPipeline

        pipe = load_single_file_pipeline(
            StableDiffusionPipeline, path, config=config, original_config=original_config,
            torch_dtype=torch_dtype, allow_pickle=allow_pickle, safety_checker=None, feature_extractor=None,
        )
        return cls.from_pipeline(pipe, **kwargs)

    # -- conditions ---------------------------------------------------------------------------
    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": clip_last_hidden_state(self.text_encoder, self.tokenizer, prompts)}

    # -- network ------------------------------------------------------------------------------
    def model_output(self, x_t, t, cond, extra):
        return self.unet(x_t.to(self.unet.dtype), t, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def sample_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """Latent (C, H, W) for an image of ``height`` x ``width`` pixels (default: the UNet's native size)."""
        height, width = self._default_size(height, width, self.unet.config.sample_size)
        return (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)


__all__ = ["StableDiffusionTeacher"]
