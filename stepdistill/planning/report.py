"""``plan_report``: the memory table of a recipe, a verdict per GPU size, and the cheapest change
that makes it fit.

A GPU of G GiB *fits* a recipe when ``headroom x peak <= G GiB``. The default headroom, 1.2,
covers what the estimate leaves out: the CUDA context and cuBLAS/cuDNN workspaces (0.5-1 GiB),
the caching allocator's fragmentation, autocast keeping a few activations (normalizations,
softmax) in fp32, and the estimate's own error (within 15 % of measured peaks on CPU,
docs/memory.md).

Levers, cheapest first (what each costs the run, not the memory it saves, sets the order):

1. ``bf16 frozen weights``: frozen networks (and LoRA bases) stored and run in bf16 instead of fp32;
2. ``gradient checkpointing`` on every trained network (about a third more compute);
3. ``LoRA fake score``: every fully trained role after the first (the student) becomes LoRA
   (its ``lora_rank``) on the weights of a frozen role with the same network, if there is one;
4. ``smaller batch``: halve the batch until it fits (gradient accumulation keeps the
   effective batch).

Each lever is tried alone; when none fits alone, they are stacked in that order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import StepdistillError
from .estimate import MemoryEstimate, Workload, estimate_memory
from .roles import RoleSpec, build_on_meta, resolve_class

GPU_SIZES_GIB = (24, 48, 80)
DEFAULT_HEADROOM = 1.2
GIB = 2**30


@dataclass(frozen=True)
class Change:
    """A what-if: changed specs / batch, and the estimate it gives."""

    levers: tuple[str, ...]
    details: tuple[str, ...]
    estimate: MemoryEstimate

    def __str__(self) -> str:
        return f"{' + '.join(self.levers)} ({'; '.join(self.details)}): peak {_gib(self.estimate.peak)}"


@dataclass(frozen=True)
class Verdict:
    gpu_gib: float
    fits: bool
    change: Change | None = None  # the cheapest change that fits, when the recipe as given does not

    def line(self, peak: int, headroom: float) -> str:
        need = f"{headroom:g} x {_gib(peak)} = {_gib(peak * headroom)}"
        if self.fits:
            return f"{self.gpu_gib:>3g} GiB: fits ({need})"
        if self.change is None:
            return f"{self.gpu_gib:>3g} GiB: does not fit ({need}), not even with every lever"
        return f"{self.gpu_gib:>3g} GiB: does not fit ({need}); cheapest change: {self.change}"


@dataclass(frozen=True)
class PlanReport:
    estimate: MemoryEstimate
    headroom: float
    verdicts: tuple[Verdict, ...]

    @property
    def peak(self) -> int:
        return self.estimate.peak

    def table(self) -> str:
        head = ("role", "params", "trained", "computes in", "weights", "grads", "optimizer states", "EMA", "activations", "host")
        rows = [head]
        for r in self.estimate.roles:
            s = r.spec
            trained = {"full": f"full ({_dtype(s.trainable_dtype)} master)", "lora": f"LoRA r{s.lora_rank}", "frozen": "frozen"}[s.trainable]
            if s.shares_weights_with:
                trained += f" on {s.shares_weights_with}"
            if s.frozen_dtype is not None and s.trainable != "full":
                trained += f", {_dtype(s.frozen_dtype)} weights"
            if s.gradient_checkpointing and s.is_trained:
                trained += ", ckpt"
            if s.offload:
                trained += ", offload"
            acts = r.activations.peak if r.activations is not None else 0
            acts += r.through_activations.peak if r.through_activations is not None else 0
            rows.append((
                s.name, _count(r.parameters.total), trained, _dtype(s.param_dtype), _gib(r.weights), _gib(r.grads),
                _gib(r.optimizer_states), _gib(r.ema), _gib(acts), _gib(r.host),
            ))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        w = self.estimate.workload
        tokens = f", {w.text_tokens} text tokens" if w.text_tokens else ""
        out = [f"batch {w.batch_size} at {w.height}x{w.width} (network input{tokens})", "", self.table(), ""]
        out.append(f"resident (weights, optimizer states, EMA): {_gib(self.estimate.resident)}")
        for phase in self.estimate.phases:
            out.append(f"training {phase.role}: backward {_gib(phase.backward)}, optimizer step {_gib(phase.optimizer_step)}")
        out.append(f"peak: {_gib(self.peak)}" + (f" (+ {_gib(self.estimate.host)} host memory)" if self.estimate.host else ""))
        out.append("")
        out += [v.line(self.peak, self.headroom) for v in self.verdicts]
        return "\n".join(out)


def plan_report(
    specs: Sequence[RoleSpec],
    batch_size: int,
    height: int,
    width: int | None = None,
    vae_scale_factor: int = 8,
    text_tokens: int | None = None,
    gpus: Sequence[float] = GPU_SIZES_GIB,
    headroom: float = DEFAULT_HEADROOM,
) -> PlanReport:
    """Estimate ``specs`` at ``batch_size`` images of ``height`` x ``width`` pixels (latents are
    ``/ vae_scale_factor``; 1 for pixel networks) and judge each GPU size in ``gpus`` (GiB)."""
    if batch_size < 1:
        raise StepdistillError(f"batch_size must be at least 1; got {batch_size}")
    width = width or height
    if height % vae_scale_factor or width % vae_scale_factor:
        raise StepdistillError(f"height and width must be multiples of vae_scale_factor {vae_scale_factor}; got {height}x{width}")
    specs = tuple(specs)
    cache: dict = {}

    def estimate(changed: Sequence[RoleSpec], batch: int) -> MemoryEstimate:
        workload = Workload(batch, height // vae_scale_factor, width // vae_scale_factor, text_tokens)
        return estimate_memory(changed, workload, cache)

    base = estimate(specs, batch_size)
    verdicts = []
    for gib in gpus:
        budget = gib * GIB / headroom
        if base.peak <= budget:
            verdicts.append(Verdict(gib, True))
        else:
            verdicts.append(Verdict(gib, False, _cheapest_change(specs, batch_size, budget, estimate)))
    return PlanReport(estimate=base, headroom=headroom, verdicts=tuple(verdicts))


# -- levers -----------------------------------------------------------------------------------

Lever = Callable[[tuple[RoleSpec, ...]], tuple[tuple[RoleSpec, ...], list[str]]]


def bf16_frozen_weights(specs):
    out, details = [], []
    for s in specs:
        if s.trainable != "full" and (s.frozen_dtype or s.param_dtype) == torch.float32:
            s = dataclasses.replace(s, param_dtype=torch.bfloat16) if s.frozen_dtype is None else dataclasses.replace(s, frozen_dtype=torch.bfloat16)
            details.append(f"{s.name} bf16")
        out.append(s)
    return tuple(out), details


def gradient_checkpointing(specs):
    out, details = [], []
    for s in specs:
        if s.is_trained and not s.gradient_checkpointing and _supports_checkpointing(s):
            s = dataclasses.replace(s, gradient_checkpointing=True)
            details.append(s.name)
        out.append(s)
    return tuple(out), details


def lora_fake_score(specs):
    out, details = [], []
    trained = [s.name for s in specs if s.trainable == "full"]
    for s in specs:
        if s.trainable == "full" and s.name != trained[0]:
            twin = next((f for f in specs if f.trainable == "frozen" and _same_network(f, s)), None)
            s = dataclasses.replace(
                s, trainable="lora", shares_weights_with=twin.name if twin else None,
                param_dtype=twin.param_dtype if twin else s.param_dtype,
            )
            details.append(f"{s.name} LoRA r{s.lora_rank}" + (f" on {twin.name}'s weights" if twin else ""))
        out.append(s)
    return tuple(out), details


LEVERS: tuple[tuple[str, Lever], ...] = (
    ("bf16 frozen weights", bf16_frozen_weights),
    ("gradient checkpointing", gradient_checkpointing),
    ("LoRA fake score", lora_fake_score),
)


def _cheapest_change(specs, batch_size, budget, estimate) -> Change | None:
    def smaller_batch(changed, levers, details):
        batch = batch_size // 2
        while batch >= 1:
            result = estimate(changed, batch)
            if result.peak <= budget:
                return Change(levers + ("smaller batch",), details + (f"batch {batch_size} -> {batch}",), result)
            batch //= 2
        return None

    for name, lever in LEVERS:  # one lever at a time, cheapest first
        changed, details = lever(specs)
        if details:
            result = estimate(changed, batch_size)
            if result.peak <= budget:
                return Change((name,), tuple(details), result)
    change = smaller_batch(specs, (), ())
    if change is not None:
        return change
    stacked, names, all_details = specs, (), ()
    for name, lever in LEVERS:  # then stacked, in the same order
        stacked, details = lever(stacked)
        if not details:
            continue
        names, all_details = names + (name,), all_details + tuple(details)
        result = estimate(stacked, batch_size)
        if result.peak <= budget:
            return Change(names, all_details, result)
    return smaller_batch(stacked, names, all_details)


def _same_network(a: RoleSpec, b: RoleSpec) -> bool:
    if a.module_factory is not None or b.module_factory is not None:
        return a.module_factory is b.module_factory
    return resolve_class(a) is resolve_class(b) and dict(a.config) == dict(b.config)


def _supports_checkpointing(spec: RoleSpec) -> bool:
    cls = resolve_class(spec) if spec.module_factory is None else type(build_on_meta(spec))
    return bool(getattr(cls, "_supports_gradient_checkpointing", False))


# -- formatting -------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 2 or n == 0 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


__all__ = ["Change", "DEFAULT_HEADROOM", "GPU_SIZES_GIB", "LEVERS", "PlanReport", "Verdict", "plan_report"]
