"""Distribution matching distillation: DMD and DMD2.

DMD  -- Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation".
DMD2 -- Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis".

A few-step generator G (initialised from the teacher) is trained so that the distribution of
its samples matches the teacher's. Two score networks judge a generated sample x = G(z):

- the *real score*: the frozen teacher, with classifier-free guidance w (our convention,
  ``uncond + w (cond - uncond)``), x0_real(x_t, t);
- the *fake score*: a copy of the teacher (or a LoRA on its frozen weights) trained online with
  the denoising loss on G's samples, x0_fake(x_t, t) -- it tracks the score of G's distribution.

Distribution-matching gradient (DMD eq. 7-8, written in x0 terms)::

    t ~ U[t_min, t_max],  x_t = alpha_t x + sigma_t eps
    grad_x KL ~ (x0_fake(x_t) - x0_real(x_t)) / mean|x - x0_real(x_t)|     (per-sample normalisation)
    L_DM = 0.5 || x - sg(x - grad) ||^2                                     (so dL_DM/dx = grad)

DMD adds a regression loss on teacher ODE pairs (noise z -> teacher sample y): L_reg = ||G(z) - y||^2
(the paper uses LPIPS; we use MSE, there is no LPIPS network offline). DMD2 drops it and adds:

- the two time-scale update rule (TTUR): the fake score takes ``critic_updates_per_generator_update``
  steps per generator step (default 5);
- a GAN: a small head D on the fake score's bottleneck features (read with a forward hook),
  real = dataset images (digits) or cached VAE latents, noised at t like the fakes; non-saturating
  losses  L_D = softplus(-D(real_t)) + softplus(D(fake_t)),  L_G_gan = softplus(-D(fake_t));
- backward simulation for K-step students: the generator's input at step k is its own
  (no-grad) output after steps 0..k-1, at exactly the exported scheduler's timesteps.

Generator loss   L_G = L_DM + gan_generator_weight * L_G_gan + regression_weight * L_reg
Critic loss      L_C = L_denoise(fake score on G's samples) + gan_critic_weight * L_D
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EMAConfig, OptimizerConfig, TrainingConfig, load_recipe, to_dict
from ..errors import RecipeError, StepdistillError
from ..training.trainer import Role, StepContext, Trainer, TrainingMethod
from .common import add_lora, check_finite, has_lora, lora_disabled, merge_lora
from .student import StudentSampler, denoiser_name, save_student_pipeline, with_network


# =============================================================================================
# Recipe
# =============================================================================================
@dataclass
class TeacherSection:
    path: str = "digits"  # "digits": the shipped digits teacher; else a diffusers pipeline directory
    guidance_scale: float = 2.0  # CFG of the real score, uncond + w (cond - uncond); 1 = none
    height: Optional[int] = None  # pixels; None: the model's native size
    width: Optional[int] = None


@dataclass
class StudentSection:
    num_steps: int = 1
    timesteps: Optional[list[float]] = None  # optional: checked against the exported scheduler
    backward_simulation: bool = True  # K > 1: inputs from the student's own earlier steps
    lora_rank: int = 0  # 0: full fine-tune
    lora_target_modules: list[str] = field(default_factory=list)  # empty: the family's default


@dataclass
class FakeScoreSection:
    lora_rank: int = 0  # > 0: a LoRA on the frozen teacher instead of a second full copy
    lora_target_modules: list[str] = field(default_factory=list)


@dataclass
class DMDSection:
    variant: Literal["dmd2", "dmd"] = "dmd2"  # dmd: regression loss, no GAN; dmd2: GAN allowed, no regression
    critic_updates_per_generator_update: int = 5  # TTUR (DMD2); DMD uses 1
    min_timestep: float = 0.02  # fractions of the training timesteps for the score timesteps
    max_timestep: float = 0.98
    gan_generator_weight: float = 0.0  # 0: no GAN
    gan_critic_weight: float = 0.0
    regression_weight: float = 0.0  # DMD's lambda_reg (the paper: 0.25)
    regression_pairs: Optional[str] = None  # safetensors from `stepdistill distill RECIPE --make-pairs N`
    pair_steps: int = 50  # teacher steps of the cached ODE pairs


@dataclass
class DataSection:
    prompts: list[str] = field(default_factory=list)  # latent teachers: training prompts
    prompts_file: Optional[str] = None  # one prompt per line
    real_latents: Optional[str] = None  # latent teachers + GAN: safetensors {latents, prompt_index}


@dataclass
class DistillRecipe:
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    fake_score: FakeScoreSection = field(default_factory=FakeScoreSection)
    dmd: DMDSection = field(default_factory=DMDSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizers: dict[str, OptimizerConfig] = field(default_factory=dict)  # "student", "fake_score"
    ema: Optional[EMAConfig] = field(default_factory=EMAConfig)  # of the student; null: none


DEFAULT_LORA_TARGETS = {
    "pixel": ["conv1", "conv2"],
    "sd": ["to_q", "to_k", "to_v", "to_out.0"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
    "flux": ["to_q", "to_k", "to_v", "to_out.0"],
}


# =============================================================================================
# The fake score with its GAN head
# =============================================================================================
def bottleneck(network: nn.Module) -> tuple[nn.Module, int, bool]:
    """(module whose output is the bottleneck, its channels, spatial?) for UNets and Flux."""
    if getattr(network, "mid_block", None) is not None:
        return network.mid_block, int(network.config.block_out_channels[-1]), True
    blocks = list(getattr(network, "transformer_blocks", [])) + list(getattr(network, "single_transformer_blocks", []))
    if blocks:
        c = network.config
        return blocks[len(blocks) // 2], int(c.num_attention_heads * c.attention_head_dim), False
    raise StepdistillError(f"cannot find a bottleneck (mid_block / transformer_blocks) in {type(network).__name__} for the GAN head")


class DiscriminatorHead(nn.Module):
    """Bottleneck features -> one logit per sample (spatial maps or token sequences)."""

    def __init__(self, channels: int, spatial: bool, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        self.spatial = spatial
        if spatial:
            self.net = nn.Sequential(
                nn.GroupNorm(math.gcd(32, channels), channels), nn.SiLU(),
                nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1),
            )
        else:
            self.norm = nn.LayerNorm(channels)
            self.proj = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU())
            self.out = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.spatial:
            # contiguous: mid-block attention hands back channels-last strides, whose GroupNorm
            # backward crashes on CPU in torch 2.13
            return self.net(features.float().contiguous()).squeeze(1)
        return self.out(self.proj(self.norm(features.float())).mean(dim=1)).squeeze(1)


class FakeScore(nn.Module):
    """The fake-score network, with a forward hook on its bottleneck when a GAN head reads it:
    ``last_features`` is what the latest forward pass produced there (the forward is untouched)."""

    def __init__(self, network: nn.Module, gan: bool):
        super().__init__()
        self.network = network
        self.last_features: torch.Tensor | None = None
        if gan:
            module, _, _ = bottleneck(network)
            self._hook = module.register_forward_hook(self._catch)

    def _catch(self, module, args, output):
        self.last_features = output[-1] if isinstance(output, (tuple, list)) else output


# =============================================================================================
# The method
# =============================================================================================
def discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN critic loss: softplus(D(fake)) + softplus(-D(real))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


class ConditionPool:
    """Every condition the run trains on, encoded once; batches are index tensors into it."""

    def __init__(self, teacher, conditions):
        self.conditions = conditions
        self.encoded = teacher.encode(conditions)

    def __len__(self) -> int:
        return len(self.conditions)

    def index(self, idx: torch.Tensor):
        return self.encoded.index(idx.cpu()).to(idx.device)


class DistributionMatchingMethod(TrainingMethod):
    """DMD / DMD2 on the shared trainer. Roles: "student" (EMA), "fake_score", "discriminator"
    (the GAN head, its own learning rate; DMD2 only), "teacher" (frozen; absent when the fake
    score is a LoRA on the teacher's own weights)."""

    def __init__(
        self,
        teacher,
        conditions,
        recipe: DistillRecipe,
        real_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        regression_pairs: Mapping[str, torch.Tensor] | None = None,
    ):
        self.teacher = teacher
        self.recipe = recipe
        self.dmd = d = recipe.dmd
        self.family = teacher.family
        self.schedule = teacher.schedule
        self.prediction_type = teacher.prediction_type
        self.guidance_scale = recipe.teacher.guidance_scale
        self.shape = tuple(teacher.sample_shape(recipe.teacher.height, recipe.teacher.width))
        self.pool = ConditionPool(teacher, conditions)
        self.real_data = real_data  # (samples in the network's space, pool indices)
        self.pairs = regression_pairs
        self.gan = d.gan_generator_weight > 0 or d.gan_critic_weight > 0
        self.ratio = d.critic_updates_per_generator_update
        self._check(recipe)

        self.sampler = StudentSampler.for_teacher(teacher, recipe.student.num_steps, self.shape)
        self.sampler.check_timesteps(recipe.student.timesteps)

        base = getattr(teacher, denoiser_name(teacher))
        targets = lambda section: section.lora_target_modules or DEFAULT_LORA_TARGETS.get(self.family, [])  # noqa: E731
        # G: initialised from the teacher (full copy, or a LoRA on a copy).
        student = copy.deepcopy(base).requires_grad_(True)
        if recipe.student.lora_rank > 0:
            add_lora(student, recipe.student.lora_rank, targets(recipe.student), what="student")
        self.student = student
        # Fake score: a second full copy, or a LoRA on the teacher's own frozen weights.
        self.shared_fake = recipe.fake_score.lora_rank > 0
        if self.shared_fake:
            network = add_lora(base, recipe.fake_score.lora_rank, targets(recipe.fake_score), adapter_name="fake_score", what="fake_score")
        else:
            network = copy.deepcopy(base).requires_grad_(True)
        self.fake_score = FakeScore(network, gan=self.gan)
        if self.gan:
            _, channels, spatial = bottleneck(network)
            self.discriminator = DiscriminatorHead(channels, spatial)

    def _check(self, recipe: DistillRecipe) -> None:
        d = recipe.dmd
        if not 0.0 <= d.min_timestep < d.max_timestep <= 1.0:
            raise RecipeError(f"dmd: need 0 <= min_timestep < max_timestep <= 1; got {d.min_timestep}, {d.max_timestep}")
        if d.variant == "dmd" and self.gan:
            raise RecipeError("dmd.variant 'dmd' has no GAN: set gan_generator_weight and gan_critic_weight to 0 (or use variant 'dmd2')")
        if d.variant == "dmd2" and d.regression_weight > 0:
            raise RecipeError("dmd.variant 'dmd2' drops the regression loss: set regression_weight to 0 (or use variant 'dmd')")
        if d.critic_updates_per_generator_update < 1:
            raise RecipeError("dmd.critic_updates_per_generator_update must be >= 1")
        if self.gan and self.real_data is None:
            raise RecipeError("dmd: the GAN needs real data (digits teachers use the dataset; latent teachers: data.real_latents)")
        if d.regression_weight > 0:
            if self.pairs is None:
                raise RecipeError("dmd.regression_weight > 0 needs dmd.regression_pairs (make them with `stepdistill distill RECIPE --make-pairs N`)")
            if recipe.student.num_steps != 1:
                raise RecipeError("dmd: the regression loss is defined for one-step students (student.num_steps: 1)")

    # -- roles --------------------------------------------------------------------------------
    def roles(self) -> dict[str, Role]:
        opts = self.recipe.optimizers
        unknown = set(opts) - {"student", "fake_score", "discriminator"}
        if unknown:
            raise RecipeError(f"optimizers: unknown role(s) {sorted(unknown)}; roles: student, fake_score, discriminator")
        roles = {
            "student": Role(self.student, optimizer=opts.get("student", OptimizerConfig()), ema=self.recipe.ema),
            "fake_score": Role(self.fake_score, optimizer=opts.get("fake_score", OptimizerConfig())),
        }
        if self.gan:
            roles["discriminator"] = Role(self.discriminator, optimizer=opts.get("discriminator", OptimizerConfig()))
        if not self.shared_fake:
            roles["teacher"] = Role(self.teacher)
        return roles

    # -- pieces -------------------------------------------------------------------------------
    def score_timesteps(self, ctx: StepContext) -> torch.Tensor:
        """t ~ U[min, max] x T (DMD2: 2%-98%); integers for VP schedules, sigma x T for flow."""
        T = self.schedule.num_train_timesteps
        lo, hi = self.dmd.min_timestep * T, self.dmd.max_timestep * T
        if self.schedule.kind == "vp":
            return ctx.randint(int(math.floor(lo)), max(int(math.ceil(hi)), int(math.floor(lo)) + 1))
        return lo + (hi - lo) * ctx.rand()

    def real_score(self, x_t, t, cond) -> torch.Tensor:
        """x0 of the frozen teacher with CFG (the base weights when the fake score is a LoRA on them)."""
        with torch.no_grad():
            if self.shared_fake:
                with lora_disabled(self.fake_score.network):
                    return self.teacher.predict(x_t, t, cond, guidance_scale=self.guidance_scale)
            return self.teacher.predict(x_t, t, cond, guidance_scale=self.guidance_scale)

    def fake_output(self, ctx: StepContext, x_t, t, cond) -> torch.Tensor:
        """The fake score's native prediction (guidance off) through the prepared module."""
        fake = ctx.model("fake_score")
        network = fake.module.network if hasattr(fake, "module") else fake.network
        return with_network(self.teacher, network).guided_output(x_t, t, cond, 1.0)

    def generate(self, ctx: StepContext, noise, cond, k: torch.Tensor, grad: bool) -> torch.Tensor:
        """G's x0 at step k of its sampler: input from backward simulation (no grad), one step with grad."""
        adapter = with_network(self.teacher, ctx.model("student"))
        timesteps = self.sampler.timesteps.to(ctx.device)
        if int(k.max()) == 0:
            x_in = noise * getattr(self.sampler.scheduler, "init_noise_sigma", 1.0)
        else:
            inputs = torch.stack(self.sampler.rollout(adapter, noise, cond, int(k.max())))  # [k_max + 1, B, ...]
            x_in = inputs[k, torch.arange(noise.shape[0], device=noise.device)]
        t_in = timesteps[k]
        with torch.set_grad_enabled(grad):
            return adapter.predict(x_in, t_in, cond, guidance_scale=1.0, output="x0")

    # -- one step -----------------------------------------------------------------------------
    def training_step(self, ctx: StepContext) -> dict[str, Any]:
        d, logs = self.dmd, {}
        if self.shared_fake:
            self.teacher.to(ctx.device)
        B = ctx.local_batch_size
        cond_idx = ctx.randint(0, len(self.pool))
        cond = self.pool.index(cond_idx)
        noise = ctx.randn(*self.shape)
        K = self.sampler.num_steps
        k = ctx.randint(0, K) if (K > 1 and self.recipe.student.backward_simulation) else torch.zeros(B, dtype=torch.long, device=ctx.device)
        update_generator = ctx.step % self.ratio == 0
        x = self.generate(ctx, noise, cond, k, grad=update_generator)

        # ---- generator update (every `ratio`-th step) ----
        if update_generator:
            gan_g = self.gan and d.gan_generator_weight > 0
            t = self.score_timesteps(ctx)
            x_t = self.schedule.add_noise(x, ctx.randn(*self.shape), t)
            x0_real = self.real_score(x_t.detach(), t, cond)
            with torch.set_grad_enabled(gan_g):  # the GAN term backpropagates through the fake score
                fake_out = self.fake_output(ctx, x_t if gan_g else x_t.detach(), t, cond)
            x0_fake = self.schedule.convert(fake_out.detach().float(), x_t.detach().float(), t, self.prediction_type, "sample")
            # DMD eq. 8: per-sample normalisation by mean |x - x0_real|.
            dims = tuple(range(1, x.ndim))
            weight = 1.0 / (x.detach() - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
            grad = (x0_fake - x0_real) * weight
            dm_loss = 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad))
            generator_loss = dm_loss
            logs["generator/dm_loss"] = dm_loss
            logs["generator/dm_grad_norm"] = grad.flatten(1).norm(dim=1).mean()
            if gan_g:
                gan_loss = F.softplus(-ctx.model("discriminator")(self.bottleneck_features(ctx))).mean()
                generator_loss = generator_loss + d.gan_generator_weight * gan_loss
                logs["generator/gan_loss"] = gan_loss
            if d.regression_weight > 0:
                reg_loss = self.regression_loss(ctx)
                generator_loss = generator_loss + d.regression_weight * reg_loss
                logs["generator/regression_loss"] = reg_loss
            check_finite({"generator": generator_loss}, ctx.step)
            ctx.step_role("student", generator_loss)
            logs["generator/loss"] = generator_loss

        # ---- critic update (every step): fake score denoising + GAN discriminator ----
        x_fake = x.detach()
        t = self.score_timesteps(ctx)
        eps = ctx.randn(*self.shape)
        x_t = self.schedule.add_noise(x_fake, eps, t)
        inputs, times, conds = x_t, t, cond
        if self.gan:
            ridx = ctx.sample_indices(len(self.real_data[0]))
            real = self.real_data[0][ridx].to(ctx.device)
            real_t = self.schedule.add_noise(real, ctx.randn(*self.shape), t)
            inputs, times = torch.cat([x_t, real_t]), torch.cat([t, t])
            conds = self.pool.index(torch.cat([cond_idx, self.real_data[1][ridx].to(ctx.device)]))
        out = self.fake_output(ctx, inputs, times, conds)
        target = self.schedule.from_x0_eps(x_fake, eps, t, self.prediction_type)
        denoise_loss = F.mse_loss(out[:B].float(), target.float())
        critic_loss = denoise_loss
        logs["critic/denoise_loss"] = denoise_loss
        if self.gan:
            # The fake score's features are shaped by the GAN loss through the (not stepped) head,
            # weighted by gan_critic_weight; the head itself then learns at its own rate on them.
            features = self.bottleneck_features(ctx)
            critic_loss = critic_loss + d.gan_critic_weight * discriminator_loss(*ctx.model("discriminator")(features).split(B))
        check_finite({"critic": critic_loss}, ctx.step)
        ctx.step_role("fake_score", critic_loss)
        if self.gan:
            logits = ctx.model("discriminator")(features.detach())
            head_loss = discriminator_loss(logits[:B], logits[B:])
            check_finite({"discriminator": head_loss}, ctx.step)
            ctx.step_role("discriminator", head_loss)
            logs["critic/gan_loss"] = head_loss
            logs["critic/real_accuracy"] = (logits[B:] > 0).float().mean()
            logs["critic/fake_accuracy"] = (logits[:B] < 0).float().mean()
        logs["critic/loss"] = critic_loss
        return logs

    def bottleneck_features(self, ctx: StepContext) -> torch.Tensor:
        fake = ctx.model("fake_score")
        return (fake.module if hasattr(fake, "module") else fake).last_features

    def regression_loss(self, ctx: StepContext) -> torch.Tensor:
        """DMD's regression loss: G(z) vs the teacher's ODE sample from the same noise z."""
        idx = ctx.sample_indices(len(self.pairs["noise"]))
        z = self.pairs["noise"][idx].to(ctx.device)
        y = self.pairs["sample"][idx].to(ctx.device)
        cond = self.pool.index(self.pairs["condition_index"][idx].to(ctx.device))
        zero = torch.zeros(z.shape[0], dtype=torch.long, device=ctx.device)
        return F.mse_loss(self.generate(ctx, z, cond, zero, grad=True).float(), y.float())

    # -- evaluation and export ----------------------------------------------------------------
    def sampling_network(self, trainer: Trainer) -> nn.Module:
        return trainer.emas["student"].module if "student" in trainer.emas else trainer.unwrap("student")

    def sample(self, network: nn.Module, num_samples: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """K-step samples of ``network`` (conditions cycle through the pool): ([-1, 1] images, pool indices)."""
        idx = torch.arange(num_samples) % len(self.pool)
        noise = torch.randn(num_samples, *self.shape, generator=generator).to(device)
        adapter = with_network(self.teacher, network)
        out = []
        for start in range(0, num_samples, 256):
            sl = slice(start, start + 256)
            x = self.sampler.sample(adapter, noise[sl], self.pool.index(idx[sl].to(device)))
            out.append(self.teacher.vae_decode(x).float().clamp(-1, 1).cpu() if self.teacher.is_latent else x.clamp(-1, 1).cpu())
        return torch.cat(out), idx

    def generate_samples(self, trainer: Trainer, num_samples: int, generator: torch.Generator):
        images, idx = self.sample(self.sampling_network(trainer), num_samples, generator, trainer.accelerator.device)
        return images, (idx if self.family == "pixel" else None)

    def export_network(self, trainer: Trainer) -> nn.Module:
        """The (EMA) student as the stock network class (LoRA merged)."""
        network = self.sampling_network(trainer)
        return merge_lora(network) if has_lora(network) else copy.deepcopy(network)


# =============================================================================================
# From a recipe to a run
# =============================================================================================
def load_teacher_for(recipe: DistillRecipe):
    from ..teachers import load_teacher

    path = recipe.teacher.path
    if path == "digits":
        from ..digits.bench import default_teacher_dir

        path = default_teacher_dir()
        if not (Path(path) / "model_index.json").is_file():
            raise StepdistillError(f"the shipped digits teacher is missing ({path}); train it with `stepdistill train-teacher configs/digits_teacher.yaml`")
    return load_teacher(path)


def conditions_for(teacher, recipe: DistillRecipe) -> list:
    """Class labels 0..n-1 for class-conditional pixel teachers; the recipe's prompts otherwise."""
    if teacher.family == "pixel":
        return list(range(teacher.num_classes)) if teacher.num_classes else [None]
    prompts = list(recipe.data.prompts)
    if recipe.data.prompts_file:
        if not os.path.isfile(recipe.data.prompts_file):
            raise RecipeError(f"data.prompts_file not found: {recipe.data.prompts_file}")
        prompts += [line.strip() for line in Path(recipe.data.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise RecipeError("data: a text-to-image teacher needs prompts (data.prompts or data.prompts_file)")
    return prompts


def real_data_for(teacher, recipe: DistillRecipe):
    """Real samples for the GAN in the network's space, with their pool indices."""
    if teacher.family == "pixel":
        from ..digits.data import load_split

        data = load_split("train")
        return data.images, data.labels.long()
    if recipe.data.real_latents is None:
        return None
    from safetensors.torch import load_file

    if not os.path.isfile(recipe.data.real_latents):
        raise RecipeError(f"data.real_latents not found: {recipe.data.real_latents}")
    cached = load_file(recipe.data.real_latents)
    return cached["latents"].float(), cached["prompt_index"].long()


def cache_real_latents(teacher, images: torch.Tensor, prompt_index: torch.Tensor, path: str | os.PathLike) -> Path:
    """Encode real images ([-1, 1]) with the teacher's VAE once; the GAN reads them from ``path``."""
    from safetensors.torch import save_file

    latents = torch.cat([teacher.vae_encode(images[i : i + 16]).float().cpu() for i in range(0, len(images), 16)])
    save_file({"latents": latents.contiguous(), "prompt_index": prompt_index.long().contiguous()}, os.fspath(path))
    return Path(path)


@torch.no_grad()
def make_ode_pairs(recipe_path: str | os.PathLike, num_pairs: int, output: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """DMD's regression data: noise z and the teacher's ``pair_steps``-step deterministic sample from
    z (with the real score's CFG), cached as safetensors {noise, sample, condition_index}."""
    from safetensors.torch import save_file

    from ..sampling import ddim_sample, euler_flow_sample

    recipe = load_recipe(recipe_path, DistillRecipe)
    output = output or recipe.dmd.regression_pairs
    if not output:
        raise RecipeError("dmd.regression_pairs names no file to write the pairs to")
    teacher = load_teacher_for(recipe)
    pool = ConditionPool(teacher, conditions_for(teacher, recipe))
    shape = teacher.sample_shape(recipe.teacher.height, recipe.teacher.width)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_pairs, *shape, generator=g)
    idx = torch.arange(num_pairs) % len(pool)
    samples = []
    for start in range(0, num_pairs, 256):
        sl = slice(start, start + 256)
        scheduler = copy.deepcopy(teacher.scheduler)
        if teacher.schedule.kind == "vp":
            y = ddim_sample(teacher, pool.index(idx[sl]), noise[sl], scheduler, recipe.dmd.pair_steps, recipe.teacher.guidance_scale)
        else:
            kwargs = teacher.sampler_kwargs(shape, recipe.dmd.pair_steps) if hasattr(teacher, "sampler_kwargs") else {}
            y = euler_flow_sample(teacher, pool.index(idx[sl]), noise[sl], scheduler, recipe.dmd.pair_steps, recipe.teacher.guidance_scale, **kwargs)
        samples.append(y.float())
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    save_file({"noise": noise.contiguous(), "sample": torch.cat(samples).contiguous(), "condition_index": idx.contiguous()}, os.fspath(output))
    return Path(output)


STUDENT_CARD = {
    "title": "stepdistill DMD2 student",
    "method": "distribution matching distillation (DMD2: TTUR, GAN head on the fake score, backward simulation)",
    "license": "apache-2.0",
    "tags": ["distillation", "dmd2", "few-step"],
}


class _CurveEvaluator:
    """Wraps the digits evaluator: appends (step, minutes, metrics) of every evaluation to curve.jsonl."""

    def __init__(self, evaluator, method: DistributionMatchingMethod, path: Path):
        self.evaluator, self.method, self.path = evaluator, method, path
        self.start = time.perf_counter()

    def __call__(self, images, labels):
        metrics = dict(self.evaluator(images, labels))
        row = {"step": self.method._step_hint, "minutes": (time.perf_counter() - self.start) / 60, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return metrics


class _StepHintTrainer(Trainer):
    """Tells the method which step an evaluation belongs to (for the FD-vs-minutes curve)."""

    def evaluate(self, step: int):
        self.method._step_hint = step
        return super().evaluate(step)


def distill(
    recipe_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    evaluate: bool = True,
    bench: bool = True,
) -> Path:
    """Run a DMD/DMD2 recipe; export the (EMA) student to ``output_dir/pipeline`` and return that path.

    Digits runs also write ``curve.jsonl`` (cheap FD against wall-clock minutes at every
    evaluation) and, with ``bench``, the benchmark table of the exported student in ``output_dir/bench``.
    """
    recipe = load_recipe(recipe_path, DistillRecipe, overrides)
    teacher = load_teacher_for(recipe)
    gan = recipe.dmd.gan_generator_weight > 0 or recipe.dmd.gan_critic_weight > 0
    pairs = None
    if recipe.dmd.regression_weight > 0 and recipe.dmd.regression_pairs:
        from safetensors.torch import load_file

        if not os.path.isfile(recipe.dmd.regression_pairs):
            raise RecipeError(f"dmd.regression_pairs not found: {recipe.dmd.regression_pairs} (make them with --make-pairs N)")
        pairs = load_file(recipe.dmd.regression_pairs)
    method = DistributionMatchingMethod(
        teacher, conditions_for(teacher, recipe), recipe, real_data=real_data_for(teacher, recipe) if gan else None, regression_pairs=pairs
    )
    method._step_hint = 0
    output_dir = Path(output_dir)
    evaluators = []
    if evaluate and teacher.family == "pixel":
        from ..evaluation import make_evaluator

        evaluators = [_CurveEvaluator(make_evaluator(), method, output_dir / "curve.jsonl")]
    from ..export import export_info

    trainer = _StepHintTrainer(
        method,
        recipe.training,
        output_dir,
        resume=resume,
        overwrite=overwrite,
        run_info={
            "recipe": to_dict(recipe),
            "recipe_path": os.fspath(recipe_path),
            "export": export_info(method.sampler.scheduler, role="student", num_inference_steps=recipe.student.num_steps, model_card_info=STUDENT_CARD),
        },
        evaluators=evaluators,
        progress=progress,
    )
    began = time.perf_counter()
    final = trainer.train()
    minutes = (time.perf_counter() - began) / 60
    pipeline_dir = output_dir / "pipeline"
    if trainer.accelerator.is_main_process:
        metrics = None
        if final:
            metrics = {
                "model": f"DMD2 student ({recipe.student.num_steps} step)",
                "steps": recipe.student.num_steps,
                "guidance_scale": 1.0,
                "samples": recipe.training.num_eval_samples,
                **{k.removeprefix("eval/"): v for k, v in final.items()},
            }
        save_student_pipeline(
            teacher, method.export_network(trainer), method.sampler, pipeline_dir, metrics=metrics,
            metrics_command=f"stepdistill distill {os.fspath(recipe_path)} (evaluation at the last step)" if metrics else None,
            model_card_info=STUDENT_CARD, overwrite=True,
        )
        (output_dir / "train_minutes.txt").write_text(f"{minutes:.2f}\n")
        if bench and teacher.family == "pixel":
            from ..digits.bench import format_table, run_bench

            results = run_bench(pipeline_dir, output_dir / "bench", num_samples=2000, steps=(recipe.student.num_steps,), guidance_scales=(1.0,), progress=progress)
            print(format_table(results))
    trainer.accelerator.wait_for_everyone()
    return pipeline_dir


__all__ = [
    "DMDSection",
    "DistillRecipe",
    "DistributionMatchingMethod",
    "FakeScore",
    "cache_real_latents",
    "distill",
    "make_ode_pairs",
]
