"""The config.json files of published real-size checkpoints, as dicts (no weights), and teacher
directories made of them: what `stepdistill plan` reads.

- stabilityai/stable-diffusion-xl-base-1.0: unet, text_encoder (CLIP ViT-L/14 text), text_encoder_2
  (OpenCLIP ViT-bigG/14 text with projection), vae;
- black-forest-labs/FLUX.1-dev: transformer, text_encoder (CLIP-L), text_encoder_2 (T5 v1.1 XXL
  encoder), vae (16 latent channels);
- stabilityai/stable-diffusion-3-medium-diffusers: transformer, text_encoder / text_encoder_2 (CLIP-L
  and CLIP-G with projection), text_encoder_3 (T5 v1.1 XXL encoder), vae (16 latent channels);
- facebook/DiT-XL-2-256: transformer, vae (sd-vae-ft-ema).
"""

from __future__ import annotations

import json
from pathlib import Path

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None,
    "time_embedding_dim": None, "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}
FLUX_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
    "pooled_projection_dim": 768,
}
SD3_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128,
}
CLIP_L_TEXT = {  # openai/clip-vit-large-patch14 text tower (SD 1.x, SDXL text_encoder, Flux, SD3)
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}
CLIP_G_TEXT = {  # laion OpenCLIP ViT-bigG/14 text tower with projection (SDXL text_encoder_2, SD3 text_encoder_2)
    "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1, "projection_dim": 1280, "vocab_size": 49408,
}
T5_XXL_ENCODER = {  # google/t5-v1_1-xxl (Flux text_encoder_2, SD3 text_encoder_3)
    "architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
    "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True,
    "pad_token_id": 0, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "use_cache": True, "vocab_size": 32128,
}
VAE_4CH = {  # SDXL's AutoencoderKL
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
VAE_16CH = {  # Flux / SD3's AutoencoderKL (no quant convs; scaling and shift factors differ: Flux's here)
    **VAE_4CH, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# facebook/DiT-XL-2-256: 749.8 M parameters in diffusers' layout, where each of the 28 blocks keeps its
# own timestep + label embedder (2.78 M each); the paper's 675 M counts them once
DIT_XL_2_256_TRANSFORMER = {
    "_class_name": "DiTTransformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
    "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000, "num_layers": 28, "out_channels": 8, "patch_size": 2, "sample_size": 32,
    "upcast_attention": False,
}
VAE_SD = {  # stabilityai/sd-vae-ft-ema (DiT's VAE)
    **VAE_4CH, "sample_size": 256, "scaling_factor": 0.18215, "force_upcast": True,
}

# published parameter counts the configs must reproduce on the meta device
PUBLISHED = {"SDXL_UNET": 2.57e9, "FLUX_DEV_TRANSFORMER": 11.9e9, "SD3_MEDIUM_TRANSFORMER": 2.03e9,
             "CLIP_L_TEXT": 123.06e6, "CLIP_G_TEXT": 694.66e6, "T5_XXL_ENCODER": 4.762e9, "VAE_4CH": 83.65e6}

TEACHERS = {
    "sdxl": ("StableDiffusionXLPipeline", {"unet": SDXL_UNET, "text_encoder": ("CLIPTextModel", CLIP_L_TEXT),
                                           "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G_TEXT), "vae": VAE_4CH}),
    "flux": ("FluxPipeline", {"transformer": FLUX_DEV_TRANSFORMER, "text_encoder": ("CLIPTextModel", CLIP_L_TEXT),
                              "text_encoder_2": ("T5EncoderModel", T5_XXL_ENCODER), "vae": VAE_16CH}),
    "sd3": ("StableDiffusion3Pipeline", {"transformer": SD3_MEDIUM_TRANSFORMER,
                                         "text_encoder": ("CLIPTextModelWithProjection", CLIP_L_TEXT),
                                         "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G_TEXT),
                                         "text_encoder_3": ("T5EncoderModel", T5_XXL_ENCODER),
                                         "vae": {**VAE_16CH, "scaling_factor": 1.5305, "shift_factor": 0.0609}}),
    "dit": ("DiTPipeline", {"transformer": DIT_XL_2_256_TRANSFORMER, "vae": VAE_SD}),
}


def write_teacher_dir(root: Path, family: str) -> Path:
    """A "teacher directory" of config files only: model_index.json + <component>/config.json."""
    pipeline, components = TEACHERS[family]
    root = Path(root) / family
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    for name, entry in components.items():
        library, (cls, config) = ("transformers", entry) if isinstance(entry, tuple) else ("diffusers", (entry["_class_name"], entry))
        index[name] = [library, cls]
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "_class_name"} | {"_class_name": cls}))
    (root / "model_index.json").write_text(json.dumps(index))
    return root
