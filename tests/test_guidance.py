"""Guidance distillation (a w-conditioned student) and adapter guidance distillation (AGD: LoRA
adapters at strength w - 1 on the frozen teacher): measured training effects, the untouched base,
the exported artefacts driven by guidance_scale, and the tiny SD 1.5 / SDXL / Flux recipes
reloaded in a fresh process with stock diffusers."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from stepdistill.config import TrainingConfig, from_dict
from stepdistill.distillers.base import RunData
from stepdistill.distillers.common import lora_disabled
from stepdistill.distillers.guidance import AdapterGuidanceDistillation, GuidanceDistillation, GuidanceRecipe
from stepdistill.distillers.registry import load_distill_recipe
from stepdistill.distillers.run import build_method, export_student, open_run_data
from stepdistill.errors import RecipeError
from stepdistill.teachers.pixel import PixelUNetTeacher
from stepdistill.training import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from fresh_process import run_fresh_python  # noqa: E402
from tiny_pipelines import tiny_flux_pipeline, tiny_pixel_unet, tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def pixel_teacher() -> PixelUNetTeacher:
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing")
    return PixelUNetTeacher(tiny_pixel_unet(num_class_embeds=11), scheduler, pipeline_class="ClassConditionalPipeline")


def pixel_method(method: str, teacher=None, lr: float = 1e-3, **section):
    teacher = teacher or pixel_teacher()
    student = {"num_steps": 4, "lora_rank": 1 if method == "agd" else 0}
    recipe = from_dict(GuidanceRecipe, {"method": method, "student": student, "guidance": section, "ema": None,
                                        "teacher": {"guidance_scale": 2.0}, "optimizers": {"student": {"lr": lr}}})
    data = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cls = AdapterGuidanceDistillation if method == "agd" else GuidanceDistillation
    return cls(teacher, recipe, RunData.in_memory(teacher, data, torch.arange(64) % 10))


def train(method, tmp_path, steps: int, batch_size: int = 32) -> Trainer:
    trainer = Trainer(method, TrainingConfig(max_steps=steps, batch_size=batch_size, checkpoint_every=10_000),
                      tmp_path / "run", log_with=None, progress=False)
    trainer.train()
    return trainer


def cfg_gap(method, network, w: float = 3.0) -> float:
    """Mean squared distance between the student's 4-step sampler at w (one pass per step) and the
    teacher's own 4-step CFG sampler at w, from the same noise."""
    labels = torch.arange(40) % 10
    cond = method.teacher.encode(labels)
    noise = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with lora_disabled(method.student):
        teacher = method.sampler.sample(method.teacher, noise, cond, guidance_scale=w)
    return float((method.sample(network, noise, cond, guidance_scale=w) - teacher).pow(2).mean())


# -- guidance distillation ----------------------------------------------------------------------
def test_guidance_student_matches_the_teachers_cfg_sampler_after_training(tmp_path):
    """Starts as the teacher (w input at zero: the conditional output at every w); a short run on
    noised data moves its one-pass 4-step samples at w = 3 onto the teacher's CFG samples."""
    method = pixel_method("guidance", lr=1e-3, inputs="data", guidance_range=(1.0, 3.0), w_embedding_dim=32)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, t = method.teacher.encode([1, 2, 3, 4]), torch.full((4,), 999)
    start = method.student_output(method.student, x, t, cond, torch.full((4,), 3.0))
    assert torch.equal(start, method.teacher.guided_output(x, t, cond, 1.0))
    before = cfg_gap(method, method.student)
    trainer = train(method, tmp_path, steps=120)
    after = cfg_gap(method, trainer.unwrap("student"))
    assert after < 0.75 * before, (before, after)  # measured: 0.175 -> 0.098 (x0.56); no training: x1.0


def test_guidance_pipeline_is_driven_by_guidance_scale_with_one_pass_per_step(tmp_path):
    method = pixel_method("guidance", inputs="trajectories", trajectory_steps=[2], trajectory_bank=4, guidance_range=(1.0, 3.0),
                          w_embedding_dim=32)
    torch.nn.init.normal_(method.student.time_embedding.cond_proj.weight, std=0.5)
    out = export_student(method, method.student, tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.config.default_guidance_scale == 2.0 and pipe.config.trained_guidance_range == [1.0, 3.0]
    calls = []
    pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    labels = torch.arange(6) % 10
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    images = {}
    for w in (1.5, 3.0):
        ours = method.sample(method.student, noise, method.teacher.encode(labels), guidance_scale=w)
        images[w] = pipe(labels, latents=noise, guidance_scale=w, output_type="pt").images
        assert torch.allclose((ours / 2 + 0.5).clamp(0, 1), images[w], atol=1e-5)
    assert calls == [6] * 8  # 4 steps x 2 calls, never a doubled CFG batch
    assert (images[1.5] - images[3.0]).abs().max() > 1e-3


def test_recipe_errors_are_one_line():
    with pytest.raises(RecipeError, match="guidance_range"):
        pixel_method("guidance", guidance_range=(3.0, 1.0))
    with pytest.raises(RecipeError, match="method: agd"):
        from_recipe = from_dict(GuidanceRecipe, {"method": "guidance", "student": {"lora_rank": 4}})
        teacher = pixel_teacher()
        GuidanceDistillation(teacher, from_recipe, RunData.in_memory(teacher, torch.zeros(2, 1, 8, 8), [0, 1]))
    with pytest.raises(RecipeError, match="at most 5%"):
        recipe = from_dict(GuidanceRecipe, {"method": "agd", "student": {"lora_rank": 16}})
        AdapterGuidanceDistillation(pixel_teacher(), recipe, None)


# -- AGD ----------------------------------------------------------------------------------------
def test_agd_trains_adapters_only_base_bitwise_untouched_and_adapters_off_is_the_teacher(tmp_path, capsys):
    teacher = pixel_teacher()
    fresh = copy.deepcopy(teacher.unet)  # the teacher as loaded
    method = pixel_method("agd", teacher=teacher, lr=1e-2, inputs="trajectories", trajectory_steps=[4], trajectory_bank=512)
    printed = capsys.readouterr().out
    assert "% of the base network's" in printed and method.adapter_parameters / method.base_parameters <= 0.05
    before = cfg_gap(method, method.student)
    trainer = train(method, tmp_path, steps=100)
    student = trainer.unwrap("student")
    after = cfg_gap(method, student)
    assert after < 0.8 * before, (before, after)  # measured: 0.175 -> 0.115 (x0.66); no training: x1.0
    # the base weights are bitwise the teacher's; only lora_ parameters were trained
    base = {k.replace(".base_layer", ""): v for k, v in student.state_dict().items() if "lora_" not in k}
    assert base.keys() == fresh.state_dict().keys()
    assert all(torch.equal(base[k], v) for k, v in fresh.state_dict().items())
    # adapters off (and strength 0 = w 1) give the teacher's conditional output back, bit for bit
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, t = teacher.encode([1, 2, 3, 4]), torch.full((4,), 500)
    reference = fresh(x, t, class_labels=cond.cond["class_labels"]).sample
    with lora_disabled(student):
        assert torch.equal(student(x, t, class_labels=cond.cond["class_labels"]).sample, reference)
    assert torch.equal(method.student_output(student, x, t, cond, torch.ones(4)), reference)
    assert (method.student_output(student, x, t, cond, torch.full((4,), 3.0)) - reference).abs().max() > 1e-3


def test_agd_pixel_export_is_the_untouched_teacher_plus_a_lora_file_switchable_off(tmp_path):
    method = pixel_method("agd", inputs="trajectories", trajectory_steps=[2], trajectory_bank=4)
    for name, p in method.student.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    out = export_student(method, method.student, tmp_path / "pipe")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    labels = torch.arange(6) % 10
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = method.teacher.encode(labels)
    with lora_disabled(method.student):
        teacher_cfg = (method.sampler.sample(method.teacher, noise, cond, guidance_scale=2.5) / 2 + 0.5).clamp(0, 1)
    ours = (method.sample(method.student, noise, cond, guidance_scale=2.5) / 2 + 0.5).clamp(0, 1)

    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    fresh = pixel_teacher().unet.state_dict()
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in fresh.items())  # the base, bitwise

    def run():
        return pipe(labels, latents=noise, guidance_scale=2.5, output_type="pt").images

    assert torch.allclose(run(), teacher_cfg, atol=1e-5)  # no adapters: the teacher with CFG
    calls = []
    pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    pipe.load_lora_weights(out)
    assert torch.allclose(run(), ours, atol=1e-5) and calls == [6] * 4  # adapters at 1.5: one pass per step
    assert (ours - teacher_cfg).abs().max() > 1e-3
    pipe.disable_lora()
    assert torch.allclose(run(), teacher_cfg, atol=1e-5)
    pipe.enable_lora()
    assert torch.allclose(run(), ours, atol=1e-5)
    pipe.unload_lora_weights()
    assert torch.allclose(run(), teacher_cfg, atol=1e-5)
    from safetensors.torch import save_file

    save_file({"noise": noise, "labels": labels}, tmp_path / "inputs.safetensors")
    stdout = run_fresh_python(f"""
        import json, torch
        from diffusers import DiffusionPipeline
        from safetensors.torch import load_file
        inputs = load_file({str(tmp_path / "inputs.safetensors")!r})
        pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
        pipe.load_lora_weights({str(out)!r})
        images = pipe(inputs["labels"], latents=inputs["noise"], guidance_scale=2.5, output_type="pt").images
        print(json.dumps(images.flatten().tolist()))
    """, cwd=tmp_path)
    assert torch.allclose(torch.tensor(json.loads(stdout.strip().splitlines()[-1])).reshape(ours.shape), ours, atol=1e-5)


# -- tiny SD 1.5 / SDXL / Flux: the shipped recipes, exported and reloaded -----------------------
FRESH = r"""
import json, sys
sys.modules["stepdistill"] = None  # the artefacts need no stepdistill
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
jobs = json.loads(open(sys.argv[1]).read())
out = {}
for job in jobs:
    inputs = load_file(job["inputs"])
    flux = job["family"] == "flux"

    def run(pipe, **extra):  # the same noise for every call
        noise = dict(height=32, width=32, generator=torch.Generator().manual_seed(3)) if flux else dict(latents=inputs["noise"])
        return pipe("a cat", num_inference_steps=2, output_type="latent", **noise, **extra).images

    w = job["w"]
    if job["method"] == "guidance":
        pipe = DiffusionPipeline.from_pretrained(job["artefact"])
        out[job["name"]] = {"student": run(pipe, guidance_scale=w).flatten().tolist()}
        continue
    pipe = DiffusionPipeline.from_pretrained(job["teacher"])  # the untouched teacher, then its adapters
    pipe.scheduler = type(pipe.scheduler).from_pretrained(job["artefact"], subfolder="scheduler")
    pipe.load_lora_weights(job["artefact"])
    if flux:
        student = run(pipe, joint_attention_kwargs={"scale": w - 1})
        pipe.disable_lora()
        teacher = run(pipe, negative_prompt="", true_cfg_scale=w)
    else:
        student = run(pipe, guidance_scale=1.0, cross_attention_kwargs={"scale": w - 1})
        pipe.disable_lora()
        teacher = run(pipe, guidance_scale=w)
    out[job["name"]] = {"student": student.flatten().tolist(), "teacher": teacher.flatten().tolist()}
print(json.dumps(out))
"""

PIPELINES = {"sd15": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "flux": tiny_flux_pipeline}


def test_tiny_latent_recipes_export_artefacts_that_stock_diffusers_reloads_equal_to_the_in_memory_model(tmp_path):
    import subprocess

    from safetensors.torch import save_file

    from stepdistill.teachers import load_teacher
    from stepdistill.teachers.flux import unpack_latents

    jobs, expected = [], {}
    for family, make in PIPELINES.items():
        pipe = make(guidance_embeds=False) if family == "flux" else make()  # Flux guidance: a new, zero-initialised embedder
        pipe.save_pretrained(tmp_path / family)
        teacher = load_teacher(tmp_path / family)
        shape = tuple(teacher.sample_shape(32, 32) if family == "flux" else teacher.sample_shape())
        save_file({"latents": torch.randn(4, *shape), "prompt_index": torch.tensor([0, 1, 0, 1])}, tmp_path / f"{family}.safetensors")
        noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(3))
        save_file({"noise": noise}, tmp_path / f"{family}_noise.safetensors")
        for kind in ("guidance", "agd"):
            if kind == "agd" and family == "flux":  # AGD on a FLUX.1-dev-like teacher (embedded guidance)
                tiny_flux_pipeline().save_pretrained(tmp_path / "flux_dev")
                teacher_dir = tmp_path / "flux_dev"
            else:
                teacher_dir = tmp_path / family
            teacher = load_teacher(teacher_dir)
            overrides = {"teacher": {"path": str(teacher_dir)}, "student": {"num_steps": 2},
                         "data": {"latents": str(tmp_path / f"{family}.safetensors"), "prompts": ["a cat", "a dog"], "prompts_file": None},
                         "training": {"max_steps": 2, "batch_size": 2, "mixed_precision": "no"},
                         "optimizers": {"student": {"lr": 0.05}}}
            if kind == "guidance":
                overrides["guidance"] = {"w_embedding_dim": 32}
            else:
                overrides["student"]["lora_rank"] = 1
                overrides["guidance"] = {"trajectory_steps": [2], "trajectory_bank": 2}
            recipe = load_distill_recipe(ROOT / "configs" / f"{family}_{kind}.yaml", overrides)
            method = build_method(teacher, recipe, open_run_data(teacher, recipe))
            trainer = train(method, tmp_path / f"{family}_{kind}", steps=2, batch_size=2)
            network = method.sampling_network(trainer)
            artefact = export_student(method, network, tmp_path / f"{family}_{kind}" / "artefact")
            w = 2.5
            cond = teacher.encode(["a cat"])
            ours = {"student": method.sample(network, noise, cond, guidance_scale=w)}
            if kind == "agd":
                with lora_disabled(method.student):
                    ours["teacher"] = method.sampler.sample(teacher, noise, cond, guidance_scale=w)
            name = f"{family}_{kind}"
            expected[name] = ours
            jobs.append({"name": name, "family": family, "method": kind, "w": w, "artefact": str(artefact),
                         "teacher": str(teacher_dir), "inputs": str(tmp_path / f"{family}_noise.safetensors")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "jobs.json")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stock = json.loads(done.stdout.strip().splitlines()[-1])
    for name, ours in expected.items():
        for what, tensor in ours.items():
            theirs = torch.tensor(stock[name][what])
            if name.startswith("flux"):
                theirs = unpack_latents(theirs.reshape(1, -1, tensor.shape[1] * 4), *tensor.shape[2:])
            diff = float((theirs.reshape(tensor.shape) - tensor).abs().max())
            assert diff <= 1e-4, (name, what, diff)
        if "teacher" in ours:  # the adapters change the output; switched off it is the teacher's CFG
            assert (ours["student"] - ours["teacher"]).abs().max() > 1e-4, name


@pytest.mark.parametrize("name", ["digits_guidance.yaml", "digits_agd.yaml"])
def test_digits_recipes_validate(name):
    recipe = load_distill_recipe(ROOT / "configs" / name)
    assert isinstance(recipe, GuidanceRecipe) and recipe.teacher.path == "digits" and recipe.guidance.guidance_range == (1.0, 3.0)
