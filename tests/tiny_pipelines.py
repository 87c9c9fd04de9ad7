"""Tiny random-weight SD / SDXL / SD3 / Flux / DiT pipelines built from configs, with in-memory tokenizers.

Stock diffusers pipeline objects, small enough that a few denoising steps take well under a
second on a CPU, and deterministic (each component is built after ``torch.manual_seed``).
Nothing is downloaded: the CLIP tokenizer is a byte-level BPE over single characters and the T5
tokenizer a Unigram model over letters, both built here. Reusable by any test that needs a
latent teacher: ``StableDiffusionTeacher.from_pipeline(tiny_sd_pipeline())``, or
``pipe.save_pretrained(dir)`` then ``load_teacher(dir)``.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

CLIP_MAX_LENGTH = 16  # tokens per prompt for the tiny CLIP tokenizers (SD uses 77)
T5_MAX_LENGTH = 16  # Flux max_sequence_length for the tiny T5 (Flux uses 512)


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2 / CLIP convention)."""
    from stepdistill.training.latent_teacher import byte_symbols

    return byte_symbols()


def tiny_clip_tokenizer(max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is every byte symbol (alone and word-final) plus a
    few merges; ids: 0 = <|startoftext|>, 1 = <|endoftext|> (also the pad token)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in _byte_alphabet():
        vocab[symbol] = len(vocab)
    for symbol in _byte_alphabet():
        vocab[symbol + "</w>"] = len(vocab)
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = T5_MAX_LENGTH) -> T5Tokenizer:
    """A T5 (Unigram) tokenizer over lowercase letters; ids: 0 = <pad>, 1 = </s>, 2 = <unk>."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -1.0) for c in string.ascii_lowercase] + [(c, -2.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_config(hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )


def tiny_clip_text_encoder(seed: int = 0, with_projection: bool = False, hidden_size: int = 32):
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_config(hidden_size)).eval()


def tiny_vae(seed: int = 0, block_out_channels=(8, 16), latent_channels: int = 4, **kwargs) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=list(block_out_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(block_out_channels),
        latent_channels=latent_channels,
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=32,
        **kwargs,
    ).eval()


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD 1.x/2.x's noise schedule, as a DDIM scheduler (what ddim_sample reproduces)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )


def tiny_sd_pipeline(prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """A tiny SD 1.x-style pipeline (latents 4 x H/2 x W/2; default image 32 x 32)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    return StableDiffusionPipeline(
        unet=unet,
        vae=tiny_vae(seed=1),
        text_encoder=tiny_clip_text_encoder(seed=2),
        tokenizer=tiny_clip_tokenizer(),
        scheduler=sd_ddim_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(force_zeros_for_empty_prompt: bool = True, prediction_type: str = "epsilon") -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline: two CLIP encoders (the second with projection), text_time conditioning."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled projection dim
        cross_attention_dim=64,  # 32 + 32: both encoders' hidden states concatenated
        norm_num_groups=4,
    ).eval()
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=tiny_vae(seed=1),
        text_encoder=tiny_clip_text_encoder(seed=2),
        text_encoder_2=tiny_clip_text_encoder(seed=3, with_projection=True),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=sd_ddim_scheduler(prediction_type),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config: dynamic shifting from the image token count."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_flux_pipeline(guidance_embeds: bool = True) -> FluxPipeline:
    """A tiny Flux pipeline (FLUX.1-dev-like with ``guidance_embeds=True``): 4 latent channels,
    VAE with scaling and shift factors, CLIP (pooled) + T5 text encoders."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    ).eval()
    t5 = tiny_t5_encoder(seed=3)
    return FluxPipeline(
        transformer=transformer,
        vae=tiny_vae(seed=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=tiny_clip_text_encoder(seed=2),
        text_encoder_2=t5,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_t5_tokenizer(),
        scheduler=flux_scheduler(),
    )


def tiny_t5_encoder(seed: int = 3, d_model: int = 32) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(d_model=d_model, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=64, pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0, relative_attention_num_buckets=8)
    ).eval()


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3-medium's scheduler config: a static shift of 3."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def tiny_sd3_pipeline(with_t5: bool = True) -> StableDiffusion3Pipeline:
    """A tiny SD3 pipeline: two CLIP encoders with projection (hidden 32 each, concatenated to 64,
    zero-padded to the T5 width 64 as SD3 pads 2048 to 4096), a T5 encoder (or none: SD3 then
    uses zeros for the T5 tokens), a VAE with scaling and shift factors, 4 latent channels."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,  # 32 + 32: both CLIP projections concatenated
        out_channels=4,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=sd3_scheduler(),
        vae=tiny_vae(seed=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=tiny_clip_text_encoder(seed=2, with_projection=True),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(seed=4, with_projection=True),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(seed=3, d_model=64) if with_t5 else None,
        tokenizer_3=tiny_t5_tokenizer() if with_t5 else None,
    )


def dit_ddim_scheduler() -> DDIMScheduler:
    """DiT-XL-2-256's scheduler: linear betas, epsilon prediction (the network also predicts a variance)."""
    return DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False, set_alpha_to_one=True)


def tiny_dit_pipeline(id2label: dict[int, str] | None = None) -> DiTPipeline:
    """A tiny DiT pipeline (DiT-XL-2 layout: 1000 classes + the null class 1000 that DiTPipeline
    hard-codes, learned sigma: out_channels = 2 x 4 latent channels, 2x2 patches)."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    ).eval()
    return DiTPipeline(transformer=transformer, vae=tiny_vae(seed=1, scaling_factor=0.18215), scheduler=dit_ddim_scheduler(), id2label=id2label)


__all__ = [
    "CLIP_MAX_LENGTH",
    "T5_MAX_LENGTH",
    "dit_ddim_scheduler",
    "flux_scheduler",
    "save_as_original_sd_checkpoint",
    "sd_ddim_scheduler",
    "sd3_scheduler",
    "tiny_clip_text_encoder",
    "tiny_dit_pipeline",
    "tiny_sd3_pipeline",
    "tiny_clip_tokenizer",
    "tiny_flux_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_t5_encoder",
    "tiny_t5_tokenizer",
    "tiny_vae",
]


# -- original (LDM / CompVis) single-file checkpoints -----------------------------------------

_UNET_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                       ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION_TO_LDM = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _unet_key_to_ldm(key: str, layers_per_block: int) -> str:
    """One diffusers UNet2DConditionModel key in the original SD layout (inverse of diffusers'
    ``convert_ldm_unet_checkpoint``)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    module, _, param = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{param}"
    parts = key.split(".")
    per = layers_per_block + 1
    if parts[0] == "down_blocks":
        block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.weight
            return f"input_blocks.{1 + block * per + layers_per_block}.0.op.{rest[-1]}"
        index = 1 + block * per + layer
        prefix = f"input_blocks.{index}.{0 if kind == 'resnets' else 1}"
    elif parts[0] == "mid_block":
        kind, layer, rest = parts[1], int(parts[2]), parts[3:]
        prefix = f"middle_block.{2 * layer if kind == 'resnets' else 1}"
    elif parts[0] == "up_blocks":
        block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":  # after the block's last resnet (+ attention, when it has one)
            return f"output_blocks.{block * per + layers_per_block}.{{up}}.conv.{rest[-1]}"
        prefix = f"output_blocks.{block * per + layer}.{0 if kind == 'resnets' else 1}"
    else:
        raise KeyError(key)
    rest = ".".join(rest)
    if kind == "resnets":
        for new, old in _UNET_RESNET_TO_LDM:
            rest = rest.replace(new, old, 1) if rest.startswith(new) else rest
    return f"{prefix}.{rest}"


def _vae_key_to_ldm(key: str, num_blocks: int) -> str:
    """One diffusers AutoencoderKL key in the original layout (inverse of ``convert_ldm_vae_checkpoint``)."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    parts = key.split(".")
    if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
        coder, block = parts[0], int(parts[2])
        if parts[1] == "up_blocks":
            block = num_blocks - 1 - block
        name = "down" if parts[1] == "down_blocks" else "up"
        if parts[3] in ("downsamplers", "upsamplers"):
            return f"{coder}.{name}.{block}.{'downsample' if name == 'down' else 'upsample'}.{'.'.join(parts[5:])}"
        return f"{coder}.{name}.{block}.block.{'.'.join(parts[4:])}"
    if len(parts) > 2 and parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        rest = ".".join(parts[4:])
        for new, old in _VAE_ATTENTION_TO_LDM:
            rest = rest.replace(new + ".", old + ".", 1) if rest.startswith(new + ".") else rest
        return f"{parts[0]}.mid.attn_1.{rest}"
    return key


def save_as_original_sd_checkpoint(pipe: StableDiffusionPipeline, path) -> None:
    """Write ``pipe``'s UNet, VAE and CLIP text encoder as one original-format (CompVis/LDM)
    safetensors checkpoint, like ``v1-5-pruned-emaonly.safetensors``: the layout
    ``StableDiffusionPipeline.from_single_file`` converts from."""
    from safetensors.torch import save_file

    lpb = pipe.unet.config.layers_per_block
    has_attention = {i: "CrossAttn" in t for i, t in enumerate(pipe.unet.config.up_block_types)}
    state = {}
    for key, value in pipe.unet.state_dict().items():
        ldm = _unet_key_to_ldm(key, lpb)
        if "{up}" in ldm:
            ldm = ldm.format(up=2 if has_attention[int(key.split(".")[1])] else 1)
        state["model.diffusion_model." + ldm] = value
    blocks = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        state["first_stage_model." + _vae_key_to_ldm(key, blocks)] = value
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def tiny_pixel_unet(num_class_embeds: int | None = None, seed: int = 0, channels: int = 1, sample_size: int = 8) -> UNet2DModel:
    """A tiny pixel UNet (default 8x8x1); ``num_class_embeds=11`` gives the digits layout (10 classes + null)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    ).eval()
