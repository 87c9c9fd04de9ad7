"""Model cards a user can paste and trust: one small exported directory per family (pixel
class-conditional, pixel unconditional DDIM / DDPM, SD, SDXL, SD3, Flux, DiT, a LoRA file), built
directly with the export functions on tiny random models. The usage snippet of each README runs,
as printed, in one fresh process with stock diffusers (no stepdistill) and makes images; the front
matter parses with huggingface_hub's ModelCard and names the right pipeline_tag and base_model."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from huggingface_hub import ModelCard

from stepdistill.distillers.common import add_lora
from stepdistill.distillers.student import save_student_lora, save_student_pipeline
from stepdistill.errors import StepdistillError
from stepdistill.export import save_class_conditional_pipeline, save_unconditional_pipeline
from stepdistill.sampling import make_student_scheduler
from stepdistill.model_card import (
    METRICS_END,
    METRICS_START,
    inside_installed_package,
    portable_path,
    read_front_matter,
    update_model_card_metrics,
)
from stepdistill.teachers.dit import DiTTeacher
from stepdistill.teachers.flux import FluxTeacher
from stepdistill.teachers.sd3 import StableDiffusion3Teacher
from stepdistill.teachers.sdxl import StableDiffusionXLTeacher
from stepdistill.teachers.stable_diffusion import StableDiffusionTeacher

from fresh_process import run_fresh_python

ROOT = Path(__file__).resolve().parent.parent
from tiny_pipelines import (
    tiny_dit_pipeline,
    tiny_flux_pipeline,
    tiny_pixel_unet,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

RECIPE = "configs/recipe.yaml"  # as a user would write it in a card: relative
# family -> (pipeline_tag, class of the loaded pipeline, image size the snippet makes)
EXPECTED = {
    "pixel-class": ("unconditional-image-generation", "ClassConditionalPipeline", (8, 8)),
    "pixel-ddim": ("unconditional-image-generation", "DDIMPipeline", (8, 8)),
    "pixel-ddpm": ("unconditional-image-generation", "DDPMPipeline", (8, 8)),
    "sd": ("text-to-image", "StableDiffusionPipeline", (32, 32)),
    "sdxl": ("text-to-image", "StableDiffusionXLPipeline", (32, 32)),
    "sd3": ("text-to-image", "StableDiffusion3Pipeline", (32, 32)),
    "flux": ("text-to-image", "FluxPipeline", (32, 32)),
    "dit": ("unconditional-image-generation", "DiTPipeline", (16, 16)),
    "lora-sd": ("text-to-image", "StableDiffusionPipeline", (32, 32)),
}


def card_info(base_model, **extra):
    return {"base_model": base_model, "method": "distribution matching distillation (test)", "recipe": RECIPE,
            "tags": ["distillation"], **extra}


def export_student(teacher, out, base_model, **extra):
    scheduler = make_student_scheduler(teacher.scheduler, 1)
    return save_student_pipeline(teacher, copy.deepcopy(teacher.denoiser), scheduler, 1, out, model_card_info=card_info(base_model, **extra))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{family: exported directory}, all under one root that is the working directory of the
    export (so the cards name them by paths relative to it); the LoRA's teacher is given by its
    absolute path, as a user may write it in a recipe."""
    root = tmp_path_factory.mktemp("cards")
    teachers, out = root / "teachers", root / "exports"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        dirs = {}
        dirs["pixel-class"] = save_class_conditional_pipeline(
            tiny_pixel_unet(11), make_student_scheduler(DDIMScheduler(prediction_type="v_prediction"), 1), out / "pixel-class",
            num_inference_steps=1, model_card_info=card_info("digits", class_names=[str(i) for i in range(10)]))
        dirs["pixel-ddim"] = save_unconditional_pipeline(
            tiny_pixel_unet(), make_student_scheduler(DDPMScheduler(), 2), out / "pixel-ddim", num_inference_steps=2,
            model_card_info=card_info("runs/shapes_teacher/pipeline"))
        dirs["pixel-ddpm"] = save_unconditional_pipeline(
            tiny_pixel_unet(), DDPMScheduler(), out / "pixel-ddpm", num_inference_steps=3, pipeline_class="DDPMPipeline")
        dirs["sd"] = export_student(StableDiffusionTeacher.from_pipeline(tiny_sd_pipeline()), out / "sd", "models/sd15")
        dirs["sdxl"] = export_student(StableDiffusionXLTeacher.from_pipeline(tiny_sdxl_pipeline()), out / "sdxl", "stabilityai/sdxl-base")
        dirs["sd3"] = export_student(StableDiffusion3Teacher.from_pipeline(tiny_sd3_pipeline()), out / "sd3", "models/sd3")
        dirs["flux"] = export_student(FluxTeacher.from_pipeline(tiny_flux_pipeline()), out / "flux", "models/flux-dev",
                                      resolution=[32, 32])
        dirs["dit"] = export_student(DiTTeacher.from_pipeline(tiny_dit_pipeline()), out / "dit", "facebook/DiT-XL-2-256",
                                     teacher_guidance_scale=4.0)

        sd = tiny_sd_pipeline()
        sd.save_pretrained(teachers / "sd")
        teacher = StableDiffusionTeacher.from_pipeline(sd)
        student = add_lora(copy.deepcopy(teacher.unet), 4, ["to_q", "to_v"])
        dirs["lora-sd"] = save_student_lora(teacher, student, make_student_scheduler(teacher.scheduler, 1), out / "lora-sd",
                                            num_steps=1, model_card_info=card_info(str(teachers / "sd")))
    return root, dirs


def readme_snippet(directory) -> str:
    card = (directory / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


RUN_SNIPPETS = r"""
import json, os, sys
results = {}
for name, cwd, snippet in json.loads(sys.argv[1]):
    os.chdir(cwd)
    if os.path.exists("sample.png"):
        os.remove("sample.png")
    scope = {"__name__": "__main__"}
    exec(compile(snippet, f"README.md of {name}", "exec"), scope)  # the snippet as printed
    images, pipe = scope["images"], scope["pipe"]
    adapters = pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") and name.startswith("lora") else {}
    results[name] = {"pipeline": type(pipe).__name__, "images": len(images), "size": list(images[0].size),
                     "saved": os.path.getsize("sample.png"), "lora": sorted(adapters)}
print(json.dumps(results))
"""


def test_every_family_runs_its_readme_snippet_as_printed_in_a_fresh_process(exports):
    root, dirs = exports
    jobs = [(name, str(root), readme_snippet(directory)) for name, directory in dirs.items()]
    out = run_fresh_python(f"import sys\nsys.argv = ['x', {json.dumps(json.dumps(jobs))}]\n" + RUN_SNIPPETS, cwd=root)
    results = json.loads(out.strip().splitlines()[-1])
    assert set(results) == set(EXPECTED)
    for name, (_, pipeline, size) in EXPECTED.items():
        got = results[name]
        assert got["pipeline"] == pipeline, name
        assert got["images"] >= 1 and tuple(got["size"]) == size and got["saved"] > 0, (name, got)
    assert results["lora-sd"]["lora"], "load_lora_weights loaded no adapter"


def test_snippets_say_what_each_pipeline_takes(exports):
    _, dirs = exports
    snippets = {name: readme_snippet(d) for name, d in dirs.items()}
    for name, snippet in snippets.items():
        assert ("trust_remote_code=True" in snippet) == (name == "pixel-class"), name  # only where the directory carries code
        assert ("prompt=" in snippet) == (EXPECTED[name][0] == "text-to-image"), name
        assert ("class_labels=" in snippet) == (name in ("pixel-class", "dit")), name
        assert "eta" not in snippet
    assert "num_inference_steps=2" in snippets["pixel-ddim"] and "num_inference_steps=3" in snippets["pixel-ddpm"]
    assert "stock `DDPMPipeline` samples with its own defaults (`num_inference_steps=1000`)" in (dirs["pixel-ddpm"] / "README.md").read_text()
    assert "guidance_scale" not in snippets["pixel-ddim"]  # unconditional pipelines take none
    assert "guidance_scale=1.0" in snippets["sd"]  # the stock default (7.5) would run CFG on a distilled student
    assert "guidance_scale=3.5" in snippets["flux"] and "height=32" in snippets["flux"]  # FLUX.1-dev's embedded guidance
    cards = {name: (d / "README.md").read_text() for name, d in dirs.items()}
    for name, (task, _, _) in EXPECTED.items():  # what negative_prompt does, on text-to-image cards only
        assert ("**Negative prompts**" in cards[name]) == (task == "text-to-image"), name
    assert "ignored at the default `guidance_scale` (guidance is baked into the weights" in cards["sd"]
    assert "takes effect with `true_cfg_scale > 1`" in cards["flux"]
    lora = snippets["lora-sd"]
    assert 'StableDiffusionPipeline.from_pretrained("teachers/sd")' in lora
    assert 'DDIMScheduler.from_pretrained("exports/lora-sd", subfolder="scheduler")' in lora
    assert 'pipe.load_lora_weights("exports/lora-sd")' in lora


def test_front_matter_validates_with_model_card_and_names_pipeline_tag_and_base_model(exports):
    root, dirs = exports
    base_models = {"pixel-class": "digits", "pixel-ddim": "runs/shapes_teacher/pipeline", "pixel-ddpm": None, "sd": "models/sd15",
                   "sdxl": "stabilityai/sdxl-base", "sd3": "models/sd3", "flux": "models/flux-dev", "dit": "facebook/DiT-XL-2-256",
                   "lora-sd": "teachers/sd"}
    for name, directory in dirs.items():
        card = ModelCard.load(directory / "README.md", ignore_metadata_errors=False)
        assert card.data.pipeline_tag == EXPECTED[name][0], name
        assert card.data.base_model == base_models[name], name
        assert card.data.library_name == "diffusers"
        assert read_front_matter(directory) == card.data.to_dict()
        text = (directory / "README.md").read_text()
        assert str(root) not in text, f"{name}: the card names an absolute path of this machine"
        kind = {"text-to-image": "text-to-image", "unconditional-image-generation": "unconditional"}[EXPECTED[name][0]]
        tags = set(card.data.tags)
        assert (kind in tags) != (name in ("pixel-class", "dit")) and ("class-conditional" in tags) == (name in ("pixel-class", "dit"))
        assert ("lora" in tags) == name.startswith("lora")
        if name != "pixel-ddpm":
            assert f"recipe `{RECIPE}`" in text
    sd = (dirs["sd"] / "README.md").read_text()
    assert "1 step with `DDIMScheduler`, at timesteps [999]" in sd
    dit = (dirs["dit"] / "README.md").read_text()
    assert "class labels in `[0, 1000)`" in dit and "the teacher's guidance w = 4 was distilled into the weights" in dit
    assert "embedded (distilled) guidance" in (dirs["flux"] / "README.md").read_text()
    lora = (dirs["lora-sd"] / "README.md").read_text()
    assert "LoRA weights (`pytorch_lora_weights.safetensors`, diffusers format) for a stock `StableDiffusionPipeline`" in lora


def test_metrics_go_into_the_table_and_the_model_index(exports, tmp_path):
    import shutil

    _, dirs = exports
    directory = tmp_path / "sd"
    shutil.copytree(dirs["sd"], directory)
    before = (directory / "README.md").read_text()
    rows = [{"steps": 1, "guidance_scale": 1.0, "num_samples": 8, "fd": 12.5, "kid": -0.72, "kid_std": 3.1, "clip_score": 21.0,
             "peak_memory_mib": 812.4, "peak_memory_kind": "cpu_peak_rss"}]
    update_model_card_metrics(directory, rows, "stepdistill eval sd --update-model-card", reference="coco-val-8", feature="random-conv")
    after = (directory / "README.md").read_text()
    assert after.split("<!-- stepdistill:metrics:start -->")[0].split("---\n", 2)[2] == before.split("<!-- stepdistill:metrics:start -->")[0].split("---\n", 2)[2]
    assert "| steps | guidance w | samples (N) | FD ↓ (feature units²) | KID ↓ (mean ± std, raw) | CLIP score ↑ (0-100) | peak memory (MiB) |" in after
    assert "| 1 | 1.00 | 8 | 12.50 | -0.72 ± 3.1 | 21.00 | 812.4 |" in after
    assert "can then be slightly negative" in after and "stepdistill eval sd --update-model-card" in after
    card = ModelCard.load(directory / "README.md", ignore_metadata_errors=False)
    values = {(r.metric_type, r.dataset_name): r.metric_value for r in card.data.eval_results}
    assert values == {("fd", "coco-val-8"): 12.5, ("kid", "coco-val-8"): -0.72, ("clip_score", "coco-val-8"): 21.0}
    assert card.data.pipeline_tag == "text-to-image" and card.data.base_model == "models/sd15"
    update_model_card_metrics(directory, [{"steps": 1, "diversity": 0.5}])  # no reference set: no model-index
    assert ModelCard.load(directory / "README.md").data.eval_results is None


def test_portable_paths_and_installed_packages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "teacher").mkdir(parents=True)
    assert portable_path(tmp_path / "runs" / "teacher") == "runs/teacher"
    assert portable_path("./runs/teacher") == "runs/teacher"
    assert portable_path("stabilityai/sd-turbo") == "stabilityai/sd-turbo"  # a Hub id stays as given
    assert portable_path("/elsewhere/models/sd15") == "sd15"  # outside the working directory: its name
    from stepdistill.digits.bench import default_teacher_dir

    import stepdistill

    assert inside_installed_package(default_teacher_dir()) is not None
    assert inside_installed_package(tmp_path / "runs" / "teacher") is None
    assert inside_installed_package(torch.__file__) is not None  # site-packages
    assert str(default_teacher_dir().resolve()).startswith(inside_installed_package(stepdistill.__file__))


def test_a_lora_card_names_the_teacher_it_was_loaded_from_or_refuses(tmp_path, monkeypatch):
    from stepdistill.teachers import load_teacher

    teacher = StableDiffusionTeacher.from_pipeline(tiny_sd_pipeline())  # built in memory: no path to name
    student = add_lora(copy.deepcopy(teacher.unet), 2, ["to_q"])
    with pytest.raises(StepdistillError, match="needs base_model"):
        save_student_lora(teacher, student, make_student_scheduler(teacher.scheduler, 1), tmp_path / "lora", num_steps=1)
    assert not any(tmp_path.iterdir())  # atomic: nothing left behind
    monkeypatch.chdir(tmp_path)
    tiny_sd_pipeline().save_pretrained(tmp_path / "models" / "sd")
    loaded = load_teacher("models/sd")
    out = save_student_lora(loaded, add_lora(copy.deepcopy(loaded.unet), 2, ["to_q"]), make_student_scheduler(loaded.scheduler, 1),
                            tmp_path / "lora", num_steps=1)
    assert read_front_matter(out)["base_model"] == "models/sd"
    assert 'StableDiffusionPipeline.from_pretrained("models/sd")' in readme_snippet(out)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_distillation_run_card_names_its_recipe_teacher_timesteps_and_guidance(tmp_path, monkeypatch, lora_rank):
    """The fields `stepdistill distill` passes (run.model_card) through export_student: an SD
    DMD2 student (full, or a LoRA file) of a teacher the recipe names by a relative path."""
    from pathlib import Path

    from stepdistill.distillers.registry import load_distill_recipe
    from stepdistill.distillers.run import build_method, export_student, load_recipe_teacher, model_card

    recipe_path = Path(__file__).resolve().parent.parent / "configs" / "sd15_dmd2.yaml"
    monkeypatch.chdir(tmp_path)
    tiny_sd_pipeline().save_pretrained(tmp_path / "teachers" / "sd")
    recipe = load_distill_recipe(recipe_path, {
        "teacher": {"path": "teachers/sd", "height": 32, "width": 32}, "student": {"lora_rank": lora_rank},
        "data": {"latents": None, "prompts_file": None, "prompts": ["a cat"]}, "training": {"mixed_precision": "no"}})
    method = build_method(load_recipe_teacher(recipe), recipe, None)
    metrics = {"model": "DMD2 student", "steps": 1, "guidance_scale": 1.0, "num_samples": 16, "fd": 3.5}
    out = export_student(method, method.student, tmp_path / "run" / ("lora" if lora_rank else "pipeline"),
                         card=model_card(method, recipe_path), metrics=metrics, metrics_command="stepdistill distill sd15_dmd2.yaml")
    card = ModelCard.load(out / "README.md", ignore_metadata_errors=False)
    assert card.data.pipeline_tag == "text-to-image" and card.data.base_model == "teachers/sd"
    assert {"dmd2", "text-to-image"} <= set(card.data.tags) and ("lora" in card.data.tags) == bool(lora_rank)
    text = (out / "README.md").read_text()
    assert "1 step with `DDIMScheduler`, trained at timesteps [999]; trained at 32x32 pixels" in text
    assert "the teacher's guidance w = 1.75 was distilled into the weights" in text
    assert "recipe `sd15_dmd2.yaml`" in text and "DMD2: distribution matching" in text  # outside the cwd: its name
    assert "| DMD2 student | 1 | 1.00 | 16 | 3.50 |" in text and "stepdistill distill sd15_dmd2.yaml" in text
    snippet = readme_snippet(out)
    assert "guidance_scale=1.0" in snippet and "height=32" in snippet and "trust_remote_code" not in snippet
    assert ("load_lora_weights" in snippet) == bool(lora_rank)
    assert str(tmp_path) not in text


def test_a_run_card_states_the_end_of_run_report_numbers(tmp_path):
    """The exported student's card carries the rows of the table the run printed (N =
    evaluation.report_samples), not the periodic evaluation's (N = training.num_eval_samples)."""
    from stepdistill.distillers.run import distill

    short = ["training.max_steps=4", "training.batch_size=8", "training.eval_every=4", "training.num_eval_samples=20",
             "training.checkpoint_every=4", "evaluation.report_samples=50", "evaluation.teacher_steps=[1]"]
    out = distill(ROOT / "configs" / "digits_dmd2.yaml", tmp_path / "run", set_items=short, progress=False)
    (row,) = json.loads((tmp_path / "run" / "report" / "student" / "bench.json").read_text())["rows"]
    card = (out / "README.md").read_text()
    table = card[card.index(METRICS_START):card.index(METRICS_END)]
    assert "(end-of-run report)" in table and f"{row['fd']:.2f}" in table and "| 50 |" in table and "| 20 |" not in table
