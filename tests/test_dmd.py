"""DMD / DMD2 (stepdistill.distillers.distribution_matching) on tiny random teachers.

- the distribution-matching gradient vanishes when the fake score equals the real score, and
  not otherwise; the GAN head reads the fake score's bottleneck through a forward hook;
- backward simulation runs the exported scheduler's own loop: the student's K-step sampler
  reproduces the exported pipeline's output;
- a LoRA fake score leaves the teacher (real score) untouched;
- bad input: mismatched student timesteps, a LoRA the network cannot take, NaN losses (stop,
  last good checkpoint kept);
- tiny SD 1.5 / SDXL / Flux: distill a few steps -> export -> reload in a fresh process without
  stepdistill -> an image in K steps with guidance off, at the trained timesteps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from diffusers import DDIMScheduler, UNet2DModel

from stepdistill.distillers.base import RunData
from stepdistill.distillers.common import lora_disabled
from stepdistill.distillers.distribution_matching import DMDRecipe, DistributionMatchingMethod
from stepdistill.distillers.registry import method_class
from stepdistill.distillers.registry import load_distill_recipe
from stepdistill.distillers.run import distill
from stepdistill.distillers.student import StudentSampler, with_network
from stepdistill.errors import RecipeError, StepdistillError, TrainingDiverged
from stepdistill.export import save_class_conditional_pipeline
from stepdistill.teachers import load_teacher
from stepdistill.teachers.pixel import PixelUNetTeacher
from stepdistill.training.checkpoint import list_checkpoints, load_trained_model
from stepdistill.training.trainer import Trainer

from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

ROOT = Path(__file__).resolve().parent.parent


# -- a tiny class-conditional digits-shaped teacher -------------------------------------------
def tiny_pixel_teacher() -> PixelUNetTeacher:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=11,
    )
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    return PixelUNetTeacher(unet, scheduler, pipeline_class="ClassConditionalPipeline")


def recipe_with(**sections) -> DMDRecipe:
    from stepdistill.config import from_dict, merge

    base = {
        "method": "dmd2",
        "training": {"max_steps": 4, "batch_size": 8, "eval_every": 0, "num_eval_samples": 10, "checkpoint_every": 1, "log_every": 1},
        "dmd": {"critic_updates_per_generator_update": 1},
    }
    return from_dict(DMDRecipe, merge(base, sections))


def dmd(teacher, recipe, real=None, **kwargs) -> DistributionMatchingMethod:
    """The method on in-memory data: every class as conditions, ``real`` = (images, labels) for the GAN."""
    data = RunData.in_memory(teacher) if real is None else RunData.in_memory(teacher, real[0], real[1])
    return method_class(recipe.method)(teacher, recipe, data, **kwargs)


def digits_real_data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.arange(32) % 10


def make_trainer(method, tmp_path, name="run") -> Trainer:
    return Trainer(method, method.recipe.training, tmp_path / name, log_with=None, progress=False)


# -- the DM gradient and the GAN head ----------------------------------------------------------
def test_dm_gradient_vanishes_iff_fake_score_equals_real_score(tmp_path):
    """At initialisation the fake score IS the teacher: with real-score guidance w = 1 the DM
    gradient is exactly zero; with w = 3 it is not (the student is pushed toward the guided teacher)."""
    norms = {}
    for w in (1.0, 3.0):
        recipe = recipe_with(teacher={"guidance_scale": w}, training={"max_steps": 1})
        method = dmd(tiny_pixel_teacher(), recipe)
        logs = make_trainer(method, tmp_path, f"w{w}").train_step(0)
        norms[w] = logs["generator/dm_grad_norm"]
        assert logs["critic/denoise_loss"] > 0
    assert norms[1.0] == 0.0
    assert norms[3.0] > 1e-3


def test_gan_head_reads_bottleneck_by_hook_and_learns(tmp_path):
    """The head's features come from the fake score's mid block (a forward hook, forward untouched);
    a few critic steps on clearly separable real data move its accuracy above chance."""
    recipe = recipe_with(
        dmd={"gan_generator_weight": 0.0, "gan_critic_weight": 1.0, "critic_updates_per_generator_update": 1000},
        training={"max_steps": 30, "batch_size": 16},
        optimizers={"discriminator": {"lr": 3e-3}},
    )
    real = (torch.ones(32, 1, 8, 8), torch.arange(32) % 10)  # all-white "digits": trivially different from G's samples
    method = dmd(tiny_pixel_teacher(), recipe, real=real)
    fake = method.fake_score
    assert "forward" not in vars(fake.network)  # no patched forward
    assert len(fake.network.mid_block._forward_hooks) == 1
    trainer = make_trainer(method, tmp_path)
    accuracies = []
    for step in range(30):
        logs = trainer.train_step(step)
        accuracies.append((logs["critic/real_accuracy"] + logs["critic/fake_accuracy"]) / 2)
    assert fake.last_features.shape[1] == 16  # mid-block channels of the tiny UNet
    assert sum(accuracies[-5:]) / 5 > 0.8


@pytest.mark.parametrize("family", ["pixel", "sd", "flux", "flux, gradient checkpointing"])
def test_encoder_only_pass_equals_the_full_pass_at_the_bottleneck_and_skips_the_decoder(family, tmp_path):
    """FakeScore.encode (the real rows of DMD2's / SiDA's GAN): the same bottleneck features and
    parameter gradients as a full forward pass, with no block after the bottleneck run (also when
    the hook fires inside a checkpointed block and backward recomputes it)."""
    from stepdistill.distillers.fake_score import bottleneck, build_fake_score

    if family == "pixel":
        teacher = tiny_pixel_teacher()
    else:
        (tiny_sd_pipeline() if family == "sd" else tiny_flux_pipeline()).save_pretrained(tmp_path / "teacher")
        teacher = load_teacher(tmp_path / "teacher")
    fake = build_fake_score(teacher, 0, [], gan=True)
    net = fake.network
    if family.endswith("checkpointing"):
        net.enable_gradient_checkpointing()
        net.train()
    family = family.split(",")[0]
    module, _, _ = bottleneck(net)
    after = net.up_blocks[0] if family != "flux" else net.proj_out  # a module past the bottleneck
    assert module is not after
    ran = []
    after.register_forward_hook(lambda *args: ran.append(1))
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, *teacher.sample_shape(), generator=g)
    t = torch.tensor([300.0, 700.0])
    cond = teacher.encode([3, 5] if family == "pixel" else ["a red square", "a blue circle"])

    def features_and_grads(encode: bool):
        net.zero_grad(set_to_none=True)
        features = fake.encode(x_t, t, cond) if encode else (fake(x_t, t, cond), fake.last_features)[1]
        (features.float() ** 2).mean().backward()
        return features.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    full, full_grads = features_and_grads(encode=False)
    assert ran == [1]
    kept = fake.last_features
    encoded, encoded_grads = features_and_grads(encode=True)
    assert ran == [1]  # nothing past the bottleneck ran
    assert fake.last_features is kept  # the full pass's features stay where the GAN reads them
    torch.testing.assert_close(encoded, full)
    assert encoded_grads.keys() == full_grads.keys() and len(encoded_grads) > 0
    for name in full_grads:
        torch.testing.assert_close(encoded_grads[name], full_grads[name], msg=name)


# -- backward simulation = the exported scheduler's loop ---------------------------------------
def test_student_sampler_reproduces_exported_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    teacher = tiny_pixel_teacher()
    sampler = StudentSampler.for_teacher(teacher, 4, (1, 8, 8))
    out = save_class_conditional_pipeline(teacher.unet, sampler.scheduler, tmp_path / "pipe", num_inference_steps=4)
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == sampler.timesteps.tolist() == [999, 749, 499, 249]

    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = [0, 1, 2, 3, 4, 5]
    ours = sampler.sample(teacher, noise, teacher.encode(labels)).clamp(-1, 1)
    theirs = pipe(class_labels=labels, latents=noise, num_inference_steps=4, output_type="pt").images * 2 - 1
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)

    inputs = sampler.rollout(teacher, noise, teacher.encode(labels), 2)  # what step k = 0, 1, 2 is fed
    assert len(inputs) == 3 and torch.equal(inputs[0], noise) and not torch.allclose(inputs[1], inputs[2])


def test_backward_simulation_inputs_are_the_students_own_steps(tmp_path):
    """generate() at step k feeds the student exactly rollout()[k] at timestep t_k."""
    recipe = recipe_with(student={"num_steps": 3})
    method = dmd(tiny_pixel_teacher(), recipe)
    trainer = make_trainer(method, tmp_path)
    from stepdistill.training.trainer import StepContext

    ctx = StepContext(trainer, 0, 0)
    noise = torch.randn(3, 1, 8, 8)
    idx = torch.tensor([1, 2, 3])
    cond = method.pool.index(idx)
    k = torch.tensor([0, 1, 2])
    x0 = method.generate(ctx, noise, cond, k, grad=False)
    adapter = with_network(method.teacher, method.student)
    inputs = method.sampler.rollout(adapter, noise, cond, 2)
    for i in range(3):
        expected = adapter.predict(inputs[i][i : i + 1], method.sampler.timesteps[i : i + 1], method.pool.index(idx[i : i + 1]), output="x0")
        torch.testing.assert_close(x0[i : i + 1], expected, atol=1e-5, rtol=0)


# -- LoRA fake score -------------------------------------------------------------------------
def test_lora_fake_score_trains_adapter_and_keeps_teacher(tmp_path):
    teacher = tiny_pixel_teacher()
    before = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    recipe = recipe_with(teacher={"guidance_scale": 2.0}, fake_score={"lora_rank": 4}, training={"max_steps": 3}, optimizers={"fake_score": {"lr": 1e-2}})
    method = dmd(teacher, recipe)
    trainer = make_trainer(method, tmp_path)
    assert "teacher" not in trainer.prepared  # no second copy: the fake score IS the teacher + LoRA
    trainable = [n for n, p in method.fake_score.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.randn(4, 1, 8, 8)
    cond = teacher.encode([1, 2, 3, 4])
    with torch.no_grad():
        fresh = tiny_pixel_teacher()
        reference = fresh.predict(x, torch.full((4,), 500), cond, guidance_scale=2.0)
    for step in range(3):
        trainer.train_step(step)
    after = teacher.unet.state_dict()
    for k, v in before.items():  # base weights untouched
        key = next(a for a in after if a.replace(".base_layer", "") == k)
        assert torch.equal(after[key], v), k
    t = torch.full((4,), 500)
    with torch.no_grad():
        torch.testing.assert_close(method.real_score(x, t, cond), reference)  # real score: the base weights
        with lora_disabled(teacher.unet):
            torch.testing.assert_close(teacher.predict(x, t, cond, guidance_scale=2.0), reference)
        fake = teacher.predict(x, t, cond, guidance_scale=2.0)  # adapters on: the trained fake score
    assert (fake - reference).abs().max() > 1e-4


# -- bad input -------------------------------------------------------------------------------
def test_student_timesteps_must_match_exported_scheduler():
    recipe = recipe_with(student={"num_steps": 2, "timesteps": [999, 500]})
    with pytest.raises(StepdistillError, match=r"do not match the exported scheduler's timesteps \[999.0, 499.0\]"):
        dmd(tiny_pixel_teacher(), recipe)
    ok = recipe_with(student={"num_steps": 2, "timesteps": [999, 499]})
    dmd(tiny_pixel_teacher(), ok)


def test_lora_on_a_network_without_matching_layers_is_a_clear_error():
    recipe = recipe_with(fake_score={"lora_rank": 4, "lora_target_modules": ["q_proj", "k_proj"]})
    with pytest.raises(RecipeError, match=r"fake_score: LoRA target_modules \['q_proj', 'k_proj'\] match no Linear/Conv2d layer of this UNet2DModel"):
        dmd(tiny_pixel_teacher(), recipe)


def test_nan_losses_are_skipped_then_stop_the_run_past_the_limit_keeping_the_last_good_checkpoint(tmp_path):
    recipe = recipe_with(training={"max_steps": 10, "checkpoint_every": 1, "max_skipped_steps": 1})
    method = dmd(tiny_pixel_teacher(), recipe)
    real_score = method.real_score

    def poisoned(x_t, t, cond):
        out = real_score(x_t, t, cond)
        return out * float("nan") if trainer_state["step"] >= 2 else out

    trainer_state = {"step": 0}
    method.real_score = poisoned
    original_step = method.training_step

    def tracked(ctx):
        trainer_state["step"] = ctx.step
        return original_step(ctx)

    method.training_step = tracked
    trainer = make_trainer(method, tmp_path)
    with pytest.raises(TrainingDiverged, match=r"^step 3: the loss of role 'student' is not finite \(2 steps skipped, more than "
                       r"training.max_skipped_steps = 1\): stopping; checkpoint-00000003 in .* is the last good state"):
        trainer.train()
    (_, before), (step, after) = list_checkpoints(tmp_path / "run")
    assert step == 3 and json.loads((after / "trainer_state.json").read_text())["skipped_steps"] == 1
    for name in ("model.safetensors", "model_1.safetensors", "ema_student.safetensors"):  # step 2 (skipped) changed nothing
        a, b = load_file(before / name), load_file(after / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    student = load_trained_model(tmp_path / "run", "student")
    assert all(torch.isfinite(p).all() for p in student.parameters())


# -- tiny SD / SDXL / Flux: distill -> export -> reload in stock diffusers ---------------------
LATENT = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "flux": tiny_flux_pipeline}


@pytest.fixture(scope="module")
def distilled_latent(tmp_path_factory):
    """configs/{sd15,sdxl,flux}_dmd2.yaml as shipped (steps, LoRA options, GAN, TTUR), pointed at
    tiny random pipelines, at 32 px, for 3 critic steps."""
    from stepdistill.config import load_yaml, merge

    root = tmp_path_factory.mktemp("latent_dmd")
    runs = {}
    for family, build in LATENT.items():
        teacher_dir = root / f"{family}_teacher"
        build().save_pretrained(teacher_dir)
        shipped = load_yaml(ROOT / "configs" / f"{'sd15' if family == 'sd' else family}_dmd2.yaml")
        overrides = {
            "teacher": {"path": str(teacher_dir), "height": 32, "width": 32},
            "data": {"prompts": ["a cat", "a dog on a mat", "a red cat"], "prompts_file": None},
            "training": {"max_steps": 3, "batch_size": 2, "mixed_precision": "no", "eval_every": 0, "num_eval_samples": 2, "checkpoint_every": 3},
            "optimizers": {"student": {"lr": 1e-3}, "fake_score": {"lr": 1e-3}},
            "dmd": {"critic_updates_per_generator_update": 2},
        }
        if shipped.get("data", {}).get("latents"):
            from stepdistill.data import TensorImageDataset, write_latent_cache

            teacher = load_teacher(teacher_dir)
            images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
            real = TensorImageDataset(images, captions=["a cat", "a dog on a mat", "a red cat", "a cat"])
            write_latent_cache(teacher.vae_encode, real, root / f"{family}_latents", progress=False)
            overrides["data"]["latents"] = str(root / f"{family}_latents")
        path = root / f"{family}.yaml"
        path.write_text(yaml.safe_dump(merge(shipped, overrides)))
        pipeline = distill(path, root / f"{family}_run", progress=False, report=False)
        recipe = load_distill_recipe(path)
        teacher = load_teacher(teacher_dir)
        sampler = StudentSampler.for_teacher(teacher, recipe.student.num_steps, teacher.sample_shape(32, 32))
        runs[family] = {"pipeline": str(pipeline), "steps": recipe.student.num_steps, "timesteps": [float(t) for t in sampler.timesteps],
                        "teacher": str(teacher_dir)}
    return runs


RELOAD = r"""
import json, os, sys, torch
import diffusers
runs = json.loads(sys.argv[1])
out = {}
for family, run in runs.items():
    if os.path.isfile(os.path.join(run["pipeline"], "pytorch_lora_weights.safetensors")):  # a LoRA student: the stock teacher + the file
        pipe = diffusers.DiffusionPipeline.from_pretrained(run["teacher"])
        config = json.load(open(os.path.join(run["pipeline"], "scheduler", "scheduler_config.json")))
        pipe.scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(run["pipeline"], subfolder="scheduler")
        pipe.load_lora_weights(run["pipeline"])
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(run["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32) if family == "flux" else dict(height=32, width=32, guidance_scale=1.0)
    seen = []
    def record(p, i, t, kw):
        seen.append(float(t))
        return kw
    image = pipe("a cat", num_inference_steps=run["steps"], output_type="np", generator=torch.Generator().manual_seed(0),
                 callback_on_step_end=record, **kwargs).images
    out[family] = {"class": type(pipe).__name__, "shape": list(image.shape), "finite": bool(torch.isfinite(torch.as_tensor(image)).all()),
                   "std": float(torch.as_tensor(image).std()), "timesteps": seen}
out["stepdistill_imported"] = any(m.startswith("stepdistill") for m in sys.modules)
print(json.dumps(out))
"""


def test_tiny_latent_students_reload_in_stock_diffusers(distilled_latent, tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, json.dumps(distilled_latent)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["stepdistill_imported"] is False
    expected_class = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
    for family, run in distilled_latent.items():
        got = out[family]
        assert got["class"] == expected_class[family]
        assert got["shape"] == [1, 32, 32, 3] and got["finite"] and got["std"] > 0
        # the stock pipeline samples at exactly the timesteps the student was trained on
        assert got["timesteps"] == pytest.approx(run["timesteps"], abs=1e-3), family


def test_tiny_latent_students_moved_away_from_teacher(distilled_latent):
    from safetensors.torch import load_file

    for family, run in distilled_latent.items():
        teacher = load_teacher(run["teacher"])
        student_dir = Path(run["pipeline"])
        if (student_dir / "pytorch_lora_weights.safetensors").is_file():  # LoRA student: lora_B starts at zero
            lora = load_file(student_dir / "pytorch_lora_weights.safetensors")
            assert student_dir.name == "lora" and max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 0, family
            continue
        name = "transformer" if family == "flux" else "unet"
        cls = type(getattr(teacher, name))
        student = cls.from_pretrained(student_dir, subfolder=name)
        diffs = [(a - b).abs().max().item() for a, b in zip(student.parameters(), getattr(teacher, name).parameters())]
        assert max(diffs) > 0, family


# -- DMD: regression loss on cached teacher ODE pairs ------------------------------------------
def test_dmd_regression_pairs_are_teacher_samples_and_train(tmp_path):
    from stepdistill.distillers.distribution_matching import make_ode_pairs
    from stepdistill.sampling import ddim_sample
    from safetensors.torch import load_file

    teacher = tiny_pixel_teacher()
    teacher_dir = save_class_conditional_pipeline(teacher.unet, teacher.scheduler, tmp_path / "teacher")
    pairs_path = tmp_path / "pairs.safetensors"
    recipe = {
        "method": "dmd",
        "teacher": {"path": str(teacher_dir), "guidance_scale": 2.0},
        "dmd": {"regression_weight": 0.25, "regression_pairs": str(pairs_path), "pair_steps": 3,
                "critic_updates_per_generator_update": 1},
        "training": {"max_steps": 2, "batch_size": 8, "eval_every": 0, "checkpoint_every": 10},
    }
    (tmp_path / "dmd.yaml").write_text(yaml.safe_dump(recipe))
    loaded = load_teacher(teacher_dir)
    make_ode_pairs(load_distill_recipe(tmp_path / "dmd.yaml"), loaded, RunData.in_memory(loaded).pool, 12)
    pairs = load_file(str(pairs_path))
    assert pairs["noise"].shape == pairs["sample"].shape == (12, 1, 8, 8)
    assert pairs["condition_index"].tolist() == [i % 10 for i in range(12)]
    expected = ddim_sample(loaded, loaded.encode(pairs["condition_index"][:3].tolist()), pairs["noise"][:3], loaded.scheduler, 3, 2.0)
    torch.testing.assert_close(pairs["sample"][:3], expected)

    method = dmd(loaded, load_distill_recipe(tmp_path / "dmd.yaml"), regression_pairs=pairs)
    logs = make_trainer(method, tmp_path).train_step(0)
    assert logs["generator/regression_loss"] > 0 and "critic/gan_loss" not in logs

    bad = load_distill_recipe(tmp_path / "dmd.yaml", {"method": "dmd2"})
    with pytest.raises(RecipeError, match="'dmd2' drops the regression loss"):
        dmd(loaded, bad, regression_pairs=pairs)
