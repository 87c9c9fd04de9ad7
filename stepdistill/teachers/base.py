"""The one interface every teacher family implements.

A teacher wraps a stock diffusers model (and its text encoders / VAE where it has them) and
answers, for a noisy sample ``x_t`` at native timestep ``t`` under conditions ``cond``:

    teacher.predict(x_t, t, cond, guidance_scale=w, output="x0" | "epsilon" | "v_prediction" | "flow")

with classifier-free guidance in the project's convention (``uncond + w (cond - uncond)``,
``w = 1`` is no guidance; see :func:`stepdistill.schedule.classifier_free_guidance`).
Conversions between parameterizations are delegated to :mod:`stepdistill.schedule`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import StepdistillError
from ..schedule import NoiseSchedule, canonical_prediction_type, classifier_free_guidance


@dataclass
class Conditioning:
    """Encoded conditions for a batch, plus the matching "null" conditions used by CFG.

    ``cond`` / ``uncond`` map model keyword arguments (``class_labels``,
    ``encoder_hidden_states``, ``added_cond_kwargs``-style dicts, ...) to batched tensors.
    ``uncond`` is None for unconditional teachers. ``extra`` holds per-batch values that are
    the same for both branches (Flux's ``txt_ids``/``img_ids``, SDXL's ``time_ids`` ...).
    """

    cond: dict[str, Any] = field(default_factory=dict)
    uncond: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int | None:
        for value in _tensors(self.cond):
            return int(value.shape[0])
        return None

    def to(self, device=None, dtype=None) -> "Conditioning":
        return replace(
            self,
            cond=_map(self.cond, device, dtype),
            uncond=None if self.uncond is None else _map(self.uncond, device, dtype),
            extra=_map(self.extra, device, dtype),
        )

    def cat(self, other: "Conditioning") -> "Conditioning":
        """This batch followed by ``other`` (same keys; ``extra`` is shared and taken from self)."""
        join = lambda a, b: {k: _cat(a[k], b[k]) for k in a}  # noqa: E731
        uncond = None if self.uncond is None else join(self.uncond, other.uncond)
        return replace(self, cond=join(self.cond, other.cond), uncond=uncond)

    def index(self, idx) -> "Conditioning":
        """Select batch entries (a slice, an index tensor or a list)."""
        pick = lambda d: {k: _index(v, idx) for k, v in d.items()}  # noqa: E731
        return replace(self, cond=pick(self.cond), uncond=None if self.uncond is None else pick(self.uncond))


def _tensors(d: dict):
    for value in d.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            yield from _tensors(value)


def _map(d: dict, device, dtype):
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
        elif isinstance(v, dict):
            v = _map(v, device, dtype)
        out[k] = v
    return out


def _index(v, idx):
    if isinstance(v, torch.Tensor):
        return v[idx]
    if isinstance(v, dict):
        return {k: _index(x, idx) for k, x in v.items()}
    return v


def _cat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return a


class Teacher(nn.Module):
    """Base class of the family adapters in :mod:`stepdistill.teachers`.

    Subclasses set ``family``, ``schedule``, ``prediction_type`` (what the network outputs),
    ``scheduler`` (the diffusers scheduler the stock pipeline samples with) and implement
    :meth:`encode`, :meth:`model_output` and :meth:`sample_shape`. Latent families also
    implement :meth:`vae_encode` / :meth:`vae_decode`.
    """

    family: str = "base"
    is_latent: bool = False
    schedule: NoiseSchedule
    prediction_type: str
    scheduler: Any  # a diffusers scheduler

    # -- conditions ---------------------------------------------------------------------------
    def encode(self, conditions: Sequence[Any] | None, batch_size: int | None = None) -> Conditioning:
        """Encode a batch of conditions (class labels, prompts, or None for unconditional)."""
        raise NotImplementedError

    # -- network ------------------------------------------------------------------------------
    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], extra: dict[str, Any]) -> torch.Tensor:
        """One forward pass of the network with conditions ``cond``: its raw, native prediction."""
        raise NotImplementedError

    def guided_output(self, x_t: torch.Tensor, t, cond: Conditioning, guidance_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """The network's native prediction under CFG (one batched pass for both branches);
        ``guidance_scale``: one scale, or a tensor of one per sample."""
        t = self._timesteps(t, x_t)
        per_sample = torch.is_tensor(guidance_scale) and guidance_scale.ndim > 0  # one scale per sample
        if cond.uncond is None or (not per_sample and guidance_scale == 1.0):
            return self.model_output(x_t, t, cond.cond, cond.extra)
        both = {k: _cat(cond.uncond[k], cond.cond[k]) for k in cond.cond}
        out = self.model_output(torch.cat([x_t, x_t]), torch.cat([t, t]), both, self._double_extra(cond.extra))
        uncond, cond_out = out.chunk(2)
        return classifier_free_guidance(uncond, cond_out, guidance_scale)

    def _double_extra(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Extra inputs for a doubled CFG batch; families whose extras are batched override this."""
        return extra

    def predict(self, x_t: torch.Tensor, t, cond: Conditioning, guidance_scale: float = 1.0, output: str = "x0") -> torch.Tensor:
        """Guided prediction converted to ``output`` (x0 / sample, epsilon, v_prediction, flow)."""
        output = "sample" if output == "x0" else output
        t = self._timesteps(t, x_t)
        raw = self.guided_output(x_t, t, cond, guidance_scale)
        return self.schedule.convert(raw.float(), x_t.float(), t, self.prediction_type, canonical_prediction_type(output))

    def predict_x0_eps(self, x_t: torch.Tensor, t, cond: Conditioning, guidance_scale: float = 1.0):
        """Both (x0, eps) from one guided prediction -- what DDIM-style samplers need."""
        t = self._timesteps(t, x_t)
        raw = self.guided_output(x_t, t, cond, guidance_scale)
        return self.schedule.to_x0_eps(raw.float(), x_t.float(), t, self.prediction_type)

    @staticmethod
    def _timesteps(t, x_t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return t

    # -- the stock pipeline -------------------------------------------------------------------
    @property
    def denoiser_name(self) -> str:
        """The pipeline component (and teacher attribute) holding the network: "unet" or "transformer"."""
        raise NotImplementedError(f"{type(self).__name__} does not name its denoiser")

    @property
    def denoiser(self) -> nn.Module:
        """The network :meth:`model_output` runs (UNet or transformer)."""
        return getattr(self, self.denoiser_name)

    def build_pipeline(self, denoiser: nn.Module, scheduler):
        """The family's stock diffusers pipeline object around ``denoiser`` (the teacher's own
        network or a student) and ``scheduler``, sharing this teacher's other components (text
        encoders, tokenizers, VAE) -- the same objects, not copies. ``save_pretrained`` on it
        writes a directory that ``DiffusionPipeline.from_pretrained`` loads without stepdistill."""
        raise NotImplementedError(f"build_pipeline is not implemented for teacher family {self.family!r}")

    # -- shapes and VAE -----------------------------------------------------------------------
    def sample_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """Shape of one sample in the space the network works in (C, H, W) -- latents for latent families."""
        raise NotImplementedError

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> (scaled, shifted) latents. Pixel teachers: identity."""
        return images

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]. Pixel teachers: identity."""
        return latents

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype




# -- running another network through a teacher's adapter ---------------------------------------
def denoiser_name(teacher) -> str:
    """The attribute holding the teacher's denoising network ("unet" or "transformer")."""
    for name in ("unet", "transformer"):
        if isinstance(getattr(teacher, name, None), nn.Module):
            return name
    raise StepdistillError(f"{type(teacher).__name__} has no 'unet' or 'transformer' network")


class PreparedNetwork:
    """A role as ``accelerator.prepare`` returned it (a DDP wrapper) seen as its network: calls go
    through the wrapper (its hooks run), attributes (``dtype``, ``config``) come from the network."""

    def __init__(self, prepared: nn.Module):
        self.prepared = prepared
        self.network = prepared.module

    def __call__(self, *args, **kwargs):
        return self.prepared(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.network, name)


def with_network(teacher, network: nn.Module):
    """A shallow copy of the teacher adapter whose denoiser is ``network`` (everything else shared).
    ``network`` may be a prepared (DDP-wrapped) role: the adapter then calls it through the wrapper."""
    import copy

    clone = copy.copy(teacher)
    clone._modules = dict(teacher._modules)
    name = denoiser_name(teacher)
    if hasattr(network, "module") and not hasattr(network, "config"):  # a DDP / accelerate wrapper
        clone._modules.pop(name)
        clone.__dict__[name] = PreparedNetwork(network)
    else:
        clone._modules[name] = network
    return clone


__all__ = ["Conditioning", "PreparedNetwork", "Teacher", "denoiser_name", "with_network"]
