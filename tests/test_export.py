"""Exported pipeline directories: fresh-process round trips, pipeline behaviour, student
schedulers, atomic writes and model cards."""

import json
import os
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel

from stepdistill.errors import OutputDirError, StepdistillError
from stepdistill.export import save_class_conditional_pipeline, save_unconditional_pipeline
from stepdistill.model_card import read_front_matter, update_model_card_metrics
from stepdistill.pipelines.class_conditional_pipeline import ClassConditionalPipeline
from stepdistill.sampling import ddim_sample, make_student_scheduler, student_timesteps
from stepdistill.teachers.pixel import PixelUNetTeacher

from fresh_process import run_fresh_python
from tiny_pipelines import tiny_pixel_unet as tiny_unet

STEPS = 4




def teacher_scheduler():
    return DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False)


def in_memory_pipeline(unet, scheduler):
    pipe = ClassConditionalPipeline(unet=unet, scheduler=scheduler, default_num_inference_steps=STEPS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A class-conditional 'student' exported with a 4-step trailing DDIM scheduler."""
    unet = tiny_unet(num_class_embeds=11)
    scheduler = make_student_scheduler(teacher_scheduler(), STEPS)
    out = save_class_conditional_pipeline(
        unet,
        scheduler,
        tmp_path_factory.mktemp("export") / "student",
        num_inference_steps=STEPS,
        metrics=[
            {"model": "teacher", "steps": 50, "guidance_scale": 2.0, "fd": 1.5, "accuracy": 0.97},
            {"model": "student", "steps": STEPS, "guidance_scale": 1.0, "fd": 2.25, "accuracy": 0.955, "ms_per_image": 3.0},
        ],
        metrics_command="stepdistill bench runs/student --steps 1 2 4",
        model_card_info={"base_model": "stepdistill/digits-teacher", "method": "progressive-distillation"},
    )
    return unet, scheduler, out


# -- round trips in a fresh process ---------------------------------------------------------------
def readme_snippet(directory) -> str:
    card = (directory / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_class_conditional_export_loads_without_stepdistill_and_matches_in_memory(student, tmp_path):
    """One fresh process runs the model card's usage snippet as written (from the folder holding
    the directory: it was exported from outside the working directory, so the card names it by
    its name), then samples with and without guidance; the in-memory pipeline gives the same images."""
    unet, scheduler, out = student
    snippet = readme_snippet(out)
    assert "trust_remote_code=True" in snippet and f"num_inference_steps={STEPS}" in snippet
    assert 'from_pretrained("student", trust_remote_code=True)' in snippet
    run_fresh_python(
        snippet
        + f"""
import numpy as np
pipe.set_progress_bar_config(disable=True)
assert type(pipe).__name__ == "ClassConditionalPipeline"
for w in (1.0, 3.0):
    images = pipe(class_labels=[0, 3, 9], num_inference_steps={STEPS}, guidance_scale=w,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    np.save(f"{tmp_path}/images_w{{w:g}}.npy", images)
""",
        cwd=out.parent,
    )
    assert (out.parent / "sample.png").is_file()  # written by the snippet
    pipe = in_memory_pipeline(unet, scheduler)
    for w in (1.0, 3.0):
        expected = pipe(class_labels=[0, 3, 9], num_inference_steps=STEPS, guidance_scale=w, generator=torch.Generator().manual_seed(0), output_type="np").images
        loaded = np.load(tmp_path / f"images_w{w:g}.npy")
        assert loaded.shape == (3, 8, 8, 1)
        assert np.abs(loaded - expected).max() <= 1e-5
    guided, unguided = np.load(tmp_path / "images_w3.npy"), np.load(tmp_path / "images_w1.npy")
    assert np.abs(guided - unguided).max() > 1e-3  # guidance changes the images


def test_unconditional_export_is_a_stock_ddim_pipeline(tmp_path):
    unet = tiny_unet()
    scheduler = make_student_scheduler(DDPMScheduler(prediction_type="epsilon"), 2)
    out = save_unconditional_pipeline(unet, scheduler, tmp_path / "student", num_inference_steps=2)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDIMPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert (out / "README.md").is_file() and not (out / "class_conditional_pipeline.py").exists()

    run_fresh_python(
        f"""
        import numpy as np, torch
        from diffusers import DDIMPipeline, DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(out)!r})
        assert type(pipe) is DDIMPipeline, type(pipe)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert pipe.scheduler.timesteps.tolist() == [999, 499], pipe.scheduler.timesteps
        np.save("images.npy", images)
        """,
        cwd=tmp_path,
    )
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.abs(np.load(tmp_path / "images.npy") - expected).max() <= 1e-5


# -- pipeline behaviour ---------------------------------------------------------------------------
def test_output_types_agree(student):
    unet, scheduler, _ = student
    pipe = in_memory_pipeline(unet, scheduler)
    call = lambda output_type: pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(1), output_type=output_type).images  # noqa: E731
    arr, tensor, pil = call("np"), call("pt"), call("pil")
    assert arr.shape == (2, 8, 8, 1) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, 1, 8, 8)
    assert np.abs(tensor.permute(0, 2, 3, 1).numpy() - arr).max() <= 1e-6
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "L"
    assert np.abs(np.asarray(pil[1], dtype=np.float32) - np.round(arr[1, :, :, 0] * 255)).max() <= 1
    with pytest.raises(ValueError, match="output_type must be"):
        pipe(class_labels=[1], output_type="latent")


def test_defaults_are_the_exported_steps_and_guidance(student):
    _, _, out = student
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.default_num_inference_steps == STEPS and pipe.config.default_guidance_scale == 1.0
    pipe(class_labels=[5], output_type="np")
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]


def test_bad_class_labels_are_clear_errors(student):
    unet, scheduler, _ = student
    pipe = in_memory_pipeline(unet, scheduler)
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 10\); got \[3, 10\]"):
        pipe(class_labels=[3, 10])  # 10 is the null class, not a label
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        pipe(class_labels=-1)
    with pytest.raises(ValueError, match="must be integers"):
        pipe(class_labels=torch.tensor([1.5]))
    with pytest.raises(ValueError, match="empty"):
        pipe(class_labels=[])


def test_guidance_scale_one_is_the_conditional_only_path(student):
    unet, scheduler, _ = student
    pipe = in_memory_pipeline(unet, scheduler)
    labels = torch.tensor([0, 7])
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))

    seen_labels = []
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: seen_labels.append(kwargs["class_labels"].tolist()), with_kwargs=True)
    try:
        images = pipe(class_labels=labels, guidance_scale=1.0, latents=noise.clone(), output_type="pt").images
    finally:
        hook.remove()
    assert seen_labels == [[0, 7]] * STEPS  # one conditional pass per step, no null-class branch

    x = noise.clone()
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        out = unet(x, t.expand(2), class_labels=labels).sample
        x = scheduler.step(out, t, x).prev_sample
    assert torch.allclose(images, (x / 2 + 0.5).clamp(0, 1), atol=1e-6)

    guided = pipe(class_labels=labels, guidance_scale=3.0, latents=noise.clone(), output_type="pt").images
    assert (guided - images).abs().max() > 1e-3


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_pipeline_sampling_equals_toolkit_ddim_sample(student, guidance_scale):
    """The exported pipeline and the toolkit's DDIM (via PixelUNetTeacher) are the same math."""
    _, _, out = student
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[2, 4, 8], guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0), output_type="pt").images

    teacher = PixelUNetTeacher.from_pretrained(out)
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    x = ddim_sample(teacher, teacher.encode([2, 4, 8]), noise, teacher.scheduler, STEPS, guidance_scale=guidance_scale)
    assert (images - (x / 2 + 0.5).clamp(0, 1)).abs().max() <= 1e-5


# -- student schedulers -------------------------------------------------------------------------
@pytest.mark.parametrize("num_steps, expected", [(1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249])])
def test_student_scheduler_starts_at_the_last_training_timestep(num_steps, expected):
    teacher = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    scheduler = make_student_scheduler(teacher, num_steps)
    assert isinstance(scheduler, DDIMScheduler) and scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(scheduler.alphas_cumprod, teacher.alphas_cumprod)  # same noise schedule
    assert student_timesteps(scheduler, num_steps).tolist() == expected


def test_student_timesteps_do_not_touch_the_scheduler_and_survive_export(student):
    _, scheduler, out = student
    before = scheduler.timesteps.clone()
    timesteps = student_timesteps(scheduler, 3)
    assert torch.equal(scheduler.timesteps, before)
    reloaded = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    reloaded.set_timesteps(STEPS)
    assert torch.equal(reloaded.timesteps, student_timesteps(scheduler, STEPS))
    assert timesteps.tolist() == [999, 666, 332]  # trailing spacing rounds; never hard-code these


def test_flow_teacher_keeps_its_flow_scheduler():
    scheduler = make_student_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 1)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 3.0
    assert student_timesteps(scheduler, 1).tolist() == [1000.0]


def test_student_scheduler_rejects_bad_step_counts():
    with pytest.raises(StepdistillError, match="positive integer"):
        make_student_scheduler(teacher_scheduler(), 0)
    with pytest.raises(StepdistillError, match="exceeds the teacher's 1000 training timesteps"):
        make_student_scheduler(teacher_scheduler(), 1001)


# -- writing directories ---------------------------------------------------------------------------
def test_existing_directory_is_refused_and_left_intact(tmp_path):
    out = save_class_conditional_pipeline(tiny_unet(11, seed=0), teacher_scheduler(), tmp_path / "run")
    (out / "notes.txt").write_text("keep me")
    old_weights = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    with pytest.raises(OutputDirError, match="is not empty"):
        save_class_conditional_pipeline(tiny_unet(11, seed=1), teacher_scheduler(), out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == old_weights

    broken = tiny_unet(11, seed=1)
    broken.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full"))
    with pytest.raises(RuntimeError, match="disk full"):
        save_class_conditional_pipeline(broken, teacher_scheduler(), out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"  # a failed export leaves the old directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # and no partial directories

    save_class_conditional_pipeline(tiny_unet(11, seed=1), teacher_scheduler(), out, overwrite=True)
    assert not (out / "notes.txt").exists()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != old_weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_empty_existing_directory_is_used_and_files_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    out = save_unconditional_pipeline(tiny_unet(), make_student_scheduler(teacher_scheduler(), 1), tmp_path / "empty")
    assert (out / "model_index.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir would make it, not mkdtemp's 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="not a directory"):
        save_unconditional_pipeline(tiny_unet(), make_student_scheduler(teacher_scheduler(), 1), tmp_path / "file")


def test_exporters_refuse_the_wrong_kind_of_model(tmp_path):
    with pytest.raises(StepdistillError, match="use save_unconditional_pipeline"):
        save_class_conditional_pipeline(tiny_unet(), teacher_scheduler(), tmp_path / "a")
    with pytest.raises(StepdistillError, match="use save_class_conditional_pipeline"):
        save_unconditional_pipeline(tiny_unet(11), teacher_scheduler(), tmp_path / "b")
    with pytest.raises(StepdistillError, match="DDIMPipeline samples with DDIMScheduler; got DDPMScheduler"):
        save_unconditional_pipeline(tiny_unet(), DDPMScheduler(), tmp_path / "c", pipeline_class="DDIMPipeline")
    assert not any(tmp_path.iterdir())


# -- model cards --------------------------------------------------------------------------------
def test_model_card_front_matter_and_metrics(student):
    _, _, out = student
    meta = read_front_matter(out)
    # the Hub has no class-conditional task: the tag says it
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "unconditional-image-generation"
    assert meta["base_model"] == "stepdistill/digits-teacher"
    assert {"diffusers", "stepdistill", "class-conditional"} <= set(meta["tags"])
    card = (out / "README.md").read_text()
    assert "- **Method**: progressive-distillation." in card
    # every column says its unit; a column a row lacks shows a dash
    assert "| model | steps | guidance w | FD ↓ (feature units²) | class accuracy ↑ (0-1) | latency (ms / image) |" in card
    assert "| teacher | 50 | 2.00 | 1.50 | 0.970 | – |" in card
    assert "| student | 4 | 1.00 | 2.25 | 0.955 | 3.00 |" in card
    assert "stepdistill bench runs/student --steps 1 2 4" in card


def test_model_card_without_metrics_shows_no_numbers(tmp_path):
    out = save_class_conditional_pipeline(tiny_unet(11), teacher_scheduler(), tmp_path / "run", model_card_info={"license": "apache-2.0"})
    card = (out / "README.md").read_text()
    assert "No metrics measured yet" in card and "|---" not in card
    meta = read_front_matter(out)
    assert meta["license"] == "apache-2.0" and "base_model" not in meta and "model-index" not in meta


def test_update_model_card_metrics_replaces_only_the_metrics(tmp_path):
    out = save_class_conditional_pipeline(tiny_unet(11), teacher_scheduler(), tmp_path / "run", metrics={"fd": 9.0})
    before = (out / "README.md").read_text()
    update_model_card_metrics(out, [{"steps": 1, "fd": 3.14159, "accuracy": np.float32(0.5)}], command="stepdistill evaluate run")
    after = (out / "README.md").read_text()
    assert "| 1 | 3.14 | 0.500 |" in after and "| 9.00 |" not in after
    assert "stepdistill evaluate run" in after
    assert after.split("<!-- stepdistill:metrics:start -->")[0] == before.split("<!-- stepdistill:metrics:start -->")[0]
    with pytest.raises(StepdistillError, match="metric 'FD' must be a number or a string"):
        update_model_card_metrics(out, [{"FD": [1, 2]}])
    with pytest.raises(StepdistillError, match="no model card"):
        update_model_card_metrics(tmp_path, {"FD": 1.0})


def test_unknown_model_card_info_key_is_named(tmp_path):
    with pytest.raises(StepdistillError, match="unknown model_card_info key 'base_modle'"):
        save_class_conditional_pipeline(tiny_unet(11), teacher_scheduler(), tmp_path / "run", model_card_info={"base_modle": "x"})
    assert not any(tmp_path.iterdir())


# -- exporting a training run ---------------------------------------------------------------------
def write_fake_run(run_dir, raw_unet, ema_unet, export):
    """A run directory in the trainer's layout (run.json + checkpoint with raw and EMA weights)."""
    from safetensors.torch import save_file

    checkpoint = run_dir / "checkpoint-00000010"
    checkpoint.mkdir(parents=True)
    save_file({f"module.{k}": v.contiguous() for k, v in raw_unet.state_dict().items()}, str(checkpoint / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema_unet.state_dict().items()}, str(checkpoint / "ema_unet.safetensors"))
    spec = {
        "class": f"{type(raw_unet).__module__}.{type(raw_unet).__qualname__}",
        "config": json.loads(json.dumps(dict(raw_unet.config), default=list)),
        "weights": "model.safetensors",
        "ema_weights": "ema_unet.safetensors",
    }
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 10, "ema_updates": {"unet": 10}, "roles": {"unet": spec}}))
    (run_dir / "run.json").write_text(json.dumps({"method": "SomeMethod", **({"export": export} if export else {})}))


def test_export_run_uses_the_recorded_scheduler_and_the_ema_weights(tmp_path):
    from stepdistill.export import export_info
    from stepdistill.training.teacher import export_run

    raw, ema = tiny_unet(11, seed=0), tiny_unet(11, seed=1)
    scheduler = make_student_scheduler(teacher_scheduler(), 2)
    info = export_info(scheduler, num_inference_steps=2, guidance_scale=1.5, model_card_info={"method": "consistency-distillation"})
    write_fake_run(tmp_path / "run", raw, ema, json.loads(json.dumps(info)))

    out = export_run(tmp_path / "run", tmp_path / "ema")
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), ema.state_dict().values()))
    assert pipe.config.default_num_inference_steps == 2 and pipe.config.default_guidance_scale == 1.5
    assert student_timesteps(pipe.scheduler, 2).tolist() == [999, 499]
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert "- **Method**: consistency-distillation." in (out / "README.md").read_text()

    raw_out = export_run(tmp_path / "run", tmp_path / "raw", ema=False)
    loaded = UNet2DModel.from_pretrained(raw_out, subfolder="unet")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), raw.state_dict().values()))
    with pytest.raises(OutputDirError):
        export_run(tmp_path / "run", tmp_path / "raw")


def test_export_run_errors_are_clear(tmp_path):
    from stepdistill.training.teacher import export_run

    with pytest.raises(StepdistillError, match="not a training run directory"):
        export_run(tmp_path, tmp_path / "out")
    write_fake_run(tmp_path / "run", tiny_unet(11), tiny_unet(11), export=None)
    with pytest.raises(StepdistillError, match="records no export settings"):
        export_run(tmp_path / "run", tmp_path / "out")


def test_shipped_teacher_carries_the_current_pipeline_code():
    # The shipped digits teacher is loaded with trust_remote_code from its own copy of the
    # pipeline file: a change to pipelines/ must be copied there too (re-export or copy).
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shipped = root / "stepdistill" / "digits" / "weights" / "teacher" / "class_conditional_pipeline.py"
    assert shipped.read_text() == (root / "pipelines" / "class_conditional_pipeline.py").read_text()
