"""Bytes per role and the peak of a training step, from :class:`~stepdistill.planning.roles.RoleSpec`.

The memory model, as the toolkit's Trainer runs a step (``ctx.step_role``: one role's backward,
clip, optimizer step, ``zero_grad(set_to_none=True)``, EMA update, then the next role):

- **resident** all the time, per role: weights (``param_dtype``; trained parameters in
  ``trainable_dtype``), optimizer states, the EMA copy;
- **transient** while role R is trained (R's "phase"), the larger of
  - its backward: the activations autograd saved (R's, plus those of roles R's loss
    backpropagates through), replayed over the backward with R's gradients appearing as they
    are computed, plus the autocast copy of R's trained weights under mixed precision;
  - its optimizer step: R's gradients plus the step's scratch (``torch.optim.AdamW`` with
    ``foreach``, the CUDA default, holds one more ``trainable_dtype`` tensor per parameter).

peak = sum of resident + the largest phase. Frozen roles run under no_grad and keep no
activations. Offloaded roles move their weights (frozen) or master weights, optimizer states
and EMA (trained) to host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..errors import StepdistillError
from .activations import ActivationProfile, example_inputs, measure_activations
from .roles import OPTIMIZER_SCRATCH, OPTIMIZER_STATES, ParameterCount, RoleSpec, build_on_meta, count_parameters


@dataclass(frozen=True)
class Workload:
    """One training forward's inputs: ``batch_size`` samples of ``height`` x ``width`` in the
    network's space (latents: pixels / vae_scale_factor), prompts of ``text_tokens`` tokens
    (None: the family's length)."""

    batch_size: int
    height: int
    width: int
    text_tokens: int | None = None


@dataclass(frozen=True)
class RoleEstimate:
    """Bytes one role costs (GPU unless ``host``)."""

    spec: RoleSpec
    parameters: ParameterCount
    weights: int
    cast_copy: int
    grads: int
    optimizer_states: int
    optimizer_scratch: int
    ema: int
    host: int
    activations: ActivationProfile | None = None
    through_activations: ActivationProfile | None = field(default=None)  # when another role's loss passes through

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def resident(self) -> int:
        return self.weights + self.optimizer_states + self.ema

    @property
    def backward_peak(self) -> int:
        """Activations + gradients at their largest during this role's backward (0 if frozen)."""
        return 0 if self.activations is None else self.activations.backward_peak + self.cast_copy

    @property
    def step_peak(self) -> int:
        return self.grads + self.optimizer_scratch


def _leaf_weight_bytes(module: nn.Module) -> int:
    """The largest set of weights one leaf module holds: what layer-by-layer offload keeps on GPU."""
    sizes = [sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in module.modules()]
    return max(sizes, default=0)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _network_key(spec: RoleSpec) -> tuple:
    """What decides the meta module: the network, how it is trained, its dtype (not the role's name)."""
    network = id(spec.module_factory) if spec.module_factory is not None else (repr(spec.model_class), repr(sorted(dict(spec.config).items())))
    return (network, spec.trainable, spec.lora_rank, spec.lora_targets, spec.param_dtype)


def estimate_role(spec: RoleSpec, workload: Workload, cache: dict | None = None) -> RoleEstimate:
    """Parameters and bytes of one role; activations measured on meta tensors of ``workload``.
    ``cache`` (a dict) keeps meta modules and activation profiles for specs that share them."""
    cache = {} if cache is None else cache
    key = ("module",) + _network_key(spec)
    if key not in cache:
        cache[key] = build_on_meta(spec)
    module = cache[key]
    count = count_parameters(module)
    trained = [p for p in module.parameters() if p.requires_grad]
    base = [p for p in module.parameters() if not p.requires_grad]
    t_size = torch.empty((), dtype=spec.trainable_dtype).element_size()
    p_size = torch.empty((), dtype=spec.param_dtype).element_size()
    n_trained = sum(p.numel() for p in trained)

    if spec.frozen_dtype is not None:  # stored in another dtype than the network computes in
        f_size = torch.empty((), dtype=spec.frozen_dtype).element_size()
        base_weights = sum(p.numel() for p in base) * f_size
    else:
        base_weights = _nbytes(base)
    base_bytes = 0 if spec.shares_weights_with else base_weights + _nbytes(module.buffers())
    master = n_trained * t_size
    grads = master if spec.is_trained else 0
    states = OPTIMIZER_STATES[spec.optimizer] * master if spec.is_trained else 0
    scratch = OPTIMIZER_SCRATCH[spec.optimizer] * master if spec.is_trained else 0
    cast_copy = n_trained * p_size if spec.is_trained and spec.param_dtype != spec.trainable_dtype else 0
    ema = (_nbytes(module.buffers()) + master) if spec.ema else 0  # frozen parameters are shared, not copied

    host = 0
    weights = base_bytes + master
    if spec.on_host:
        host, weights = weights, 0
    elif spec.offload and not spec.is_trained:
        host, weights = weights, _leaf_weight_bytes(module)
    elif spec.offload:
        # ZeRO-offload: master weights, states, EMA and the step on the host; GPU computes in param_dtype.
        host = master + states + ema + scratch
        weights = base_bytes + n_trained * p_size
        states, ema, scratch, cast_copy = 0, 0, 0, 0

    def measured(through: bool) -> ActivationProfile:
        key = ("activations",) + _network_key(spec) + (spec.trainable_dtype, spec.gradient_checkpointing, workload, through,
                                                        id(spec.example_inputs), spec.batch_factor)
        if key not in cache:
            inputs = _inputs(spec, module, workload, 1 if through else spec.batch_factor)  # batch_factor: its own training forward
            cache[key] = measure_activations(module, inputs, spec.gradient_checkpointing, differentiate_inputs=through, grad_itemsize=t_size)
        return cache[key]

    activations = measured(False) if spec.is_trained else None
    through = measured(True) if spec.backprop_from else None
    return RoleEstimate(
        spec=spec, parameters=count, weights=weights, cast_copy=cast_copy, grads=grads, optimizer_states=states,
        optimizer_scratch=scratch, ema=ema, host=host, activations=activations, through_activations=through,
    )


def _inputs(spec: RoleSpec, module: nn.Module, workload: Workload, batch_factor: int = 1) -> dict:
    b, h, w = workload.batch_size * batch_factor, workload.height, workload.width
    if spec.example_inputs is not None:
        return spec.example_inputs(module, b, h, w, spec.param_dtype)
    try:
        return example_inputs(module, b, h, w, spec.param_dtype, text_tokens=workload.text_tokens)
    except ValueError as exc:
        raise StepdistillError(f"role {spec.name!r}: {exc}") from None


@dataclass(frozen=True)
class Phase:
    """The part of a step that trains one role: its backward or its optimizer step, whichever is larger."""

    role: str
    backward: int
    optimizer_step: int

    @property
    def peak(self) -> int:
        return max(self.backward, self.optimizer_step)


@dataclass(frozen=True)
class MemoryEstimate:
    """Every role's bytes, the phases of a step, and the peak."""

    roles: tuple[RoleEstimate, ...]
    phases: tuple[Phase, ...]
    workload: Workload

    @property
    def resident(self) -> int:
        return sum(r.resident for r in self.roles)

    @property
    def peak(self) -> int:
        return self.resident + max((p.peak for p in self.phases), default=0)

    @property
    def host(self) -> int:
        return sum(r.host for r in self.roles)

    def role(self, name: str) -> RoleEstimate:
        return next(r for r in self.roles if r.name == name)


def check_roles(specs: Sequence[RoleSpec]) -> None:
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise StepdistillError(f"role names must be unique; got {names}")
    for spec in specs:
        if spec.shares_weights_with is not None and spec.shares_weights_with not in names:
            raise StepdistillError(f"role {spec.name!r} shares weights with unknown role {spec.shares_weights_with!r}")
        for other in spec.backprop_from:
            if other not in names or not next(s for s in specs if s.name == other).is_trained:
                raise StepdistillError(f"role {spec.name!r}: backprop_from names {other!r}, which is not a trained role")


def estimate_memory(specs: Sequence[RoleSpec], workload: Workload, cache: dict | None = None) -> MemoryEstimate:
    """Estimate a recipe's roles at ``workload``. ``cache`` (a dict) reuses role estimates across
    calls with equal specs and workloads (what-if levers re-estimate only what changed)."""
    check_roles(specs)
    cache = {} if cache is None else cache
    roles = []
    for spec in specs:
        key = ("role", repr(spec), workload)  # configs are dicts: specs compare but do not hash
        if key not in cache:
            cache[key] = estimate_role(spec, workload, cache)
        roles.append(cache[key])
    phases = []
    for role in roles:
        if not role.spec.is_trained:
            continue
        through = sum(r.through_activations.peak for r in roles if role.name in r.spec.backprop_from)
        phases.append(Phase(role.name, backward=role.backward_peak + through, optimizer_step=role.step_peak))
    return MemoryEstimate(roles=tuple(roles), phases=tuple(phases), workload=workload)


__all__ = ["MemoryEstimate", "Phase", "RoleEstimate", "Workload", "check_roles", "estimate_memory", "estimate_role"]
