"""SD / SDXL / Flux teacher adapters against the stock diffusers pipelines, on tiny random weights.

Each pipeline is saved to disk and loaded back through ``load_teacher(dir)``; a sampling loop
driven by the adapter (DDIM for SD/SDXL, Euler for Flux) must reproduce the stock pipeline's
latents and images for the same seed, prompts, steps and guidance.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from stepdistill.errors import TeacherLoadError
from stepdistill.sampling import ddim_sample, euler_flow_sample
from stepdistill.schedule import FlowSchedule, VPSchedule
from stepdistill.teachers import load_teacher
from stepdistill.teachers.flux import FluxTeacher, latent_image_ids, pack_latents, unpack_latents
from stepdistill.teachers.sdxl import StableDiffusionXLTeacher
from stepdistill.teachers.stable_diffusion import StableDiffusionTeacher
from stepdistill.teachers.text import TextEmbeddingCache

from tiny_pipelines import T5_MAX_LENGTH, save_as_original_sd_checkpoint, tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a cat", "a dog on a mat"]
SIZE = 32  # pixels; latents are 16 x 16 with the tiny VAEs
STEPS = 3
TOL = 1e-4

BUILDERS = {
    "sd": lambda: tiny_sd_pipeline("epsilon"),
    "sd-v": lambda: tiny_sd_pipeline("v_prediction"),
    "sdxl": lambda: tiny_sdxl_pipeline(),
    "flux": lambda: tiny_flux_pipeline(guidance_embeds=True),
}
LOAD_KWARGS = {"flux": {"max_sequence_length": T5_MAX_LENGTH}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (stock pipeline, teacher loaded from the pipeline saved to disk)."""
    cache = {}

    def get(name):
        if name not in cache:
            pipe = BUILDERS[name]()
            path = tmp_path_factory.mktemp(name)
            pipe.save_pretrained(path)
            cache[name] = (pipe, load_teacher(path, **LOAD_KWARGS.get(name.split("-")[0], {})))
        return cache[name]

    return get


def _stock(pipe, name, cfg_scale, output_type, **kwargs):
    """The stock pipeline's output under CFG ``cfg_scale``; for Flux that is ``true_cfg_scale``
    with the empty negative prompt, and ``guidance_scale`` in ``kwargs`` is the embedded guidance."""
    generator = torch.Generator().manual_seed(0)
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, generator=generator, output_type=output_type)
    if name == "flux":
        cfg = {"negative_prompt": "", "true_cfg_scale": cfg_scale} if cfg_scale > 1 else {}
        kwargs.setdefault("guidance_scale", 3.5)  # the *embedded* guidance of FLUX.1-dev
        out = pipe(PROMPTS, max_sequence_length=T5_MAX_LENGTH, **common, **cfg, **kwargs).images
        return unpack_latents(out, SIZE // 2, SIZE // 2) if output_type == "latent" else out
    return pipe(PROMPTS, guidance_scale=cfg_scale, **common, **kwargs).images


def _adapter_sample(teacher, guidance_scale, cond=None):
    shape = (len(PROMPTS), *teacher.sample_shape(SIZE, SIZE))
    noise = randn_tensor(shape, generator=torch.Generator().manual_seed(0))
    cond = cond if cond is not None else teacher.encode(PROMPTS)
    if teacher.family == "flux":
        return euler_flow_sample(teacher, cond, noise, teacher.scheduler, STEPS, guidance_scale, **teacher.sampler_kwargs(shape, STEPS))
    return ddim_sample(teacher, cond, noise, teacher.scheduler, STEPS, guidance_scale)


def _to_unit(images):
    return (images / 2 + 0.5).clamp(0, 1)


# -- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls, prediction_type, schedule_cls, shape",
    [
        ("sd", StableDiffusionTeacher, "epsilon", VPSchedule, (4, 16, 16)),
        ("sd-v", StableDiffusionTeacher, "v_prediction", VPSchedule, (4, 16, 16)),
        ("sdxl", StableDiffusionXLTeacher, "epsilon", VPSchedule, (4, 16, 16)),
        ("flux", FluxTeacher, "flow", FlowSchedule, (4, 16, 16)),
    ],
)
def test_load_teacher_builds_the_family_adapter(saved, name, cls, prediction_type, schedule_cls, shape):
    pipe, teacher = saved(name)
    assert type(teacher) is cls and teacher.is_latent and teacher.family == name.split("-")[0]
    assert teacher.prediction_type == prediction_type
    assert isinstance(teacher.schedule, schedule_cls)
    assert type(teacher.scheduler) is type(pipe.scheduler)
    assert teacher.sample_shape(SIZE, SIZE) == shape
    assert not any(p.requires_grad for p in teacher.parameters())
    # Weights came from disk, not from the object the test holds.
    assert teacher.denoiser is not (pipe.transformer if name == "flux" else pipe.unet)

    cond = teacher.encode(PROMPTS)
    x = torch.randn(len(PROMPTS), *shape)
    t = torch.tensor(750.0 if name == "flux" else 500)
    for output in ("x0", "epsilon", "v_prediction", "flow"):
        assert teacher.predict(x, t, cond, guidance_scale=2.0, output=output).shape == x.shape


def test_default_sample_shapes_follow_the_configs(saved):
    assert saved("sd")[1].sample_shape() == (4, 16, 16)  # unet.sample_size
    assert saved("sdxl")[1].sample_shape(64, 48) == (4, 32, 24)
    flux = saved("flux")[1]
    assert flux.sample_shape() == (4, 128, 128)  # FluxPipeline's default 128 * vae_scale_factor pixels
    assert flux.sample_shape(36, 36) == (4, 18, 18)  # rounded as FluxPipeline rounds


# -- parity with the stock pipelines ----------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("name", ["sd", "sd-v", "sdxl", "flux"])
def test_adapter_sampling_reproduces_stock_pipeline(saved, name, guidance_scale):
    pipe, teacher = saved(name)
    latents = _adapter_sample(teacher, guidance_scale)
    reference = _stock(pipe, name, guidance_scale, "latent")
    assert latents.shape == reference.shape
    assert (latents - reference).abs().max().item() < TOL

    images = _to_unit(teacher.vae_decode(latents))
    reference_images = _stock(pipe, name, guidance_scale, "pt")
    assert images.shape == reference_images.shape == (len(PROMPTS), 3, SIZE, SIZE)
    assert (images - reference_images).abs().max().item() < TOL


def test_guidance_changes_the_samples(saved):
    """Guards the parity test against a loop where guidance is silently ignored."""
    _, teacher = saved("sd")
    assert (_adapter_sample(teacher, 1.0) - _adapter_sample(teacher, 4.0)).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_cfg_equals_uncond_plus_w_times_difference(saved, name):
    _, teacher = saved(name)
    shape = (len(PROMPTS), *teacher.sample_shape(SIZE, SIZE))
    x = randn_tensor(shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((len(PROMPTS),), 600.0 if name == "flux" else 600)
    cond = teacher.encode(PROMPTS)
    conditional = teacher.model_output(x, t, cond.cond, cond.extra)
    unconditional = teacher.model_output(x, t, cond.uncond, cond.extra)
    assert (unconditional - conditional).abs().max() > 1e-3

    assert torch.equal(teacher.guided_output(x, t, cond, guidance_scale=1.0), conditional)
    guided = teacher.guided_output(x, t, cond, guidance_scale=3.0)  # one batched pass of both branches
    expected = unconditional + 3.0 * (conditional - unconditional)
    assert (guided - expected).abs().max() < 1e-5


def test_sdxl_null_branch_follows_force_zeros_for_empty_prompt(tmp_path):
    pipe = tiny_sdxl_pipeline(force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(tmp_path)
    teacher = load_teacher(tmp_path)
    assert teacher.force_zeros_for_empty_prompt is False
    assert teacher.encode(PROMPTS).uncond["encoder_hidden_states"].abs().max() > 0
    reference = _stock(pipe, "sdxl", 4.0, "latent")
    assert (_adapter_sample(teacher, 4.0) - reference).abs().max() < TOL

    zeros = StableDiffusionXLTeacher.from_pipeline(tiny_sdxl_pipeline(force_zeros_for_empty_prompt=True))
    assert zeros.encode(PROMPTS).uncond["encoder_hidden_states"].abs().max() == 0
    assert (_adapter_sample(zeros, 4.0) - reference).abs().max() > 1e-3


def test_sdxl_micro_conditioning_matches_pipeline_sizes(saved):
    pipe, teacher = saved("sdxl")
    cond = teacher.encode(PROMPTS, original_size=(64, 48), crops_coords_top_left=(4, 0), target_size=(SIZE, SIZE))
    assert cond.cond["time_ids"].tolist() == [[64, 48, 4, 0, SIZE, SIZE]] * len(PROMPTS)
    reference = _stock(pipe, "sdxl", 4.0, "latent", original_size=(64, 48), crops_coords_top_left=(4, 0))
    assert (_adapter_sample(teacher, 4.0, cond) - reference).abs().max() < TOL
    # ... and the default (sizes from the latent shape) is a different conditioning.
    assert (_adapter_sample(teacher, 4.0) - reference).abs().max() > 1e-3


def test_flux_embedded_guidance_is_distinct_from_cfg(saved):
    pipe, teacher = saved("flux")
    assert teacher.uses_embedded_guidance and teacher.embedded_guidance_scale == 3.5
    cond = teacher.encode(PROMPTS, embedded_guidance_scale=6.0)
    reference = _stock(pipe, "flux", 1.0, "latent", guidance_scale=6.0)
    assert (_adapter_sample(teacher, 1.0, cond) - reference).abs().max() < TOL
    assert (_adapter_sample(teacher, 1.0) - reference).abs().max() > 1e-3


def test_flux_without_guidance_embeds(tmp_path):
    pipe = tiny_flux_pipeline(guidance_embeds=False)
    pipe.save_pretrained(tmp_path)
    teacher = load_teacher(tmp_path, max_sequence_length=T5_MAX_LENGTH)
    assert not teacher.uses_embedded_guidance
    for w in (1.0, 4.0):
        reference = _stock(pipe, "flux", w, "latent")
        assert (_adapter_sample(teacher, w) - reference).abs().max() < TOL


def test_flux_packing_and_mu():
    latents = torch.randn(2, 4, 6, 8)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 12, 16)
    assert torch.equal(unpack_latents(tokens, 6, 8), latents)
    # token k covers the 2x2 patch at (row, col) = ids[k, 1:], channel-major within the token
    ids = latent_image_ids(6, 8)
    k = 5
    row, col = int(ids[k, 1]), int(ids[k, 2])
    assert torch.equal(tokens[0, k].view(4, 2, 2), latents[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2])
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 5, 8))

    teacher = FluxTeacher.from_pipeline(tiny_flux_pipeline(), max_sequence_length=T5_MAX_LENGTH)
    # FluxPipeline's calculate_shift at 1024 px (4096 tokens) and 512 px (1024 tokens)
    assert teacher.mu((4, 128, 128)) == pytest.approx(1.15)
    assert teacher.mu((4, 64, 64)) == pytest.approx(0.5 + 0.65 * (1024 - 256) / (4096 - 256))


# -- VAE --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_vae_encode_decode_are_the_pipeline_scalings(saved, name):
    _, teacher = saved(name)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = teacher.vae_encode(images)
    assert latents.shape == (2, *teacher.sample_shape(SIZE, SIZE))
    raw = teacher.vae.encode(images).latent_dist.mode()
    assert not torch.allclose(latents, raw)  # scaled (and, for Flux, shifted)
    # decode(encode(x)) is the VAE's own reconstruction: the two scalings are inverse.
    reconstruction = teacher.vae.decode(raw).sample
    assert (teacher.vae_decode(latents) - reconstruction).abs().max() < 1e-5
    sampled = teacher.vae_encode(images, generator=torch.Generator().manual_seed(0), sample_posterior=True)
    assert sampled.shape == latents.shape and not torch.allclose(sampled, latents)


# -- text-embedding cache ---------------------------------------------------------------------


def test_text_embedding_cache_on_disk(saved, tmp_path):
    pipe, teacher = saved("sdxl")
    plain = teacher.encode(PROMPTS)
    cached_teacher = StableDiffusionXLTeacher.from_pipeline(pipe, text_cache=TextEmbeddingCache(tmp_path, namespace="tiny-sdxl"))
    first = cached_teacher.encode(PROMPTS + ["a cat"])
    assert len(os.listdir(tmp_path)) == 2  # "a cat" and "a dog on a mat" (the null branch is zeros: not encoded)
    for key in ("encoder_hidden_states", "text_embeds"):
        assert (first.cond[key][:2] - plain.cond[key]).abs().max() < 1e-6
        assert torch.equal(first.cond[key][0], first.cond[key][2])

    # A fresh teacher reading the same directory never runs its text encoders.
    def refuse(*args, **kwargs):
        raise AssertionError("text encoder ran despite a warm cache")

    reader = StableDiffusionXLTeacher.from_pipeline(tiny_sdxl_pipeline(), text_cache=TextEmbeddingCache(tmp_path, namespace="tiny-sdxl"))
    reader.text_encoder.forward = refuse
    reader.text_encoder_2.forward = refuse
    again = reader.encode(PROMPTS)
    assert torch.equal(again.cond["encoder_hidden_states"], first.cond["encoder_hidden_states"][:2])


# -- single-file checkpoints ------------------------------------------------------------------


def test_sd_single_file_round_trip(saved, tmp_path):
    """An original-format SD checkpoint + a local config directory, as an offline GPU user has them."""
    pipe, _ = saved("sd")
    config_dir = tmp_path / "sd-config"
    pipe.save_pretrained(config_dir)
    checkpoint = tmp_path / "tiny-sd.safetensors"
    save_as_original_sd_checkpoint(pipe, checkpoint)

    teacher = load_teacher(checkpoint, family="sd", config=config_dir)
    assert isinstance(teacher, StableDiffusionTeacher)
    for name in ("unet", "vae", "text_encoder"):
        loaded, original = getattr(teacher, name).state_dict(), getattr(pipe, name).state_dict()
        assert loaded.keys() == original.keys()
        assert all(torch.equal(loaded[k], original[k]) for k in loaded)
    assert (_adapter_sample(teacher, 4.0) - _stock(pipe, "sd", 4.0, "latent")).abs().max() < TOL


def test_single_file_errors_are_one_clear_line(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not read before the checks")
    with pytest.raises(TeacherLoadError, match="pass config=<local diffusers directory"):
        load_teacher(checkpoint, family="sd")  # offline, nothing to build the components from
    with pytest.raises(TeacherLoadError, match="not a local diffusers pipeline directory"):
        load_teacher(checkpoint, family="sdxl", config=tmp_path)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"")
    with pytest.raises(TeacherLoadError, match="allow_pickle=True"):
        load_teacher(pickle, family="sd")
    with pytest.raises(TeacherLoadError, match="cannot be loaded from a single file"):
        load_teacher(checkpoint, family="flux")
    with pytest.raises(TeacherLoadError, match="single file: pass family="):
        load_teacher(checkpoint)


# -- bad input --------------------------------------------------------------------------------


def test_load_teacher_rejects_bad_paths_and_families(tmp_path, saved):
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher(tmp_path / "missing")
    with pytest.raises(TeacherLoadError, match="no model_index.json"):
        load_teacher(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableCascadePriorPipeline"}))
    with pytest.raises(TeacherLoadError, match="unsupported pipeline class 'StableCascadePriorPipeline'"):
        load_teacher(tmp_path)
    with pytest.raises(TeacherLoadError, match="unsupported model family 'sd4'"):
        load_teacher(tmp_path, family="sd4")
    # A pipeline directory with a component missing on disk.
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    with pytest.raises(TeacherLoadError, match="lacks the 'unet' subfolder"):
        load_teacher(tmp_path)
