"""Pixel-space teachers: stock DDPM/DDIM pipeline directories and our class-conditional one."""

import json

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from stepdistill.errors import TeacherLoadError
from stepdistill.export import save_class_conditional_pipeline
from stepdistill.sampling import ddim_sample
from stepdistill.teachers import detect_family, load_teacher
from stepdistill.teachers.pixel import PixelUNetTeacher
from tiny_pipelines import tiny_pixel_unet as tiny_unet




@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_adapter_ddim_loop_reproduces_stock_ddim_pipeline(tmp_path, prediction_type, clip_sample):
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=clip_sample, beta_schedule="squaredcos_cap_v2")
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)

    teacher = load_teacher(tmp_path)
    assert isinstance(teacher, PixelUNetTeacher) and teacher.prediction_type == prediction_type
    assert teacher.sample_shape() == (1, 8, 8)

    ref = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=0.0, output_type="np").images
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    x = ddim_sample(teacher, teacher.encode(None), noise, teacher.scheduler, 10)
    ours = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - ref).max() < 1e-4


def test_stock_ddpm_pipeline_directory_loads(tmp_path):
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    assert detect_family(tmp_path) == "pixel"
    teacher = load_teacher(tmp_path)
    assert teacher.num_classes is None and teacher.encode(None).uncond is None
    x = torch.randn(2, 1, 8, 8)
    x0 = teacher.predict(x, 500, teacher.encode(None), output="x0")
    assert x0.shape == x.shape and torch.isfinite(x0).all()


@pytest.fixture
def class_conditional_teacher(tmp_path):
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing")
    save_class_conditional_pipeline(tiny_unet(num_class_embeds=11), scheduler, tmp_path / "teacher")
    return load_teacher(tmp_path / "teacher")


def test_cfg_with_w_one_equals_the_conditional_prediction(class_conditional_teacher):
    teacher = class_conditional_teacher
    cond = teacher.encode([0, 3, 9])
    assert teacher.num_classes == 10 and cond.uncond["class_labels"].tolist() == [10, 10, 10]
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 10])
    only_cond = teacher.schedule.convert(teacher.unet(x, t, class_labels=cond.cond["class_labels"]).sample, x, t, "v_prediction", "sample")
    assert torch.allclose(teacher.predict(x, t, cond, guidance_scale=1.0), only_cond, atol=1e-6)


def test_batched_cfg_equals_two_separate_passes(class_conditional_teacher):
    teacher = class_conditional_teacher
    cond = teacher.encode([1, 2])
    x, t, w = torch.randn(2, 1, 8, 8), torch.tensor([700, 300]), 3.0
    c = teacher.unet(x, t, class_labels=cond.cond["class_labels"]).sample
    u = teacher.unet(x, t, class_labels=cond.uncond["class_labels"]).sample
    expected = teacher.schedule.convert(u + w * (c - u), x, t, "v_prediction", "epsilon")
    assert torch.allclose(teacher.predict(x, t, cond, guidance_scale=w, output="epsilon"), expected, atol=1e-5)


def test_bad_class_labels_are_clear_errors(class_conditional_teacher):
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\)"):
        class_conditional_teacher.encode([3, 10])
    with pytest.raises(ValueError, match="class-conditional"):
        class_conditional_teacher.encode(None)


def test_load_teacher_errors(tmp_path):
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher(tmp_path / "missing")
    with pytest.raises(TeacherLoadError, match="not a diffusers pipeline directory"):
        load_teacher(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline"}))
    with pytest.raises(TeacherLoadError, match="unsupported pipeline class 'AudioLDMPipeline'"):
        load_teacher(tmp_path)
    with pytest.raises(TeacherLoadError, match="unsupported model family 'sd9'"):
        load_teacher(tmp_path, family="sd9")
