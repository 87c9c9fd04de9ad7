"""The guidance-distillation family: one network evaluation per step instead of CFG's two.

Guidance distillation -- Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage one
(``method: guidance``). A student that takes w as an input is trained to match the teacher's
classifier-free-guided output at every noise level::

    w ~ U[w_min, w_max]                                          (per sample)
    x_t = alpha_t x0 + sigma_t eps,  t ~ U[0, T)                 (inputs: data -- Meng et al.)
       or x_t = the teacher's own CFG sampler at w after k steps  (inputs: trajectories)
    target = uncond(x_t, t) + w (cond(x_t, t) - uncond(x_t, t))  (the teacher's CFG, 2 evaluations)
    L = || s_θ(x_t, t, c, w) - sg(target) ||²                    (Meng eq. 6, in the teacher's own
                                                                   parameterization: eps / v / flow)

The student is a copy of the teacher's network with a w input that starts at zero
(:mod:`.guidance_input`): ``time_cond_proj_dim`` for UNets (SD / SDXL ``UNet2DConditionModel``,
pixel ``UNet2DModel`` through our ``GuidanceUNet2DModel``), the guidance embedding for Flux. The
exported pipeline is the family's stock one (pixel: ``ClassConditionalPipeline``) with the
scheduler the teacher is sampled with (DDIM trailing / flow Euler), whose ``guidance_scale`` is
fed to that input exactly as diffusers feeds it -- one network pass per step, no CFG. Its K-step
sampler at w is the teacher's K-step CFG sampler at w with the CFG output replaced by the student's.

Adapter guidance distillation -- Jensen & Sadat 2025, "Efficient Distillation of Classifier-Free
Guidance using Adapters" (AGD, ``method: agd``). The teacher's network stays frozen and bitwise
untouched; small adapters on it (at most 5 % of its parameters; the paper reports about 2 %) learn
the guided output from the teacher's CFG-guided sampling trajectories (AGD §3.2: training on the
states the guided sampler visits, not on noised data, removes the train/inference mismatch)::

    w ~ U[w_min, w_max]                                          (per trajectory)
    x_t = the teacher's CFG sampler at w after k of K steps      (a bank of trajectories sampled at the start)
    L = || s_{θ + (w-1) Δ}(x_t, t, c) - sg(uncond + w (cond - uncond)) ||²

Here the adapters are LoRA layers whose strength is ``w - 1`` (W + (w - 1) B A): the CFG output is
affine in (w - 1) and equals the conditional output at w = 1, where the adapter is off by
construction -- so w reaches the adapters through the one number a stock diffusers LoRA carries,
and the export is a plain diffusers LoRA file (``pytorch_lora_weights.safetensors``):

    pipe.load_lora_weights(dir)                                            # SD / SDXL / Flux
    pipe(prompt, guidance_scale=1.0, cross_attention_kwargs={"scale": w - 1})   # SD / SDXL: no CFG pass
    pipe(prompt, joint_attention_kwargs={"scale": w - 1})                  # Flux (embedded guidance as before)
    pipe.disable_lora()  /  pipe.unload_lora_weights()                     # the untouched teacher again

(The paper's adapters instead take an embedding of w, t and the prompt as an extra input, which
no diffusers loader can feed; the LoRA strength is the w input a stock pipeline has.) Pixel
teachers export the untouched teacher as a ``ClassConditionalPipeline`` with the LoRA file inside;
its ``load_lora_weights`` makes ``guidance_scale`` drive the adapters (``pipeline/``, which the
digits benchmark loads with the adapters on).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..errors import RecipeError
from ..sampling import make_student_scheduler
from ..training.trainer import Role, StepContext
from .base import Distiller, RunData
from .common import add_lora, lora_disabled
from .guidance_input import GuidanceInput, cfg_output, check_guidance, w_conditioned_copy
from .recipe import DistillRecipe, lora_targets
from .student import StudentSampler, denoiser_name, pipeline_timestep_kwargs, with_network

MAX_ADAPTER_FRACTION = 0.05  # AGD: adapters of at most 5 % of the base network's parameters


# =============================================================================================
# Recipe: the shared sections (recipe.py) plus `guidance:`
# =============================================================================================
@dataclass
class GuidanceSection:
    guidance_range: tuple[float, float] = (1.0, 3.0)  # w ~ U[lo, hi]; convention uncond + w (cond - uncond), 1 = none
    inputs: Literal["data", "trajectories"] = "data"  # x_t: noised real data (Meng et al.) / the teacher's CFG sampler states (AGD)
    trajectory_steps: list[int] = field(default_factory=lambda: [10])  # inputs: trajectories: the teacher's CFG sampler at K steps, for each K listed
    trajectory_bank: int = 1024  # inputs: trajectories: CFG trajectories per K, sampled once at the start (held in memory)
    w_embedding_dim: int = 256  # method guidance, UNet students: time_cond_proj_dim (Flux: its guidance embedding)


@dataclass
class GuidanceRecipe(DistillRecipe):
    guidance: GuidanceSection = field(default_factory=GuidanceSection)


# =============================================================================================
# What both methods share: w ranges, training inputs, the teacher's CFG target
# =============================================================================================
class _GuidanceFamily(Distiller):
    """Guidance distillation and AGD: the student replaces the teacher's CFG output at w."""

    recipe_class = GuidanceRecipe

    def __init__(self, teacher, recipe: GuidanceRecipe, data: RunData | None):
        super().__init__(teacher, recipe, data)
        self.section = s = recipe.guidance
        lo, hi = s.guidance_range
        if lo > hi or lo < 1.0:
            raise RecipeError(f"guidance.guidance_range must be [lo, hi] with 1 <= lo <= hi; got {[lo, hi]}")
        if data is not None and self.pool.encoded.uncond is None:
            raise RecipeError(f"{recipe.method}: the teacher has no unconditional branch: there is no CFG to distill")
        if not s.trajectory_steps or any(k < 1 for k in s.trajectory_steps) or s.trajectory_bank < 1:
            raise RecipeError(f"guidance.trajectory_steps must be positive step counts and trajectory_bank >= 1; got "
                              f"{s.trajectory_steps}, {s.trajectory_bank}")
        if s.inputs == "data" and data is not None and self.real is None:
            raise RecipeError(f"{recipe.method}: guidance.inputs is 'data' but the recipe has no real data: set data.images "
                              "(data.latents for latent teachers), or guidance.inputs: trajectories (data-free)")
        if self.real is not None and self.real.latents is not None:
            self.shape = tuple(int(n) for n in self.real.latents.shape("latents")[1:])  # the training resolution (Flux's shift depends on it)
        self.bank: TrajectoryBank | None = None
        self.scheduler = make_student_scheduler(teacher.scheduler, self.num_steps)
        self.sampler = StudentSampler(self.scheduler, self.num_steps, self.timestep_kwargs)
        self.sampler.check_timesteps(recipe.student.timesteps)

    def timestep_kwargs(self, num_steps: int) -> dict:
        """``set_timesteps`` arguments of the stock pipeline at this resolution (Flux: mu, sigmas)."""
        return pipeline_timestep_kwargs(self.teacher, self.shape, num_steps)

    @property
    def trained_guidance_range(self):
        return tuple(self.section.guidance_range)

    @property
    def export_guidance_scale(self) -> float:
        """The exported pipeline's default w: the recipe's teacher guidance, clamped to the trained range."""
        lo, hi = self.section.guidance_range
        return min(max(float(self.recipe.teacher.guidance_scale), lo), hi)

    # -- the teacher's CFG target ---------------------------------------------------------------
    def teacher_context(self):
        """Where the teacher is evaluated (AGD: the shared network with its adapters off)."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def target(self, x_t, t, cond, w) -> torch.Tensor:
        with self.teacher_context():
            return cfg_output(self.teacher, x_t, t, cond, w)

    # -- training inputs ------------------------------------------------------------------------
    def inputs(self, ctx: StepContext):
        """(x_t, t, cond, w) of this batch: noised real data at t ~ U[0, T) with w ~ U[lo, hi], or
        states of the teacher's CFG sampler drawn from the trajectory bank (each with its own w)."""
        if self.section.inputs == "data":
            flips = ctx.rand() < 0.5 if self.real.random_flip else None
            x0, cond = self.real.batch(ctx.sample_indices(len(self.real)), ctx.device, flips=flips)
            T = self.schedule.num_train_timesteps
            t = ctx.randint(0, T) if self.schedule.kind == "vp" else T * (1 - ctx.rand())  # flow: sigma in (0, 1]
            lo, hi = self.section.guidance_range
            w = lo + (hi - lo) * ctx.rand()
            return self.schedule.add_noise(x0, ctx.randn(*x0.shape[1:]), t), t, cond, w
        if self.bank is None:
            self.bank = TrajectoryBank.build(self, ctx.device, ctx.trainer.config.seed)
        idx = ctx.sample_indices(len(self.bank))
        return (self.bank.x[idx].to(ctx.device), self.bank.t[idx].to(ctx.device), self.pool.index(self.bank.cond[idx].to(ctx.device)),
                self.bank.w[idx].to(ctx.device))

    def training_step(self, ctx: StepContext) -> dict[str, Any]:
        x_t, t, cond, w = self.inputs(ctx)
        target = self.target(x_t, t, cond, w)
        pred = self.student_output(ctx.model("student"), x_t, t, cond, w)
        loss = torch.mean((pred.float() - target) ** 2)
        ctx.step_role("student", loss)
        return {"loss": loss}


class _CFGTeacher:
    """The teacher's CFG at per-sample w, called like a teacher adapter by the sampler's rollout."""

    def __init__(self, method: _GuidanceFamily, w: torch.Tensor):
        self.method, self.w = method, w

    def guided_output(self, x, t, cond, guidance_scale=None):
        return self.method.target(x, t.expand(x.shape[0]) if t.ndim == 0 else t, cond, self.w)


@dataclass
class TrajectoryBank:
    """The states the teacher's CFG sampler visits (AGD's training trajectories), flattened over
    (trajectory, step): input ``x`` at timestep ``t`` of a trajectory sampled at guidance ``w`` for
    the pool condition ``cond``. Built once per run from the run's seed (a resumed run rebuilds the
    same bank): ``trajectory_bank`` trajectories for each K in ``trajectory_steps``, each with its
    own w ~ U[lo, hi], sampled with the exported scheduler (DDIM trailing / flow Euler) at K steps."""

    x: torch.Tensor
    t: torch.Tensor
    w: torch.Tensor
    cond: torch.Tensor

    def __len__(self) -> int:
        return int(self.t.shape[0])

    @classmethod
    @torch.no_grad()
    def build(cls, method: _GuidanceFamily, device, seed: int, batch_size: int = 256) -> "TrajectoryBank":
        import time

        from ..training.trainer import seed_for

        began = time.perf_counter()
        s, pool = method.section, method.pool
        lo, hi = s.guidance_range
        g = torch.Generator().manual_seed(seed_for(seed, "trajectories"))
        parts: dict[str, list[torch.Tensor]] = {"x": [], "t": [], "w": [], "cond": []}
        for K in s.trajectory_steps:
            sampler = StudentSampler(method.scheduler, K, method.timestep_kwargs)
            for start in range(0, s.trajectory_bank, batch_size):
                n = min(batch_size, s.trajectory_bank - start)
                noise = torch.randn(n, *method.shape, generator=g)
                w = lo + (hi - lo) * torch.rand(n, generator=g)
                idx = torch.randint(0, len(pool), (n,), generator=g)
                states = sampler.rollout(_CFGTeacher(method, w.to(device)), noise.to(device), pool.index(idx.to(device)), K - 1, total_steps=K)
                parts["x"].append(torch.stack(states, 1).flatten(0, 1).float().cpu())  # [n * K, ...], step-major per trajectory
                parts["t"].append(sampler.timesteps.float().repeat(n))
                parts["w"].append(w.repeat_interleave(K))
                parts["cond"].append(idx.repeat_interleave(K))
        bank = cls(**{k: torch.cat(v) for k, v in parts.items()})
        if method.schedule.kind == "vp":
            bank.t = bank.t.round().long()
        print(f"{method.recipe.method}: trajectory bank of {len(bank):,} states ({s.trajectory_bank} CFG trajectories x "
              f"{s.trajectory_steps} steps, w ~ U[{lo:g}, {hi:g}]) in {time.perf_counter() - began:.0f} s", flush=True)
        return bank


# =============================================================================================
# Guidance distillation (Meng et al., stage one): a w-conditioned copy of the teacher
# =============================================================================================
class GuidanceDistillation(_GuidanceFamily):
    description = "guidance distillation (Meng et al. 2023, stage one)"

    def __init__(self, teacher, recipe: GuidanceRecipe, data: RunData | None):
        super().__init__(teacher, recipe, data)
        if recipe.student.lora_rank > 0:
            raise RecipeError("guidance: the student is a full w-conditioned copy (student.lora_rank must be 0); "
                              "for adapters on the frozen teacher use method: agd")
        student = w_conditioned_copy(getattr(teacher, denoiser_name(teacher)), self.section.w_embedding_dim)
        self.w_input = GuidanceInput.attach(student)
        self.student = student.requires_grad_(True).train()

    def method_roles(self) -> dict[str, Role]:
        opts = self.optimizer_configs(("student",), "guidance distillation")
        return {"student": Role(self.student, optimizer=opts["student"], ema=self.recipe.ema)}

    @classmethod
    def method_role_specs(cls, plan) -> list:
        """A full w-conditioned copy of the denoiser (the w input as ``w_conditioned_copy`` adds
        it) next to the frozen teacher."""
        denoiser = plan.configs.denoiser
        w_input = ({"guidance_embeds": True} if denoiser.get("_class_name") == "FluxTransformer2DModel"
                   else {"time_cond_proj_dim": plan.recipe.guidance.w_embedding_dim})
        return [plan.teacher(), plan.student(lora=False, config={**denoiser, **w_input})]

    def guidance_input(self, w: torch.Tensor):
        check_guidance(float(w.reshape(-1)[0]), self.section.guidance_range)
        return self.w_input.at(w)

    def student_output(self, network: nn.Module, x_t, t, cond, w) -> torch.Tensor:
        """s_θ(x_t, t, c, w): one pass of the w-conditioned student (the teacher's parameterization)."""
        with self.w_input.at(w):
            return with_network(self.teacher, network).guided_output(x_t, t, cond, 1.0)


# =============================================================================================
# Adapter guidance distillation (AGD): LoRA adapters at strength w - 1 on the frozen teacher
# =============================================================================================
@contextlib.contextmanager
def adapter_strength(network: nn.Module, strength):
    """Run ``network``'s LoRA adapters at ``strength`` (W + strength * B A), then back to 1.

    A number (or equal entries) sets peft's scale, what ``cross_attention_kwargs={"scale": s}`` /
    ``set_adapters(..., s)`` do in a stock pipeline; a tensor of one strength per sample scales each
    sample's adapter output (a forward hook on every ``lora_B``: its output is batch-first)."""
    from .common import lora_layers

    layers = lora_layers(network)
    strength = torch.as_tensor(strength, dtype=torch.float32).reshape(-1)
    uniform = bool((strength == strength[0]).all())
    hooks = []
    for layer in layers:
        for name in layer.scaling:
            layer.set_scale(name, float(strength[0]) if uniform else 1.0)
            if not uniform:
                hooks.append(layer.lora_B[name].register_forward_hook(_per_sample(strength)))
    try:
        yield network
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            for name in layer.scaling:
                layer.set_scale(name, 1.0)


def _per_sample(strength: torch.Tensor):
    def scale(module, args, out):
        return out * strength.to(out.device, out.dtype).reshape(-1, *([1] * (out.ndim - 1)))

    return scale


def count_parameters(network: nn.Module) -> tuple[int, int]:
    """(base parameters, adapter parameters) of a network carrying LoRA adapters."""
    adapter = sum(p.numel() for n, p in network.named_parameters() if "lora_" in n)
    return sum(p.numel() for p in network.parameters()) - adapter, adapter


class AdapterGuidanceDistillation(_GuidanceFamily):
    description = "adapter guidance distillation (AGD, Jensen & Sadat 2025)"
    keeps_base = True  # exported as the adapter file next to the untouched teacher, never merged

    def __init__(self, teacher, recipe: GuidanceRecipe, data: RunData | None):
        super().__init__(teacher, recipe, data)
        rank = recipe.student.lora_rank
        if rank < 1:
            raise RecipeError("agd: the adapters are LoRA layers: set student.lora_rank >= 1")
        network = getattr(teacher, denoiser_name(teacher))  # adapters on the teacher's own frozen weights: no second copy
        targets = lora_targets(self.family, recipe.student.lora_target_modules)
        add_lora(network, rank, targets, what="agd adapters")
        self.base_parameters, self.adapter_parameters = count_parameters(network)
        fraction = self.adapter_parameters / self.base_parameters
        print(f"agd: adapters {self.adapter_parameters:,} parameters = {100 * fraction:.2f}% of the base network's "
              f"{self.base_parameters:,} (rank {rank}, targets {', '.join(targets)}); base frozen", flush=True)
        if fraction > MAX_ADAPTER_FRACTION:
            raise RecipeError(f"agd: the adapters are {100 * fraction:.2f}% of the base network's parameters (AGD: at most "
                              f"{100 * MAX_ADAPTER_FRACTION:g}%): lower student.lora_rank ({rank}) or student.lora_target_modules")
        self.student = network

    @classmethod
    def method_role_specs(cls, plan) -> list:
        """LoRA adapters on the teacher's own weights, no second copy. The trajectory bank (host
        memory, ``guidance.trajectory_bank`` states) is not planned."""
        return [plan.teacher(), plan.student(shares="teacher")]

    def method_roles(self) -> dict[str, Role]:
        opts = self.optimizer_configs(("student",), "agd (the student is the adapters)")
        # the student IS the teacher's network (its adapters off for the teacher): the base's
        # teacher role holds the rest of the teacher (encoders, VAE) unless memory.release_encoders
        return {"student": Role(self.student, optimizer=opts["student"], ema=self.recipe.ema)}

    def teacher_context(self):
        return lora_disabled(self.student)

    def student_output(self, network: nn.Module, x_t, t, cond, w) -> torch.Tensor:
        """The teacher's network with its adapters at strength w - 1 (per sample): one pass."""
        with adapter_strength(_unwrapped(network), w - 1.0):
            return with_network(self.teacher, network).guided_output(x_t, t, cond, 1.0)

    @torch.no_grad()
    def sample(self, network, noise, cond, guidance_scale=None, num_steps=None, generator=None) -> torch.Tensor:
        """The exported sampler at w: adapters at strength w - 1, one pass per step, no CFG."""
        w = self.export_guidance_scale if guidance_scale is None else float(guidance_scale)
        check_guidance(w, self.section.guidance_range)
        with adapter_strength(_unwrapped(network), w - 1.0):
            return self.sampler.sample(with_network(self.teacher, network), noise, cond, num_steps, generator=generator)


def _unwrapped(network: nn.Module) -> nn.Module:
    return network.module if hasattr(network, "module") and not hasattr(network, "config") else network


__all__ = [
    "AdapterGuidanceDistillation",
    "GuidanceDistillation",
    "GuidanceRecipe",
    "GuidanceSection",
    "adapter_strength",
    "count_parameters",
]
