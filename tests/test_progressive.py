"""Progressive distillation (stepdistill.distillers.progressive): the two-DDIM-step target, the
stages of one recipe, a measured training effect, per-stage export / resume / rebuild, and
tiny SD 1.5 / SDXL / Flux students that reload in a fresh process equal to the in-memory ones."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from stepdistill.config import from_dict
from stepdistill.distillers.base import RunData
from stepdistill.distillers.progressive import ProgressiveDistillation, ProgressiveRecipe
from stepdistill.distillers.run import distill, export_run_dir
from stepdistill.errors import RecipeError
from stepdistill.export import save_class_conditional_pipeline
from stepdistill.teachers import load_teacher
from stepdistill.teachers.pixel import PixelUNetTeacher
from stepdistill.training import Trainer
from stepdistill.training.checkpoint import latest_checkpoint, load_role_weights

sys.path.insert(0, str(Path(__file__).parent))
from fresh_process import run_fresh_python  # noqa: E402
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402


def tiny_pixel_teacher(seed: int = 0, prediction_type: str = "v_prediction") -> PixelUNetTeacher:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=11,
    ).eval()
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, timestep_spacing="trailing", clip_sample=False)
    return PixelUNetTeacher(unet, scheduler, pipeline_class="ClassConditionalPipeline")


def recipe(**sections) -> ProgressiveRecipe:
    from stepdistill.config import merge

    base = {"method": "progressive", "student": {"num_steps": 1}, "progressive": {"teacher_steps": 4},
            "training": {"max_steps": 2, "batch_size": 8, "checkpoint_every": 100}}
    return from_dict(ProgressiveRecipe, merge(base, sections))


def staged(teacher=None, **sections) -> ProgressiveDistillation:
    teacher = teacher or tiny_pixel_teacher()
    g = torch.Generator().manual_seed(1)
    data = RunData.in_memory(teacher, torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.arange(64) % 10)
    return ProgressiveDistillation(teacher, recipe(**sections), data)


# -- the target ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_one_exported_student_step_onto_the_target_equals_two_teacher_steps(prediction_type, tmp_path):
    """Salimans & Ho Alg. 2: a student whose x̂ is the target x̃ makes, with the exported
    scheduler's own ``step``, exactly the sample two steps of the 2N-step scheduler make with the
    teacher -- at every step i of the N-step grid (4 -> 2 steps)."""
    method = staged(tiny_pixel_teacher(prediction_type=prediction_type), progressive={"teacher_steps": 4}, student={"num_steps": 2})
    stage = method.build_stage(0, None)
    assert stage.prediction == "v_prediction" and stage.scheduler.config.prediction_type == "v_prediction"  # eps teachers -> v students
    trainer = Trainer(stage, stage.recipe.training, tmp_path / "run", log_with=None, progress=False)
    from stepdistill.training.trainer import StepContext

    ctx = StepContext(trainer, 0, 0)
    teacher = stage.teacher
    cond = teacher.encode([3, 4])
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    two_n = copy.deepcopy(teacher.scheduler)
    two_n = DDIMScheduler.from_config(two_n.config, timestep_spacing="trailing")
    two_n.set_timesteps(4)
    one = copy.deepcopy(stage.scheduler)
    one.set_timesteps(2)
    for i, t in enumerate(one.timesteps):
        idx = torch.full((2,), i)
        x_t = z if i == 0 else z * 0.5 + 0.1  # any input at step i
        z_out = stage.two_teacher_steps(ctx, x_t, idx, cond)
        expected = x_t
        for t2 in two_n.timesteps[2 * i : 2 * i + 2]:
            expected = two_n.step(teacher.guided_output(expected, t2, cond), t2, expected).prev_sample
        torch.testing.assert_close(z_out, expected, atol=1e-5, rtol=1e-4)
        alpha, sigma = (float(v) for v in teacher.schedule.alpha_sigma(t))
        ratio = float(stage.sigma_out[i]) / sigma
        target = (z_out - ratio * x_t) / (float(stage.alpha_out[i]) - ratio * alpha)
        v = teacher.schedule.from_x0_eps(target, (x_t - alpha * target) / sigma, t, "v_prediction")
        torch.testing.assert_close(one.step(v, t, x_t).prev_sample, z_out, atol=1e-4, rtol=1e-4)


def test_stages_halve_from_the_teacher_steps_and_bad_input_is_one_line():
    assert staged(progressive={"teacher_steps": 64}).stage_names == ["stage_32", "stage_16", "stage_08", "stage_04", "stage_02", "stage_01"]
    assert staged(progressive={"teacher_steps": 16}, student={"num_steps": 4}).stage_names == ["stage_08", "stage_04"]
    with pytest.raises(RecipeError, match=r"teacher_steps \(12\) must be student.num_steps \(1\) times a power of 2"):
        staged(progressive={"teacher_steps": 12})
    with pytest.raises(RecipeError, match=r"stage_max_steps has 1 entries for 2 stages \(4 -> 2 -> 1 steps\)"):
        staged(progressive={"stage_max_steps": [5]})
    with pytest.raises(RecipeError, match="trains full students"):
        staged(student={"lora_rank": 2}).build_stage(0, None)
    with pytest.raises(RecipeError, match="prediction_type 'flow' is for flow-matching teachers"):
        staged(progressive={"prediction_type": "flow"})
    with pytest.raises(RecipeError, match="trains on real data"):
        teacher = tiny_pixel_teacher()
        ProgressiveDistillation(teacher, recipe(), RunData.in_memory(teacher)).build_stage(0, None)


# -- the effect -------------------------------------------------------------------------------
def test_a_stage_moves_the_n_step_student_onto_the_2n_step_teacher(tmp_path):
    """The measured effect of one halving (8 -> 4 steps): the 4-step student's samples land closer
    to the teacher's 8-step DDIM samples from the same noise than the teacher's own 4 steps do."""
    method = staged(progressive={"teacher_steps": 8}, student={"num_steps": 4}, optimizers={"student": {"lr": 2e-3}},
                    training={"max_steps": 60, "batch_size": 32}, ema=None)
    stage = method.build_stage(0, None)
    teacher = stage.teacher
    cond = teacher.encode(torch.arange(32) % 10)
    noise = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    teacher_8 = stage.sampler.sample(teacher, noise, cond, num_steps=8)  # the same DDIM-trailing loop at 8 steps

    def gap(network):
        return float((stage.sample(network, noise, cond) - teacher_8).pow(2).mean())

    before = gap(stage.student)
    trainer = Trainer(stage, stage.recipe.training, tmp_path / "run", log_with=None, progress=False)
    trainer.train()
    after = gap(trainer.unwrap("student"))
    assert after < 0.6 * before, (before, after)  # measured: 0.34x (0.0152 -> 0.0051); no training: 1.0x


# -- one recipe, every stage ------------------------------------------------------------------
PIXEL_SAMPLE = """
import json, sys, torch
from diffusers import DiffusionPipeline
out = {}
for name, path in json.loads(sys.argv[1]).items():
    pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pipe([0, 1, 2, 3], latents=noise, output_type="pt").images  # the directory's own default step count
    out[name] = {"images": images.tolist(), "steps": pipe.config.default_num_inference_steps,
                 "prediction_type": pipe.scheduler.config.prediction_type, "class": type(pipe.scheduler).__name__}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("progressive")
    teacher = tiny_pixel_teacher()
    save_class_conditional_pipeline(teacher.unet, teacher.scheduler, root / "teacher")
    overrides = {"teacher": {"path": str(root / "teacher")}, "data": {"images": "digits"}, "progressive": {"teacher_steps": 8, "stage_max_steps": [3, 2, 2]},
                 "training": {"batch_size": 8, "checkpoint_every": 1, "keep_checkpoints": 2}, "optimizers": {"student": {"lr": 1e-3}},
                 "evaluation": {"report": False}}
    out = distill({"method": "progressive"}, root / "run", overrides=overrides, progress=False, evaluate=False)
    return root, overrides, out


def test_one_recipe_runs_every_stage_and_exports_each_as_a_stock_pipeline(pixel_run, tmp_path):
    """stage_04 / stage_02 / stage_01, each a ClassConditionalPipeline at its own step count (v
    prediction, DDIM trailing), reloading in a fresh process equal to the in-memory student."""
    root, overrides, out = pixel_run
    run = root / "run"
    assert out == run / "stage_01" / "pipeline"
    stages = {name: run / name / "pipeline" for name in ("stage_04", "stage_02", "stage_01")}
    assert json.loads((run / "run.json").read_text())["method"] == "progressive"
    expected = {}
    teacher = load_teacher(root / "teacher")
    method = ProgressiveDistillation(teacher, from_dict(ProgressiveRecipe, {"method": "progressive", **overrides}), None)
    for index, (name, path) in enumerate(stages.items()):
        stage = method.build_stage(index, None)
        network = load_role_weights(latest_checkpoint(run / name), "student", stage.student, ema=True)
        noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        expected[name] = ((stage.sample(network, noise, teacher.encode([0, 1, 2, 3])) / 2 + 0.5).clamp(0, 1), stage.num_steps)
        assert latest_checkpoint(run / name).name.endswith(f"{stage.recipe.training.max_steps:08d}")
    got = json.loads(run_fresh_python(f"import sys; sys.argv[1:] = [{json.dumps({k: str(v) for k, v in stages.items()})!r}]\n" + PIXEL_SAMPLE,
                                      cwd=tmp_path).strip().splitlines()[-1])
    for name, (images, steps) in expected.items():
        assert got[name]["steps"] == steps and got[name]["class"] == "DDIMScheduler" and got[name]["prediction_type"] == "v_prediction"
        assert (torch.tensor(got[name]["images"]) - images).abs().max() < 1e-5, name
    # each stage started from the previous one: stage_02's student differs from the teacher and from stage_04's
    weights = {name: load_role_weights(latest_checkpoint(run / name), "student", teacher.unet, ema=True) for name in stages}
    first = next(weights["stage_02"].parameters())
    assert not torch.equal(first, next(weights["stage_04"].parameters())) and not torch.equal(first, next(teacher.unet.parameters()))


def test_resume_continues_the_first_unfinished_stage_and_export_rebuilds_every_stage(pixel_run, tmp_path):
    """Interrupted in stage_01: --resume keeps stage_04 / stage_02 as they were, trains stage_01
    from its checkpoint and ends with the same weights as the uninterrupted run; ``stepdistill
    export`` rebuilds every stage's artefact bit for bit."""
    import shutil

    from safetensors.torch import load_file

    root, overrides, _ = pixel_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    final = load_file(run / "stage_01" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    kept = {name: (run / name / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns for name in ("stage_04", "stage_02")}
    shutil.rmtree(run / "stage_01" / "pipeline")
    shutil.rmtree(latest_checkpoint(run / "stage_01"))
    assert latest_checkpoint(run / "stage_01").name == "checkpoint-00000001"  # back to step 1 of 2
    distill({"method": "progressive"}, run, overrides=overrides, progress=False, evaluate=False, resume=True)
    resumed = load_file(run / "stage_01" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    for name, mtime in kept.items():
        assert (run / name / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime

    rebuilt = export_run_dir(root / "run", tmp_path / "export")
    single = export_run_dir(root / "run" / "stage_02", tmp_path / "stage_02_only")  # one stage's directory
    for name in ("stage_04", "stage_02", "stage_01"):
        ours = load_file(root / "run" / name / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
        theirs = load_file(rebuilt / name / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    alone = load_file(single / "unet" / "diffusion_pytorch_model.safetensors")
    ours = load_file(root / "run" / "stage_02" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ours[k], alone[k]) for k in ours)
    assert json.loads((single / "model_index.json").read_text())["default_num_inference_steps"] == 2


# -- tiny SD 1.5 / SDXL / Flux ------------------------------------------------------------------
LATENT_SAMPLE = """
import json, sys, torch
import diffusers
runs = json.loads(sys.argv[1])
out = {}
for key, run in runs.items():
    pipe = diffusers.DiffusionPipeline.from_pretrained(run["path"])
    pipe.set_progress_bar_config(disable=True)
    latents = torch.tensor(run["latents"])
    kwargs = {} if run["family"] == "flux" else {"guidance_scale": 1.0}
    images = pipe("a cat", latents=latents, num_inference_steps=run["steps"], height=32, width=32, output_type="latent", **kwargs).images
    out[key] = {"latents": images.tolist(), "class": type(pipe).__name__, "prediction": pipe.scheduler.config.get("prediction_type")}
print(json.dumps(out))
"""


def test_tiny_sd_sdxl_flux_students_of_every_stage_reload_equal_to_the_in_memory_model(tmp_path):
    from safetensors.torch import save_file

    from stepdistill.teachers.flux import pack_latents, unpack_latents

    runs, expected = {}, {}
    for family, build in (("sd", tiny_sd_pipeline), ("sdxl", tiny_sdxl_pipeline), ("flux", tiny_flux_pipeline)):
        build().save_pretrained(tmp_path / family)
        teacher = load_teacher(tmp_path / family)
        shape = tuple(teacher.sample_shape(32, 32))
        save_file({"latents": torch.randn(4, *shape), "prompt_index": torch.tensor([0, 1, 0, 1])}, tmp_path / f"{family}_latents.safetensors")
        overrides = {"teacher": {"path": str(tmp_path / family), "height": 32, "width": 32},
                     "data": {"latents": str(tmp_path / f"{family}_latents.safetensors"), "prompts": ["a cat", "a dog"]},
                     "progressive": {"teacher_steps": 4}, "training": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 2},
                     "optimizers": {"student": {"lr": 1e-3}}}
        distill({"method": "progressive"}, tmp_path / f"{family}_run", overrides=overrides, progress=False)
        method = ProgressiveDistillation(teacher, from_dict(ProgressiveRecipe, {"method": "progressive", **overrides}), None)
        for index, name in enumerate(method.stage_names):
            stage = method.build_stage(index, None)
            network = load_role_weights(latest_checkpoint(tmp_path / f"{family}_run" / name), "student", stage.student, ema=True)
            noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(index))
            ours = stage.sample(network, noise, teacher.encode(["a cat"]))
            key = f"{family}/{name}"
            latents = pack_latents(noise) if family == "flux" else noise
            runs[key] = {"path": str(tmp_path / f"{family}_run" / name / "pipeline"), "family": family, "steps": stage.num_steps, "latents": latents.tolist()}
            expected[key] = (ours, stage)
    got = json.loads(run_fresh_python(f"import sys; sys.argv[1:] = [{json.dumps(runs)!r}]\n" + LATENT_SAMPLE, cwd=tmp_path).strip().splitlines()[-1])
    for key, (ours, stage) in expected.items():
        theirs = torch.tensor(got[key]["latents"])
        if key.startswith("flux"):
            theirs = unpack_latents(theirs, *ours.shape[2:])
        assert (theirs - ours).abs().max() < 1e-4, key
        assert got[key]["class"] == {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}[key.split("/")[0]]
        assert got[key]["prediction"] == (None if key.startswith("flux") else "v_prediction")  # eps teachers: v students
