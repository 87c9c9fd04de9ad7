"""The guidance scale w as an input of the student network, shared by every family that trains
one network for a range of w (w-conditioned LCM, guidance distillation).

Convention: w as in ``uncond + w (cond - uncond)`` (w = 1: no guidance). Each network takes w
exactly the way the family's stock diffusers pipeline feeds its ``guidance_scale``, so the
exported pipeline's ``guidance_scale`` argument drives the student (and that pipeline then runs
no CFG pass of its own):

- UNets (``UNet2DConditionModel``; pixel ``UNet2DModel`` through our ``GuidanceUNet2DModel``):
  ``timestep_cond = get_guidance_scale_embedding(w - 1)`` into ``time_cond_proj_dim`` -- what
  diffusers' SD / SDXL / LCM pipelines compute when the UNet has that input;
- Flux (``FluxTransformer2DModel`` with ``guidance_embeds``): ``guidance = w``, what
  ``FluxPipeline`` passes from its ``guidance_scale``.

:func:`w_conditioned_copy` builds the student from the teacher's network (the new w input starts
at zero, so the student starts as the teacher at w = 1); :class:`GuidanceInput` is the forward
pre-hook that hands w to it during training and in-memory sampling; :func:`cfg_output` is the
teacher's CFG output with one w per sample.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn

from ..errors import RecipeError, StepdistillError


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """What diffusers' SD/SDXL/LCM pipelines feed to ``time_cond_proj_dim``: the embedding of
    ``guidance_scale - 1`` (our w minus one = LCM's w'), computed by the stock pipeline's function."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, (w - 1).float(), embedding_dim=dim)


def check_guidance(guidance_scale: float, trained_range) -> None:
    """Warn when a w-conditioned student is asked for a w outside the range it was trained on."""
    lo, hi = trained_range
    if not lo - 1e-6 <= float(guidance_scale) <= hi + 1e-6:
        warnings.warn(
            f"guidance_scale {guidance_scale:g} is outside the range [{lo:g}, {hi:g}] this student's w-embedding was "
            "trained on: expect off-distribution samples",
            UserWarning,
            stacklevel=3,
        )


def takes_guidance(network: nn.Module) -> str:
    """How ``network`` takes w: "timestep_cond" (UNets with ``time_cond_proj_dim``) or "guidance" (Flux)."""
    if getattr(network.config, "time_cond_proj_dim", None) is not None:
        return "timestep_cond"
    if getattr(network.config, "guidance_embeds", False):
        return "guidance"
    raise StepdistillError(f"{type(network).__name__} has no guidance input (time_cond_proj_dim / guidance_embeds)")


class GuidanceInput:
    """Forward pre-hook that passes w to a w-conditioned network: the teacher adapters call the
    student exactly like the teacher, this adds (or replaces) the one input that carries w --
    ``timestep_cond`` = embedding(w - 1) for UNets, ``guidance`` = w for Flux."""

    def __init__(self, kind: str, dim: int | None = None):
        if kind not in ("timestep_cond", "guidance"):
            raise ValueError(f"unknown guidance input {kind!r}")
        self.kind = kind
        self.dim = dim
        self.w: torch.Tensor | None = None

    @classmethod
    def attach(cls, network: nn.Module) -> "GuidanceInput":
        """A hook for ``network`` (built by :func:`w_conditioned_copy`), registered on it."""
        kind = takes_guidance(network)
        hook = cls(kind, network.config.time_cond_proj_dim if kind == "timestep_cond" else None)
        network.register_forward_pre_hook(hook, with_kwargs=True)
        return hook

    def __deepcopy__(self, memo):  # copies of the network (EMA, export) share the hook (and its w)
        return self

    def __call__(self, module, args, kwargs):
        if self.w is None:
            raise StepdistillError("a w-conditioned student was called without a guidance scale")
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        w = self.w.to(x.device).reshape(-1)
        w = w.expand(x.shape[0]) if w.numel() == 1 else w.repeat(x.shape[0] // w.numel())
        if self.kind == "timestep_cond":
            kwargs["timestep_cond"] = guidance_embedding(w, self.dim).to(x.device, x.dtype)
        else:  # FluxPipeline: guidance = guidance_scale per sample (the transformer scales it by 1000 itself)
            kwargs["guidance"] = w.float()
        return args, kwargs

    @contextlib.contextmanager
    def at(self, w: torch.Tensor):
        self.w, old = torch.as_tensor(w), self.w
        try:
            yield
        finally:
            self.w = old


def w_conditioned_copy(network: nn.Module, dim: int) -> nn.Module:
    """A copy of the teacher's network that takes w, with the teacher's weights and the w input
    starting at zero (so it starts as the teacher at w = 1):

    - ``UNet2DConditionModel`` (SD / SDXL): the same class with ``time_cond_proj_dim = dim``;
    - ``UNet2DModel`` (pixel teachers): our ``GuidanceUNet2DModel`` (UNet2DModel + that input);
    - ``FluxTransformer2DModel``: with ``guidance_embeds`` (its guidance embedder zero-initialised);
      a teacher that already has one (FLUX.1-dev) keeps it and learns to read it as w.
    """
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel, UNet2DModel

    from ..pipelines.guidance_unet_2d import GuidanceUNet2DModel

    if isinstance(network, FluxTransformer2DModel):
        if network.config.guidance_embeds:
            return copy.deepcopy(network)
        cls, extra, new = FluxTransformer2DModel, {"guidance_embeds": True}, "time_text_embed.guidance_embedder."
    elif isinstance(network, UNet2DConditionModel):
        cls, extra, new = UNet2DConditionModel, {"time_cond_proj_dim": dim}, "time_embedding.cond_proj"
    elif isinstance(network, UNet2DModel):
        cls, extra, new = GuidanceUNet2DModel, {"time_cond_proj_dim": dim}, "time_embedding.cond_proj"
    else:
        raise RecipeError(
            f"a w input needs a UNet (UNet2DConditionModel / UNet2DModel) or a Flux transformer; this teacher's network is "
            f"{type(network).__name__}: use a fixed guidance (guidance_range [w, w]) instead"
        )
    config = {k: v for k, v in network.config.items() if not k.startswith("_")}
    student = cls.from_config({**config, **extra})
    missing, unexpected = student.load_state_dict(network.state_dict(), strict=False)
    if unexpected or any(not k.startswith(new) for k in missing):
        raise StepdistillError(f"cannot copy the teacher into a w-conditioned network (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cls is FluxTransformer2DModel:
        last = student.time_text_embed.guidance_embedder.linear_2
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    else:
        nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(network.dtype)


@torch.no_grad()
def cfg_output(teacher, x_t: torch.Tensor, t, cond, w: torch.Tensor) -> torch.Tensor:
    """The teacher's native prediction under CFG with one w per sample: ``uncond + w (cond - uncond)``
    (the conditional branch alone where every w is 1)."""
    from ..teachers.base import Conditioning

    cond_out = teacher.guided_output(x_t, t, cond, 1.0).float()
    w = torch.as_tensor(w, device=x_t.device, dtype=torch.float32).reshape(-1)
    if not bool((w != 1).any()):
        return cond_out
    if cond.uncond is None:
        raise RecipeError("a guidance scale above 1 needs a teacher with an unconditional branch (CFG)")
    uncond_out = teacher.guided_output(x_t, t, Conditioning(cond=cond.uncond, extra=cond.extra), 1.0).float()
    w = w.expand(x_t.shape[0]) if w.numel() == 1 else w
    return uncond_out + w.reshape(-1, *([1] * (x_t.ndim - 1))) * (cond_out - uncond_out)


__all__ = ["GuidanceInput", "cfg_output", "check_guidance", "guidance_embedding", "takes_guidance", "w_conditioned_copy"]
