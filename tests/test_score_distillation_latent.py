"""Tiny SD 1.5 / SDXL / Flux: the shipped VSD recipes (configs/{sd15,sdxl,flux}_vsd.yaml) with a LoRA
fake score and a LoRA student, pointed at tiny random pipelines, train a few steps and export a
diffusers LoRA file; in a fresh interpreter (no stepdistill) the stock teacher pipeline with that
file loaded by ``load_lora_weights`` reproduces the in-memory student's one-step latents."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.distillers.registry import load_distill_recipe
from stepdistill.distillers.run import build_method, distill, load_recipe_teacher
from stepdistill.training.checkpoint import latest_checkpoint, load_role_weights

sys.path.insert(0, str(Path(__file__).parent))
from fresh_process import run_fresh_python  # noqa: E402
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {"sd": (tiny_sd_pipeline, "sd15_vsd.yaml"), "sdxl": (tiny_sdxl_pipeline, "sdxl_vsd.yaml"), "flux": (tiny_flux_pipeline, "flux_vsd.yaml")}


@pytest.fixture(scope="module")
def vsd_runs(tmp_path_factory):
    """Each recipe as shipped (method, LoRA ranks and targets, timesteps, guidance mode) with a
    LoRA student (sd15_vsd.yaml ships a full one: student.lora_rank 8 here), 32 px, 3 steps; and
    the in-memory student's latents from the run's last checkpoint (the EMA, as exported)."""
    root = tmp_path_factory.mktemp("vsd")
    runs = {}
    for family, (build, recipe_name) in FAMILIES.items():
        teacher_dir = root / f"{family}_teacher"
        build().save_pretrained(teacher_dir)
        overrides = {
            "teacher": {"path": str(teacher_dir), "height": 32, "width": 32},
            "data": {"prompts": ["a cat", "a dog on a mat", "a red cat"], "prompts_file": None},
            "training": {"max_steps": 3, "batch_size": 2, "mixed_precision": "no", "checkpoint_every": 3, "num_eval_samples": 2},
            "optimizers": {"student": {"lr": 1e-2}, "fake_score": {"lr": 1e-2}},
        }
        if family == "sd":
            overrides["student"] = {"lora_rank": 8, "lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
        recipe_path = ROOT / "configs" / recipe_name
        lora_dir = distill(recipe_path, root / f"{family}_run", overrides=overrides, progress=False, report=False)
        recipe = load_distill_recipe(recipe_path, overrides)
        assert recipe.fake_score.lora_rank > 0 and recipe.student.lora_rank > 0 and recipe.method == "vsd"
        teacher = load_recipe_teacher(recipe)
        method = build_method(teacher, recipe, None)
        assert method.shared_fake  # the fake score is a LoRA on the teacher's weights: no teacher role, no second copy
        network = load_role_weights(latest_checkpoint(root / f"{family}_run"), "student", method.student, ema=True)
        shape = tuple(teacher.sample_shape(32, 32))
        noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
        cond = teacher.encode(["a cat"])
        runs[family] = {
            "teacher": str(teacher_dir), "lora": str(lora_dir), "shape": list(shape),
            "student": method.sample(network, noise, cond).tolist(),
            "untrained": method.sample(getattr(teacher, "transformer" if family == "flux" else "unet"), noise, cond).tolist(),
        }
    return runs


FRESH = """
import json, os, torch, diffusers
runs = json.loads({runs!r})
out = {{}}
for family, run in runs.items():
    pipe = diffusers.DiffusionPipeline.from_pretrained(run["teacher"])
    pipe.set_progress_bar_config(disable=True)
    config = json.load(open(os.path.join(run["lora"], "scheduler", "scheduler_config.json")))
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(run["lora"], subfolder="scheduler")
    pipe.load_lora_weights(run["lora"])
    kwargs = dict(height=32, width=32) if family == "flux" else dict(height=32, width=32, guidance_scale=1.0)
    latents = pipe("a cat", num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images
    if family == "flux":  # packed 2x2 patches -> [B, C, H, W]
        c, h, w = run["shape"]
        latents = latents.view(1, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, c, h, w)
    out[family] = {{"class": type(pipe).__name__, "latents": latents.tolist(),
                    "lora_file": os.path.isfile(os.path.join(run["lora"], "pytorch_lora_weights.safetensors"))}}
print(json.dumps(out))
"""


def test_vsd_lora_students_reload_with_load_lora_weights_equal_to_the_in_memory_student(vsd_runs, tmp_path):
    stdout = run_fresh_python(FRESH.format(runs=json.dumps(vsd_runs)), cwd=tmp_path)
    out = json.loads(stdout.strip().splitlines()[-1])
    expected_class = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
    for family, run in vsd_runs.items():
        got = out[family]
        assert got["class"] == expected_class[family] and got["lora_file"], family
        ours, theirs, untrained = (torch.tensor(v) for v in (run["student"], got["latents"], run["untrained"]))
        assert ours.shape == theirs.shape == (1, *run["shape"]), family
        assert (ours - theirs).abs().max() <= 1e-4, (family, float((ours - theirs).abs().max()))
        assert (ours - untrained).abs().max() > 1e-3, family  # the LoRA trained: it is not the teacher's one step
