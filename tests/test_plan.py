"""`stepdistill plan RECIPE`: per-role memory of the shipped recipes from real config files only
(teacher directories of config.json files, no weights: tests/realsize_configs.py), the verdicts
and the cheapest recipe change, and the estimate against a measured CPU training step of a
mid-size UNet."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.cli import main
from stepdistill.distillers.plan import plan_recipe, read_teacher_configs
from stepdistill.distillers.registry import load_distill_recipe
from stepdistill.planning import RoleSpec, build_on_meta, count_parameters, estimate_memory
from stepdistill.planning.report import GIB
from stepdistill.planning.rss import estimated_increase, measure_training_steps

sys.path.insert(0, str(Path(__file__).parent))
import realsize_configs as real  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SDXL_PARAMS = 2_567_463_684
CACHE: dict = {}  # meta measurements shared by every plan of this file (one per network configuration)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("config_only")
    return {family: real.write_teacher_dir(root, family) for family in real.TEACHERS}


def plan(recipe: str, teacher: Path, *sets: str, gpus=()):
    r = load_distill_recipe(ROOT / "configs" / recipe, set_items=[f"teacher.path={teacher}", *sets])
    return plan_recipe(r, gpus=gpus, cache=CACHE)


@pytest.mark.parametrize("name, cls", [("CLIP_L_TEXT", "CLIPTextModel"), ("CLIP_G_TEXT", "CLIPTextModelWithProjection"),
                                       ("T5_XXL_ENCODER", "T5EncoderModel"), ("VAE_4CH", None)])
def test_encoder_configs_are_the_published_networks(name, cls):
    count = count_parameters(build_on_meta(RoleSpec(name, model_class=cls, config=getattr(real, name)))).total
    assert abs(count / real.PUBLISHED[name] - 1) < 0.001


def test_teacher_directory_of_config_files_is_enough(teachers):
    configs = read_teacher_configs(teachers["sd3"])
    assert configs.family == "sd3" and configs.denoiser_name == "transformer"
    assert set(configs.components) == {"text_encoder", "text_encoder_2", "text_encoder_3", "vae"}
    assert configs.vae_scale_factor == 8 and configs.default_size() == 1024 and configs.text_tokens == 77 + 256
    assert not any(p.suffix == ".safetensors" for p in teachers["sd3"].rglob("*"))


def test_sdxl_dmd2_full_vs_lora_fake_score_with_and_without_checkpointing(teachers, capsys):
    """configs/sdxl_dmd2.yaml (batch 8 at 1024 px, bf16, GAN on cached latents) four ways."""
    n = SDXL_PARAMS
    plans = {(fake, ckpt): plan("sdxl_dmd2.yaml", teachers["sdxl"], f"fake_score.lora_rank={fake}", f"memory.gradient_checkpointing={ckpt}")
             for fake in (0, 64) for ckpt in ("false", "true")}
    for (fake, ckpt), p in plans.items():
        print(f"\n== fake_score.lora_rank={fake}, memory.gradient_checkpointing={ckpt}\n{p}")
    full, lora = plans[(0, "false")].report.estimate, plans[(64, "false")].report.estimate
    # full fake score: fp32 master weights, their gradients and two AdamW states
    fake = full.role("fake_score")
    assert (fake.weights, fake.grads, fake.optimizer_states) == (4 * n, 4 * n, 8 * n)
    assert fake.spec.batch_factor == 2 and fake.spec.backprop_from == ("student",)  # fakes + reals; the GAN loss passes through
    # LoRA fake score: adapters only, on the bf16 teacher's weights
    lora_fake = lora.role("fake_score")
    assert lora_fake.spec.shares_weights_with == "teacher" and lora_fake.weights == 4 * lora_fake.parameters.lora
    assert lora.role("teacher").weights == 2 * n  # memory.teacher_dtype: bf16
    assert lora.resident <= full.resident - 12 * n + 16 * lora_fake.parameters.lora
    assert lora.peak < full.peak - 10 * n  # at least the copy's weights and AdamW states (12 bytes per parameter) less
    # gradient checkpointing keeps a fraction of the student's activations
    for fake_rank in (0, 64):
        plain, ckpt = plans[(fake_rank, "false")].report.estimate, plans[(fake_rank, "true")].report.estimate
        assert ckpt.role("student").activations.saved < plain.role("student").activations.saved / 3
        assert ckpt.peak < plain.peak
    # released encoders: host memory only
    for name in ("text_encoder", "text_encoder_2", "vae"):
        role = lora.role(name)
        assert role.weights == 0 and role.host > 0
    out = capsys.readouterr().out
    assert out.count("role            params") == 4 and "LoRA r64 on teacher, ckpt" in out


def test_shipped_sdxl_dmd2_fits_80gb(teachers):
    shipped = plan("sdxl_dmd2.yaml", teachers["sdxl"], gpus=(48, 80))  # one of the four plans above: measured once
    assert [v.fits for v in shipped.report.verdicts] == [False, True]
    assert "cheapest change: LoRA student" in str(shipped)  # what 48 GiB would take


def test_the_cheapest_recipe_change_is_named_as_set_options_and_fits(tmp_path):
    """A small DMD2 recipe (full fake score, fp32, encoders kept) against GPU sizes between
    what it needs and what the levers give: each verdict names --set options that, applied to
    the recipe, plan to what the verdict says and fit."""
    teacher = mid_size_teacher(tmp_path, SMALL_UNET)
    sets = ["teacher.height=128", "teacher.width=128", "training.batch_size=8", "training.mixed_precision=no",
            "memory.teacher_dtype=null", "memory.release_encoders=false", "memory.gradient_checkpointing=false", "fake_score.lora_rank=0"]
    base = plan("sd15_dmd2.yaml", teacher, *sets)
    gib = base.peak / GIB
    p = plan("sd15_dmd2.yaml", teacher, *sets, gpus=(gib * 1.2 * 0.9, gib * 1.2 * 0.4, gib * 1.2 * 0.1))
    levers = []
    for verdict in p.report.verdicts:
        assert not verdict.fits and verdict.change is not None
        options = verdict.change.details[0].split()
        assert options[0] == "--set" and all(o == "--set" for o in options[::2])
        again = plan("sd15_dmd2.yaml", teacher, *sets, *options[1::2])
        assert again.peak == verdict.change.estimate.peak and 1.2 * again.peak <= verdict.gpu_gib * GIB
        levers.append(verdict.change.levers)
    assert len(levers[0]) == 1  # a lever that is enough alone
    assert len(levers[2]) > 1  # the tightest budget needs several, stacked in cost order
    assert "release encoders" not in levers[2]  # tiny text encoders: releasing them saves nothing, so it is no part of the change


def test_flux_dmd2_as_shipped(teachers):
    """configs/flux_dmd2.yaml: LoRA student (on its own bf16 copy of the 11.9 B base) and LoRA
    fake score on the bf16 teacher, T5-XXL and CLIP released, gradient checkpointing."""
    p = plan("flux_dmd2.yaml", teachers["flux"], gpus=(48, 80))
    est = p.report.estimate
    base = 11_901_408_320
    student, fake = est.role("student"), est.role("fake_score")
    assert student.parameters.base == base and student.weights == 2 * base + 4 * student.parameters.lora
    assert fake.spec.shares_weights_with == "teacher" and fake.weights == 4 * fake.parameters.lora
    assert est.role("teacher").weights == 2 * base
    assert est.role("text_encoder_2").host == 4 * 4_762_310_656 and est.role("text_encoder_2").weights == 0
    assert est.workload.text_tokens == 512 and (est.workload.height, est.workload.width) == (128, 128)
    assert [v.fits for v in p.report.verdicts] == [False, True]
    print(p)


def test_sd3_lcm_lora_as_shipped(teachers, capsys):
    """configs/sd3_lcm_lora.yaml: the LoRA student on the bf16 teacher's own weights, no EMA."""
    p = plan("sd3_lcm_lora.yaml", teachers["sd3"], gpus=(24, 80))
    est = p.report.estimate
    student = est.role("student")
    assert student.spec.shares_weights_with == "teacher" and student.ema == 0
    teacher = est.role("teacher")
    assert student.weights == 4 * student.parameters.lora
    assert teacher.weights == 2 * (2_028_328_000 + teacher.parameters.buffers)  # bf16 weights and pos_embed buffer
    assert [r.name for r in est.roles] == ["teacher", "student", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"]
    assert all(v.fits for v in p.report.verdicts)
    # the CLI prints the same plan
    assert main(["plan", str(ROOT / "configs" / "sd3_lcm_lora.yaml"), "--set", f"teacher.path={teachers['sd3']}", "--gpus", "24", "80"]) == 0
    out = capsys.readouterr().out
    assert "text_encoder_3" in out and "24 GiB: fits" in out and f"peak: {p.peak / GIB:.2f} GiB" in out


def test_score_distillation_roles(teachers):
    """configs/sdxl_vsd.yaml (LoRA student, LoRA fake score on the teacher) and the same recipe as SiD
    and SDS: VSD takes its generator gradient without a backward through the scores; SiD's loss is
    differentiated through the teacher's and the fake score's forwards, whose activations add to the
    student's backward; SDS has no fake score."""
    vsd, sid, sds = (plan("sdxl_vsd.yaml", teachers["sdxl"], f"method={m}").report.estimate for m in ("vsd", "sid", "sds"))
    assert [r.name for r in vsd.roles][:3] == ["teacher", "student", "fake_score"]
    assert vsd.role("fake_score").spec.shares_weights_with == "teacher" and vsd.role("fake_score").weights == 4 * vsd.role("fake_score").parameters.lora
    assert vsd.role("student").spec.shares_weights_with is None  # G: a LoRA on its own copy of the base
    assert "fake_score" not in [r.name for r in sds.roles]

    def student_backward(est):
        return next(p.backward for p in est.phases if p.role == "student")

    through = sid.role("teacher").through_activations.peak + sid.role("fake_score").through_activations.peak
    assert vsd.role("teacher").through_activations is None and vsd.role("fake_score").through_activations is None
    assert through > 0 and student_backward(sid) == student_backward(vsd) + through
    assert sid.peak > vsd.peak


def test_guidance_and_agd_roles(teachers):
    """configs/sdxl_guidance.yaml: a full copy of SDXL's UNet with the w input (time_cond_proj_dim 256:
    a 256 x 320 projection more) and its EMA next to the frozen teacher; configs/sdxl_agd.yaml: the
    adapters on the teacher's own weights (no second copy, no EMA); Flux guidance: FLUX.1-dev's own embedder."""
    guidance = plan("sdxl_guidance.yaml", teachers["sdxl"]).report.estimate
    student, teacher = guidance.role("student"), guidance.role("teacher")
    assert teacher.parameters.total == SDXL_PARAMS and student.parameters.total == SDXL_PARAMS + 256 * 320
    assert student.parameters.trainable == student.parameters.total and student.ema > 0 and student.spec.shares_weights_with is None
    agd = plan("sdxl_agd.yaml", teachers["sdxl"]).report.estimate
    adapters = agd.role("student")
    assert adapters.spec.shares_weights_with == "teacher" and adapters.ema == 0
    assert adapters.weights == 4 * adapters.parameters.lora and 0 < adapters.parameters.lora < 0.02 * SDXL_PARAMS  # fp32 adapters, 1.8 %
    assert agd.peak < guidance.peak
    flux = plan("flux_guidance.yaml", teachers["flux"]).report.estimate  # FLUX.1-dev has its guidance embedder already
    assert flux.role("student").parameters.total == flux.role("teacher").parameters.total


MID_UNET = {  # ~79 M parameters: SD 1.x's layout at 0.3 of its width (docs/scripts/memory_check.py)
    "_class_name": "UNet2DConditionModel", "block_out_channels": [96, 192, 384, 384], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 384, "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 32,
}


SMALL_UNET = {  # 2.3 M parameters, few blocks: quick to measure on the meta device
    **MID_UNET, "block_out_channels": [32, 64], "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 64,
}


def mid_size_teacher(root: Path, unet: dict = MID_UNET) -> Path:
    """A tiny SD pipeline directory whose UNet config is ``unet``: the planner reads configs only."""
    from tiny_pipelines import tiny_sd_pipeline

    teacher = root / f"sd_{unet['block_out_channels'][-1]}"
    if not teacher.exists():
        tiny_sd_pipeline().save_pretrained(teacher)
        (teacher / "unet" / "config.json").write_text(json.dumps(unet))
    return teacher


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_plan_of_a_mid_size_unet_within_15_percent_of_a_measured_training_step(tmp_path):
    """The student role `stepdistill plan` derives from configs/sd15_dmd2.yaml on a teacher
    directory whose UNet is mid-size (79 M), against one real AdamW training step of that role on
    the CPU (peak RSS increase after a warm-up step; stepdistill.planning.rss)."""
    p = plan("sd15_dmd2.yaml", mid_size_teacher(tmp_path), "teacher.height=64", "teacher.width=64", "training.batch_size=2",
             "training.mixed_precision=no", "memory.teacher_dtype=null")
    spec = next(s for s in p.specs if s.name == "student")
    assert spec.trainable == "full" and spec.param_dtype == torch.float32
    workload = p.report.estimate.workload
    assert (workload.batch_size, workload.height) == (2, 32)
    estimate = estimated_increase(estimate_memory([spec], workload))
    measured = measure_training_steps(spec, workload, steps=1, warmup=True)
    assert measured.parameters > 75e6
    assert abs(estimate / measured.peak_increase - 1) < 0.15, (estimate, measured)


def test_every_registered_method_is_planned_from_its_class():
    """`stepdistill plan` reads the roles from each registered method's class (no method names in
    the planner): every method, progressive and reflow included, on the shipped t2i VP teacher's
    config files, with the roles its paper's networks need."""
    from stepdistill.distillers.registry import METHODS, method_class
    from stepdistill.t2i.bench import teacher_dir

    teacher = teacher_dir("t2i-sd")
    own = {"dmd": {"fake_score"}, "dmd2": {"fake_score", "discriminator"}, "vsd": {"fake_score"}, "sid": {"fake_score"},
           "sida": {"fake_score"}, "progressive": {"previous_student"}}
    for name in sorted(METHODS):
        recipe = {"method": name, "teacher": {"path": str(teacher)}, "data": {"images": "t2i"}}
        sets = {"agd": ["student.lora_rank=4"], "dmd2": ["dmd.gan_generator_weight=0.3", "dmd.gan_critic_weight=0.3"]}.get(name, [])
        r = load_distill_recipe(recipe, set_items=sets)
        assert type(r) is method_class(name).recipe_class
        result = plan_recipe(r, gpus=(1,), cache=CACHE)
        roles = {spec.name for spec in result.specs}
        assert {"teacher", "student", "text_encoder", "vae"} <= roles, name
        assert roles - {"teacher", "student", "text_encoder", "vae"} == own.get(name, set()), name
        assert result.peak > 0 and result.report.verdicts[0].fits
