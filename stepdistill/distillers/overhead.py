"""``stepdistill bench overhead RECIPE``: what the trainer adds to the networks' own work.

One training iteration of the recipe (``Trainer.train_step``: for DMD2 the generator update and
the critic updates, as the recipe's TTUR schedules them) is timed, and compared with the *bare*
work of the networks it runs: every network call the iteration made -- student, teacher (real
score, CFG passes), fake score, GAN head, text / VAE encoders -- is recorded once (its inputs,
grad mode and whether a LoRA was switched off), then replayed alone: forward, and backward from
its output where the iteration backpropagated through it -- into its inputs when they came from
another network (the fake score under the generator's GAN loss), else into its trained
parameters. Optimizer steps of the trained roles are timed on their own.

    overhead = iteration / sum(bare forward + backward)              (target <= 1.15)
    overhead incl. optimizer = iteration / (sum(bare) + optimizer steps)

What the ratio charges to the trainer: condition lookup, noise / timestep draws, schedule
conversions, the sampler's bookkeeping, gradient clipping, EMA updates, accelerate's wrappers
(and the optimizer steps, in the first ratio). Iterations and replays alternate over ``rounds``
and medians are taken, so a busy machine slows both alike; compare ratios measured in one run.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from .common import lora_layers


@dataclass
class Call:
    network: nn.Module
    name: str
    args: tuple
    kwargs: dict
    grad: bool  # grad mode of the call
    lora_off: bool  # the network's LoRA adapters were disabled (the real score on a LoRA'd teacher)
    backward: bool = False  # its output took part in a backward pass
    to_bottleneck: Any = None  # the FakeScore whose encoder-only pass this was (FakeScore.encode), else None


@dataclass
class OverheadReport:
    iteration: float  # seconds, median over rounds
    calls: list[tuple[str, str, float]]  # (network, what, seconds of its bare replay)
    optimizer: dict[str, float]  # role -> seconds of its optimizer step
    rounds: int
    iterations: list[float] = field(default_factory=list)

    @property
    def bare(self) -> float:
        return sum(seconds for _, _, seconds in self.calls)

    @property
    def ratio(self) -> float:
        return self.iteration / self.bare

    @property
    def ratio_with_optimizer(self) -> float:
        return self.iteration / (self.bare + sum(self.optimizer.values()))

    def __str__(self) -> str:
        lines = ["network call                                   bare replay"]
        for name, what, seconds in self.calls:
            lines.append(f"  {name:<22} {what:<22} {seconds * 1000:9.1f} ms")
        lines.append(f"  {'sum of bare forward + backward':<45} {self.bare * 1000:9.1f} ms")
        for role, seconds in self.optimizer.items():
            lines.append(f"  optimizer step {role:<30} {seconds * 1000:9.1f} ms")
        lines.append(f"training iteration (median of {self.rounds})               {self.iteration * 1000:9.1f} ms")
        lines.append(f"overhead: iteration / bare forward+backward = {self.ratio:.3f} (target <= 1.15)")
        lines.append(f"          iteration / (bare + optimizer steps) = {self.ratio_with_optimizer:.3f}")
        return "\n".join(lines)


def bench_networks(method) -> dict[str, nn.Module]:
    """The networks a distillation iteration runs: denoisers, GAN heads, text encoders, the VAE's encoder."""
    from .fake_score import DiscriminatorHead
    from .memory import denoising_networks

    from .student import denoiser_name

    found: dict[str, nn.Module] = {}
    roles = method.roles()
    names: dict[int, str] = {}
    for role in sorted(roles, key=lambda r: roles[r].optimizer is None):  # trained roles first
        for m in [roles[role].module, *roles[role].module.modules()]:
            names.setdefault(id(m), role)
    teacher = getattr(method.teacher, denoiser_name(method.teacher))
    if names.get(id(teacher), "teacher") != "teacher":  # a LoRA trained on the teacher's own weights
        names[id(teacher)] += " (teacher's)"
    names.setdefault(id(teacher), "teacher")
    for network in denoising_networks(method):
        found[names.get(id(network), type(network).__name__)] = network
    for role, spec in method.roles().items():
        for m in spec.module.modules():
            if isinstance(m, DiscriminatorHead):
                found[role] = m
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if isinstance(getattr(method.teacher, attr, None), nn.Module):
            found[attr] = getattr(method.teacher, attr)
    if isinstance(getattr(method.teacher, "vae", None), nn.Module):
        found["vae.encoder"] = method.teacher.vae.encoder
    return found


class Recorder:
    """Forward hooks that record each call of the networks (inputs detached and cloned). A call of
    the fake score's network during its encoder-only pass (``fake_score``'s ``encoding``) stops at
    the bottleneck: no forward hook fires for it, and its replay stops there too."""

    def __init__(self, networks: dict[str, nn.Module], fake_score=None):
        self.calls: list[Call] = []
        self.handles = []
        self.fake_score = fake_score
        for name, network in networks.items():
            lora = lora_layers(network)
            self.handles.append(network.register_forward_pre_hook(self._pre(name, lora), with_kwargs=True))
            self.handles.append(network.register_forward_hook(self._post(), with_kwargs=True))
        self._open: list[Call] = []

    def _pre(self, name, lora):
        def hook(module, args, kwargs):
            keep = lambda t: t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t  # noqa: E731
            call = Call(module, name, tree_map(keep, args), tree_map(keep, kwargs), torch.is_grad_enabled(),
                        any(layer.disable_adapters for layer in lora))
            self.calls.append(call)
            fake = self.fake_score
            if fake is not None and fake.encoding and module is fake.network:
                call.to_bottleneck = fake  # its forward ends in an exception: no post-hook
                call.backward = call.grad and any(p.requires_grad for p in module.parameters())
            else:
                self._open.append(call)

        return hook

    def _post(self):
        def hook(module, args, kwargs, output):
            call = self._open.pop()
            call.backward = any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(output))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def replay(call: Call) -> float:
    """Seconds of one bare call: forward (and backward from its output when it had one)."""
    from .common import lora_disabled

    fresh = lambda t: t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t  # noqa: E731
    args, kwargs = tree_map(fresh, call.args), tree_map(fresh, call.kwargs)
    context = lora_disabled(call.network) if call.lora_off else contextlib.nullcontext()
    start = time.perf_counter()
    with context, torch.set_grad_enabled(call.grad):
        if call.to_bottleneck is not None:
            out = call.to_bottleneck.run_to_bottleneck(lambda: call.network(*args, **kwargs))
        else:
            out = call.network(*args, **kwargs)
        if call.backward:
            leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            # A call fed by another network's output (the fake score under the generator's GAN
            # loss, the GAN head under the critic's) is backpropagated through to its input only,
            # as the iteration's role-restricted backward does; otherwise into its parameters.
            through = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
            targets = through or [p for p in call.network.parameters() if p.requires_grad]
            torch.autograd.backward([t.float().sum() for t in leaves], inputs=targets)
    seconds = time.perf_counter() - start
    for p in call.network.parameters():
        p.grad = None
    return seconds


def _describe(call: Call) -> str:
    first = next((t for t in tree_leaves((call.args, call.kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
    shape = "x".join(str(n) for n in first.shape) if first is not None else "-"
    mode = "fwd+bwd" if call.backward else ("fwd" if call.grad else "fwd no_grad")
    return f"{mode} {shape}" + (" (LoRA off)" if call.lora_off else "") + (" (to the bottleneck)" if call.to_bottleneck is not None else "")


def measure_overhead(trainer, method, rounds: int = 3, warmup: int = 1) -> OverheadReport:
    """Alternate ``rounds`` timed iterations with bare replays of the recorded calls; medians."""
    step = 0
    for _ in range(warmup):
        trainer.train_step(step)
        step += 1
    from .fake_score import FakeScore

    fake = getattr(method, "fake_score", None)
    recorder = Recorder(bench_networks(method), fake_score=fake if isinstance(fake, FakeScore) else None)
    try:
        trainer.train_step(step)  # the iteration whose calls are replayed (hooks on: not timed)
        step += 1
    finally:
        recorder.remove()
    calls = recorder.calls
    iterations, replays = [], [[] for _ in calls]
    for _ in range(rounds):
        start = time.perf_counter()
        trainer.train_step(step)
        iterations.append(time.perf_counter() - start)
        step += 1
        for i, call in enumerate(calls):
            replays[i].append(replay(call))
    optimizer = {}
    for role, opt in trainer.optimizers.items():
        params = [p for group in opt.param_groups for p in group["params"]]
        times = []
        for _ in range(rounds):
            for p in params:
                p.grad = torch.zeros_like(p)
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
            opt.zero_grad(set_to_none=True)
        optimizer[role] = statistics.median(times)
    return OverheadReport(
        iteration=statistics.median(iterations),
        calls=[("teacher" if call.lora_off else call.name, _describe(call), statistics.median(times))  # LoRA off: the real score
               for call, times in zip(calls, replays)],
        optimizer=optimizer, rounds=rounds, iterations=iterations,
    )


def bench_overhead(recipe_path, set_items: Sequence[str] | None = None, rounds: int = 3, warmup: int = 1) -> OverheadReport:
    """Build the recipe's run as ``stepdistill distill`` does (no evaluation, a temporary run
    directory) and measure its trainer overhead; a staged method (progressive, reflow) is
    measured on its first stage."""
    from pathlib import Path

    from ..training.trainer import Trainer, run_state
    from .base import StagedDistillation
    from .memory import apply_memory_levers
    from .registry import load_distill_recipe
    from .run import build_method, load_recipe_teacher, open_run_data

    recipe = load_distill_recipe(recipe_path, set_items=set_items)
    teacher = load_recipe_teacher(recipe)
    method = build_method(teacher, recipe, open_run_data(teacher, recipe))
    with tempfile.TemporaryDirectory() as run_dir:
        if isinstance(method, StagedDistillation):
            method.run_dir = Path(run_dir)
            method = method.build_stage(0, None)
        apply_memory_levers(method, run_state().device)
        trainer = Trainer(method, method.recipe.training, run_dir, log_with=None, progress=False)
        return measure_overhead(trainer, method, rounds=rounds, warmup=warmup)


__all__ = ["OverheadReport", "bench_overhead", "measure_overhead"]
