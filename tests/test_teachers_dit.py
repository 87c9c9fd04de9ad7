"""DiT teacher adapter against the stock DiTPipeline, on a tiny random DiT (1000 classes + null,
learned sigma). DiTPipeline returns only images, so its latents are read where the VAE receives
them (a forward pre-hook on ``vae.post_quant_conv``: ``latents / scaling_factor``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from stepdistill.sampling import ddim_sample
from stepdistill.schedule import VPSchedule
from stepdistill.teachers import detect_family, load_teacher
from stepdistill.teachers.dit import DiTTeacher

from fresh_process import run_fresh_python
from tiny_pipelines import tiny_dit_pipeline

LABELS = [1, 207, 999]
STEPS = 4
TOL = 1e-5
ID2LABEL = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 207: "golden retriever"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(stock pipeline, teacher loaded from its directory), with id2label written the way
    facebook/DiT-XL-2-256 ships it (in model_index.json)."""
    pipe = tiny_dit_pipeline(id2label=ID2LABEL)
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path_factory.mktemp("dit")
    pipe.save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in ID2LABEL.items()}  # DiTPipeline.save_pretrained drops it
    (path / "model_index.json").write_text(json.dumps(index))
    return pipe, load_teacher(path)


def _stock(pipe, guidance_scale):
    """(latents, images in [0, 1]) of DiTPipeline for LABELS."""
    seen = []
    hook = pipe.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        images = pipe(LABELS, guidance_scale=guidance_scale, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
    finally:
        hook.remove()
    return seen[0] * pipe.vae.config.scaling_factor, images


def _relative_error(x, reference):
    """Max abs difference over the reference's scale: a random DiT's eps is far from the noise,
    so DDIM's x0 = (x - sqrt(1 - a) eps) / sqrt(a) blows latents up to |x| ~ 100 here."""
    return ((x - reference).abs().max() / reference.abs().max().clamp(min=1.0)).item()


def _noise(teacher):
    return randn_tensor((len(LABELS), *teacher.sample_shape()), generator=torch.Generator().manual_seed(0))


def test_load_teacher_builds_the_dit_adapter(saved):
    pipe, teacher = saved
    assert type(teacher) is DiTTeacher and teacher.family == "dit" and teacher.is_latent
    assert teacher.prediction_type == "epsilon" and isinstance(teacher.schedule, VPSchedule)
    assert teacher.denoiser_name == "transformer" and teacher.transformer is not pipe.transformer
    assert teacher.learns_sigma and teacher.num_classes == 1000 and teacher.null_class == 1000
    assert teacher.sample_shape() == (4, 8, 8) and teacher.sample_shape(32, 32) == (4, 16, 16)
    assert not any(p.requires_grad for p in teacher.parameters())
    cond = teacher.encode(LABELS)
    assert cond.cond["class_labels"].tolist() == LABELS and cond.uncond["class_labels"].tolist() == [1000] * 3
    assert teacher.predict(_noise(teacher), 500, cond, guidance_scale=2.0).shape == (3, 4, 8, 8)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_adapter_ddim_loop_reproduces_stock_pipeline(saved, guidance_scale):
    pipe, teacher = saved
    latents = ddim_sample(teacher, teacher.encode(LABELS), _noise(teacher), teacher.scheduler, STEPS, guidance_scale)
    reference_latents, reference_images = _stock(pipe, guidance_scale)
    assert _relative_error(latents, reference_latents) < TOL
    images = (teacher.vae_decode(latents) / 2 + 0.5).clamp(0, 1)
    assert (images - reference_images).abs().max().item() < TOL


def test_guidance_changes_the_samples(saved):
    pipe, _ = saved
    assert (_stock(pipe, 4.0)[0] - _stock(pipe, 1.0)[0]).abs().max() > 1e-2


def test_cfg_is_applied_to_the_eps_half_only(saved):
    _, teacher = saved
    cond = teacher.encode(LABELS)
    x, t = _noise(teacher), torch.full((3,), 600)
    raw_cond = teacher.transformer(x, timestep=t, class_labels=cond.cond["class_labels"]).sample
    raw_uncond = teacher.transformer(x, timestep=t, class_labels=cond.uncond["class_labels"]).sample
    assert raw_cond.shape[1] == 8  # eps (4) + variance (4)
    expected = raw_uncond[:, :4] + 4.0 * (raw_cond[:, :4] - raw_uncond[:, :4])
    assert (teacher.guided_output(x, t, cond, guidance_scale=4.0) - expected).abs().max() < 1e-5
    assert torch.equal(teacher.guided_output(x, t, cond, guidance_scale=1.0), teacher.model_output(x, t, cond.cond, {}))


def test_any_scheduler_loop_sees_what_the_pipeline_feeds_the_scheduler(saved):
    """DPM-Solver++ (multistep, stateful) over guided_output, as DiTPipeline steps it."""
    pipe, teacher = saved
    # Both from the *loaded* config: converting an in-memory DDIM config gives DPM another
    # timestep_spacing (diffusers drops the DDIM defaults it marked in _use_default_values).
    scheduler = DPMSolverMultistepScheduler.from_config(teacher.scheduler.config)
    stock = DiTPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=copy.deepcopy(scheduler))
    stock.set_progress_bar_config(disable=True)
    reference, _ = _stock(stock, 4.0)
    scheduler.set_timesteps(STEPS)
    x, cond = _noise(teacher), teacher.encode(LABELS)
    for t in scheduler.timesteps:
        x = scheduler.step(teacher.guided_output(x, t, cond, 4.0), t, x).prev_sample
    assert _relative_error(x, reference) < TOL


def test_label_names_and_bad_labels(saved):
    _, teacher = saved
    assert teacher.labels["goldfish"] == 1 and teacher.labels["Carassius auratus"] == 1
    assert teacher.encode(["golden retriever", 3]).cond["class_labels"].tolist() == [207, 3]
    with pytest.raises(ValueError, match="unknown class label names"):
        teacher.encode(["unicorn"])
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 1000\)"):
        teacher.encode([1000])
    with pytest.raises(ValueError, match="class-conditional"):
        teacher.encode(None)


def test_legacy_transformer2d_class_name_loads(saved, tmp_path):
    """facebook/DiT-XL-2-256 lists its network as Transformer2DModel; diffusers remaps it."""
    pipe, _ = saved
    pipe.save_pretrained(tmp_path)
    for path, key in ((tmp_path / "model_index.json", "transformer"), (tmp_path / "transformer" / "config.json", "_class_name")):
        data = json.loads(path.read_text())
        data[key] = ["diffusers", "Transformer2DModel"] if key == "transformer" else "Transformer2DModel"
        path.write_text(json.dumps(data))
    teacher = load_teacher(tmp_path)
    assert type(teacher.transformer).__name__ == "DiTTransformer2DModel" and teacher.id2label is None


def test_from_pipeline_keeps_the_labels(saved):
    pipe, _ = saved
    assert DiTTeacher.from_pipeline(pipe).labels == pipe.labels


def test_build_pipeline_round_trips_through_a_fresh_process(saved, tmp_path):
    _, teacher = saved
    pipe = teacher.build_pipeline(teacher.transformer, DDIMScheduler.from_config(teacher.scheduler.config))
    assert type(pipe) is DiTPipeline and pipe.vae is teacher.vae
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(LABELS, guidance_scale=4.0, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt").images
    pipe.save_pretrained(tmp_path / "pipe")
    assert detect_family(tmp_path / "pipe") == "dit"

    run_fresh_python(
        f"""
        import torch
        from diffusers import DiffusionPipeline
        from safetensors.torch import save_file
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "pipe")!r})
        pipe.set_progress_bar_config(disable=True)
        out = pipe({LABELS!r}, guidance_scale=4.0, num_inference_steps={STEPS}, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
        save_file({{"images": out.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
        assert pipe.labels["golden retriever"] == 207  # id2label came back from model_index.json
        """,
        cwd=tmp_path,
    )
    assert (load_file(tmp_path / "out.safetensors")["images"] - expected).abs().max().item() < TOL
    assert load_teacher(tmp_path / "pipe").labels == teacher.labels
