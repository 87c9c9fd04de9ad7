"""SD3 and DiT through the distillers and the CLI: the shipped recipes (configs/sd3_dmd2.yaml,
sd3_lcm_lora.yaml, dit_dmd2.yaml, dit_lcm.yaml) run a few steps on tiny random pipelines with
`stepdistill distill ... --set teacher.path=...`; each export reloads in a fresh process (stock
diffusers, no stepdistill) and samples exactly what the in-memory student samples; `stepdistill
export RUN_DIR` rebuilds the same artefact; DiT never drops labels in train mode; a DiT LoRA
student is exported merged (DiTPipeline loads no LoRA files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from fresh_process import run_fresh_python  # noqa: E402
from test_any_teacher import weights  # noqa: E402
from tiny_pipelines import tiny_dit_pipeline, tiny_sd3_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# fp32 and no frozen-weight cast: the reload must be exact (the bf16 levers: tests/test_memory_levers.py)
SHORT = ["--set", "training.max_steps=2", "--set", "training.batch_size=2", "--set", "training.eval_every=0",
         "--set", "training.num_eval_samples=4", "--set", "training.checkpoint_every=2", "--set", "evaluation.report=false",
         "--set", "training.mixed_precision=no", "--set", "memory.teacher_dtype=null"]
RUNS = {  # name -> (recipe, family, extra --set items)
    "sd3_dmd2": ("sd3_dmd2.yaml", "sd3", ["teacher.height=32", "teacher.width=32", "data.latents=null", "data.prompts_file=null",
                                          "dmd.critic_updates_per_generator_update=1"]),
    "sd3_lcm_lora": ("sd3_lcm_lora.yaml", "sd3", ["teacher.height=32", "teacher.width=32", "data.latents=null", "data.prompts_file=null"]),
    "dit_dmd2": ("dit_dmd2.yaml", "dit", ["dmd.critic_updates_per_generator_update=1"]),
    "dit_lcm": ("dit_lcm.yaml", "dit", []),
}


def image_folders(root: Path) -> dict[str, Path]:
    """Captioned 32x32 images (SD3: metadata.jsonl) and class sub-folders of 16x16 images (DiT)."""
    rng = np.random.default_rng(0)
    captioned, classes = root / "captioned", root / "classes"
    captioned.mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(captioned / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": ["a cat", "a dog"][i % 2]})
    (captioned / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("a", "b"):
        (classes / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(classes / name / f"{i}.png")
    return {"sd3": captioned, "dit": classes}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_dit")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    tiny_dit_pipeline().save_pretrained(root / "dit")
    data = image_folders(root)
    out = {}
    for name, (recipe, family, sets) in RUNS.items():
        args = ["distill", str(ROOT / "configs" / recipe), "--output-dir", str(root / name), *SHORT,
                "--set", f"teacher.path={root / family}", "--set", f"data.images={data[family]}"]
        for item in sets:
            args += ["--set", item]
        assert main(args) == 0, name
        out[name] = root / name
    return out


def test_recipes_train_the_roles_they_name(runs, capsys):
    roles = {name: set(json.loads((run / "checkpoint-00000002" / "trainer_state.json").read_text())["roles"]) for name, run in runs.items()}
    # LoRA fake score on the teacher's denoiser: the teacher role is the rest of the teacher (encoders, VAE), frozen
    assert roles["sd3_dmd2"] == {"student", "fake_score", "discriminator", "teacher"}
    assert roles["dit_dmd2"] == {"student", "fake_score", "discriminator", "teacher"}  # full fake score copy
    assert roles["sd3_lcm_lora"] == {"student", "teacher"}  # the LoRA sits on the teacher's own denoiser; encoders and VAE: teacher
    assert roles["dit_lcm"] == {"student", "teacher"}
    assert (runs["sd3_lcm_lora"] / "lora" / "pytorch_lora_weights.safetensors").is_file()
    index = {name: json.loads((runs[name] / "pipeline" / "model_index.json").read_text()) for name in ("sd3_dmd2", "dit_dmd2", "dit_lcm")}
    assert index["sd3_dmd2"]["_class_name"] == "StableDiffusion3Pipeline"
    assert index["sd3_dmd2"]["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    assert index["dit_dmd2"]["_class_name"] == "DiTPipeline" and index["dit_dmd2"]["scheduler"][1] == "DDIMScheduler"
    assert index["dit_lcm"]["scheduler"][1] == "LCMScheduler"
    for run in runs.values():  # the attention backend is recorded with every run
        assert json.loads((run / "run.json").read_text())["memory"]["attention"] == "sdpa"


def in_memory_samples(run: Path, family: str):
    """The run's student (rebuilt from its checkpoint) sampled by the run's own sampler: SD3
    latents for "a cat", DiT images of classes 0 and 1; LCM's re-noising from torch.manual_seed(1),
    as the stock pipelines draw it (they call scheduler.step without the generator)."""
    from stepdistill.distillers.registry import load_distill_recipe
    from stepdistill.distillers.run import build_method, load_recipe_teacher
    from stepdistill.training.checkpoint import latest_checkpoint, load_role_weights

    recipe = load_distill_recipe(json.loads((run / "run.json").read_text())["recipe"])
    teacher = load_recipe_teacher(recipe)
    method = build_method(teacher, recipe, None)
    network = load_role_weights(latest_checkpoint(run), "student", method.student, ema=method.export_from_ema)
    g = torch.Generator().manual_seed(0)
    conditions = ["a cat"] if family == "sd3" else [0, 1]
    noise = torch.randn(len(conditions), *method.shape, generator=g)
    torch.manual_seed(1)
    with torch.no_grad():
        x = method.sample(network, noise, teacher.encode(conditions), generator=None)
        if family == "dit":
            x = (teacher.vae_decode(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return x.float().numpy(), method.num_steps


RELOAD = """
import json, os, torch
import diffusers
runs = {runs}
out = {{}}
for name, (path, teacher, family, steps) in runs.items():
    if os.path.isfile(os.path.join(path, "pytorch_lora_weights.safetensors")):  # LoRA student: stock teacher + the file
        pipe = diffusers.DiffusionPipeline.from_pretrained(teacher)
        config = json.load(open(os.path.join(path, "scheduler", "scheduler_config.json")))
        pipe.scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(path, subfolder="scheduler")
        pipe.load_lora_weights(path)
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    if family == "sd3":
        x = pipe("a cat", height=32, width=32, guidance_scale=1.0, num_inference_steps=steps, generator=g, output_type="latent").images
    else:
        x = torch.as_tensor(pipe(class_labels=[0, 1], guidance_scale=1.0, num_inference_steps=steps, generator=g, output_type="np").images)
    out[name] = [type(pipe).__name__, x.float().numpy().tolist()]
print(json.dumps(out))
"""


def test_exports_reload_in_a_fresh_process_equal_to_the_in_memory_student(runs, tmp_path):
    expected, jobs = {}, {}
    for name, run in runs.items():
        family = RUNS[name][1]
        expected[name], steps = in_memory_samples(run, family)
        artefact = run / ("lora" if (run / "lora").is_dir() else "pipeline")
        jobs[name] = [str(artefact), str(run.parent / family), family, steps]
    theirs = json.loads(run_fresh_python(RELOAD.format(runs=repr(jobs)), cwd=tmp_path).strip().splitlines()[-1])
    classes = {"sd3_dmd2": "StableDiffusion3Pipeline", "sd3_lcm_lora": "StableDiffusion3Pipeline", "dit_dmd2": "DiTPipeline", "dit_lcm": "DiTPipeline"}
    for name, ours in expected.items():
        cls, values = theirs[name]
        assert cls == classes[name], name
        assert np.abs(np.array(values) - ours).max() < 1e-5, name
        assert np.array(values).std() > 0, name


def test_stepdistill_export_rebuilds_each_artefact(runs, tmp_path):
    for name, run in runs.items():
        artefact = run / ("lora" if (run / "lora").is_dir() else "pipeline")
        assert main(["export", str(run), str(tmp_path / name)]) == 0, name
        ours, theirs = weights(artefact), weights(tmp_path / name)
        assert ours.keys() == theirs.keys() and ours, name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


# -- DiT specifics ---------------------------------------------------------------------------------
def dit_method(tmp_path, **student):
    from stepdistill.config import from_dict
    from stepdistill.distillers.base import RunData
    from stepdistill.distillers.distribution_matching import DMDRecipe
    from stepdistill.distillers.registry import method_class
    from stepdistill.teachers.dit import DiTTeacher

    teacher = DiTTeacher.from_pipeline(tiny_dit_pipeline())
    recipe = from_dict(DMDRecipe, {"method": "dmd2", "student": student, "teacher": {"path": str(tmp_path)}})
    return method_class(recipe.method)(teacher, recipe, RunData.in_memory(teacher, pool=[0, 1, 2]))


def test_dit_student_in_train_mode_never_drops_labels(tmp_path):
    """DiT's label embedding would replace labels by the null class with p = 0.1 in train mode
    (global RNG); the teacher adapter turns that off for the teacher and every copy of it."""
    method = dit_method(tmp_path)
    student = method.student.train()
    x, t, labels = torch.randn(64, 4, 8, 8), torch.full((64,), 500), torch.arange(64) % 7
    with torch.no_grad():
        outs = [student(x, timestep=t, class_labels=labels).sample for _ in range(2)]
        student.eval()
        reference = student(x, timestep=t, class_labels=labels).sample
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], reference)
    # without the fix, 64 samples at p = 0.1 drop some label with probability 1 - 0.9^64 > 0.998
    from diffusers.models.embeddings import LabelEmbedding

    embeddings = [m for m in student.modules() if isinstance(m, LabelEmbedding)]
    assert embeddings and all(m.dropout_prob == 0.0 for m in embeddings)


def test_dit_lora_student_is_exported_merged_as_a_stock_dit_pipeline(tmp_path):
    from diffusers import DiTTransformer2DModel

    from stepdistill.distillers.common import merge_lora
    from stepdistill.distillers.run import artefact_dir, export_student

    method = dit_method(tmp_path, lora_rank=4)
    with torch.no_grad():
        for name, p in method.student.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained-looking adapter
    assert method.lora_student and not method.exports_lora_file and artefact_dir(method, tmp_path).name == "pipeline"
    out = export_student(method, method.student, tmp_path / "pipeline")
    reloaded = DiTTransformer2DModel.from_pretrained(out, subfolder="transformer")
    merged = merge_lora(method.student).state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in reloaded.state_dict().items())
