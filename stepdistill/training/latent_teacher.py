"""Train latent text-to-image teachers from a captioned image folder (``stepdistill train-teacher``).

Two recipes, two runs, the way latent diffusion is built:

1. **The autoencoder** (a recipe with an ``autoencoder:`` section, ``configs/t2i_vae.yaml``): an
   ``AutoencoderKL`` trained to reconstruct the images (L1 + MSE + a small KL term, as SD's VAE, without
   its perceptual and GAN losses that need downloaded networks). At the end the latents of every
   training image fix the VAE config's ``scaling_factor`` (1 / std, SD's rule: unit-variance
   latents) and ``shift_factor`` (their mean, what SD3 / Flux subtract); the export is a
   diffusers ``AutoencoderKL`` directory (``OUTPUT/vae``).
2. **The denoiser** (a recipe with ``family: sd`` or ``family: sd3``): that VAE, frozen text
   encoder(s) and a denoiser (``UNet2DConditionModel`` for ``sd``, ``SD3Transformer2DModel`` for
   ``sd3``) trained on the VAE's latents with the family's own loss: VP epsilon / v / x0 targets
   for ``sd`` (:mod:`stepdistill.schedule`), the rectified-flow velocity ``eps - x0`` at
   logit-normal sigmas shifted by the scheduler's ``shift`` for ``sd3`` (SD3's training recipe).
   Captions are replaced by the empty prompt with probability ``denoising.caption_dropout``,
   the null branch the stock pipelines use for classifier-free guidance. The export is the
   family's stock pipeline (``StableDiffusionPipeline`` / ``StableDiffusion3Pipeline``): it loads
   with ``DiffusionPipeline.from_pretrained(dir)`` and nothing else.

The text encoders are **frozen at their random initialisation** (``CLIPTextModel`` /
``CLIPTextModelWithProjection`` built from the recipe's sizes and seed). Why frozen: users'
teachers condition on frozen pretrained encoders, and a frozen encoder's embeddings of the
finite caption set are computed once and cached, so training costs only the denoiser's passes.
Why random is enough: the captions' words are single tokens of a word-level BPE vocabulary
(:func:`word_tokenizer`), and a small random transformer with residual connections keeps token
identity and order distinguishable -- whether the denoiser can read them is measured, not
assumed (prompt accuracy, docs/t2i.md). SD3's third encoder is a small T5 over the same
words (frozen, random, ``text_encoder_3``): a pipeline saved without it does not load with a plain
``DiffusionPipeline.from_pretrained(dir)`` (diffusers asks for ``text_encoder_3=None`` then).

Conditioning and VAE scaling go through the teacher adapters (:mod:`stepdistill.teachers`),
so the embeddings trained on are exactly what the stock pipeline computes for the same prompt.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EMAConfig, OptimizerConfig, TrainingConfig, bounded, load_recipe, to_dict
from ..errors import RecipeError
from ..schedule import schedule_from_scheduler
from .trainer import Role, StepContext, Trainer, TrainingMethod, seed_run


# -- recipe sections -------------------------------------------------------------------------------
@dataclass
class CaptionedDataSection:
    images: Optional[str] = None  # a captioned image folder (metadata.jsonl) or a `datasets` directory with a text column
    resolution: Optional[int] = bounded(None, ge=8)
    center_crop: bool = True
    image_column: Optional[str] = None
    caption_column: Optional[str] = None
    split: Optional[str] = None


@dataclass
class AutoencoderSection:
    """``AutoencoderKL`` architecture and loss. ``len(block_out_channels) - 1`` halvings: three
    blocks make a factor-4 VAE (32 x 32 images -> 8 x 8 latents)."""

    block_out_channels: tuple[int, ...] = bounded((32, 64, 64), ge=1)
    layers_per_block: int = bounded(1, ge=1)
    latent_channels: int = bounded(4, ge=1)
    norm_num_groups: int = bounded(16, ge=1)
    kl_weight: float = bounded(1e-6, ge=0)


@dataclass
class VAERecipe:
    data: CaptionedDataSection = field(default_factory=CaptionedDataSection)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class TextEncoderSection:
    """The frozen, randomly initialised CLIP text encoder(s) (two for sd3, as SD3's CLIP-L and CLIP-G)."""

    hidden_size: int = bounded(64, ge=8)
    intermediate_size: int = bounded(128, ge=8)
    num_hidden_layers: int = bounded(2, ge=1)
    num_attention_heads: int = bounded(4, ge=1)
    projection_dim: int = bounded(32, ge=8)  # sd3: pooled projections (both encoders concatenated)
    max_length: int = bounded(16, ge=4)  # tokens per prompt, start and end tokens included
    seed: int = bounded(0, ge=0)


@dataclass
class ConditionalUNetSection:
    """``UNet2DConditionModel`` (family sd)."""

    block_out_channels: tuple[int, ...] = bounded((64, 128), ge=1)
    layers_per_block: int = bounded(1, ge=1)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    attention_head_dim: int = bounded(8, ge=1)
    norm_num_groups: int = bounded(16, ge=1)


@dataclass
class TransformerSection:
    """``SD3Transformer2DModel`` (family sd3)."""

    num_layers: int = bounded(4, ge=1)
    num_attention_heads: int = bounded(4, ge=1)
    attention_head_dim: int = bounded(32, ge=1)
    patch_size: int = bounded(1, ge=1)
    caption_projection_dim: int = bounded(128, ge=1)


@dataclass
class LatentSchedulerSection:
    """The scheduler the teacher is trained for and exported with. VP fields apply to DDIM / DDPM
    (family sd), ``shift`` to FlowMatchEulerDiscreteScheduler (family sd3)."""

    class_name: Literal["DDIMScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler"] = "DDIMScheduler"
    num_train_timesteps: int = bounded(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = bounded(0.00085, gt=0, lt=1)
    beta_end: float = bounded(0.012, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    steps_offset: int = bounded(1, ge=0)
    shift: float = bounded(3.0, gt=0)


@dataclass
class LatentDenoisingSection:
    caption_dropout: float = bounded(0.1, ge=0, le=1)  # probability of the empty prompt (the CFG null branch)
    logit_mean: float = 0.0  # sd3: sigma = shift(sigmoid(N(logit_mean, logit_std)))
    logit_std: float = bounded(1.0, gt=0)
    eval_inference_steps: int = bounded(25, ge=1)
    eval_guidance_scale: float = bounded(4.0, ge=1)


@dataclass
class VAEPathSection:
    path: Optional[str] = None  # an AutoencoderKL directory (e.g. OUTPUT/vae of the autoencoder recipe)


@dataclass
class LatentTeacherRecipe:
    family: Literal["sd", "sd3"] = "sd"
    data: CaptionedDataSection = field(default_factory=CaptionedDataSection)
    vae: VAEPathSection = field(default_factory=VAEPathSection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    unet: ConditionalUNetSection = field(default_factory=ConditionalUNetSection)
    transformer: TransformerSection = field(default_factory=TransformerSection)
    scheduler: LatentSchedulerSection = field(default_factory=LatentSchedulerSection)
    denoising: LatentDenoisingSection = field(default_factory=LatentDenoisingSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)


def recipe_kind(data: Mapping[str, Any]) -> str:
    """Which teacher a recipe trains: ``vae`` (an ``autoencoder:`` section), ``latent`` (a
    ``family:``), else ``pixel``."""
    if "autoencoder" in data:
        return "vae"
    if "family" in data:
        return "latent"
    return "pixel"


def load_captioned_recipe(cls, path, overrides: Mapping[str, Any] | None = None, set_items: Sequence[str] | None = None):
    recipe = load_recipe(path, cls, overrides, set_items)
    if not recipe.data.images:
        raise RecipeError(f"{os.fspath(path)}: data.images is required: a captioned image folder or `datasets` directory (--set data.images=DIR)")
    return recipe


def open_captioned(section: CaptionedDataSection):
    from ..data import open_images

    resolution = (section.resolution, section.resolution) if section.resolution else None
    dataset = open_images(section.images, channels=3, resolution=resolution, center_crop=section.center_crop,
                          image_column=section.image_column, caption_column=section.caption_column, split=section.split)
    if dataset.kind != "text":
        raise RecipeError(f"{section.images} has no captions ({dataset.summary()}); a text-to-image teacher needs a metadata.jsonl "
                          "with a text column (or a `datasets` text column)")
    return dataset


# -- the word-level CLIP tokenizer -------------------------------------------------------------------
def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2 / CLIP), so any text tokenizes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def word_tokenizer(captions: Sequence[str], max_length: int):
    """A ``CLIPTokenizer`` whose BPE merges make every word of ``captions`` one token.

    The merges are learnt from the captions' words the way BPE is trained (repeatedly merge the
    most frequent adjacent pair), so tokenizing a caption word replays exactly its training
    merges and ends in one token; any other text still tokenizes (into byte symbols). ids: 0 =
    ``<|startoftext|>``, 1 = ``<|endoftext|>`` (also the padding token, as in SD's tokenizer).
    """
    from transformers import CLIPTokenizer

    words = Counter(word.lower() for caption in captions for word in caption.split())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in byte_symbols():
        vocab.setdefault(symbol, len(vocab))
    for symbol in byte_symbols():
        vocab.setdefault(symbol + "</w>", len(vocab))
    pieces = {word: list(word[:-1]) + [word[-1] + "</w>"] for word in sorted(words)}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for word, parts in pieces.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])  # most frequent; ties: the first in sorted order
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for word, parts in pieces.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            pieces[word] = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def word_t5_tokenizer(captions: Sequence[str], max_length: int = 256):
    """A ``T5Tokenizer`` (Unigram) in which every word of ``captions`` is one piece (``▁word``);
    letters remain as fallback pieces, so any lower-case text tokenizes. ids: 0 = ``<pad>``,
    1 = ``</s>``, 2 = ``<unk>`` (T5's)."""
    import string

    from transformers import T5Tokenizer

    words = sorted({word.lower() for caption in captions for word in caption.split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    pieces += [("▁" + c, -10.0) for c in string.ascii_lowercase] + [(c, -10.0) for c in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def t5_encoder(section: TextEncoderSection, vocab_size: int, width: int, seed_offset: int = 2):
    """SD3's third text encoder, at the width of the joint attention (frozen, random)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=width, d_ff=section.intermediate_size, d_kv=width // section.num_attention_heads,
                      num_heads=section.num_attention_heads, num_layers=section.num_hidden_layers, vocab_size=vocab_size,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=8)
    torch.manual_seed(section.seed + seed_offset)
    return T5EncoderModel(config).eval().requires_grad_(False)


def text_encoder(section: TextEncoderSection, vocab_size: int, seed_offset: int = 0, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=section.hidden_size, intermediate_size=section.intermediate_size,
        num_hidden_layers=section.num_hidden_layers, num_attention_heads=section.num_attention_heads,
        max_position_embeddings=section.max_length, projection_dim=section.projection_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu",
    )
    torch.manual_seed(section.seed + seed_offset)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return model.eval().requires_grad_(False)


# -- stage 1: the autoencoder --------------------------------------------------------------------------
def build_autoencoder(section: AutoencoderSection, channels: int = 3):
    from diffusers import AutoencoderKL

    for width in section.block_out_channels:
        if width % section.norm_num_groups:
            raise RecipeError(f"autoencoder: every block_out_channels must be divisible by norm_num_groups ({section.norm_num_groups})")
    blocks = len(section.block_out_channels)
    return AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=section.latent_channels,
        block_out_channels=tuple(section.block_out_channels), layers_per_block=section.layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        norm_num_groups=section.norm_num_groups,
    )


class AutoencoderMethod(TrainingMethod):
    """Reconstruction (L1 + MSE) of the posterior mean plus ``kl_weight`` x KL(posterior || N(0, I))."""

    def __init__(self, vae: nn.Module, dataset, optimizer: OptimizerConfig, kl_weight: float):
        self.vae, self.dataset, self.optimizer, self.kl_weight = vae, dataset, optimizer, kl_weight

    def roles(self) -> dict[str, Role]:
        return {"vae": Role(self.vae, optimizer=self.optimizer)}

    def training_step(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        x = self.dataset.images(ctx.sample_indices(len(self.dataset)).tolist()).to(ctx.device)
        vae = ctx.model("vae")
        posterior = vae.encode(x).latent_dist
        # The posterior mean is decoded, not a sample: with a KL weight this small the encoder's
        # variance only adds noise that it must first learn to shrink; decoding samples, 1,500
        # steps reconstructed shapes as blurs with their hues collapsed to red / cyan (docs/t2i.md).
        recon = vae.decode(posterior.mean).sample
        error = recon.float() - x.float()
        l1, mse = error.abs().mean(), error.square().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + mse + self.kl_weight * kl
        ctx.step_role("vae", loss)
        return {"loss": loss, "l1": l1, "mse": mse, "kl": kl}

    def generate_samples(self, trainer: Trainer, num_samples: int, generator: torch.Generator):
        """Originals and reconstructions, interleaved row by row (the grid's pairs)."""
        vae = trainer.unwrap("vae")
        count = min(num_samples, 50)
        x = self.dataset.images(list(range(count))).to(trainer.accelerator.device)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        rows = [t for start in range(0, count, 10) for t in (x[start:start + 10], recon[start:start + 10])]
        return torch.cat(rows).cpu(), None


@torch.no_grad()
def fit_latent_scale(vae, dataset, batch_size: int = 256) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of ``vae`` on ``dataset``: 1 / std and mean of the posterior
    means of every image (SD fixed 0.18215 this way; SD3 / Flux also subtract a shift)."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(dataset), batch_size):
        x = dataset.images(list(range(start, min(start + batch_size, len(dataset))))).to(vae.device, vae.dtype)
        z = vae.encode(x).latent_dist.mode().double()
        total, total_sq, count = total + z.sum().item(), total_sq + (z * z).sum().item(), count + z.numel()
    mean = total / count
    std = (total_sq / count - mean * mean) ** 0.5
    return 1.0 / std, mean


def train_autoencoder(recipe_path, output_dir, *, resume: bool = False, overwrite: bool = False, overrides=None, set_items=None,
                      progress: bool = True) -> Path:
    """Stage 1: train the VAE, fit its latent scale and export it to ``output_dir/vae``."""
    from .checkpoint import load_trained_model

    recipe = load_captioned_recipe(VAERecipe, recipe_path, overrides, set_items)
    dataset = open_captioned(recipe.data)
    if progress:
        print(f"stepdistill train-teacher (autoencoder): {dataset.summary()}", flush=True)
    with seed_run(recipe.training):
        vae = build_autoencoder(recipe.autoencoder, dataset.channels)
    method = AutoencoderMethod(vae, dataset, recipe.optimizer, recipe.autoencoder.kl_weight)
    trainer = Trainer(method, recipe.training, output_dir, resume=resume, overwrite=overwrite, progress=progress,
                      run_info={"kind": "autoencoder", "recipe": to_dict(recipe), "recipe_path": os.fspath(recipe_path)})
    trainer.train()
    out = Path(output_dir) / "vae"
    if trainer.accelerator.is_main_process:
        trained = load_trained_model(output_dir, role="vae", ema=False).eval()
        scaling, shift = fit_latent_scale(trained, dataset)
        trained.register_to_config(scaling_factor=scaling, shift_factor=shift)
        trained.save_pretrained(out)
        if progress:
            print(f"autoencoder written to {out} (scaling_factor {scaling:.5f}, shift_factor {shift:.5f})", flush=True)
    trainer.finish()
    return out


# -- stage 2: the denoiser -------------------------------------------------------------------------
def build_scheduler(section: LatentSchedulerSection):
    import diffusers

    if section.class_name == "FlowMatchEulerDiscreteScheduler":
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=section.num_train_timesteps, shift=section.shift)
    return getattr(diffusers, section.class_name)(
        num_train_timesteps=section.num_train_timesteps, beta_schedule=section.beta_schedule, beta_start=section.beta_start,
        beta_end=section.beta_end, prediction_type=section.prediction_type, timestep_spacing=section.timestep_spacing,
        steps_offset=section.steps_offset, clip_sample=False,
        **({"set_alpha_to_one": False} if section.class_name == "DDIMScheduler" else {}),
    )


def load_vae(path: str | None, family: str):
    """The stage-1 VAE with the family's latent convention: SD pipelines scale only (no shift)."""
    from diffusers import AutoencoderKL

    if not path:
        raise RecipeError("vae.path is required: the AutoencoderKL directory of the autoencoder recipe (configs/t2i_vae.yaml -> OUTPUT/vae)")
    if not os.path.isdir(path):
        raise RecipeError(f"vae.path {path} is not a directory")
    vae = AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)
    if family == "sd":
        # StableDiffusionPipeline ignores shift_factor; keep the config honest about it. Re-fit the
        # scale around zero would change nothing that matters: the mean is a small offset.
        vae.register_to_config(shift_factor=None)
    return vae


def build_pipeline(recipe: LatentTeacherRecipe, vae, captions: Sequence[str]):
    """The family's stock pipeline with fresh (random) denoiser and text encoder(s)."""
    import diffusers

    t = recipe.text_encoder
    tokenizer = word_tokenizer(captions, t.max_length)
    latent_channels = vae.config.latent_channels
    scheduler = build_scheduler(recipe.scheduler)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    sample_size = (recipe.data.resolution or 32) // factor
    if recipe.family == "sd":
        if recipe.scheduler.class_name == "FlowMatchEulerDiscreteScheduler":
            raise RecipeError("family sd trains a VP teacher: scheduler.class_name DDIMScheduler or DDPMScheduler")
        u = recipe.unet
        unet = diffusers.UNet2DConditionModel(
            sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
            block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
            down_block_types=tuple(u.down_block_types), up_block_types=tuple(u.up_block_types),
            cross_attention_dim=t.hidden_size, attention_head_dim=u.attention_head_dim, norm_num_groups=u.norm_num_groups,
        )
        encoder = text_encoder(t, len(tokenizer))
        return diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=encoder, tokenizer=tokenizer, scheduler=scheduler,
                                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if recipe.scheduler.class_name != "FlowMatchEulerDiscreteScheduler":
        raise RecipeError("family sd3 trains a flow-matching teacher: scheduler.class_name FlowMatchEulerDiscreteScheduler")
    s = recipe.transformer
    t5_tokenizer = word_t5_tokenizer(captions)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=sample_size, patch_size=s.patch_size, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=s.num_layers, attention_head_dim=s.attention_head_dim, num_attention_heads=s.num_attention_heads,
        caption_projection_dim=s.caption_projection_dim, joint_attention_dim=2 * t.hidden_size,  # both CLIPs concatenated
        pooled_projection_dim=2 * t.projection_dim, pos_embed_max_size=max(sample_size // s.patch_size, 1),
    )
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder(t, len(tokenizer), 0, with_projection=True), tokenizer=tokenizer,
        text_encoder_2=text_encoder(t, len(tokenizer), 1, with_projection=True), tokenizer_2=tokenizer,
        text_encoder_3=t5_encoder(t, len(t5_tokenizer), 2 * t.hidden_size), tokenizer_3=t5_tokenizer,
    )


def build_teacher(recipe: LatentTeacherRecipe, vae, captions: Sequence[str]):
    """The teacher adapter around a freshly built pipeline (seeded by ``training.seed``, so the
    frozen encoders of an export are those the run trained with)."""
    from ..teachers.sd3 import StableDiffusion3Teacher
    from ..teachers.stable_diffusion import StableDiffusionTeacher

    with seed_run(recipe.training):
        pipe = build_pipeline(recipe, vae, captions)
    return (StableDiffusionTeacher if recipe.family == "sd" else StableDiffusion3Teacher).from_pipeline(pipe)


class LatentDenoisingMethod(TrainingMethod):
    """Train the denoiser of a latent teacher adapter on cached latents and caption embeddings."""

    def __init__(self, teacher, dataset, recipe: LatentTeacherRecipe, progress: bool = True):
        self.teacher = teacher
        self.recipe = recipe
        self.schedule = schedule_from_scheduler(teacher.scheduler)
        self.denoiser = teacher.denoiser
        captions = dataset.captions(list(range(len(dataset))))
        unique = sorted(set(captions))
        position = {caption: i for i, caption in enumerate(unique)}
        self.caption_index = torch.tensor([position[c] for c in captions])
        with torch.no_grad():
            embeddings = [teacher.encode(unique[i:i + 256]).cond for i in range(0, len(unique), 256)]
            self.embeddings = {k: torch.cat([e[k] for e in embeddings]) for k in embeddings[0]}
            self.null = teacher.null_embeddings()
            self.latents = torch.cat([teacher.vae_encode(dataset.images(list(range(i, min(i + 256, len(dataset))))))
                                      for i in range(0, len(dataset), 256)]).cpu()
        if progress:
            std = self.latents.std().item()
            print(f"cached {len(self.latents)} latents {tuple(self.latents.shape[1:])} (std {std:.3f}) and {len(unique)} captions", flush=True)
        self.eval_prompts = captions[: max(1, recipe.training.num_eval_samples)]

    def roles(self) -> dict[str, Role]:
        return {"denoiser": Role(self.denoiser, optimizer=self.recipe.optimizer, ema=self.recipe.ema)}

    def _timesteps(self, ctx: StepContext) -> torch.Tensor:
        if self.schedule.kind == "vp":
            return ctx.randint(0, self.schedule.num_train_timesteps)
        d = self.recipe.denoising  # SD3: logit-normal sigmas, then the scheduler's static shift
        sigma = torch.sigmoid(d.logit_mean + d.logit_std * ctx.randn())
        return self.schedule.shift_sigmas(sigma) * self.schedule.num_train_timesteps

    def training_step(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        from ..teachers.base import with_network

        idx = ctx.sample_indices(len(self.latents))
        x0 = self.latents[idx].to(ctx.device)
        eps = ctx.randn(*x0.shape[1:])
        t = self._timesteps(ctx)
        drop = ctx.rand() < self.recipe.denoising.caption_dropout
        cond = {}
        for key, table in self.embeddings.items():
            rows = table[self.caption_index[idx]].to(ctx.device)
            null = self.null[key].to(ctx.device).expand_as(rows)
            cond[key] = torch.where(drop.view(-1, *([1] * (rows.ndim - 1))), null, rows)
        x_t = self.schedule.add_noise(x0, eps, t)
        target = self.schedule.from_x0_eps(x0, eps, t, self.teacher.prediction_type)
        pred = with_network(self.teacher, ctx.model("denoiser")).model_output(x_t, t, cond, {})
        loss = F.mse_loss(pred.float(), target.float())
        ctx.step_role("denoiser", loss)
        return {"loss": loss}

    def generate_samples(self, trainer: Trainer, num_samples: int, generator: torch.Generator):
        """The EMA denoiser through the stock pipeline at the recipe's evaluation steps and guidance."""
        import copy

        from ..teachers.base import with_network

        denoiser = trainer.emas["denoiser"].module if "denoiser" in trainer.emas else trainer.unwrap("denoiser")
        pipe = with_network(self.teacher, denoiser).build_pipeline(denoiser, copy.deepcopy(self.teacher.scheduler))
        pipe.set_progress_bar_config(disable=True)
        pipe.to(trainer.accelerator.device)  # the frozen VAE and encoders are not roles: the trainer did not place them
        d = self.recipe.denoising
        size = self.recipe.data.resolution or 32
        prompts = self.eval_prompts[:num_samples]
        images = [pipe(prompt=prompts[i:i + 100], num_inference_steps=d.eval_inference_steps, guidance_scale=d.eval_guidance_scale,
                       height=size, width=size, generator=generator, output_type="pt").images for i in range(0, len(prompts), 100)]
        return (torch.cat(images) * 2 - 1).cpu(), None


def train_latent_teacher(recipe_path, output_dir, *, resume: bool = False, overwrite: bool = False, overrides=None, set_items=None,
                         progress: bool = True) -> Path:
    """Stage 2: train the denoiser and export the family's stock pipeline to ``output_dir/pipeline``."""
    from .checkpoint import load_trained_model

    recipe = load_captioned_recipe(LatentTeacherRecipe, recipe_path, overrides, set_items)
    dataset = open_captioned(recipe.data)
    if progress:
        print(f"stepdistill train-teacher ({recipe.family}): {dataset.summary()}", flush=True)
    vae = load_vae(recipe.vae.path, recipe.family)
    captions = dataset.captions(list(range(len(dataset))))
    adapter = build_teacher(recipe, vae, captions)
    adapter.denoiser.requires_grad_(True).train()
    method = LatentDenoisingMethod(adapter, dataset, recipe, progress=progress)
    trainer = Trainer(method, recipe.training, output_dir, resume=resume, overwrite=overwrite, progress=progress,
                      run_info={"kind": "latent-teacher", "recipe": to_dict(recipe), "recipe_path": os.fspath(recipe_path)})
    trainer.train()
    out = Path(output_dir) / "pipeline"
    if trainer.accelerator.is_main_process:
        save_teacher_pipeline(adapter, load_trained_model(output_dir, role="denoiser", ema="denoiser" in trainer.emas), recipe, out,
                              recipe_path=recipe_path, overwrite=True)
    trainer.finish()
    return out


def save_teacher_pipeline(adapter, denoiser: nn.Module, recipe: LatentTeacherRecipe, output_dir, recipe_path=None,
                          overwrite: bool = False) -> Path:
    """The family's stock pipeline around ``denoiser`` (with the adapter's VAE, encoders and
    tokenizers and a fresh scheduler of the recipe), written atomically."""
    from ..atomic import atomic_directory

    from ..model_card import portable_path, write_model_card

    pipe = adapter.build_pipeline(denoiser.eval(), build_scheduler(recipe.scheduler))
    kind = "VP (epsilon / v)" if recipe.family == "sd" else "rectified-flow"
    info = {
        "title": f"stepdistill latent text-to-image teacher ({type(pipe).__name__})",
        "description": (f"A small {kind} latent text-to-image teacher trained with `stepdistill train-teacher` on "
                        f"{recipe.data.images}: {type(adapter.denoiser).__name__} on frozen, randomly initialised text encoders "
                        "with a word-level tokenizer of the training captions, and a VAE trained on the same images."),
        "method": "latent denoising diffusion training" if recipe.family == "sd" else "rectified flow matching",
        "recipe": portable_path(recipe_path), "dataset": recipe.data.images, "license": "apache-2.0",
        "tags": ["teacher", "text-to-image", "stepdistill"], "resolution": [recipe.data.resolution or 32] * 2,
    }
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        write_model_card(staging, info, num_inference_steps=recipe.denoising.eval_inference_steps,
                         guidance_scale=recipe.denoising.eval_guidance_scale, model_id=portable_path(output_dir))
    return Path(output_dir)


def export_run(run_dir, output_dir, *, ema: bool = True, overwrite: bool = False, checkpoint=None) -> Path:
    """A latent-teacher run's checkpoint (the latest unless ``checkpoint``) as the stock pipeline:
    the encoders and tokenizers are rebuilt from the recorded recipe (they are frozen at a seeded
    initialisation, so they come out identical), the denoiser from the checkpoint."""
    import json

    from ..config import from_dict
    from .checkpoint import RUN_FILE, load_trained_model

    info = json.loads((Path(run_dir) / RUN_FILE).read_text())
    recipe = from_dict(LatentTeacherRecipe, info["recipe"])
    dataset = open_captioned(recipe.data)
    adapter = build_teacher(recipe, load_vae(recipe.vae.path, recipe.family), dataset.captions(list(range(len(dataset)))))
    denoiser = load_trained_model(run_dir, role="denoiser", ema=ema, checkpoint=checkpoint)
    return save_teacher_pipeline(adapter, denoiser, recipe, output_dir, recipe_path=info.get("recipe_path"), overwrite=overwrite)


__all__ = [
    "AutoencoderMethod", "LatentDenoisingMethod", "export_run", "save_teacher_pipeline", "LatentTeacherRecipe", "VAERecipe", "build_autoencoder", "build_pipeline",
    "build_teacher", "byte_symbols", "fit_latent_scale", "load_captioned_recipe", "recipe_kind", "train_autoencoder", "train_latent_teacher", "word_tokenizer",
]
