"""The memory planner: real-size configs on the meta device, the memory model's bookkeeping, the
levers, and the estimate against the measured peak RSS of real CPU training steps."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.errors import StepdistillError
from stepdistill.planning import RoleSpec, Workload, build_on_meta, count_parameters, estimate_memory, measure_activations, plan_report
from stepdistill.planning.activations import example_inputs
from stepdistill.planning.report import GIB, bf16_frozen_weights, lora_fake_score
from stepdistill.planning.roles import build_module
from stepdistill.planning.rss import estimated_increase, measure_training_steps

BF16 = torch.bfloat16
sys.path.insert(0, str(Path(__file__).parent))

# the published config.json files (stabilityai/stable-diffusion-xl-base-1.0 unet, FLUX.1-dev and SD3-medium transformers)
from realsize_configs import FLUX_DEV_TRANSFORMER, SD3_MEDIUM_TRANSFORMER, SDXL_UNET  # noqa: E402

TINY_UNET = {  # 0.5 M parameters: a two-level SD-style UNet
    "_class_name": "UNet2DConditionModel", "block_out_channels": [16, 32], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8, "sample_size": 16,
}
SMALL_UNET = {  # 8.8 M parameters (docs/scripts/memory_check.py)
    "_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64, 128, 128], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 128, "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 32,
}
TINY = Workload(batch_size=2, height=16, width=16, text_tokens=8)


# -- real-size configs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, published",
    [(SDXL_UNET, 2.57e9), (FLUX_DEV_TRANSFORMER, 11.9e9), (SD3_MEDIUM_TRANSFORMER, 2.03e9)],
    ids=["sdxl-unet", "flux-dev", "sd3-medium"],
)
def test_parameter_counts_of_real_configs_match_the_published_sizes(config, published):
    module = build_on_meta(RoleSpec("net", config=config, param_dtype=BF16))
    assert all(p.device.type == "meta" for p in module.parameters())
    count = count_parameters(module)
    assert abs(count.total / published - 1) < 0.01
    assert count.lora == 0 and count.trainable == 0


def test_sdxl_dmd2_recipe_at_1024px():
    teacher = RoleSpec("teacher", config=SDXL_UNET, param_dtype=BF16)
    generator = RoleSpec("generator", config=SDXL_UNET, trainable="full", param_dtype=BF16, ema=True)
    fake_score = RoleSpec("fake_score", config=SDXL_UNET, trainable="full", param_dtype=BF16)
    report = plan_report([teacher, generator, fake_score], batch_size=1, height=1024)

    n = 2_567_463_684
    r = report.estimate.role("generator")
    assert r.weights == 4 * n and r.grads == 4 * n and r.optimizer_states == 8 * n and r.ema == 4 * n and r.cast_copy == 2 * n
    assert report.estimate.role("teacher").weights == 2 * n and report.estimate.role("teacher").activations is None
    assert 0 < r.activations.saved < 20 * GIB  # one 1024 px sample
    assert report.estimate.workload == Workload(1, 128, 128)
    assert [v.fits for v in report.verdicts] == [False, False, False]  # two full AdamW copies: 16 B/param each
    at_80 = report.verdicts[-1].change
    assert at_80 is not None and "LoRA fake score" in at_80.levers
    assert at_80.estimate.peak * report.headroom <= 80 * GIB
    assert at_80.estimate.role("fake_score").spec.shares_weights_with == "teacher"
    text = str(report)
    assert "generator" in text and "80 GiB: does not fit" in text and "cheapest change" in text


def test_flux_lora_and_sd3_recipes():
    flux = plan_report([
        RoleSpec("teacher", config=FLUX_DEV_TRANSFORMER, param_dtype=BF16),
        RoleSpec("student", config=FLUX_DEV_TRANSFORMER, trainable="lora", lora_rank=64, param_dtype=BF16,
                 shares_weights_with="teacher", gradient_checkpointing=True),
    ], batch_size=1, height=1024, gpus=(48, 80))
    student = flux.estimate.role("student")
    assert student.weights == 4 * student.parameters.lora and student.parameters.base == 11_901_408_320
    assert flux.estimate.workload == Workload(1, 128, 128)  # 4096 packed image tokens
    assert [v.fits for v in flux.verdicts] == [True, True]  # 22 GiB of bf16 weights + LoRA

    sd3 = plan_report([
        RoleSpec("teacher", config=SD3_MEDIUM_TRANSFORMER, param_dtype=BF16),
        RoleSpec("student", config=SD3_MEDIUM_TRANSFORMER, trainable="full", param_dtype=BF16),
    ], batch_size=4, height=1024, gpus=(24, 80))
    assert sd3.estimate.role("student").parameters.total == 2_028_328_000
    assert sd3.verdicts[1].fits and not sd3.verdicts[0].fits


# -- the memory model -------------------------------------------------------------------------


def test_bytes_per_role():
    n = count_parameters(build_on_meta(RoleSpec("n", config=TINY_UNET))).total
    specs = [
        RoleSpec("teacher", config=TINY_UNET, param_dtype=BF16),
        RoleSpec("student", config=TINY_UNET, trainable="full", param_dtype=BF16, ema=True),
        RoleSpec("fake", config=TINY_UNET, trainable="lora", lora_rank=4, param_dtype=BF16, shares_weights_with="teacher", ema=True),
    ]
    est = estimate_memory(specs, TINY)
    teacher, student, fake = (est.role(name) for name in ("teacher", "student", "fake"))
    assert teacher.weights == 2 * n and teacher.grads == teacher.optimizer_states == 0 and teacher.activations is None
    # full, mixed precision: fp32 master + grads + 2 AdamW states + EMA, bf16 autocast copy, foreach scratch
    assert (student.weights, student.grads, student.optimizer_states, student.ema) == (4 * n, 4 * n, 8 * n, 4 * n)
    assert student.cast_copy == 2 * n and student.optimizer_scratch == 4 * n
    # LoRA on the teacher's weights: only the adapters cost weights; the Trainer's EMA shares the frozen base
    lora = fake.parameters.lora
    assert fake.parameters.base == n and fake.parameters.trainable == lora > 0
    assert fake.weights == 4 * lora and fake.grads == 4 * lora and fake.ema == 4 * lora
    assert est.resident == teacher.resident + student.resident + fake.resident
    assert est.peak == est.resident + max(p.peak for p in est.phases)
    assert [p.role for p in est.phases] == ["student", "fake"]


def test_gradient_checkpointing_lora_offload_and_backprop_from():
    full = estimate_memory([RoleSpec("s", config=SMALL_UNET, trainable="full")], Workload(2, 32, 32, 16)).role("s")
    ckpt = estimate_memory([RoleSpec("s", config=SMALL_UNET, trainable="full", gradient_checkpointing=True)], Workload(2, 32, 32, 16)).role("s")
    assert ckpt.activations.saved < full.activations.saved / 3 and ckpt.activations.recompute > 0

    offloaded = estimate_memory([RoleSpec("t", config=TINY_UNET, offload=True)], TINY).role("t")
    assert offloaded.host == 4 * offloaded.parameters.total and 0 < offloaded.weights < offloaded.host / 5

    trained_offload = estimate_memory([RoleSpec("s", config=TINY_UNET, trainable="full", offload=True, ema=True)], TINY).role("s")
    n = trained_offload.parameters.total
    assert trained_offload.host == 4 * n * 5 and trained_offload.optimizer_states == trained_offload.ema == 0

    # a frozen critic the generator's loss passes through keeps input-gradient activations in the generator's phase
    gen = RoleSpec("generator", config=TINY_UNET, trainable="full")
    alone = estimate_memory([gen, RoleSpec("critic", config=TINY_UNET)], TINY)
    through = estimate_memory([gen, RoleSpec("critic", config=TINY_UNET, backprop_from=("generator",))], TINY)
    critic = through.role("critic")
    assert critic.activations is None and critic.through_activations.saved > 0
    assert through.phases[0].backward == alone.phases[0].backward + critic.through_activations.peak


def test_meta_measurement_equals_a_real_forward():
    spec = RoleSpec("s", config=TINY_UNET, trainable="full")
    profiles = []
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        module = build_module(spec, device)
        inputs = example_inputs(module, 2, 16, 16, text_tokens=8, device=device)
        if device == "cpu":
            inputs = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in inputs.items()}
        profiles.append(measure_activations(module, inputs, gradient_checkpointing=True))
    assert profiles[0] == profiles[1] and profiles[0].saved > 0


def test_fused_attention_saves_no_attention_matrix():
    """On meta, SDPA's math path would save B x heads x L x L; the fused kernels do not."""
    module = build_on_meta(RoleSpec("s", config=TINY_UNET, trainable="full"))
    small = measure_activations(module, example_inputs(module, 1, 32, 32, text_tokens=8))
    large = measure_activations(module, example_inputs(module, 1, 64, 64, text_tokens=8))
    assert large.saved / small.saved == pytest.approx(4.0, rel=0.05)  # linear in tokens, not quadratic


# -- levers and verdicts ----------------------------------------------------------------------


def test_the_cheapest_lever_that_fits_is_suggested():
    specs = [
        RoleSpec("teacher", config=SMALL_UNET),
        RoleSpec("generator", config=SMALL_UNET, trainable="full"),
        RoleSpec("fake_score", config=SMALL_UNET, trainable="full"),
    ]
    workload = dict(batch_size=2, height=256, vae_scale_factor=8, text_tokens=16)
    base = plan_report(specs, **workload, gpus=())
    bf16 = estimate_memory(bf16_frozen_weights(specs)[0], base.estimate.workload).peak
    lora = estimate_memory(lora_fake_score(specs)[0], base.estimate.workload).peak
    assert bf16 < base.peak and lora < bf16

    between = (bf16 + base.peak) / 2 / GIB  # bf16 alone fits
    tight = (lora + min(bf16, base.peak)) / 2 / GIB  # only LoRA (or more) fits
    report = plan_report(specs, **workload, gpus=(between, tight), headroom=1.0)
    first, second = report.verdicts
    assert not first.fits and first.change.levers == ("bf16 frozen weights",)
    assert not second.fits and "LoRA fake score" in second.change.levers
    assert second.change.estimate.peak <= tight * GIB
    assert plan_report(specs, **workload, gpus=(base.peak / GIB,), headroom=1.0).verdicts[0].fits


def test_bad_specs_are_one_line_errors():
    with pytest.raises(StepdistillError, match="trainable must be one of"):
        RoleSpec("x", config=TINY_UNET, trainable="partial")
    with pytest.raises(StepdistillError, match="give module_factory or model_class"):
        RoleSpec("x")
    with pytest.raises(StepdistillError, match="needs trainable='lora'"):
        RoleSpec("x", config=TINY_UNET, trainable="full", shares_weights_with="teacher")
    with pytest.raises(StepdistillError, match="role names must be unique"):
        estimate_memory([RoleSpec("x", config=TINY_UNET)] * 2, TINY)
    with pytest.raises(StepdistillError, match="shares weights with unknown role 'teacher'"):
        estimate_memory([RoleSpec("x", config=TINY_UNET, trainable="lora", shares_weights_with="teacher")], TINY)
    with pytest.raises(StepdistillError, match="cannot find model class 'NoSuchModel'"):
        build_on_meta(RoleSpec("x", model_class="NoSuchModel", config={}))
    with pytest.raises(StepdistillError, match="no example inputs for Linear"):
        estimate_memory([RoleSpec("x", module_factory=lambda: torch.nn.Linear(4, 4), trainable="full")], TINY)
    with pytest.raises(StepdistillError, match="match no module"):
        build_on_meta(RoleSpec("x", config=TINY_UNET, trainable="lora", lora_targets=("nope",)))
    # a network the planner does not know, with its own inputs
    linear = RoleSpec("x", module_factory=lambda: torch.nn.Linear(4, 4), trainable="full",
                      example_inputs=lambda module, b, h, w, dtype: {"input": torch.empty(b, 4, device="meta", dtype=dtype)})
    assert estimate_memory([linear], TINY).role("x").activations.saved == 2 * 4 * 4


# -- against measured RSS ---------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("trainable, checkpointing", [("full", False), ("full", True), ("lora", False)])
def test_estimate_within_15_percent_of_measured_peak_rss(trainable, checkpointing):
    """docs/memory.md: two real AdamW training steps of an 8.8 M-parameter UNet on CPU, peak RSS
    increase after a warm-up step, against the estimate built on the meta device."""
    spec = RoleSpec("s", config=SMALL_UNET, trainable=trainable, lora_rank=16, gradient_checkpointing=checkpointing)
    workload = Workload(2, 32, 32, 16)
    estimate = estimated_increase(estimate_memory([spec], workload))
    measured = measure_training_steps(spec, workload, warmup=True)
    assert abs(estimate / measured.peak_increase - 1) < 0.15, (estimate, measured)


def test_changed_specs_reuse_cached_estimates():
    spec = RoleSpec("s", config=TINY_UNET, trainable="full")
    cache: dict = {}
    first = estimate_memory([spec], TINY, cache)
    again = estimate_memory([dataclasses.replace(spec)], TINY, cache)
    assert again.roles[0] is first.roles[0]
    renamed = estimate_memory([dataclasses.replace(spec, name="t", ema=True)], TINY, cache).roles[0]
    assert renamed is not first.roles[0] and renamed.activations is first.roles[0].activations  # measured once
