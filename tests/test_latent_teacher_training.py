"""Latent text-to-image teachers trained by ``train-teacher`` (stepdistill/training/latent_teacher.py):
the autoencoder stage, the SD (VP) and SD3 (flow) denoiser stages on a tiny captioned folder, the
exports loaded by stock diffusers in a fresh process, resume, and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fresh_process import run_fresh_python
from stepdistill.errors import RecipeError
from stepdistill.t2i.data import all_scenes, make_t2i
from stepdistill.training.latent_teacher import word_tokenizer
from stepdistill.training.teacher import train_teacher

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TINY_TEXT = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 8}
TINY_TRAINING = {"max_steps": 3, "batch_size": 8, "checkpoint_every": 2, "log_every": 1, "num_eval_samples": 4, "eval_every": 0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    make_t2i(root / "data", counts={"train": 24, "test": 0, "heldout": 0})
    return root


@pytest.fixture(scope="module")
def vae_dir(folder):
    tiny = {"data": {"images": str(folder / "data" / "train")}, "training": TINY_TRAINING,
            "autoencoder": {"block_out_channels": [8, 8, 16], "norm_num_groups": 4}}
    out = train_teacher(CONFIGS / "t2i_vae.yaml", folder / "vae_run", overrides=tiny, progress=False)
    assert out == folder / "vae_run" / "vae"
    return out


def test_word_tokenizer_makes_each_caption_word_one_token_and_survives_a_save(tmp_path):
    from transformers import CLIPTokenizer

    captions = [s.caption for s in all_scenes(None)]
    tokenizer = word_tokenizer(captions, max_length=16)
    for word in {w for c in captions for w in c.split()}:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded(captions[7]).input_ids == tokenizer(captions[7]).input_ids
    assert len(tokenizer(captions[7]).input_ids) == 14  # start + 12 words + end
    assert tokenizer("a purple dog").input_ids[-1] == 1  # other text still tokenizes (byte symbols)


def test_autoencoder_stage_fits_the_latent_scale(vae_dir):
    from diffusers import AutoencoderKL

    from stepdistill.data import open_images
    from stepdistill.training.latent_teacher import fit_latent_scale

    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert vae.config.block_out_channels == [8, 8, 16]
    images = open_images(str(vae_dir.parent.parent / "data" / "train"), channels=3)
    z = (vae.encode(images.images(list(range(len(images))))).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    assert z.shape[1:] == (4, 8, 8)
    assert abs(z.std().item() - 1.0) < 1e-3 and abs(z.mean().item()) < 1e-3  # unit-variance, centred latents
    assert fit_latent_scale(vae, images) == pytest.approx((vae.config.scaling_factor, vae.config.shift_factor), rel=1e-5)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_latent_teacher_exports_a_stock_pipeline_that_loads_in_a_fresh_process(folder, vae_dir, family):
    recipe = CONFIGS / ("t2i_sd_teacher.yaml" if family == "sd" else "t2i_flow_teacher.yaml")
    tiny = {"data": {"images": str(folder / "data" / "train")}, "vae": {"path": str(vae_dir)}, "text_encoder": TINY_TEXT,
            "unet": {"block_out_channels": [16, 32], "attention_head_dim": 4, "norm_num_groups": 8},
            "transformer": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "caption_projection_dim": 16},
            "denoising": {"eval_inference_steps": 2}, "training": TINY_TRAINING}
    out = folder / family
    pipeline_dir = train_teacher(recipe, out, overrides=tiny, progress=False)
    assert pipeline_dir == out / "pipeline"
    expected = "StableDiffusionPipeline" if family == "sd" else "StableDiffusion3Pipeline"
    assert json.loads((pipeline_dir / "model_index.json").read_text())["_class_name"] == expected

    stdout = run_fresh_python(f"""
        import torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(pipeline_dir)!r})
        images = pipe(prompt=["a large red circle in the top left on a black background"] * 2, num_inference_steps=2,
                      guidance_scale=4.0, height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images
        print(type(pipe).__name__, tuple(images.shape), bool(torch.isfinite(images).all()))
    """, cwd=folder)
    assert stdout.split() == [expected, "(2,", "3,", "32,", "32)", "True"]

    if family == "sd":  # resume is the trainer's (bitwise, tests/test_trainer_faults.py); one family shows the recipe resumes
        longer = {**tiny, "training": {**TINY_TRAINING, "max_steps": 4}}
        train_teacher(recipe, out, resume=True, overrides=longer, progress=False)
        assert json.loads((out / "checkpoint-00000004" / "trainer_state.json").read_text())["step"] == 4


def test_uncaptioned_folder_and_missing_vae_are_one_line_errors(tmp_path, folder):
    with pytest.raises(RecipeError, match="vae.path"):
        train_teacher(CONFIGS / "t2i_sd_teacher.yaml", tmp_path / "x", overrides={"data": {"images": str(folder / "data" / "train")},
                                                                                  "vae": {"path": None}}, progress=False)
    with pytest.raises(RecipeError, match="family sd3 trains a flow-matching teacher"):
        train_teacher(CONFIGS / "t2i_flow_teacher.yaml", tmp_path / "y", progress=False,
                      set_items=[f"data.images={folder / 'data' / 'train'}", f"vae.path={folder / 'vae_run' / 'vae'}",
                                 "scheduler.class_name=DDIMScheduler"])


def test_a_datasets_directory_with_captions_trains_the_sd_teacher(tmp_path, folder, vae_dir):
    """The same recipe on a `datasets` dataset saved with save_to_disk (image + text columns)."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from stepdistill.t2i.data import t2i_image

    pairs = [t2i_image(0, i) for i in range(16)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    source = datasets.Dataset.from_dict({"image": [image for image, _ in pairs], "text": [scene.caption for _, scene in pairs]},
                                        features=features)
    source.save_to_disk(tmp_path / "saved")
    assert isinstance(pairs[0][0], Image.Image)
    tiny = {"data": {"images": str(tmp_path / "saved")}, "vae": {"path": str(vae_dir)}, "text_encoder": TINY_TEXT,
            "unet": {"block_out_channels": [16, 32], "attention_head_dim": 4, "norm_num_groups": 8},
            "denoising": {"eval_inference_steps": 2}, "training": {**TINY_TRAINING, "max_steps": 2}}
    pipeline_dir = train_teacher(CONFIGS / "t2i_sd_teacher.yaml", tmp_path / "run", overrides=tiny, progress=False)
    assert (pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "background</w>" in (pipeline_dir / "tokenizer" / "tokenizer.json").read_text()  # the tokenizer learnt the dataset's words
