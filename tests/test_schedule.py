"""Noise schedules and parameterizations: every conversion pair inverts, schedules match diffusers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from stepdistill.schedule import (
    PREDICTION_TYPES,
    FlowSchedule,
    VPSchedule,
    canonical_prediction_type,
    classifier_free_guidance,
    convert,
    from_x0_eps,
    guidance_from_lcm_convention,
    prediction_type_of,
    schedule_from_scheduler,
    to_x0_eps,
)

VP_CONFIGS = [
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
]


def _point(seed: int, alpha: float, sigma: float):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    eps = torch.randn(3, 2, 4, 4, generator=g)
    a = torch.full((3,), alpha, dtype=torch.float64)
    s = torch.full((3,), sigma, dtype=torch.float64)
    x0, eps = x0.double(), eps.double()
    x_t = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    return x0, eps, x_t, a, s


# alpha, sigma pairs that are not degenerate (both > 0); VP (a^2+s^2=1) and flow (a+s=1) and generic.
coefficient = st.floats(min_value=0.02, max_value=1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**16), coefficient, coefficient, st.sampled_from(PREDICTION_TYPES))
def test_every_parameterization_recovers_x0_and_eps(seed, alpha, sigma, kind):
    x0, eps, x_t, a, s = _point(seed, alpha, sigma)
    pred = from_x0_eps(x0, eps, a, s, kind)
    x0_back, eps_back = to_x0_eps(pred, x_t, a, s, kind)
    assert torch.allclose(x0_back, x0, atol=1e-8 / min(alpha, sigma))
    assert torch.allclose(eps_back, eps, atol=1e-8 / min(alpha, sigma))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**16), coefficient, coefficient, st.sampled_from(PREDICTION_TYPES), st.sampled_from(PREDICTION_TYPES))
def test_every_conversion_pair_inverts(seed, alpha, sigma, src, dst):
    x0, eps, x_t, a, s = _point(seed, alpha, sigma)
    pred = from_x0_eps(x0, eps, a, s, src)
    there = convert(pred, x_t, a, s, src, dst)
    back = convert(there, x_t, a, s, dst, src)
    assert torch.allclose(back, pred, atol=1e-8 / min(alpha, sigma))
    # and `there` is the true quantity in the target parameterization
    assert torch.allclose(there, from_x0_eps(x0, eps, a, s, dst), atol=1e-8 / min(alpha, sigma))


def test_definitions_match_diffusers_conventions():
    x0, eps, x_t, a, s = _point(0, 0.6, 0.8)
    a4, s4 = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    # diffusers' DDPMScheduler.get_velocity: v = sqrt(ab) * noise - sqrt(1 - ab) * sample
    assert torch.allclose(from_x0_eps(x0, eps, a, s, "v_prediction"), a4 * eps - s4 * x0)
    # diffusers' flow-matching training target: noise - latents
    assert torch.allclose(from_x0_eps(x0, eps, a, s, "flow"), eps - x0)
    sched = DDIMScheduler(prediction_type="v_prediction")
    t = torch.tensor([10, 500, 900])
    v_diffusers = sched.get_velocity(x0.float(), eps.float(), t)
    vp = schedule_from_scheduler(sched)
    a_t, s_t = vp.alpha_sigma(t)
    assert torch.allclose(from_x0_eps(x0.float(), eps.float(), a_t, s_t, "v_prediction"), v_diffusers, atol=1e-6)


@pytest.mark.parametrize("config", VP_CONFIGS, ids=lambda c: c["beta_schedule"] + ("-zsnr" if c.get("rescale_betas_zero_snr") else ""))
def test_vp_schedule_matches_diffusers_alphas_cumprod(config):
    sched = DDIMScheduler(**config)
    vp = schedule_from_scheduler(sched)
    assert isinstance(vp, VPSchedule) and vp.num_train_timesteps == 1000
    assert torch.allclose(vp.alphas_cumprod.float(), sched.alphas_cumprod, atol=2e-6)
    # add_noise agrees with the scheduler's own
    x0, eps = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    t = torch.tensor([0, 250, 700, 999])
    assert torch.allclose(vp.add_noise(x0, eps, t), sched.add_noise(x0, eps, t), atol=1e-5)
    a, s = vp.alpha_sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones(4), atol=1e-6)


def test_vp_terminal_conditioning_is_what_the_docs_say():
    # The reason the digits teacher is not linear-beta epsilon-prediction (see docs/digits.md).
    linear = schedule_from_scheduler(DDIMScheduler(beta_schedule="linear"))
    a, s = linear.alpha_sigma(torch.tensor([999]))
    assert math.isclose(float(a), 0.0064, abs_tol=5e-4)  # x0 = (x_t - s eps) / a multiplies eps errors by ~157


def test_vp_fractional_timesteps_interpolate():
    vp = schedule_from_scheduler(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    lo, hi = vp.alpha_bar(torch.tensor([100])), vp.alpha_bar(torch.tensor([101]))
    mid = vp.alpha_bar(torch.tensor([100.5]))
    assert torch.allclose(mid, (lo + hi) / 2)


def test_flow_schedule_matches_diffusers_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow = schedule_from_scheduler(sched)
    assert isinstance(flow, FlowSchedule) and flow.shift == 3.0
    assert prediction_type_of(sched) == "flow"
    sched.set_timesteps(6)
    a, s = flow.alpha_sigma(sched.timesteps)
    assert torch.allclose(s, sched.sigmas[:-1], atol=1e-6)
    assert torch.allclose(a + s, torch.ones_like(a))
    # static shift as diffusers applies it at construction
    raw = torch.linspace(1.0, 0.001, 1000)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    ours = flow.shift_sigmas(torch.linspace(1.0, 1 / 1000, 1000))
    assert torch.allclose(ours, ref, atol=1e-5), (raw[:3], ours[:3], ref[:3])


def test_flow_dynamic_shift_matches_diffusers():
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    flow = schedule_from_scheduler(sched)
    mu = flow.mu(1024)
    base = torch.linspace(1.0, 1 / 4, 4)
    sched.set_timesteps(sigmas=base.numpy(), mu=mu)
    assert torch.allclose(flow.shift_sigmas(base, image_seq_len=1024), sched.sigmas[:-1], atol=1e-6)
    with pytest.raises(ValueError, match="image_seq_len"):
        flow.shift_sigmas(base)


def test_cfg_convention():
    uncond, cond = torch.zeros(2), torch.ones(2)
    assert torch.equal(classifier_free_guidance(uncond, cond, 1.0), cond)
    assert torch.equal(classifier_free_guidance(uncond, cond, 3.0), torch.full((2,), 3.0))
    # LCM's cond + w'(cond - uncond) with w' = 2 is our w = 3
    w_lcm = 2.0
    lcm = cond + w_lcm * (cond - uncond)
    assert torch.equal(classifier_free_guidance(uncond, cond, guidance_from_lcm_convention(w_lcm)), lcm)


def test_unknown_prediction_type_is_a_clear_error():
    assert canonical_prediction_type("flow_prediction") == "flow"
    with pytest.raises(ValueError, match="unknown prediction type 'eps_pred'"):
        canonical_prediction_type("eps_pred")
