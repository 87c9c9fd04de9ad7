"""SD3 teacher adapter against the stock StableDiffusion3Pipeline, on tiny random weights.

The pipeline is saved to disk and loaded back through ``load_teacher(dir)``; an Euler loop driven
by the adapter must reproduce the pipeline's latents for the same seed, prompts, steps and
guidance. ``build_pipeline`` must give a pipeline that survives save_pretrained ->
DiffusionPipeline.from_pretrained in a process that never imports stepdistill.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from stepdistill.sampling import euler_flow_sample
from stepdistill.schedule import FlowSchedule
from stepdistill.teachers import detect_family, load_teacher
from stepdistill.teachers.sd3 import StableDiffusion3Teacher

from fresh_process import run_fresh_python
from tiny_pipelines import T5_MAX_LENGTH, tiny_sd3_pipeline

PROMPTS = ["a cat", "a dog on a mat"]
SIZE = 32  # pixels; latents 4 x 16 x 16 with the tiny VAE
STEPS = 3
TOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """with_t5 -> (stock pipeline, teacher loaded from the pipeline saved to disk)."""
    cache = {}

    def get(with_t5: bool = True):
        if with_t5 not in cache:
            pipe = tiny_sd3_pipeline(with_t5=with_t5)
            pipe.set_progress_bar_config(disable=True)
            path = tmp_path_factory.mktemp("sd3")
            pipe.save_pretrained(path)
            cache[with_t5] = (pipe, load_teacher(path, max_sequence_length=T5_MAX_LENGTH))
        return cache[with_t5]

    return get


def _stock_latents(pipe, guidance_scale, **kwargs):
    return pipe(
        PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance_scale,
        max_sequence_length=T5_MAX_LENGTH, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs,
    ).images


def _adapter_latents(teacher, guidance_scale):
    shape = (len(PROMPTS), *teacher.sample_shape(SIZE, SIZE))
    noise = randn_tensor(shape, generator=torch.Generator().manual_seed(0))
    return euler_flow_sample(
        teacher, teacher.encode(PROMPTS), noise, teacher.scheduler, STEPS, guidance_scale, **teacher.sampler_kwargs(shape, STEPS)
    )


def test_load_teacher_builds_the_sd3_adapter(saved):
    pipe, teacher = saved()
    assert type(teacher) is StableDiffusion3Teacher and teacher.family == "sd3" and teacher.is_latent
    assert teacher.prediction_type == "flow" and isinstance(teacher.schedule, FlowSchedule)
    assert teacher.schedule.shift == 3.0 and not teacher.schedule.use_dynamic_shifting
    assert teacher.denoiser_name == "transformer" and teacher.denoiser is teacher.transformer
    assert teacher.transformer is not pipe.transformer  # weights came from disk
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.sample_shape(SIZE, SIZE) == (4, 16, 16)
    assert teacher.sample_shape() == (4, 16, 16)  # default: transformer.sample_size latents (32 px here)
    with pytest.raises(ValueError, match="divisible by 2"):
        teacher.sample_shape(33, 32)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_adapter_euler_loop_reproduces_stock_pipeline(saved, guidance_scale):
    pipe, teacher = saved()
    latents = _adapter_latents(teacher, guidance_scale)
    reference = _stock_latents(pipe, guidance_scale)
    assert latents.shape == reference.shape == (len(PROMPTS), 4, 16, 16)
    assert (latents - reference).abs().max().item() < TOL

    images = (teacher.vae_decode(latents) / 2 + 0.5).clamp(0, 1)
    reference_images = pipe(
        PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance_scale,
        max_sequence_length=T5_MAX_LENGTH, generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images
    assert (images - reference_images).abs().max().item() < TOL


def test_guidance_is_the_empty_prompt_cfg_of_the_pipeline(saved):
    pipe, teacher = saved()
    cond = teacher.encode(PROMPTS)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=T5_MAX_LENGTH
    )
    assert cond.cond["encoder_hidden_states"].shape == (2, 16 + T5_MAX_LENGTH, 64)  # CLIP tokens, then T5 tokens
    assert (cond.cond["encoder_hidden_states"] - embeds).abs().max() < 1e-6
    assert (cond.cond["pooled_projections"] - pooled).abs().max() < 1e-6
    assert (cond.uncond["encoder_hidden_states"] - negative).abs().max() < 1e-6
    assert (cond.uncond["pooled_projections"] - negative_pooled).abs().max() < 1e-6

    x = randn_tensor((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 700.0)
    conditional = teacher.model_output(x, t, cond.cond, cond.extra)
    unconditional = teacher.model_output(x, t, cond.uncond, cond.extra)
    assert (conditional - unconditional).abs().max() > 1e-3
    guided = teacher.guided_output(x, t, cond, guidance_scale=3.0)
    assert (guided - (unconditional + 3.0 * (conditional - unconditional))).abs().max() < 1e-5
    assert (_adapter_latents(teacher, 3.0) - _adapter_latents(teacher, 1.0)).abs().max() > 1e-2


def test_without_t5_the_pipeline_zeros_are_reproduced(saved):
    pipe, teacher = saved(with_t5=False)
    assert teacher.text_encoder_3 is None and teacher.tokenizer_3 is None
    assert teacher.encode(PROMPTS).cond["encoder_hidden_states"][:, 16:].abs().max() == 0
    assert (_adapter_latents(teacher, 3.0) - _stock_latents(pipe, 3.0)).abs().max().item() < TOL


def test_dynamic_shifting_passes_mu_as_the_pipeline(saved):
    pipe, _ = saved()
    pipe = StableDiffusion3Pipeline(**{**pipe.components, "scheduler": FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=64, max_image_seq_len=1024, base_shift=0.5, max_shift=1.15)})
    pipe.set_progress_bar_config(disable=True)
    teacher = StableDiffusion3Teacher.from_pipeline(pipe, max_sequence_length=T5_MAX_LENGTH)
    kwargs = teacher.sampler_kwargs((2, 4, 16, 16), STEPS)
    assert kwargs["mu"] == pytest.approx(0.5 + 0.65 * (256 - 64) / (1024 - 64))
    assert (_adapter_latents(teacher, 1.0) - _stock_latents(pipe, 1.0)).abs().max().item() < TOL


def test_build_pipeline_round_trips_through_a_fresh_process(saved, tmp_path):
    _, teacher = saved()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler.config)
    pipe = teacher.build_pipeline(teacher.transformer, scheduler)
    assert type(pipe) is StableDiffusion3Pipeline and pipe.text_encoder_3 is teacher.text_encoder_3  # shared, not copied
    pipe.set_progress_bar_config(disable=True)
    expected = _stock_latents(pipe, 3.0)
    pipe.save_pretrained(tmp_path / "pipe")
    assert detect_family(tmp_path / "pipe") == "sd3"

    run_fresh_python(
        f"""
        import torch
        from diffusers import DiffusionPipeline
        from safetensors.torch import save_file
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "pipe")!r})
        pipe.set_progress_bar_config(disable=True)
        out = pipe({PROMPTS!r}, height={SIZE}, width={SIZE}, num_inference_steps={STEPS}, guidance_scale=3.0,
                   max_sequence_length={T5_MAX_LENGTH}, generator=torch.Generator().manual_seed(0), output_type="latent").images
        save_file({{"latents": out.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
        """,
        cwd=tmp_path,
    )
    assert (load_file(tmp_path / "out.safetensors")["latents"] - expected).abs().max().item() < TOL
