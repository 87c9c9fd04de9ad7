"""The fake score and its GAN head: shared by every distiller that tracks the student's own
distribution with a second score network (DMD / DMD2, and the score-distillation family).

- :class:`FakeScore`: a copy of the teacher's denoiser (or a LoRA on the teacher's own frozen
  weights), trained online with the denoising loss on the student's samples, so it follows the
  score of the student's distribution. It is called like the teacher (through the teacher's
  adapter), and through its role's prepared (DDP) wrapper: ``ctx.model("fake_score")(x_t, t, cond)``.
- the real score: the frozen teacher with CFG -- the same network with the LoRA switched off
  when the fake score is a LoRA on it (:meth:`FakeScore.real_score`).
- a GAN head on the fake score's bottleneck features, read by a forward hook (the network's
  forward is untouched): :func:`bottleneck`, :class:`DiscriminatorHead`, :func:`discriminator_loss`.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StepdistillError
from .common import add_lora, lora_disabled
from .student import denoiser_name, with_network


def bottleneck(network: nn.Module) -> tuple[nn.Module, int, bool]:
    """(module whose output is the bottleneck, its channels, spatial?) for UNets and transformers."""
    if getattr(network, "mid_block", None) is not None:
        return network.mid_block, int(network.config.block_out_channels[-1]), True
    blocks = list(getattr(network, "transformer_blocks", [])) + list(getattr(network, "single_transformer_blocks", []))
    if blocks:
        c = network.config
        return blocks[len(blocks) // 2], int(c.num_attention_heads * c.attention_head_dim), False
    raise StepdistillError(f"cannot find a bottleneck (mid_block / transformer_blocks) in {type(network).__name__} for the GAN head")


class DiscriminatorHead(nn.Module):
    """Bottleneck features -> one logit per sample (spatial maps or token sequences)."""

    def __init__(self, channels: int, spatial: bool, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        self.spatial = spatial
        if spatial:
            self.net = nn.Sequential(
                nn.GroupNorm(math.gcd(32, channels), channels), nn.SiLU(),
                nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1),
            )
        else:
            self.norm = nn.LayerNorm(channels)
            self.proj = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU())
            self.out = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.spatial:
            # contiguous: mid-block attention hands back channels-last strides, whose GroupNorm
            # backward crashes on CPU in torch 2.13
            return self.net(features.float().contiguous()).squeeze(1)
        return self.out(self.proj(self.norm(features.float())).mean(dim=1)).squeeze(1)


def discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN critic loss: softplus(D(fake)) + softplus(-D(real))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN generator loss: softplus(-D(fake))."""
    return F.softplus(-fake_logits).mean()


class FakeScore(nn.Module):
    """The fake-score network (see the module docstring). ``last_features`` holds what the
    latest forward pass produced at the bottleneck when a GAN head reads it."""

    def __init__(self, teacher, network: nn.Module, shares_teacher_weights: bool, gan: bool):
        super().__init__()
        self.network = network
        self.shares_teacher_weights = shares_teacher_weights
        self.__dict__["teacher"] = teacher  # not a submodule: the teacher is its own (frozen) role
        self.last_features: torch.Tensor | None = None
        if gan:
            module, _, _ = bottleneck(network)
            self._hook = module.register_forward_hook(self._catch)

    def _catch(self, module, args, output):
        self.last_features = output[-1] if isinstance(output, (tuple, list)) else output

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """The fake score's native prediction (what the teacher's network outputs)."""
        return with_network(self.teacher, self.network).guided_output(x_t, t, cond, guidance_scale)

    @torch.no_grad()
    def real_score(self, x_t, t, cond, guidance_scale: float, output: str = "x0") -> torch.Tensor:
        """The frozen teacher's prediction with CFG (the base weights when the fake score is a LoRA on them)."""
        if self.shares_teacher_weights:
            with lora_disabled(self.network):
                return self.teacher.predict(x_t, t, cond, guidance_scale=guidance_scale, output=output)
        return self.teacher.predict(x_t, t, cond, guidance_scale=guidance_scale, output=output)


def build_fake_score(teacher, lora_rank: int, lora_targets: Sequence[str], gan: bool) -> FakeScore:
    """A second full copy of the teacher's denoiser, or (``lora_rank > 0``) a LoRA named
    "fake_score" on the teacher's own frozen weights (no second copy in memory)."""
    base = getattr(teacher, denoiser_name(teacher))
    if lora_rank > 0:
        network = add_lora(base, lora_rank, lora_targets, adapter_name="fake_score", what="fake_score")
    else:
        network = copy.deepcopy(base).requires_grad_(True)
    return FakeScore(teacher, network, shares_teacher_weights=lora_rank > 0, gan=gan)


def discriminator_for(fake: FakeScore) -> DiscriminatorHead:
    _, channels, spatial = bottleneck(fake.network)
    return DiscriminatorHead(channels, spatial)


__all__ = [
    "DiscriminatorHead",
    "FakeScore",
    "bottleneck",
    "build_fake_score",
    "discriminator_for",
    "discriminator_loss",
    "generator_gan_loss",
]
