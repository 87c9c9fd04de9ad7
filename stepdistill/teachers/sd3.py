"""Stable Diffusion 3 / 3.5 teachers (``StableDiffusion3Pipeline`` checkpoints).

SD3 is a rectified-flow MMDiT: ``SD3Transformer2DModel`` predicts the velocity ``u = eps - x0``
at native timestep ``t = sigma * 1000``, which it takes as is (unlike Flux, no ``/ 1000``).
Latents are ``[B, 16, H/8, W/8]`` (unpacked: the transformer patchifies them itself), scaled and
shifted by the VAE's ``scaling_factor`` / ``shift_factor``.

Conditions come from three text encoders, through the pipeline's own ``encode_prompt`` (run on
a pipeline object that shares this teacher's components; re-implementing it would only be a
second copy of the same concatenation and padding rules to keep in sync):

- ``encoder_hidden_states``: the penultimate hidden states of both CLIP encoders concatenated
  (768 + 1280), zero-padded to the T5 width (4096), followed along the sequence by the T5
  tokens (``max_sequence_length``, 256 by default as in the pipeline); zeros in place of the T5
  tokens when the checkpoint is loaded without ``text_encoder_3`` (as the pipeline does);
- ``pooled_projections``: both CLIP projected pooled embeddings concatenated (768 + 1280).

The CFG null branch is the empty prompt through all three encoders, what the pipeline uses
without a negative prompt. ``guidance_scale`` in ``predict`` is the pipeline's ``guidance_scale``
(``uncond + w (cond - uncond)``, w = 1 off). Skip-layer guidance (SD3.5) is not modelled.

Sampling as the pipeline does: ``euler_flow_sample(..., **teacher.sampler_kwargs(shape, steps))``
(empty for the static shift of SD3 / SD3.5; ``mu`` for schedulers with dynamic shifting).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .latent import LatentTeacher
from .text import TextEmbeddingCache


class StableDiffusion3Teacher(LatentTeacher):
    family = "sd3"
    denoiser_name = "transformer"
    pipeline_class_name = "StableDiffusion3Pipeline"
    component_names = (
        "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
        "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler",
    )
    optional_component_names = ("text_encoder_3", "tokenizer_3")

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        text_encoder_2,
        text_encoder_3,
        tokenizer,
        tokenizer_2,
        tokenizer_3,
        scheduler,
        max_sequence_length: int = 256,
        text_cache: TextEmbeddingCache | None = None,
    ):
        super().__init__(vae, scheduler, text_cache)
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.text_encoder_3 = text_encoder_3
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.tokenizer_3 = tokenizer_3
        self.max_sequence_length = int(max_sequence_length)
        self._freeze()

    def build_pipeline(self, denoiser, scheduler):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=denoiser,
            scheduler=scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3,
        )

    # -- conditions ---------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipe = self.build_pipeline(self.transformer, self.scheduler)  # references only: cheap
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, device=self.text_encoder.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    # -- network ------------------------------------------------------------------------------
    def model_output(self, x_t, t, cond, extra):
        """Velocity for latents ``x_t`` [B, C, H, W] at native timesteps ``t`` (sigma * 1000)."""
        return self.transformer(
            hidden_states=x_t.to(self.transformer.dtype),
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    # -- shapes and sampling ------------------------------------------------------------------
    def sample_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """Latent (C, H, W) for ``height`` x ``width`` pixels (default: the transformer's sample_size
        x vae_scale_factor, 1024 for SD3); both must be multiples of vae_scale_factor x patch_size."""
        height, width = self._default_size(height, width, self.transformer.config.sample_size)
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"SD3 needs height and width divisible by {multiple}; got {height}x{width}")
        return (self.transformer.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def image_seq_len(self, latent_shape: Sequence[int]) -> int:
        """Number of image tokens (patches) for latents of shape (..., H, W)."""
        p = self.transformer.config.patch_size
        return (int(latent_shape[-2]) // p) * (int(latent_shape[-1]) // p)

    def sampler_kwargs(self, latent_shape: Sequence[int], num_inference_steps: int) -> dict:
        """What StableDiffusion3Pipeline passes to ``set_timesteps``: ``mu`` from the image token
        count when the scheduler shifts dynamically, nothing for the static shift of SD3 / SD3.5."""
        if not getattr(self.scheduler.config, "use_dynamic_shifting", False):
            return {}
        return {"mu": self.schedule.mu(self.image_seq_len(latent_shape))}


__all__ = ["StableDiffusion3Teacher"]
