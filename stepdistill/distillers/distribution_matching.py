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
  real = the recipe's data (``data.images`` through the data layer, or a latent cache), noised
  at t like the fakes and run through the fake score's encoder alone (DMD2's classify_mode);
  non-saturating losses  L_D = softplus(-D(real_t)) + softplus(D(fake_t)), L_G_gan = softplus(-D(fake_t)).
  No real data: the data-free variant (no GAN);
- backward simulation for K-step students: the generator's input at step k is its own
  (no-grad) output after steps 0..k-1, at exactly the exported scheduler's timesteps.

Generator loss   L_G = L_DM + gan_generator_weight * L_G_gan + regression_weight * L_reg
Critic loss      L_C = L_denoise(fake score on G's samples) + gan_critic_weight * L_D

The recipe's ``method:`` is ``dmd`` (regression, no GAN) or ``dmd2`` (GAN allowed, no regression).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from ..config import bounded
from ..errors import RecipeError
from ..training.trainer import Role, StepContext
from .base import Distiller, RunData
from . import ode_pairs
from .fake_score import (FakeScoreSection, build_fake_score, discriminator_role, denoising_loss, discriminator_for, discriminator_loss,
                         generator_gan_loss)
from .ode_pairs import load_ode_pairs
from .recipe import DistillRecipe, lora_targets


# =============================================================================================
# Recipe: the shared sections (recipe.py) plus these two
# =============================================================================================
@dataclass
class DMDSection:
    critic_updates_per_generator_update: int = bounded(5, ge=1)  # TTUR (DMD2); DMD uses 1
    min_timestep: float = bounded(0.02, ge=0, le=1)  # fractions of the training timesteps for the score timesteps
    max_timestep: float = bounded(0.98, ge=0, le=1)
    gan: Optional[bool] = None  # null: on when data.images / data.latents are given (and weights > 0); true: required
    gan_generator_weight: float = bounded(0.0, ge=0)
    gan_critic_weight: float = bounded(0.0, ge=0)
    regression_weight: float = bounded(0.0, ge=0)  # DMD's lambda_reg (the paper: 0.25)
    regression_pairs: Optional[str] = None  # safetensors from `stepdistill distill RECIPE --make-pairs N`
    pair_steps: int = bounded(50, ge=1)  # teacher steps of the cached ODE pairs

    def validate(self) -> None:
        if not self.min_timestep < self.max_timestep:
            raise RecipeError(f"need min_timestep < max_timestep; got {self.min_timestep}, {self.max_timestep}")


@dataclass
class DMDRecipe(DistillRecipe):
    fake_score: FakeScoreSection = field(default_factory=FakeScoreSection)
    dmd: DMDSection = field(default_factory=DMDSection)


def gan_enabled(recipe: DMDRecipe, has_real_data: bool) -> bool:
    """Whether the run trains the GAN head: weights > 0 and real data, or ``dmd.gan: true``
    (which is an error without real data); ``dmd.gan: false`` turns it off."""
    d = recipe.dmd
    weighted = d.gan_generator_weight > 0 or d.gan_critic_weight > 0
    if d.gan is False or not weighted:
        if d.gan and not weighted:
            raise RecipeError("dmd.gan is true but gan_generator_weight and gan_critic_weight are 0")
        return False
    if not has_real_data:
        if d.gan:
            raise RecipeError("dmd.gan is true but the recipe names no real data: set data.images (or data.latents), or dmd.gan: false")
        return False
    return True


# =============================================================================================
# The method
# =============================================================================================
class DistributionMatchingMethod(Distiller):
    """DMD / DMD2 on the shared trainer. Roles: "student" (EMA), "fake_score", "discriminator"
    (the GAN head, its own learning rate; DMD2 only), "teacher" (frozen; absent when the fake
    score is a LoRA on the teacher's own weights)."""

    recipe_class = DMDRecipe
    one_step_generator = True

    def __init__(self, teacher, recipe: DMDRecipe, data: RunData | None, regression_pairs: Mapping[str, torch.Tensor] | None = None):
        super().__init__(teacher, recipe, data)
        self.dmd = d = recipe.dmd
        self.guidance_scale = recipe.teacher.guidance_scale
        self.pairs = regression_pairs
        self.gan = gan_enabled(recipe, self.real is not None) if data is not None else self._gan_for_export(recipe)
        self.ratio = d.critic_updates_per_generator_update
        if data is not None:
            self._check(recipe)

        self.student = self.init_generator()  # G: initialised from the teacher (full copy, or a LoRA on a copy)
        # Fake score: a second full copy, or a LoRA on the teacher's own frozen weights.
        self.fake_score = build_fake_score(
            teacher, recipe.fake_score.lora_rank, lora_targets(self.family, recipe.fake_score.lora_target_modules), gan=self.gan
        )
        self.shared_fake = self.fake_score.shares_teacher_weights
        if self.gan:
            self.discriminator = discriminator_for(self.fake_score)

    @staticmethod
    def _gan_for_export(recipe: DMDRecipe) -> bool:
        """Rebuilding a finished run without its data: the GAN head as the run had it."""
        return bool(recipe.dmd.gan is not False and (recipe.dmd.gan_generator_weight > 0 or recipe.dmd.gan_critic_weight > 0)
                    and (recipe.data.images or recipe.data.latents))

    def _check(self, recipe: DMDRecipe) -> None:
        d = recipe.dmd
        if d.regression_weight > 0:
            if self.pairs is None:
                raise RecipeError("dmd.regression_weight > 0 needs dmd.regression_pairs (make them with `stepdistill distill RECIPE --make-pairs N`)")
            if recipe.student.num_steps != 1:
                raise RecipeError("dmd: the regression loss is defined for one-step students (student.num_steps: 1)")

    # -- roles --------------------------------------------------------------------------------
    def method_roles(self) -> dict[str, Role]:
        opts = self.optimizer_configs(("student", "fake_score", "discriminator"), f"method '{self.recipe.method}'")
        roles = {
            "student": Role(self.student, optimizer=opts["student"], ema=self.recipe.ema),
            "fake_score": Role(self.fake_score, optimizer=opts["fake_score"]),
        }
        if self.gan:
            roles["discriminator"] = Role(self.discriminator, optimizer=opts["discriminator"])
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
        return self.fake_score.real_score(x_t, t, cond, self.guidance_scale)

    # -- one step -----------------------------------------------------------------------------
    def training_step(self, ctx: StepContext) -> dict[str, Any]:
        d, logs = self.dmd, {}
        B = ctx.local_batch_size
        cond = self.pool.index(ctx.randint(0, len(self.pool)))
        noise = ctx.randn(*self.shape)
        K = self.sampler.num_steps
        k = ctx.randint(0, K) if (K > 1 and self.recipe.student.backward_simulation) else torch.zeros(B, dtype=torch.long, device=ctx.device)
        update_generator = ctx.step % self.ratio == 0
        x = self.generate(ctx, noise, cond, k, grad=update_generator)
        fake = ctx.model("fake_score")

        # ---- generator update (every `ratio`-th step) ----
        if update_generator:
            gan_g = self.gan and d.gan_generator_weight > 0
            t = self.score_timesteps(ctx)
            x_t = self.schedule.add_noise(x, ctx.randn(*self.shape), t)
            x0_real = self.real_score(x_t.detach(), t, cond)
            with torch.set_grad_enabled(gan_g):  # the GAN term backpropagates through the fake score
                fake_out = fake(x_t if gan_g else x_t.detach(), t, cond)
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
                gan_loss = generator_gan_loss(ctx.model("discriminator")(self.bottleneck_features()))
                generator_loss = generator_loss + d.gan_generator_weight * gan_loss
                logs["generator/gan_loss"] = gan_loss
            if d.regression_weight > 0:
                reg_loss = self.regression_loss(ctx)
                generator_loss = generator_loss + d.regression_weight * reg_loss
                logs["generator/regression_loss"] = reg_loss
            ctx.step_role("student", generator_loss)
            logs["generator/loss"] = generator_loss

        # ---- critic update (every step): fake score denoising + GAN discriminator ----
        t = self.score_timesteps(ctx)
        eps = ctx.randn(*self.shape)
        if self.gan:
            flips = ctx.rand() < 0.5 if self.real.random_flip else None
            real, real_cond = self.real.batch(ctx.sample_indices(len(self.real)), ctx.device, flips=flips)
            real_t = self.schedule.add_noise(real, ctx.randn(*self.shape), t)
        denoise_loss = denoising_loss(fake, self.schedule, self.prediction_type, x, eps, t, cond).mean()
        critic_loss = denoise_loss
        logs["critic/denoise_loss"] = denoise_loss
        if self.gan:
            # [student's rows; real rows]: the real ones through the encoder alone (DMD2's classify_mode).
            # The fake score's features are shaped by the GAN loss through the (not stepped) head,
            # weighted by gan_critic_weight; the head itself then learns at its own rate on them.
            features = torch.cat([self.bottleneck_features(), self.fake_score.encode(real_t, t, real_cond)])
            critic_loss = critic_loss + d.gan_critic_weight * discriminator_loss(*ctx.model("discriminator")(features).split(B))
        ctx.step_role("fake_score", critic_loss)
        if self.gan:
            logits = ctx.model("discriminator")(features.detach())
            head_loss = discriminator_loss(logits[:B], logits[B:])
            ctx.step_role("discriminator", head_loss)
            logs["critic/gan_loss"] = head_loss
            logs["critic/real_accuracy"] = (logits[B:] > 0).float().mean()
            logs["critic/fake_accuracy"] = (logits[:B] < 0).float().mean()
        logs["critic/loss"] = critic_loss
        return logs

    def bottleneck_features(self) -> torch.Tensor:
        return self.fake_score.last_features

    def regression_loss(self, ctx: StepContext) -> torch.Tensor:
        """DMD's regression loss: G(z) vs the teacher's ODE sample from the same noise z."""
        idx = ctx.sample_indices(len(self.pairs["noise"]))
        z = self.pairs["noise"][idx].to(ctx.device)
        y = self.pairs["sample"][idx].to(ctx.device)
        cond = self.pool.index(self.pairs["condition_index"][idx].to(ctx.device))
        zero = torch.zeros(z.shape[0], dtype=torch.long, device=ctx.device)
        return F.mse_loss(self.generate(ctx, z, cond, zero, grad=True).float(), y.float())


# =============================================================================================
# DMD's regression data
# =============================================================================================
def load_regression_pairs(recipe: DMDRecipe) -> Mapping[str, torch.Tensor] | None:
    if recipe.dmd.regression_weight <= 0 or not recipe.dmd.regression_pairs:
        return None
    return load_ode_pairs(recipe.dmd.regression_pairs, "dmd.regression_pairs")


def make_ode_pairs(recipe: DMDRecipe, teacher, pool, num_pairs: int, output: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """DMD's regression data (:func:`.ode_pairs.make_ode_pairs`): noise z and the teacher's
    ``dmd.pair_steps``-step deterministic sample from z with the teacher's CFG, written to
    ``dmd.regression_pairs``."""
    output = output or recipe.dmd.regression_pairs
    if not output:
        raise RecipeError("dmd.regression_pairs names no file to write the pairs to")
    shape = teacher.sample_shape(recipe.teacher.height, recipe.teacher.width)
    return ode_pairs.make_ode_pairs(teacher, pool, num_pairs, output, steps=recipe.dmd.pair_steps,
                                    guidance_scale=recipe.teacher.guidance_scale, shape=shape, seed=seed)


# =============================================================================================
# The registered methods
# =============================================================================================
class _Registered(DistributionMatchingMethod):
    caches_pairs = True  # DMD's regression pairs (dmd.regression_pairs)
    @classmethod
    def build(cls, teacher, recipe: DMDRecipe, data: RunData | None) -> DistributionMatchingMethod:
        """The method with its regression pairs (DMD) loaded."""
        return cls(teacher, recipe, data, regression_pairs=load_regression_pairs(recipe) if data is not None else None)

    @classmethod
    def method_role_specs(cls, plan) -> list:
        """G (with its EMA), the fake score (a full copy, or a LoRA on the teacher's weights) and,
        with the GAN, its head. With the GAN the fake score also runs the real samples, planned as
        twice the batch (an upper bound: the real rows run the encoder alone,
        :meth:`~.fake_score.FakeScore.encode`), and the generator's GAN loss backpropagates
        through it."""
        recipe = plan.recipe
        gan = gan_enabled(recipe, bool(recipe.data.images or recipe.data.latents))
        fake = plan.trained("fake_score", recipe.fake_score, shares="teacher", batch_factor=2 if gan else 1,
                            backprop_from=("student",) if gan and recipe.dmd.gan_generator_weight > 0 else ())
        roles = [plan.teacher(), plan.student(), fake]
        if gan:
            roles.append(discriminator_role(plan.configs, backprop_from=("fake_score",) if recipe.dmd.gan_critic_weight > 0 else ()))
        return roles

    @classmethod
    def make_pairs(cls, recipe: DMDRecipe, teacher, pool, num_pairs: int) -> Path:
        return make_ode_pairs(recipe, teacher, pool, num_pairs)


class DMD(_Registered):
    """DMD (Yin et al. 2024a): distribution matching plus a regression loss on teacher ODE pairs; no GAN."""

    description = "DMD: distribution matching with a regression loss on teacher ODE pairs"

    def _check(self, recipe: DMDRecipe) -> None:
        if self.gan:
            raise RecipeError("method 'dmd' has no GAN: set dmd.gan_generator_weight and gan_critic_weight to 0 (or use method: dmd2)")
        super()._check(recipe)


class DMD2(_Registered):
    """DMD2 (Yin et al. 2024b): no regression loss; TTUR, a GAN head on the fake score, backward simulation."""

    description = "DMD2: distribution matching, TTUR, GAN head on the fake score, backward simulation"

    def _check(self, recipe: DMDRecipe) -> None:
        if recipe.dmd.regression_weight > 0:
            raise RecipeError("method 'dmd2' drops the regression loss: set dmd.regression_weight to 0 (or use method: dmd)")
        super()._check(recipe)


__all__ = [
    "DMD",
    "DMD2",
    "DMDRecipe",
    "DMDSection",
    "DistributionMatchingMethod",
    "FakeScoreSection",
    "gan_enabled",
    "make_ode_pairs",
]
