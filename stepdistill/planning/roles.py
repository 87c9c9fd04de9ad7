"""What a distillation recipe puts in memory, one role at a time: :class:`RoleSpec`, and the
role's network built on the meta device from its config alone (no weights are read or made).

A role is one network the run holds: the frozen teacher, the trained student, a fake score
(a full copy, or LoRA on the teacher's own weights), text encoders, an EMA target.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import StepdistillError
from .activations import InputsFn

TRAINABLE = ("full", "lora", "frozen")
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "adamw_fused": 2, "sgd": 0}  # state tensors per trainable parameter
OPTIMIZER_SCRATCH = {"adamw": 1, "adam": 1, "adamw_fused": 0, "sgd": 0}  # temporaries per parameter in a step (foreach)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers attention projections


@dataclass(frozen=True)
class RoleSpec:
    """One network of a recipe, and how the run treats it.

    The network comes from ``module_factory()`` (called under the meta device), or from
    ``model_class`` + ``config`` (a diffusers ``config.json`` as a dict: ``from_config``; a
    transformers class: its ``config_class(**config)``); ``model_class`` may be a class, a
    diffusers / transformers class name, ``"module.Class"``, or None when ``config`` names its
    ``_class_name``.

    - ``trainable``: "full" (every parameter trained), "lora" (LoRA adapters of ``lora_rank`` on
      the modules named ``lora_targets``; the base frozen), "frozen" (run under no_grad).
    - ``param_dtype``: the dtype the network computes in and frozen weights are stored in.
      ``trainable_dtype``: trained parameters' master weights, their gradients and optimizer
      states (fp32 under mixed precision; then an autocast copy in ``param_dtype`` exists during
      forward and backward). ``frozen_dtype``: frozen weights stored in another dtype than the
      network computes in (an fp32 base under a LoRA that autocast runs in bf16); None: ``param_dtype``.
    - ``optimizer``: "adamw" / "adam" (2 states per parameter; the default ``foreach`` step
      holds one more parameter-sized temporary), "adamw_fused" (``fused=True``: no temporary),
      or "sgd" (none).
    - ``ema``: an EMA copy, as the toolkit's Trainer keeps it: a deep copy of the module that
      shares its frozen parameters (a LoRA role's EMA costs its adapters and the buffers).
    - ``shares_weights_with``: the role whose weights this one runs on (a LoRA fake score on the
      teacher's weights): its base weights cost nothing here.
    - ``offload``: frozen roles keep their weights in host memory and stream them layer by layer;
      trainable roles keep master weights, optimizer states and EMA in host memory (ZeRO-offload).
    - ``backprop_from``: trainable roles whose loss backpropagates *through* this role's forward
      (a critic under the generator's GAN loss): its activations then add to theirs.
    - ``batch_factor``: the role's training forward sees ``batch_factor`` x the batch (DMD2's
      fake score with a GAN head runs the student's samples and real samples together: 2).
    - ``on_host``: the role lives in host memory only and never on the GPU (text encoders released
      after filling the embedding cache): its weights count as host memory.
    - ``example_inputs(module, batch_size, height, width, dtype) -> kwargs``: for networks
      :func:`~stepdistill.planning.activations.example_inputs` does not know.
    """

    name: str
    model_class: type | str | None = None
    config: Mapping[str, Any] | None = None
    module_factory: Callable[[], nn.Module] | None = None
    trainable: str = "frozen"
    lora_rank: int = 64
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    param_dtype: torch.dtype = torch.float32
    trainable_dtype: torch.dtype = torch.float32
    frozen_dtype: torch.dtype | None = None
    optimizer: str = "adamw"
    ema: bool = False
    gradient_checkpointing: bool = False
    shares_weights_with: str | None = None
    offload: bool = False
    backprop_from: tuple[str, ...] = ()
    batch_factor: int = 1
    on_host: bool = False
    example_inputs: InputsFn | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise StepdistillError(f"role {self.name!r}: trainable must be one of {', '.join(TRAINABLE)}; got {self.trainable!r}")
        if self.optimizer not in OPTIMIZER_STATES:
            raise StepdistillError(f"role {self.name!r}: optimizer must be one of {', '.join(OPTIMIZER_STATES)}; got {self.optimizer!r}")
        if self.module_factory is None and self.config is None:
            raise StepdistillError(f"role {self.name!r}: give module_factory or model_class + config")
        if self.shares_weights_with is not None and self.trainable != "lora":
            raise StepdistillError(f"role {self.name!r}: shares_weights_with needs trainable='lora' (only adapters on shared weights)")
        if self.ema and self.trainable == "frozen":
            raise StepdistillError(f"role {self.name!r}: a frozen role has no EMA")
        if self.on_host and self.trainable != "frozen":
            raise StepdistillError(f"role {self.name!r}: only a frozen role can live in host memory (on_host)")
        if self.batch_factor < 1:
            raise StepdistillError(f"role {self.name!r}: batch_factor must be >= 1; got {self.batch_factor}")
        object.__setattr__(self, "backprop_from", tuple(self.backprop_from))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @property
    def is_trained(self) -> bool:
        return self.trainable != "frozen"


def resolve_class(spec: RoleSpec) -> type:
    """The network class of a spec: a class, a diffusers / transformers name, or "module.Class"."""
    name = spec.model_class or (spec.config or {}).get("_class_name")
    if isinstance(name, type):
        return name
    if not name:
        raise StepdistillError(f"role {spec.name!r}: no model_class and no _class_name in its config")
    if "." in name:
        module, _, attr = name.rpartition(".")
        candidates = [(module, attr)]
    else:
        candidates = [("diffusers", name), ("transformers", name)]
    for module, attr in candidates:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
    raise StepdistillError(f"role {spec.name!r}: cannot find model class {name!r} in diffusers or transformers")


def _instantiate(spec: RoleSpec) -> nn.Module:
    if spec.module_factory is not None:
        return spec.module_factory()
    cls = resolve_class(spec)
    config = {k: v for k, v in dict(spec.config).items() if not k.startswith("_")}
    if hasattr(cls, "from_config"):  # diffusers ModelMixin / ConfigMixin
        return cls.from_config(config)
    if hasattr(cls, "config_class"):  # transformers PreTrainedModel
        return cls(cls.config_class(**config))
    return cls(**config)


def build_on_meta(spec: RoleSpec) -> nn.Module:
    """The role's network on the meta device, cast to ``param_dtype``, with LoRA adapters
    (``trainable_dtype``) injected by peft for LoRA roles and ``requires_grad`` set as trained."""
    return build_module(spec, "meta")


def build_module(spec: RoleSpec, device: str | torch.device = "meta") -> nn.Module:
    """:func:`build_on_meta` on any device (random weights off the meta device)."""
    with torch.device(device):
        module = _instantiate(spec)
        nn.Module.to(module, spec.param_dtype)  # nn.Module's own .to: no diffusers dtype warnings
        module.requires_grad_(spec.trainable == "full")
        if spec.trainable == "lora":
            _inject_lora(module, spec)
    return module.train(spec.is_trained)


def _inject_lora(module: nn.Module, spec: RoleSpec) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_rank, target_modules=list(spec.lora_targets))
    try:
        inject_adapter_in_model(config, module)
    except ValueError as exc:
        raise StepdistillError(f"role {spec.name!r}: LoRA targets {list(spec.lora_targets)} match no module ({exc})") from None
    for name, parameter in module.named_parameters():
        if "lora_" in name:
            # In param_dtype, as autocast runs them; their trainable_dtype master copies are
            # counted by the memory model. (Without autocast, peft would cast every LoRA input
            # up to fp32 and save that copy, which a mixed-precision step does not keep.)
            parameter.data = parameter.data.to(spec.param_dtype)
            parameter.requires_grad_(True)


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a built role: the base network, LoRA adapters, and what is trained."""

    base: int
    lora: int
    trainable: int
    buffers: int

    @property
    def total(self) -> int:
        return self.base + self.lora


def count_parameters(module: nn.Module) -> ParameterCount:
    base = lora = trainable = 0
    for name, parameter in module.named_parameters():
        if "lora_" in name:
            lora += parameter.numel()
        else:
            base += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return ParameterCount(base=base, lora=lora, trainable=trainable, buffers=sum(b.numel() for b in module.buffers()))


__all__ = ["DEFAULT_LORA_TARGETS", "OPTIMIZER_SCRATCH", "OPTIMIZER_STATES", "ParameterCount", "RoleSpec", "build_module", "build_on_meta", "count_parameters", "resolve_class"]
