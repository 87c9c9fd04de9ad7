"""Consistency distillation (LCM, LCM-LoRA, PCM): export parity, phase edges, w-embedding, a
measured training effect, and the LoRA round trip into stock SD / SDXL pipelines."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, LCMScheduler, TCDScheduler, UNet2DModel

from stepdistill.config import TrainingConfig, from_dict
from stepdistill.distillers.base import RunData
from stepdistill.distillers.consistency import ConsistencyDistillation, ConsistencyRecipe
from stepdistill.distillers.registry import method_class
from stepdistill.distillers.registry import load_distill_recipe
from stepdistill.distillers.run import distill, export_student
from stepdistill.errors import RecipeError
from stepdistill.sampling import student_timesteps
from stepdistill.sampling import ddim_sample
from stepdistill.teachers.pixel import PixelUNetTeacher
from stepdistill.training import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from fresh_process import run_fresh_python  # noqa: E402
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def tiny_pixel_teacher(seed: int = 0) -> PixelUNetTeacher:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=11,
    ).eval()
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing")
    return PixelUNetTeacher(unet, scheduler, pipeline_class="ClassConditionalPipeline")


def consistency(teacher, data, conditions, method: str = "lcm", steps: int = 4, lr: float = 1e-3, ema=None, lora_rank: int = 0,
                **section) -> ConsistencyDistillation:
    """The method on in-memory data (samples in the network's space and their conditions)."""
    recipe = from_dict(ConsistencyRecipe, {"method": method, "student": {"num_steps": steps, "lora_rank": lora_rank},
                                           "consistency": section, "optimizers": {"student": {"lr": lr}}, "ema": ema})
    return method_class(recipe.method)(teacher, recipe, RunData.in_memory(teacher, data, conditions))


def pixel_method(method: str = "lcm", steps: int = 4, lr: float = 1e-3, ema=None, seed: int = 0, **section) -> ConsistencyDistillation:
    teacher = tiny_pixel_teacher(seed)
    g = torch.Generator().manual_seed(1)
    data = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(64) % 10
    return consistency(teacher, data, labels, method, steps, lr, ema, **section)


def train(method, tmp_path, steps: int, batch_size: int = 16) -> Trainer:
    trainer = Trainer(method, TrainingConfig(max_steps=steps, batch_size=batch_size, checkpoint_every=10_000),
                      tmp_path / "run", log_with=None, progress=False)
    trainer.train()
    return trainer


# -- LCM: export ------------------------------------------------------------------------------
def test_lcm_export_is_an_lcm_pipeline_reproducing_the_in_memory_sampler(tmp_path):
    method = pixel_method("lcm", steps=4, num_solver_steps=20, guidance_range=(2.0, 2.0))
    trainer = train(method, tmp_path, steps=2)
    student = method.export_network(method.sampling_network(trainer))
    out = export_student(method, student, tmp_path / "pipeline")
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 20
    # the exported timesteps are on the teacher's 20-step grid and are what the pipeline runs
    grid = method.grid.tolist()
    exported = student_timesteps(pipe.scheduler, 4).tolist()
    assert exported[0] == 999 and all(t in grid for t in exported)
    labels = torch.arange(6) % 10
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = method.sample(student, noise, method.teacher.encode(labels), generator=torch.Generator().manual_seed(4))
    theirs = pipe(labels, latents=noise, generator=torch.Generator().manual_seed(4), output_type="pt").images
    assert torch.allclose((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5)
    assert pipe.config.default_num_inference_steps == 4
    # TCD sampling of the same student: same timesteps; gamma (the pipeline's eta) 0 is deterministic
    tcd = DiffusionPipeline.from_pretrained(tmp_path / "pipeline_tcd", trust_remote_code=True)  # written next to it
    assert isinstance(tcd.scheduler, TCDScheduler)
    assert student_timesteps(tcd.scheduler, 4).tolist() == exported

    def run(gamma, seed):
        return tcd(labels, latents=noise, eta=gamma, generator=torch.Generator().manual_seed(seed), output_type="pt").images

    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert (run(0.5, 1) - run(0.5, 2)).abs().max() > 1e-3


# -- PCM: phases ------------------------------------------------------------------------------
def test_pcm_phase_edges_are_the_exported_ddim_timesteps():
    method = pixel_method("pcm", steps=4, num_solver_steps=20)
    assert isinstance(method.scheduler, DDIMScheduler) and method.scheduler.config.timestep_spacing == "trailing"
    assert method.edges.tolist() == [999.0, 749.0, 499.0, 249.0, -1.0]
    t = torch.tensor([999, 979, 759, 749, 269, 249, 19])
    assert method.edge_below(t).tolist() == [749.0, 749.0, 749.0, 499.0, 249.0, -1.0, -1.0]
    # f_θ at a phase's start is exactly one step of the exported DDIM sampler
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = method.teacher.encode([1, 2, 3])
    f = method.consistency_fn(method.student, x, torch.full((3,), 999), cond, torch.ones(3))
    one_step = copy.deepcopy(method.scheduler)
    one_step.set_timesteps(4)
    out = method.teacher.guided_output(x, torch.full((3,), 999), cond)
    assert torch.allclose(f, one_step.step(out, 999, x).prev_sample, atol=1e-5)


def test_phase_count_that_does_not_divide_the_schedule_is_a_clear_error():
    with pytest.raises(RecipeError, match=r"student.num_steps=3 \(PCM phases\) does not divide"):
        pixel_method("pcm", steps=3, num_solver_steps=20)
    with pytest.raises(RecipeError, match=r"student.num_steps \(21\) exceeds consistency.num_solver_steps \(20\)"):
        pixel_method("lcm", steps=21, num_solver_steps=20)  # found by tests/test_recipe_fuzz.py


def test_pcm_training_moves_few_step_samples_onto_the_teacher_ode(tmp_path):
    """The measured effect: after distillation the 2-step student lands closer to the teacher's
    8-step DDIM solution from the same noise than the undistilled 2-step sampler does."""
    method = pixel_method("pcm", steps=2, lr=2e-3, num_solver_steps=8, loss="l2")
    labels = torch.arange(32) % 10
    cond = method.teacher.encode(labels)
    noise = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    teacher_8 = ddim_sample(method.teacher, cond, noise, copy.deepcopy(method.teacher.scheduler), 8)

    def gap(network):
        return float((method.sample(network, noise, cond) - teacher_8).pow(2).mean())

    before = gap(method.student)
    trainer = train(method, tmp_path, steps=60, batch_size=32)
    after = gap(trainer.unwrap("student"))
    assert after < 0.7 * before, (before, after)  # measured: about 0.49x; no training: 1.0x


# -- guidance ---------------------------------------------------------------------------------
def test_guidance_range_needs_a_w_embedding_and_a_unet_that_takes_one():
    from stepdistill.distillers.guidance_input import w_conditioned_copy

    with pytest.raises(RecipeError, match="w_embedding is off"):
        pixel_method(guidance_range=(1.0, 3.0))
    with pytest.raises(RecipeError, match="needs a UNet"):
        w_conditioned_copy(torch.nn.Linear(2, 2), 32)


def test_w_embedding_pixel_student_exports_a_pipeline_driven_by_guidance_scale(tmp_path):
    """A UNet2DModel teacher's w-conditioned student (GuidanceUNet2DModel) starts as the teacher,
    and its exported ClassConditionalPipeline (the UNet class travels in unet/) reproduces the
    in-memory sampler at each w, with one network pass per step (no CFG)."""
    from stepdistill.pipelines.guidance_unet_2d import GuidanceUNet2DModel

    method = pixel_method(steps=2, num_solver_steps=10, guidance_range=(1.0, 3.0), w_embedding=True, w_embedding_dim=32)
    teacher = method.teacher
    assert isinstance(method.student, GuidanceUNet2DModel) and method.student.config.time_cond_proj_dim == 32
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, t = teacher.encode([1, 2, 3, 4]), torch.full((4,), 999)
    with method.w_input.at(torch.tensor(3.0)):
        start = method.consistency_fn(method.student, x, t, cond, torch.full((4,), 3.0))
    assert torch.allclose(start, method.consistency_fn(teacher.unet, x, t, cond, torch.ones(4)), atol=1e-6)
    torch.nn.init.normal_(method.student.time_embedding.cond_proj.weight, std=0.5)
    out = export_student(method, method.student, tmp_path / "pipe")
    assert (out / "unet" / "guidance_unet_2d.py").is_file()
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe.unet).__name__ == "GuidanceUNet2DModel" and pipe.config.default_guidance_scale == 1.0
    calls = []
    pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    labels = torch.arange(6) % 10
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    results = {}
    for w in (1.0, 2.5):
        ours = method.sample(method.student, noise, teacher.encode(labels), guidance_scale=w, generator=torch.Generator().manual_seed(4))
        theirs = pipe(labels, latents=noise, guidance_scale=w, generator=torch.Generator().manual_seed(4), output_type="pt").images
        assert torch.allclose((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5)
        results[w] = theirs
    assert calls == [6] * 4  # 2 steps x 2 calls, never a doubled CFG batch
    assert (results[1.0] - results[2.5]).abs().max() > 1e-3  # the embedding matters
    with pytest.warns(UserWarning, match="outside the range"):
        pipe(labels[:1], guidance_scale=4.0, num_inference_steps=1)
    # a process that never imports stepdistill loads the custom UNet from the directory
    from safetensors.torch import save_file

    save_file({"noise": noise, "labels": labels}, tmp_path / "inputs.safetensors")
    stdout = run_fresh_python(f"""
        import json, torch
        from diffusers import DiffusionPipeline
        from safetensors.torch import load_file
        inputs = load_file({str(tmp_path / "inputs.safetensors")!r})
        pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
        images = pipe(inputs["labels"], latents=inputs["noise"], guidance_scale=2.5, generator=torch.Generator().manual_seed(4), output_type="pt").images
        print(json.dumps([type(pipe.unet).__name__, images.flatten().tolist()]))
    """, cwd=tmp_path)
    name, values = __import__("json").loads(stdout.strip().splitlines()[-1])
    assert name == "GuidanceUNet2DModel"
    assert torch.allclose(torch.tensor(values).reshape(results[2.5].shape), results[2.5], atol=1e-5)


def sd_teacher(tmp_path):
    from stepdistill.teachers import load_teacher

    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    return load_teacher(tmp_path / "sd")


def test_w_embedding_student_is_driven_by_the_stock_pipelines_guidance_scale(tmp_path):
    teacher = sd_teacher(tmp_path)
    method = consistency(teacher, torch.randn(2, *teacher.sample_shape()), ["a", "b"], steps=2, num_solver_steps=10,
                         guidance_range=(2.0, 4.0), w_embedding=True, w_embedding_dim=32)
    # zero-initialised w projection: the student starts as the (unguided) teacher
    x = torch.randn(2, *teacher.sample_shape(), generator=torch.Generator().manual_seed(0))
    cond = teacher.encode(["a", "b"])
    with method.w_input.at(torch.tensor(3.0)):
        start = method.consistency_fn(method.student, x, torch.tensor([999, 999]), cond, torch.full((2,), 3.0))
    assert torch.allclose(start, method.consistency_fn(teacher.unet, x, torch.tensor([999, 999]), cond, torch.ones(2)), atol=1e-5)
    torch.nn.init.normal_(method.student.time_embedding.cond_proj.weight, std=0.5)
    out = export_student(method, method.student, tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 32
    latents = torch.randn(1, *teacher.sample_shape(), generator=torch.Generator().manual_seed(1))
    results = {}
    for w in (2.0, 4.0):
        ours = method.sample(method.student, latents, teacher.encode(["a"]), guidance_scale=w, generator=torch.Generator().manual_seed(2))
        theirs = pipe("a", num_inference_steps=2, guidance_scale=w, latents=latents, output_type="latent",
                      generator=torch.Generator().manual_seed(2)).images
        assert torch.allclose(ours, theirs, atol=1e-4)
        results[w] = theirs
    assert (results[2.0] - results[4.0]).abs().max() > 1e-3  # the embedding matters
    with pytest.warns(UserWarning, match="outside the range"):
        method.sample(method.student, latents, teacher.encode(["a"]), guidance_scale=7.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        method.sample(method.student, latents, teacher.encode(["a"]), guidance_scale=3.0)


# -- LCM-LoRA ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_lcm_lora_round_trip_through_load_lora_weights(tmp_path, family):
    from stepdistill.teachers import load_teacher

    pipe = tiny_sd_pipeline() if family == "sd" else tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "teacher")
    teacher = load_teacher(tmp_path / "teacher")
    method = consistency(teacher, torch.randn(4, *teacher.sample_shape()), ["a red square", "a cat", "b", "c"], steps=2, lr=5e-2,
                         ema={"decay": 0.95}, lora_rank=4, num_solver_steps=10, guidance_range=(2.0, 2.0))
    assert method.ema is None  # LCM-LoRA has no target network
    trainer = train(method, tmp_path, steps=3, batch_size=2)
    student = trainer.unwrap("student")
    lora_dir = export_student(method, student, tmp_path / "lora")
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    kw = dict(num_inference_steps=2, guidance_scale=1.0, output_type="np")
    in_memory = teacher.build_pipeline(student, method.scheduler)("a red square", generator=torch.Generator().manual_seed(0), **kw).images

    stock = type(pipe).from_pretrained(tmp_path / "teacher")
    stock.scheduler = LCMScheduler.from_pretrained(lora_dir, subfolder="scheduler")
    base = stock("a red square", generator=torch.Generator().manual_seed(0), **kw).images
    stock.load_lora_weights(lora_dir)
    loaded = stock("a red square", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(in_memory - loaded).max() <= 1e-4
    assert abs(in_memory - base).max() > 1e-3  # the trained LoRA changed the images


# -- recipes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["digits_lcm.yaml", "digits_pcm.yaml"])
def test_shipped_recipes_validate(name):
    recipe = load_distill_recipe(ROOT / "configs" / name)
    assert isinstance(recipe, ConsistencyRecipe) and recipe.method in ("lcm", "pcm") and recipe.data.images == "digits"
    with pytest.raises(RecipeError, match="num_phase"):
        load_distill_recipe(ROOT / "configs" / name, {"consistency": {"num_phase": 4}})


@pytest.mark.parametrize("name", ["sd15_lcm.yaml", "sd15_lcm_lora.yaml", "sdxl_lcm_lora.yaml"])
def test_latent_recipes_validate(name):
    recipe = load_distill_recipe(ROOT / "configs" / name)
    assert recipe.teacher.path.startswith("models/") and recipe.data.latents


FRESH_PROCESS = r"""
import sys, json
sys.modules["stepdistill"] = None  # prove the exported directories need no stepdistill
import torch
from diffusers import DiffusionPipeline, LCMScheduler
full, teacher, lora = sys.argv[1:4]
pipe = DiffusionPipeline.from_pretrained(full)
a = pipe("a cat", num_inference_steps=2, guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(0)).images
stock = DiffusionPipeline.from_pretrained(teacher)
stock.scheduler = LCMScheduler.from_pretrained(lora, subfolder="scheduler")
stock.load_lora_weights(lora)
b = stock("a cat", num_inference_steps=2, guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0)).images
print(json.dumps({"full": [type(pipe.scheduler).__name__, pipe.unet.config.time_cond_proj_dim, float(abs(a).sum())],
                  "lora": [type(stock.scheduler).__name__, float(abs(b).sum()), list(b.shape)]}))
"""


def test_latent_recipes_export_and_reload_in_a_fresh_process_without_stepdistill(tmp_path):
    import json
    import subprocess

    from safetensors.torch import save_file

    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    save_file({"latents": torch.randn(4, 4, 16, 16), "prompt_index": torch.tensor([0, 1, 0, 1])}, tmp_path / "latents.safetensors")
    common = {"data": {"latents": str(tmp_path / "latents.safetensors"), "prompts": ["a cat", "a dog"], "prompts_file": None},
              "training": {"max_steps": 2, "batch_size": 2, "mixed_precision": "no"}}
    lcm = {**common, "teacher": {"path": str(tmp_path / "sd")}, "consistency": {"num_solver_steps": 10, "w_embedding_dim": 32}}
    full = distill(ROOT / "configs" / "sd15_lcm.yaml", tmp_path / "full", overrides=lcm, progress=False)
    lora = distill(ROOT / "configs" / "sdxl_lcm_lora.yaml", tmp_path / "lora_run", overrides={**common, "teacher": {"path": str(tmp_path / "sdxl")},
                   "consistency": {"num_solver_steps": 10}, "optimizers": {"student": {"lr": 0.05}}}, progress=False)
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(full), str(tmp_path / "sdxl"), str(lora)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["full"][:2] == ["LCMScheduler", 32] and result["full"][2] > 0
    assert result["lora"][0] == "LCMScheduler" and result["lora"][2] == [1, 32, 32, 3]


def test_distill_command_dispatches_on_the_recipes_method(tmp_path, capsys):
    from stepdistill.cli import main

    bad = tmp_path / "lcm.yaml"
    bad.write_text((ROOT / "configs" / "digits_lcm.yaml").read_text().replace("  num_solver_steps: 50", "  num_solver_step: 50"))
    assert main(["distill", str(bad), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "num_solver_step" in err and "num_solver_steps" in err  # the consistency recipe's validation answered


def flux_teacher(tmp_path):
    from stepdistill.teachers import load_teacher

    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    return load_teacher(tmp_path / "flux")


def test_flux_lcm_grid_is_the_pipelines_own_sigmas_and_export_reproduces_the_student(tmp_path):
    """Flow matching: the solver grid is FluxPipeline's shifted N-step schedule at the training
    resolution, the exported FlowMatchLCMScheduler's K steps lie on it, and the stock FluxPipeline
    (loaded from the directory) reproduces the in-memory student."""
    from diffusers import FlowMatchLCMScheduler, FluxPipeline

    teacher = flux_teacher(tmp_path)
    shape = tuple(teacher.sample_shape(32, 32))
    data = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    method = consistency(teacher, data, ["a cat", "a dog", "a cat", "a dog"], steps=2, lr=1e-2, num_solver_steps=8)
    stock = FluxPipeline.from_pretrained(tmp_path / "flux")
    stock.set_progress_bar_config(disable=True)

    def pipeline_timesteps(pipe, steps):
        seen = []
        pipe("a cat", num_inference_steps=steps, height=32, width=32, output_type="latent",
             callback_on_step_end=lambda p, i, t, kw: seen.append(float(t)) or kw)
        return seen

    assert method.grid.tolist() == pytest.approx(pipeline_timesteps(stock, 8), abs=1e-3)
    assert method.grid[0] == 1000.0 and method.grid[-1] > 0  # shifted sigmas * 1000, the end (0) excluded
    with pytest.raises(RecipeError, match="to divide num_solver_steps"):
        consistency(teacher, data, ["a"] * 4, steps=3, num_solver_steps=8)
    with pytest.raises(RecipeError, match="needs a UNet"):
        consistency(teacher, data, ["a"] * 4, steps=2, num_solver_steps=8, guidance_range=(1.0, 2.0), w_embedding=True)

    trainer = train(method, tmp_path, steps=3, batch_size=2)
    student = method.export_network(method.sampling_network(trainer))
    out = export_student(method, student, tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, FluxPipeline) and isinstance(pipe.scheduler, FlowMatchLCMScheduler)
    assert pipeline_timesteps(pipe, 2) == pytest.approx(student_timesteps(method.scheduler, 2, **method.timestep_kwargs(2)).tolist(), abs=1e-3)
    assert all((method.grid - t).abs().min() < 1e-3 for t in pipeline_timesteps(pipe, 2))
    # one step is deterministic (the re-noising goes to sigma 0): the stock pipeline == the in-memory student
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(3))
    ours = method.sample(student, noise, teacher.encode(["a cat"]), num_steps=1)
    theirs = pipe("a cat", num_inference_steps=1, height=32, width=32, output_type="latent",
                  generator=torch.Generator().manual_seed(3)).images
    from stepdistill.teachers.flux import unpack_latents

    assert torch.allclose(ours, unpack_latents(theirs, *shape[1:]), atol=1e-4)
    assert (ours - method.sample(teacher.transformer, noise, teacher.encode(["a cat"]), num_steps=1)).abs().max() > 1e-4  # it trained


def test_flux_lcm_lora_recipe_round_trip_through_load_lora_weights(tmp_path):
    """configs/flux_lcm_lora.yaml as shipped (rank, targets), on a tiny Flux pipeline: the LoRA file
    loaded into the stock FluxPipeline with its FlowMatchLCMScheduler reproduces the in-memory student."""
    from diffusers import FlowMatchLCMScheduler, FluxPipeline
    from safetensors.torch import save_file

    teacher = flux_teacher(tmp_path)
    shape = tuple(teacher.sample_shape(32, 32))
    save_file({"latents": torch.randn(4, *shape), "prompt_index": torch.tensor([0, 1, 0, 1])}, tmp_path / "latents.safetensors")
    overrides = {"teacher": {"path": str(tmp_path / "flux")}, "data": {"latents": str(tmp_path / "latents.safetensors"), "prompts": ["a cat", "a dog"],
                 "prompts_file": None}, "consistency": {"num_solver_steps": 8}, "student": {"num_steps": 2},
                 "training": {"max_steps": 3, "batch_size": 2, "mixed_precision": "no"}, "optimizers": {"student": {"lr": 0.05}}}
    lora = distill(ROOT / "configs" / "flux_lcm_lora.yaml", tmp_path / "run", overrides=overrides, progress=False)
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    pipe = FluxPipeline.from_pretrained(tmp_path / "flux")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchLCMScheduler.from_pretrained(lora, subfolder="scheduler")
    kw = dict(num_inference_steps=1, height=32, width=32, output_type="latent")
    before = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(lora)
    after = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    # the in-memory student: the recipe's method with the run's LoRA weights put back (peft's own loader)
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from stepdistill.teachers.flux import unpack_latents

    recipe = load_distill_recipe(ROOT / "configs" / "flux_lcm_lora.yaml", overrides)
    method = method_class(recipe.method)(teacher, recipe, RunData.in_memory(teacher, torch.randn(2, *shape), ["a cat", "a dog"]))
    state = {k.removeprefix("transformer."): v for k, v in load_file(lora / "pytorch_lora_weights.safetensors").items()}
    set_peft_model_state_dict(method.student, state)
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    ours = method.sample(method.student, noise, teacher.encode(["a cat"]), num_steps=1)
    diff = float((unpack_latents(after, *shape[1:]) - ours).abs().max())
    assert diff <= 1e-4, diff
    assert (after - before).abs().max() > 1e-4
