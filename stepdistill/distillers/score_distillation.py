"""The score-distillation family: SDS, VSD / SwiftBrush, SiD and SiDA, with LSG and SNOOPI guidance.

SDS    -- Poole et al. 2023, "DreamFusion: Text-to-3D using 2D Diffusion" (score distillation sampling).
VSD    -- Wang et al. 2023, "ProlificDreamer" (variational score distillation); as an image-free
          one-step text-to-image distiller: Nguyen & Tran 2024, "SwiftBrush".
SiD    -- Zhou et al. 2024, "Score identity Distillation: Exponentially Fast Distillation of
          Pretrained Diffusion Models for One-Step Generation".
SiDA   -- Zhou et al. 2025, "Adversarial Score identity Distillation: Rapidly Surpassing the Teacher in One Step".
LSG    -- Zhou et al. 2025, "Long and Short Guidance in Score identity Distillation for One-Step
          Text-to-Image Generation".
SNOOPI -- Nguyen et al. 2024, "SNOOPI: Supercharged One-step Diffusion Distillation with Proper Guidance".

A generator G (initialised from the teacher; a full copy or a LoRA) maps noise z and a condition c
to x = G(z, c): one step of the exported scheduler (K steps: backward simulation, as DMD2). It is
trained from conditions alone -- no data image is read (SiDA's discriminator excepted). A score
timestep t is drawn, x_t = alpha_t x + sigma_t eps, and

    x̂0_real(x_t)   the frozen teacher with CFG w_real, uncond + w (cond - uncond) (w = 1: none);
    x̂0_fake(x_t)   the fake score: a copy of the teacher, or a LoRA on its frozen weights (the teacher
                   is then the same network with the LoRA switched off), trained online on sg(x) with
                   the teacher's own denoising loss, so it follows the score of G's distribution; CFG w_fake;
    ε̂ = (x_t - alpha_t x̂0) / sigma_t   the matching noise prediction.

Generator losses (``L = 0.5 || x - sg(x - g) ||^2`` has the gradient g in x):

    SDS   score distillation sampling gradient       g = w(t) (ε̂_real(x_t) - eps),            w(t) = sigma_t^2
    VSD   variational score distillation gradient    g = w(t) (ε̂_real(x_t) - ε̂_fake(x_t)),  w(t) = sigma_t^2
    SiD   score-identity generator loss, differentiated through x, x_t and both networks (weights frozen):
              L = (x̂0_real - x̂0_fake) . ((x̂0_real - x) - alpha (x̂0_real - x̂0_fake)) / mean|x - x̂0_real|
          alpha = 1.2 the paper's default; the per-sample normalisation mean|x - x̂0_real| (no gradient)
          stands in for the paper's omega(t) / sigma_t^4, as SiD's code does.
    SiDA  SiD's loss + lambda_G softplus(-D(x_t)) / mean|x - x̂0_real|, where the discriminator D is the
          fake score's encoder: its bottleneck features averaged over channels (no parameters of its own).

Fake-score loss: ||f_phi(x_t) - target||^2 on sg(x), in the teacher's parameterization
(:func:`~stepdistill.distillers.fake_score.denoising_loss`, shared with DMD2); SiDA adds
lambda_D (softplus(D(x_t)) + softplus(-D(real_t))) with real samples from the data layer noised
at the same t with the same eps, run through the fake score's encoder alone (SiDA's
return_flag='encoder': :meth:`~.fake_score.FakeScore.encode`).

Timesteps (``score_distillation.timesteps``):
    uniform   t ~ U[min_timestep, max_timestep] x T (DreamFusion, SwiftBrush, SiD-LSG: 2 % .. 98 %)
    sid       SiD's range: u ~ U[0, sid_tmax / 1000], EDM's sigma(u) = (sigma_max^(1/rho) + (1 - u)
              (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with (0.002, 80, 7), mapped to the native
              timestep whose sigma_t / alpha_t is sigma(u); sid_tmax = 800.

Guidance (``guidance.mode``), every scale in our convention:
    plain     w_real = teacher.guidance_scale, w_fake = guidance.fake_scale
    lsg       SiD-LSG's long and short guidance: as plain (kappa_4 = teacher.guidance_scale,
              kappa_2 = kappa_3 = guidance.fake_scale) and the fake score trains on its own CFG
              output at kappa_1 = guidance.fake_train_scale
    snoopi    SNOOPI's PG-SB: one w per sample ~ U[guidance.scale_range], the same for both branches
Whenever the fake branch is guided, the fake score trains with condition dropout
(``fake_condition_dropout``): its unconditional branch must follow G's samples too.

Non-finite values (SiD filters them): samples with non-finite values are dropped from a loss and
counted (logs ``nonfinite/filtered_samples``, :class:`~.common.NonFiniteSamples`); a loss that is
still non-finite makes the trainer skip the rest of the step, count it (``skipped_steps``) and
stop with one line past ``training.max_skipped_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from ..errors import RecipeError
from ..training.trainer import Role, StepContext
from .base import Distiller, RunData
from .common import NonFiniteSamples, finite_rows
from .fake_score import (FakeScoreSection, build_fake_score, denoising_loss, discriminator_loss, drop_conditions, encoder_logits,
                         generator_gan_loss)
from .recipe import DistillRecipe, lora_targets

EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0  # SiD's Karras grid (EDM's defaults)
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # EDM's training noise levels, SiD's fake-score loss


# =============================================================================================
# Recipe: the shared sections (recipe.py) plus these three
# =============================================================================================
@dataclass
class ScoreDistillationSection:
    timesteps: Literal["uniform", "sid"] = "uniform"  # score timesteps: U[min, max] x T, or SiD's EDM range
    min_timestep: float = 0.02  # uniform: fractions of the training timesteps
    max_timestep: float = 0.98
    sid_tmax: float = 800.0  # sid: SiD's tmax (of 1000) on EDM's Karras sigma grid
    fake_score_timesteps: Literal["same", "edm"] = "same"  # the fake score's: the generator's, or EDM's log-normal sigma (SiD's fake-score loss)
    alpha: float = 1.2  # SiD / SiDA: alpha of the score-identity loss (the paper's default 1.2)
    critic_updates_per_generator_update: int = 1  # SiD: one fake-score step per generator step
    fake_condition_dropout: float = 0.1  # when the fake branch is guided (SiD-LSG drops 10 % of the prompts)


@dataclass
class GuidanceSection:
    mode: Literal["plain", "lsg", "snoopi"] = "plain"
    fake_scale: float = 1.0  # w_fake: CFG of the fake score in the generator loss (LSG kappa_2 = kappa_3)
    fake_train_scale: float = 1.0  # lsg: CFG of the fake score in its own denoising loss (kappa_1)
    scale_range: Optional[tuple[float, float]] = None  # snoopi: w ~ U[lo, hi] per sample, both branches


@dataclass
class AdversarialSection:
    """SiDA only: the GAN terms, both relative to per-pixel means of the SiD / denoising losses."""

    generator_weight: float = 0.001  # lambda_G (on softplus(-D) / mean|x - x̂0_real|)
    critic_weight: float = 0.01  # lambda_D (on the fake score's softplus(D(fake)) + softplus(-D(real)))


@dataclass
class ScoreDistillationRecipe(DistillRecipe):
    fake_score: FakeScoreSection = field(default_factory=FakeScoreSection)
    score_distillation: ScoreDistillationSection = field(default_factory=ScoreDistillationSection)
    guidance: GuidanceSection = field(default_factory=GuidanceSection)
    adversarial: AdversarialSection = field(default_factory=AdversarialSection)


def check_recipe(recipe: ScoreDistillationRecipe) -> None:
    """The combinations the family accepts (one-line RecipeErrors)."""
    s, g = recipe.score_distillation, recipe.guidance
    if not 0.0 <= s.min_timestep < s.max_timestep <= 1.0:
        raise RecipeError(f"score_distillation: need 0 <= min_timestep < max_timestep <= 1; got {s.min_timestep}, {s.max_timestep}")
    if not 0 < s.sid_tmax <= 1000:
        raise RecipeError(f"score_distillation.sid_tmax must lie in (0, 1000]; got {s.sid_tmax}")
    if s.critic_updates_per_generator_update < 1:
        raise RecipeError("score_distillation.critic_updates_per_generator_update must be >= 1")
    if not 0.0 <= s.fake_condition_dropout < 1.0:
        raise RecipeError(f"score_distillation.fake_condition_dropout must lie in [0, 1); got {s.fake_condition_dropout}")
    if g.mode != "lsg" and g.fake_train_scale != 1.0:
        raise RecipeError("guidance.fake_train_scale is SiD-LSG's kappa_1: set guidance.mode: lsg (or leave it at 1)")
    if g.mode == "snoopi":
        if g.scale_range is None or not 0.0 <= g.scale_range[0] <= g.scale_range[1]:
            raise RecipeError(f"guidance.mode snoopi draws w ~ U[lo, hi] per sample: set guidance.scale_range: [lo, hi] with 0 <= lo <= hi; got {g.scale_range}")
        if recipe.teacher.guidance_scale != 1.0 or g.fake_scale != 1.0:
            raise RecipeError("guidance.mode snoopi draws both branches' scale from guidance.scale_range: leave teacher.guidance_scale and guidance.fake_scale at 1")
    elif g.scale_range is not None:
        raise RecipeError("guidance.scale_range is SNOOPI's per-sample range: set guidance.mode: snoopi (or remove it)")
    from .registry import method_class

    variant = method_class(recipe.method)
    if issubclass(variant, ScoreDistillationMethod):
        variant.check_variant(recipe)


# =============================================================================================
# The method
# =============================================================================================
class ScoreDistillationMethod(Distiller):
    """The family's shared machinery on the shared trainer (the registered methods are the
    subclasses below). Roles: "student" (EMA), "fake_score" (not SDS), "teacher" (frozen; absent
    when the fake score is a LoRA on the teacher's own weights)."""

    recipe_class = ScoreDistillationRecipe
    one_step_generator = True
    has_fake_score: bool = True  # SDS: the injected noise stands in for the fake score
    score_identity: bool = False  # SiD / SiDA: the score-identity loss, differentiated through both scores
    adversarial: bool = False  # SiDA: a GAN term on the fake score's encoder (needs real data)

    @classmethod
    def check_variant(cls, recipe: ScoreDistillationRecipe) -> None:
        """The method's own recipe constraints (one-line RecipeErrors)."""

    def __init__(self, teacher, recipe: ScoreDistillationRecipe, data: RunData | None):
        super().__init__(teacher, recipe, data)
        check_recipe(recipe)
        self.settings = s = recipe.score_distillation
        self.guidance = recipe.guidance
        if data is not None:
            if self.adversarial and self.real is None:
                raise RecipeError("method 'sida' needs real data for its discriminator: set data.images (or data.latents)")
            if not self.adversarial and self.real is not None:
                raise RecipeError(f"method '{recipe.method}' trains without data images: remove data.images / data.latents "
                                  "(FD reference: evaluation.reference or evaluation.benchmark)")
        self.ratio = s.critic_updates_per_generator_update
        self.guard = NonFiniteSamples()

        self.student = self.init_generator()  # G: initialised from the teacher (full copy, or a LoRA on a copy)
        # The fake score (not SDS): a second full copy, or a LoRA on the teacher's own frozen weights.
        self.fake_score = None
        if self.has_fake_score:
            self.fake_score = build_fake_score(teacher, recipe.fake_score.lora_rank,
                                               lora_targets(self.family, recipe.fake_score.lora_target_modules), gan=self.adversarial)
        self.shared_fake = self.fake_score is not None and self.fake_score.shares_teacher_weights
        g = self.guidance
        self.fake_guided = self.fake_score is not None and (g.mode == "snoopi" or g.fake_scale != 1.0 or g.fake_train_scale != 1.0)

    # -- roles --------------------------------------------------------------------------------
    def method_roles(self) -> dict[str, Role]:
        opts = self.optimizer_configs(("student",) if self.fake_score is None else ("student", "fake_score"), f"method '{self.recipe.method}'")
        roles = {"student": Role(self.student, optimizer=opts["student"], ema=self.recipe.ema)}
        if self.fake_score is not None:
            roles["fake_score"] = Role(self.fake_score, optimizer=opts["fake_score"])
        return roles

    # -- pieces -------------------------------------------------------------------------------
    def fake_score_timesteps(self, ctx: StepContext) -> torch.Tensor:
        """Native timesteps of the fake score's denoising loss: the generator's, or (``edm``) SiD's
        fake-score loss: EDM's log-normal sigma, ln sigma ~ N(-1.2, 1.2^2)."""
        if self.settings.fake_score_timesteps == "edm":
            return self.schedule.timestep_for_noise_level((ctx.randn() * EDM_P_STD + EDM_P_MEAN).exp())
        return self.score_timesteps(ctx)

    def score_timesteps(self, ctx: StepContext) -> torch.Tensor:
        """Native timesteps of the score evaluations (see the module docstring)."""
        s, T = self.settings, self.schedule.num_train_timesteps
        if s.timesteps == "sid":
            # SiD's time range: u ~ U[0, tmax / 1000] on EDM's Karras sigma grid
            u = ctx.rand() * s.sid_tmax / 1000
            lo, hi = EDM_SIGMA_MIN ** (1 / EDM_RHO), EDM_SIGMA_MAX ** (1 / EDM_RHO)
            sigma = (hi + (1 - u) * (lo - hi)) ** EDM_RHO
            return self.schedule.timestep_for_noise_level(sigma)
        lo, hi = s.min_timestep * T, s.max_timestep * T
        if self.schedule.kind == "vp":
            return ctx.randint(int(math.floor(lo)), max(int(math.ceil(hi)), int(math.floor(lo)) + 1))
        return lo + (hi - lo) * ctx.rand()

    def guidance_scales(self, ctx: StepContext):
        """(w_real, w_fake): fixed scales, or SNOOPI's one draw per sample shared by both branches."""
        g = self.guidance
        if g.mode == "snoopi":
            lo, hi = g.scale_range
            w = lo + (hi - lo) * ctx.rand()
            return w, w
        return self.recipe.teacher.guidance_scale, g.fake_scale

    def real_score(self, x_t, t, cond, guidance_scale, output: str = "x0", grad: bool = False) -> torch.Tensor:
        """The frozen teacher with CFG (the base weights when the fake score is a LoRA on them)."""
        if self.fake_score is not None:
            return self.fake_score.real_score(x_t, t, cond, guidance_scale, output=output, grad=grad)
        with torch.set_grad_enabled(grad):
            return self.teacher.predict(x_t, t, cond, guidance_scale=guidance_scale, output=output)

    def fake_prediction(self, ctx: StepContext, x_t, t, cond, guidance_scale, output: str, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            native = ctx.model("fake_score")(x_t, t, cond, guidance_scale)
            return self.schedule.convert(native.float(), x_t.float(), t, self.prediction_type, output)

    # -- generator losses (per sample) ---------------------------------------------------------
    def sds_vsd_loss(self, ctx, x, eps, t, cond, w_real, w_fake):
        """SDS / VSD: the gradient g = sigma_t^2 (ε̂_real - ε̂_ref) with ε̂_ref = eps (SDS) or the fake score's (VSD)."""
        x_t = self.schedule.add_noise(x.detach(), eps, t)
        eps_real = self.real_score(x_t, t, cond, w_real, output="epsilon")
        if self.fake_score is None:
            eps_ref = eps  # SDS: the injected noise
        else:
            eps_ref = self.fake_prediction(ctx, x_t, t, cond, w_fake, output="epsilon", grad=False)  # VSD: the fake score
        _, sigma = self.schedule.alpha_sigma(t)
        g = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2 * (eps_real - eps_ref)  # w(t) = sigma_t^2
        keep = finite_rows(x, g)
        loss = 0.5 * (x.float() - (x.detach().float() - g)).pow(2).flatten(1).mean(dim=1)
        return loss, keep, {"generator/grad_norm": g[keep].flatten(1).norm(dim=1).mean()}

    def sid_loss(self, ctx, x, eps, t, cond, w_real, w_fake):
        """SiD's score-identity loss (+ SiDA's adversarial term), differentiated through both networks."""
        a = self.settings.alpha
        x_t = self.schedule.add_noise(x, eps, t)
        x0_real = self.real_score(x_t, t, cond, w_real, output="sample", grad=True)
        x0_fake = self.fake_prediction(ctx, x_t, t, cond, w_fake, output="sample", grad=True)
        keep = finite_rows(x, x0_real, x0_fake)
        x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
        with torch.no_grad():  # per-sample normalisation
            norm = (x - x0_real).abs().flatten(1).mean(dim=1).clamp_min(1e-5)
        per_pixel = (x0_real - x0_fake) * ((x0_real - x) - a * (x0_real - x0_fake))
        loss = per_pixel.flatten(1).mean(dim=1) / norm
        logs = {"generator/sid_loss": loss[keep].mean()}
        if self.adversarial:  # SiDA: D = the fake score's encoder on the same x_t, weighted like the SiD loss
            gan = generator_gan_loss(encoder_logits(self.fake_score.last_features), per_sample=True) / norm
            loss = loss + self.recipe.adversarial.generator_weight * gan
            keep &= torch.isfinite(gan.detach())
            logs["generator/gan_loss"] = gan[keep].mean()
        return loss, keep, logs

    # -- one step -----------------------------------------------------------------------------
    def training_step(self, ctx: StepContext) -> dict[str, Any]:
        logs: dict[str, Any] = {}
        B = ctx.local_batch_size
        cond = self.pool.index(ctx.randint(0, len(self.pool)))
        noise = ctx.randn(*self.shape)
        K = self.sampler.num_steps
        k = ctx.randint(0, K) if (K > 1 and self.recipe.student.backward_simulation) else torch.zeros(B, dtype=torch.long, device=ctx.device)
        update_generator = self.fake_score is None or ctx.step % self.ratio == 0
        x = self.generate(ctx, noise, cond, k, grad=update_generator)
        w_real, w_fake = self.guidance_scales(ctx)

        # ---- generator update ----
        if update_generator:
            t, eps = self.score_timesteps(ctx), ctx.randn(*self.shape)
            loss_fn = self.sid_loss if self.score_identity else self.sds_vsd_loss
            per_sample, keep, generator_logs = loss_fn(ctx, x, eps, t, cond, w_real, w_fake)
            self.guard.cut(x, keep)
            generator_loss = per_sample[self.guard.filter(keep)].mean()
            ctx.step_role("student", generator_loss)
            logs.update(generator_logs)
            logs["generator/loss"] = generator_loss.detach()

        # ---- fake-score update: its denoising loss on G's samples (+ SiDA's discriminator) ----
        if self.fake_score is not None:
            t, eps = self.fake_score_timesteps(ctx), ctx.randn(*self.shape)
            fake_cond = drop_conditions(cond, ctx.rand() < self.settings.fake_condition_dropout) if self.fake_guided else cond
            if self.adversarial:
                flips = ctx.rand() < 0.5 if self.real.random_flip else None
                real, real_cond = self.real.batch(ctx.sample_indices(len(self.real)), ctx.device, flips=flips)
                real_t = self.schedule.add_noise(real, eps, t)  # SiDA: the same t and noise
            kappa1 = self.guidance.fake_train_scale  # LSG's short guidance (1 unless mode lsg)
            per_sample = denoising_loss(ctx.model("fake_score"), self.schedule, self.prediction_type, x, eps, t, fake_cond,
                                        guidance_scale=kappa1)
            keep = self.guard.filter(torch.isfinite(per_sample.detach()))
            denoise = per_sample[keep].mean()
            critic_loss = denoise
            logs["critic/denoise_loss"] = denoise.detach()
            if self.adversarial:
                # the real samples through the encoder alone (SiDA's return_flag='encoder')
                fake_logits = encoder_logits(self.fake_score.last_features)
                real_logits = encoder_logits(self.fake_score.encode(real_t, t, real_cond))
                gan = discriminator_loss(fake_logits, real_logits)
                critic_loss = critic_loss + self.recipe.adversarial.critic_weight * gan
                logs["critic/gan_loss"] = gan.detach()
                logs["critic/real_accuracy"] = (real_logits > 0).float().mean()
                logs["critic/fake_accuracy"] = (fake_logits < 0).float().mean()
            ctx.step_role("fake_score", critic_loss)
            logs["critic/loss"] = critic_loss.detach()
        logs.update(self.guard.logs())
        return logs


    # -- the memory plan --------------------------------------------------------------------------
    @classmethod
    def method_role_specs(cls, plan) -> list:
        """G, the frozen teacher and (not SDS) the fake score. SiD's generator loss is
        differentiated through both scores' forwards (their activations add to G's backward);
        SDS / VSD take their gradient without one. SiDA's fake score also runs the real samples
        (planned as 2x the batch: an upper bound, their pass stops at the bottleneck)."""
        through = ("student",) if cls.score_identity else ()
        roles = [plan.teacher(backprop_from=through), plan.student()]
        if cls.has_fake_score:
            roles.append(plan.trained("fake_score", plan.recipe.fake_score, shares="teacher",
                                      batch_factor=2 if cls.adversarial else 1, backprop_from=through))
        return roles


# =============================================================================================
# The registered methods
# =============================================================================================
class SDS(ScoreDistillationMethod):
    """SDS (Poole et al. 2022) as a generator loss: the baseline, no fake score."""

    description = "SDS: score distillation sampling as a generator loss"
    has_fake_score = False

    @classmethod
    def check_variant(cls, recipe: ScoreDistillationRecipe) -> None:
        if recipe.guidance.mode == "lsg" or recipe.guidance.fake_scale != 1.0:
            raise RecipeError("method 'sds' has no fake score: guidance.mode lsg and guidance.fake_scale do not apply")


class VSD(ScoreDistillationMethod):
    """VSD / SwiftBrush (Wang et al. 2023; Nguyen & Tran 2024): an online fake score replaces the noise."""

    description = "VSD / SwiftBrush: image-free variational score distillation with an online fake score"


class SiD(ScoreDistillationMethod):
    """SiD (Zhou et al. 2024): the score-identity loss, data-free."""

    description = "SiD: score identity distillation, data-free"
    score_identity = True


class SiDA(SiD):
    """SiDA (Zhou et al. 2025): SiD plus an adversarial loss on the fake score's encoder."""

    description = "SiDA: score identity distillation with an adversarial loss on the fake score's encoder"
    adversarial = True

    @classmethod
    def check_variant(cls, recipe: ScoreDistillationRecipe) -> None:
        g = recipe.guidance
        if g.fake_scale != 1.0 or g.fake_train_scale != 1.0 or g.mode == "snoopi":
            raise RecipeError("method 'sida': the discriminator reads the fake score's unguided pass; keep the fake branch unguided "
                              "(guidance.fake_scale and fake_train_scale 1, mode plain or lsg with kappa_1 = 1)")


__all__ = [
    "AdversarialSection",
    "GuidanceSection",
    "ScoreDistillationMethod",
    "ScoreDistillationRecipe",
    "ScoreDistillationSection",
    "SDS",
    "SiD",
    "SiDA",
    "VSD",
    "check_recipe",
]
