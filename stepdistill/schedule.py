"""Noise schedules and parameterizations: the ONE place where eps / x0 / v / velocity meet.

Every schedule writes a noisy sample as

    x_t = alpha(t) * x0 + sigma(t) * eps

with ``t`` the *native timestep* of the diffusers scheduler that drives the model (an integer
index in ``[0, num_train_timesteps)`` for VP schedules, ``sigma * num_train_timesteps`` for
flow matching, exactly what ``scheduler.timesteps`` holds and what the network is fed).

Parameterizations (the ``prediction_type`` names diffusers uses, plus ``"flow"``):

- ``"epsilon"``: the noise ``eps``
- ``"sample"``: the clean sample ``x0``
- ``"v_prediction"``: ``v = alpha * eps - sigma * x0`` (Salimans & Ho)
- ``"flow"``: the rectified-flow velocity ``u = eps - x0`` (= dx_t/dsigma for alpha = 1 - sigma)

Conversions go through the pair (x0, eps); both directions are closed-form and hold for any
(alpha, sigma), so the same two functions serve VP and flow schedules. Distillers ask a teacher
for the quantity they need and never re-derive these formulas inline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")

# Diffusers spells a few things differently across schedulers; map them onto ours.
_PREDICTION_ALIASES = {"flow_prediction": "flow", "velocity": "flow", "v": "v_prediction", "x0": "sample", "eps": "epsilon"}


def canonical_prediction_type(name: str) -> str:
    key = _PREDICTION_ALIASES.get(name, name)
    if key not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {name!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    return key


def _bcast(coef: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient of shape [B] (or scalar) against a [B, ...] tensor."""
    coef = torch.as_tensor(coef, device=like.device, dtype=like.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1)))


def to_x0_eps(pred: torch.Tensor, x_t: torch.Tensor, alpha, sigma, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Recover (x0, eps) from a model output in any parameterization."""
    kind = canonical_prediction_type(prediction_type)
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if kind == "epsilon":
        eps = pred
        x0 = (x_t - s * eps) / a
    elif kind == "sample":
        x0 = pred
        eps = (x_t - a * x0) / s
    elif kind == "v_prediction":
        # x_t = a x0 + s eps,  v = a eps - s x0  =>  solve the 2x2 system.
        norm = a * a + s * s
        x0 = (a * x_t - s * pred) / norm
        eps = (s * x_t + a * pred) / norm
    else:  # flow: u = eps - x0
        x0 = (x_t - s * pred) / (a + s)
        eps = x0 + pred
    return x0, eps


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """Express (x0, eps) in the requested parameterization."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        a, s = _bcast(alpha, x0), _bcast(sigma, x0)
        return a * eps - s * x0
    return eps - x0


def convert(pred: torch.Tensor, x_t: torch.Tensor, alpha, sigma, src: str, dst: str) -> torch.Tensor:
    """Convert a prediction between parameterizations at the point (x_t, alpha, sigma)."""
    if canonical_prediction_type(src) == canonical_prediction_type(dst):
        return pred
    x0, eps = to_x0_eps(pred, x_t, alpha, sigma, src)
    return from_x0_eps(x0, eps, alpha, sigma, dst)


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """CFG in the project's convention: ``uncond + w * (cond - uncond)``; ``w = 1`` is no guidance.

    (LCM and some video codebases write ``cond + w' * (cond - uncond)``: that ``w'`` is our
    ``w - 1``. Convert at the boundary with :func:`guidance_from_lcm_convention`.)
    Every parameterization above is affine in the prediction at fixed x_t, so guiding in the
    network's native parameterization equals guiding in x0 or eps. ``guidance_scale`` may be a
    tensor of one scale per sample.
    """
    if torch.is_tensor(guidance_scale) and guidance_scale.ndim > 0:  # one scale per sample (SNOOPI)
        guidance_scale = _bcast(guidance_scale.to(cond.dtype), cond)
    elif guidance_scale == 1.0:
        return cond
    return uncond + guidance_scale * (cond - uncond)


def guidance_from_lcm_convention(w_lcm: float) -> float:
    """``cond + w' (cond - uncond)`` (LCM) is our ``uncond + (w' + 1)(cond - uncond)``."""
    return w_lcm + 1.0


class NoiseSchedule:
    """alpha(t), sigma(t) over native timesteps, plus the conversions bound to them."""

    kind: str  # "vp" or "flow"
    num_train_timesteps: int

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return _bcast(a, x0) * x0 + _bcast(s, x0) * eps

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t, src: str, dst: str) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return convert(pred, x_t, a, s, src, dst)

    def to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str):
        a, s = self.alpha_sigma(t)
        return to_x0_eps(pred, x_t, a, s, prediction_type)

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t, prediction_type: str) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return from_x0_eps(x0, eps, a, s, prediction_type)

    def snr(self, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return (a / s) ** 2

    def timestep_for_noise_level(self, sigma_over_alpha: torch.Tensor) -> torch.Tensor:
        """The native timestep whose noise level sigma_t / alpha_t (EDM's sigma: x_t / alpha_t =
        x0 + sigma eps) is ``sigma_over_alpha``."""
        raise NotImplementedError


def betas_for(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The beta sequences of diffusers' DDPM/DDIM schedulers, in float32 as diffusers builds them."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
    raise ValueError(f"unsupported beta_schedule {beta_schedule!r}; expected linear, scaled_linear or squaredcos_cap_v2")


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, 'Common Diffusion Noise Schedules and Sample Steps are Flawed', Alg. 1."""
    sqrt_ab = alphas_cumprod.sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return sqrt_ab**2


@dataclass
class VPSchedule(NoiseSchedule):
    """Variance-preserving schedule: alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t)."""

    alphas_cumprod: torch.Tensor  # float64, [num_train_timesteps]

    kind = "vp"

    @property
    def num_train_timesteps(self) -> int:  # type: ignore[override]
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "VPSchedule":
        """Build from a diffusers DDPM/DDIM/Euler/LCM/TCD scheduler config (dict or FrozenDict)."""
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        else:
            betas = betas_for(
                config.get("beta_schedule", "linear"),
                int(config.get("num_train_timesteps", 1000)),
                float(config.get("beta_start", 0.0001)),
                float(config.get("beta_end", 0.02)),
            )
        # diffusers computes alphas_cumprod in float32; follow it so timesteps line up bit-for-bit.
        acp = torch.cumprod(1.0 - betas.float(), dim=0).double()
        if config.get("rescale_betas_zero_snr", False):
            # alpha_bar = 0 at the last timestep, as DDIM/DDPM/LCM/TCD keep it: only v / x0 / flow
            # predictions can be turned into x0 there (epsilon cannot, by construction).
            acp = rescale_zero_terminal_snr(acp)
        return cls(acp)

    def alpha_bar(self, t: torch.Tensor | float) -> torch.Tensor:
        """alpha_bar at native timesteps; non-integer t interpolates linearly between neighbours."""
        t = torch.as_tensor(t)
        acp = self.alphas_cumprod.to(t.device)
        if not torch.is_floating_point(t) or torch.equal(t, t.round()):
            return acp[t.long().clamp(0, len(acp) - 1)]
        t = t.double().clamp(0, len(acp) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(acp) - 1)
        w = t - lo.double()
        return acp[lo] * (1 - w) + acp[hi] * w

    def alpha_sigma(self, t):
        ab = self.alpha_bar(t)
        return ab.sqrt().float(), (1 - ab).sqrt().float()

    def timestep_for_noise_level(self, sigma_over_alpha: torch.Tensor) -> torch.Tensor:
        """The training timestep (an integer: what the network was trained on) whose noise level is
        nearest to ``sigma_over_alpha`` in log space."""
        acp = self.alphas_cumprod
        levels = ((1 - acp) / acp).sqrt().log()  # increasing in t
        target = torch.as_tensor(sigma_over_alpha, dtype=torch.float64).log().to("cpu")
        hi = torch.searchsorted(levels, target).clamp(1, len(levels) - 1)
        nearest = torch.where((target - levels[hi - 1]).abs() <= (levels[hi] - target).abs(), hi - 1, hi)
        return nearest.to(torch.as_tensor(sigma_over_alpha).device)


@dataclass
class FlowSchedule(NoiseSchedule):
    """Rectified-flow schedule (SD3, Flux): x_t = (1 - sigma) x0 + sigma eps, t = sigma * T.

    ``shift`` is the static time shift of SD3; with ``use_dynamic_shifting`` the shift depends
    on the image's token count through ``mu`` (Flux), as in diffusers' FlowMatchEulerDiscreteScheduler.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    kind = "flow"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FlowSchedule":
        keys = cls.__dataclass_fields__.keys()
        return cls(**{k: config[k] for k in keys if k in config and config[k] is not None})

    def sigma_of(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float32) / self.num_train_timesteps

    def alpha_sigma(self, t):
        s = self.sigma_of(t)
        return 1.0 - s, s

    def timestep_for_noise_level(self, sigma_over_alpha: torch.Tensor) -> torch.Tensor:
        """sigma / (1 - sigma) = r  =>  sigma = r / (1 + r); t = sigma x T (continuous)."""
        r = torch.as_tensor(sigma_over_alpha, dtype=torch.float32)
        return r / (1 + r) * self.num_train_timesteps

    def mu(self, image_seq_len: int) -> float:
        """Flux's dynamic-shift exponent: linear in the number of image tokens."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)

    def shift_sigmas(self, sigmas: torch.Tensor, image_seq_len: int | None = None) -> torch.Tensor:
        """Apply the static shift ``s*sigma / (1 + (s-1) sigma)`` or the dynamic exponential shift."""
        if self.use_dynamic_shifting:
            if image_seq_len is None:
                raise ValueError("this schedule uses dynamic shifting: pass image_seq_len")
            e = math.exp(self.mu(image_seq_len))
            return e / (e + (1 / sigmas - 1))
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)


def schedule_from_scheduler(scheduler_or_config) -> NoiseSchedule:
    """The schedule behind any diffusers scheduler (object or config dict)."""
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    class_name = config.get("_class_name", type(scheduler_or_config).__name__)
    if "FlowMatch" in str(class_name) or "shift" in config and "beta_schedule" not in config:
        return FlowSchedule.from_config(config)
    return VPSchedule.from_config(config)


def prediction_type_of(scheduler_or_config) -> str:
    """The model parameterization a diffusers scheduler expects (flow schedulers: velocity)."""
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if isinstance(schedule_from_scheduler(config), FlowSchedule):
        return "flow"
    return canonical_prediction_type(config.get("prediction_type", "epsilon"))
