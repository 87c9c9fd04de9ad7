"""Flux teachers (``FluxPipeline`` checkpoints: FLUX.1-dev, FLUX.1-schnell and fine-tunes).

Flux is a rectified-flow transformer: the network predicts the velocity ``u = eps - x0`` at
native timestep ``t = sigma * 1000`` (what ``FlowMatchEulerDiscreteScheduler.timesteps``
holds); the transformer itself takes ``t / 1000``, which :meth:`FluxTeacher.model_output` does.

Latent layout. ``predict`` / ``model_output`` take and return **unpacked** latents
``[B, C, H, W]`` (C = 16 for FLUX.1, H = W = 128 for 1024 px), like every other family, so
``sample_shape``, ``vae_encode`` and ``vae_decode`` speak the same layout. Packing into the 2x2
patch tokens ``[B, H/2 * W/2, 4C]`` the transformer reads, and the ``img_ids`` that go with
them, happen inside :meth:`model_output`. Packing is a fixed permutation, so an Euler step on
unpacked latents is the pipeline's step on packed ones, and FluxPipeline's initial noise is
exactly ``randn_tensor((B, C, H, W), generator)`` before packing.

Two guidance knobs, not to be confused:

- ``embedded_guidance_scale`` (teacher attribute, default 3.5 like FluxPipeline's
  ``guidance_scale``): FLUX.1-dev's *distilled* guidance, fed to the transformer's guidance
  embedding. Ignored by ``guidance_embeds=False`` checkpoints (schnell). ``encode(...,
  embedded_guidance_scale=g)`` overrides it for one Conditioning.
- ``guidance_scale`` in ``predict``: true classifier-free guidance with the empty prompt
  (FluxPipeline's ``true_cfg_scale`` with ``negative_prompt=""``); 1 disables it.

Sampling as FluxPipeline does needs its sigmas and the resolution-dependent shift ``mu``:
``euler_flow_sample(..., **teacher.sampler_kwargs(latent_shape, steps))``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import Conditioning
from .latent import LatentTeacher
from .text import TextEmbeddingCache, clip_pooled, t5_last_hidden_state


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2x2 patches as tokens, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width; got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Positions (0, row, col) of the packed tokens for latents of ``height`` x ``width``."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxTeacher(LatentTeacher):
    family = "flux"
    denoiser_name = "transformer"
    pipeline_class_name = "FluxPipeline"
    component_names = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        scheduler,
        embedded_guidance_scale: float = 3.5,
        max_sequence_length: int = 512,
        text_cache: TextEmbeddingCache | None = None,
    ):
        super().__init__(vae, scheduler, text_cache)
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.embedded_guidance_scale = float(embedded_guidance_scale)
        self.max_sequence_length = int(max_sequence_length)
        self._freeze()

    @property
    def denoiser(self):
        return self.transformer

    @property
    def uses_embedded_guidance(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    # -- conditions ---------------------------------------------------------------------------
    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pooled = clip_pooled(self.text_encoder, self.tokenizer, prompts).to(self.text_encoder.dtype)
        hidden = t5_last_hidden_state(self.text_encoder_2, self.tokenizer_2, prompts, self.max_sequence_length)
        return {"encoder_hidden_states": hidden.to(self.text_encoder_2.dtype), "pooled_projections": pooled}

    def _extra(self, cond):
        seq_len = cond["encoder_hidden_states"].shape[1]
        return {"txt_ids": torch.zeros(seq_len, 3, device=self.device, dtype=self.text_encoder.dtype)}

    def encode(
        self, prompts: str | Sequence[str] | None, batch_size: int | None = None, embedded_guidance_scale: float | None = None
    ) -> Conditioning:
        conditioning = super().encode(prompts, batch_size)
        if embedded_guidance_scale is not None:
            conditioning.extra["embedded_guidance_scale"] = float(embedded_guidance_scale)
        return conditioning

    # -- network ------------------------------------------------------------------------------
    def model_output(self, x_t, t, cond, extra):
        """Velocity for unpacked latents ``x_t`` [B, C, H, W] at native timesteps ``t`` (sigma * 1000)."""
        b, _, h, w = x_t.shape
        dtype = self.transformer.dtype
        hidden = cond["encoder_hidden_states"]
        guidance = None
        if self.uses_embedded_guidance:
            scale = extra.get("embedded_guidance_scale", self.embedded_guidance_scale)
            guidance = torch.full([b], scale, device=x_t.device, dtype=torch.float32)
        txt_ids = extra.get("txt_ids")
        if txt_ids is None:
            txt_ids = torch.zeros(hidden.shape[1], 3, device=x_t.device, dtype=hidden.dtype)
        tokens = self.transformer(
            hidden_states=pack_latents(x_t.to(dtype)),
            timestep=t.to(dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=txt_ids,
            img_ids=latent_image_ids(h, w, device=x_t.device, dtype=hidden.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(tokens, h, w)

    # -- shapes and sampling ------------------------------------------------------------------
    def sample_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """Unpacked latent (C, H, W) for ``height`` x ``width`` pixels (default 128 * vae_scale_factor),
        rounded as FluxPipeline rounds (H, W even)."""
        height, width = self._default_size(height, width, 128)
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels // 4, 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2)))

    def image_seq_len(self, latent_shape: Sequence[int]) -> int:
        """Number of packed image tokens for unpacked latents of shape (..., H, W)."""
        return (int(latent_shape[-2]) // 2) * (int(latent_shape[-1]) // 2)

    def mu(self, latent_shape: Sequence[int]) -> float:
        """The dynamic time-shift exponent FluxPipeline computes from the image token count."""
        return self.schedule.mu(self.image_seq_len(latent_shape))

    def sampling_sigmas(self, num_inference_steps: int) -> np.ndarray | None:
        """FluxPipeline's unshifted sigmas ``linspace(1, 1/n, n)`` (None for ``use_flow_sigmas`` schedulers)."""
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)

    def sampler_kwargs(self, latent_shape: Sequence[int], num_inference_steps: int) -> dict:
        """``mu`` and ``sigmas`` for :func:`stepdistill.sampling.euler_flow_sample`, as FluxPipeline sets them."""
        return {"mu": self.mu(latent_shape), "sigmas": self.sampling_sigmas(num_inference_steps)}


__all__ = ["FluxTeacher", "latent_image_ids", "pack_latents", "unpack_latents"]
