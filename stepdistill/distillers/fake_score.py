"""The fake score and its GAN head: shared by every distiller that tracks the student's own
distribution with a second score network (DMD / DMD2, and the score-distillation family).

- :class:`FakeScore`: a copy of the teacher's denoiser (or a LoRA on the teacher's own frozen
  weights), trained online with the denoising loss on the student's samples, so it follows the
  score of the student's distribution. It is called like the teacher (through the teacher's
  adapter), and through its role's prepared (DDP) wrapper: ``ctx.model("fake_score")(x_t, t, cond)``.
- :func:`denoising_loss`: that online update -- the teacher's own denoising loss, in its native
  parameterization, on the student's (detached) samples, optionally on the fake score's CFG
  output (SiD-LSG); :func:`drop_conditions`: the condition dropout that teaches its unconditional branch.
- the real score: the frozen teacher with CFG (one scale, or one per sample) -- the same network
  with the LoRA switched off when the fake score is a LoRA on it (:meth:`FakeScore.real_score`).
- a GAN on the fake score's bottleneck features, read by a forward hook (the network's forward
  is untouched): :func:`bottleneck`, a learnt :class:`DiscriminatorHead` (DMD2) or the
  parameter-free :func:`encoder_logits` (SiDA), :func:`discriminator_loss`, :func:`generator_gan_loss`.
  Real samples run the encoder alone (:meth:`FakeScore.encode`, DMD2's ``classify_mode``, SiDA's
  ``return_flag='encoder'``): the forward stops at the bottleneck, the decoder's half is not paid.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StepdistillError
from ..teachers.base import Conditioning
from .common import add_lora, lora_disabled
from .student import denoiser_name, with_network


@dataclass
class FakeScoreSection:
    """Recipe section ``fake_score:`` (DMD / DMD2, VSD, SiD, SiDA)."""

    lora_rank: int = 0  # > 0: a LoRA on the frozen teacher instead of a second full copy
    lora_target_modules: list[str] = field(default_factory=list)


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


def encoder_logits(features: torch.Tensor) -> torch.Tensor:
    """SiDA's discriminator: no head, the fake score's encoder (bottleneck) features averaged over
    channels -- one logit per location ([B, h, w] for UNets, [B, tokens] for transformers)."""
    return features.float().mean(dim=1 if features.ndim == 4 else -1)


def discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN critic loss: softplus(D(fake)) + softplus(-D(real)) (= the binary
    cross-entropy of fake -> 0, real -> 1), averaged over every logit."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def generator_gan_loss(fake_logits: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Non-saturating GAN generator loss: softplus(-D(fake)), averaged over every logit, or over
    each sample's logits (``per_sample``: [B], for losses weighted per sample as SiDA's)."""
    loss = F.softplus(-fake_logits)
    return loss.flatten(1).mean(dim=1) if per_sample else loss.mean()


class _ReachedBottleneck(Exception):
    """Raised by the bottleneck hook to end an encoder-only pass (:meth:`FakeScore.encode`)."""


class FakeScore(nn.Module):
    """The fake-score network (see the module docstring). ``last_features`` holds what the
    latest full forward pass produced at the bottleneck when a GAN head reads it."""

    def __init__(self, teacher, network: nn.Module, shares_teacher_weights: bool, gan: bool):
        super().__init__()
        self.network = network
        self.shares_teacher_weights = shares_teacher_weights
        self.__dict__["teacher"] = teacher  # not a submodule: the teacher is its own (frozen) role
        self.last_features: torch.Tensor | None = None
        self._encoder_only = False
        if gan:
            module, _, _ = bottleneck(network)
            self._hook = module.register_forward_hook(self._catch)

    def _catch(self, module, args, output):
        features = output[-1] if isinstance(output, (tuple, list)) else output
        if self._encoder_only:
            raise _ReachedBottleneck(features)
        self.last_features = features

    def encode(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The bottleneck features of an encoder-only pass (no CFG): the network runs up to the
        bottleneck and stops there (the hook raises), so the decoder half is neither run nor
        backpropagated. Called on this module, not its DDP wrapper: the gradients reach the same
        parameters and are all-reduced with the full pass's in the one backward. ``last_features``
        keeps the full pass's."""
        return self.run_to_bottleneck(lambda: self(x_t, t, cond))

    @property
    def encoding(self) -> bool:
        """True while an encoder-only pass runs (``stepdistill bench overhead`` records it as one)."""
        return self._encoder_only

    def run_to_bottleneck(self, forward: Callable[[], Any]) -> torch.Tensor:
        """Run ``forward`` (a call that runs :attr:`network`) up to the bottleneck; its features."""
        if not hasattr(self, "_hook"):
            raise StepdistillError("FakeScore.encode needs the bottleneck hook: build the fake score with gan=True")
        self._encoder_only = True
        try:
            forward()
        except _ReachedBottleneck as reached:
            return reached.args[0]
        finally:
            self._encoder_only = False
        raise StepdistillError(f"the forward pass of {type(self.network).__name__} never reached its bottleneck")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond, guidance_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """The fake score's native prediction (what the teacher's network outputs), with CFG
        ``uncond + w (cond - uncond)`` when ``guidance_scale`` (one, or one per sample) is not 1."""
        return with_network(self.teacher, self.network).guided_output(x_t, t, cond, guidance_scale)

    def real_score(self, x_t, t, cond, guidance_scale: float | torch.Tensor, output: str = "x0", grad: bool = False) -> torch.Tensor:
        """The frozen teacher's prediction with CFG (the base weights when the fake score is a LoRA
        on them). ``grad``: differentiable in ``x_t`` (SiD backpropagates through the teacher; its
        weights stay frozen)."""
        with torch.set_grad_enabled(grad):
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


# -- the fake score's online update -------------------------------------------------------------
def denoising_loss(fake, schedule, prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                   guidance_scale: float = 1.0) -> torch.Tensor:
    """Per-sample denoising loss of the fake score on the student's samples ``x0`` (detached):
    ``|| fake(x_t, t) - target ||^2`` in the network's native parameterization, x_t = alpha_t x0 +
    sigma_t eps -- the loss the teacher was trained with, so the fake score follows the score of
    the student's distribution (DMD's fake-score loss, VSD's LoRA loss, SiD's fake-score loss).

    ``guidance_scale`` != 1: the loss is on the fake score's CFG output (SiD-LSG's kappa_1).
    """
    x0 = x0.detach()
    x_t = schedule.add_noise(x0, eps, t)
    target = schedule.from_x0_eps(x0, eps, t, prediction_type)
    out = fake(x_t, t, cond, guidance_scale)
    return (out.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def drop_conditions(cond: Conditioning, drop: torch.Tensor) -> Conditioning:
    """``cond`` with the samples where ``drop`` [B] is true replaced by the null condition (CFG's
    unconditional branch), so a fake score trained on it learns its own unconditional score too."""
    if cond.uncond is None or not bool(drop.any()):
        return cond

    def pick(c, u):
        if isinstance(c, dict):
            return {k: pick(c[k], u[k]) for k in c}
        if torch.is_tensor(c) and c.ndim > 0 and c.shape[0] == drop.shape[0]:
            return torch.where(drop.reshape(-1, *([1] * (c.ndim - 1))).to(c.device), u.to(c.dtype), c)
        return c

    return replace(cond, cond=pick(cond.cond, cond.uncond))


def discriminator_role(configs, backprop_from=()):
    """``stepdistill plan``'s role of the GAN head on the fake score's bottleneck: its size and
    inputs from a meta forward of the denoiser (made once per teacher, so estimates of recipe
    variants share it); fp32: the head upcasts its features."""
    from ..planning import RoleSpec

    if configs.discriminator is None:
        configs.discriminator = _discriminator_parts(configs)
    factory, features = configs.discriminator
    return RoleSpec("discriminator", module_factory=factory, trainable="full", batch_factor=2, example_inputs=features,
                    backprop_from=backprop_from)


def _discriminator_parts(configs):
    from ..planning import RoleSpec, build_on_meta
    from ..planning.activations import example_inputs

    network = build_on_meta(RoleSpec("probe", config=configs.denoiser))
    module, channels, spatial = bottleneck(network)
    shapes: dict[tuple[int, int], torch.Size] = {}

    def feature_shape(h: int, w: int) -> torch.Size:
        if (h, w) not in shapes:
            def catch(m, args, out):  # returns None: the output is left as it is
                shapes[(h, w)] = (out[-1] if isinstance(out, (tuple, list)) else out).shape

            hook = module.register_forward_hook(catch)
            try:
                with torch.no_grad():
                    network(**example_inputs(network, 1, h, w, text_tokens=configs.text_tokens))
            finally:
                hook.remove()
        return shapes[(h, w)]

    def features(net, b, h, w, dtype):
        return {"features": torch.empty(b, *feature_shape(h, w)[1:], device="meta", dtype=dtype)}

    return (lambda: DiscriminatorHead(channels, spatial)), features


__all__ = [
    "DiscriminatorHead",
    "FakeScore",
    "FakeScoreSection",
    "bottleneck",
    "build_fake_score",
    "denoising_loss",
    "discriminator_for",
    "discriminator_loss",
    "discriminator_role",
    "drop_conditions",
    "encoder_logits",
    "generator_gan_loss",
]
