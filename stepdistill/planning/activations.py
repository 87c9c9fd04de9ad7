"""Activation memory of one forward pass, measured on the meta device.

What a training step holds for backward is exactly what autograd saves: every tensor an op
keeps for its gradient formula passes through ``torch.autograd.graph.saved_tensors_hooks``.
:func:`measure_activations` runs the network once on meta tensors (no memory, no compute) and
sums the bytes of those saved tensors, counting each storage once and leaving out the weights
(parameters and buffers are counted elsewhere).

Two things a meta forward would get wrong, corrected here:

- **Attention.** On meta, ``scaled_dot_product_attention`` takes the math path and saves the
  full ``L x L`` attention matrix; the fused kernels a real step runs (flash / memory-efficient
  on GPUs, the flash kernel on CPUs) save only q, k, v, the output and a log-sum-exp per row.
  During the measurement SDPA without mask and dropout is routed to the flash kernel's op,
  which saves exactly those (:class:`FusedAttention`).
- **Gradient checkpointing.** Diffusers checkpoints through ``_gradient_checkpointing_func``;
  here that function records what a non-reentrant checkpoint keeps (the region's tensor
  inputs) and measures the region's own saved tensors separately: they exist again only while
  that region is recomputed during backward.

The backward pass is not run: its peak is replayed from the forward's op order
(:func:`_replay_backward`), with parameter gradients appearing as backward reaches them.

Example inputs for the diffusers networks the toolkit distils are built from their configs
(:func:`example_inputs`); other networks pass their own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SAMPLE_INPUTS = ("sample", "hidden_states")  # the noisy-sample argument of diffusers networks
InputsFn = Callable[[nn.Module, int, int, int, torch.dtype], dict[str, Any]]


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd keeps from one forward pass, and the peak its backward reaches.

    ``saved``: held from the end of the forward until backward frees them (checkpoint inputs
    included). ``recompute``: the largest checkpointed region's saved tensors, re-created while
    that region's backward runs. ``backward_peak``: the largest (saved tensors still alive +
    region being recomputed + parameter gradients already allocated) over the backward pass,
    replayed from the forward's op order: backward frees a saved tensor once it has passed the
    first op that saved it, and allocates a parameter's gradient when it reaches the parameter's
    last use. ``grads``: all parameter gradients (trainable parameters only).
    """

    saved: int
    recompute: int = 0
    backward_peak: int = 0
    grads: int = 0

    @property
    def peak(self) -> int:
        """Activation bytes alone at their largest (forward end, or a region's recomputation)."""
        return self.saved + self.recompute


class _SavedTensors:
    """Sums the storages of saved tensors, each once, except those in ``excluded``; notes the
    op index (from ``clock``) at which each was first saved."""

    def __init__(self, excluded: set[int], clock: "_OpClock | None" = None):
        self.excluded = excluded
        self.clock = clock
        self.storages: dict[int, int] = {}
        self.first_saved: dict[int, int] = {}
        self._alive: list[torch.Tensor] = []  # keeps the storages (and so their ids) unique

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.excluded and key not in self.storages:
            self.storages[key] = storage.nbytes()
            self.first_saved[key] = self.clock.index if self.clock is not None else 0
            self._alive.append(tensor)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class _OpClock(TorchDispatchMode):
    """Counts aten ops and notes the last op that read each trainable parameter."""

    def __init__(self, trainable: set[int]):
        super().__init__()
        self.index = 0
        self.trainable = trainable
        self.last_use: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.index += 1
        for value in tree_leaves((args, kwargs)):
            if isinstance(value, torch.Tensor):
                key = value.untyped_storage()._cdata
                if key in self.trainable:
                    self.last_use[key] = self.index
        return func(*args, **(kwargs or {}))


class FusedAttention(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` (no mask, no dropout) to the flash kernel's op,
    which saves q, k, v, output and log-sum-exp as the fused GPU and CPU kernels do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            bound = {**dict(zip(names, args)), **kwargs}
            if bound.get("attn_mask") is None and not bound.get("dropout_p") and not bound.get("enable_gqa"):
                out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    bound["query"], bound["key"], bound["value"], is_causal=bool(bound.get("is_causal", False)), scale=bound.get("scale")
                )
                return out
        return func(*args, **kwargs)


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def measure_activations(
    module: nn.Module,
    inputs: dict[str, Any],
    gradient_checkpointing: bool = False,
    differentiate_inputs: bool = False,
    grad_itemsize: int | None = None,
) -> ActivationProfile:
    """Saved-tensor bytes of ``module(**inputs)`` with grad enabled (meta or real tensors).

    ``module``'s ``requires_grad`` flags decide what autograd saves (a frozen network under
    ``no_grad`` saves nothing: do not call this for it). ``differentiate_inputs`` makes the
    noisy-sample input (``sample`` / ``hidden_states``) require grad, for a network a loss
    backpropagates *through* (a frozen critic under a generator's GAN loss). ``grad_itemsize``: bytes per gradient element
    (the fp32 master weights' 4 under mixed precision; default: each parameter's own).
    """
    weights = list(module.parameters()) + list(module.buffers())
    excluded = {_storage_key(t) for t in weights}
    grad_bytes = {
        _storage_key(p): p.numel() * (grad_itemsize or p.element_size()) for p in module.parameters() if p.requires_grad
    }
    clock = _OpClock(set(grad_bytes))
    outer = _SavedTensors(excluded, clock)
    regions: list[tuple[int, int, int]] = []  # (first op, last op, saved bytes) per checkpointed region

    def checkpoint(block, *args, **kwargs):
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, torch.Tensor):
                outer.add(value)  # what a non-reentrant checkpoint keeps to recompute the region
        inner = _SavedTensors(excluded)
        first = clock.index + 1
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, lambda t: t):
            out = block(*args, **kwargs)
        regions.append((first, clock.index, inner.total))
        return out

    if differentiate_inputs:
        inputs = {k: v.detach().requires_grad_(True) if k in SAMPLE_INPUTS and isinstance(v, torch.Tensor) else v
                  for k, v in inputs.items()}
    if gradient_checkpointing:
        if not getattr(module, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(module).__name__} does not support diffusers gradient checkpointing")
        module.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(outer.pack, lambda t: t))
            stack.enter_context(FusedAttention())
            stack.enter_context(clock)
            out = module(**inputs)
        del out
    finally:
        if gradient_checkpointing:
            module.disable_gradient_checkpointing()
    return ActivationProfile(
        saved=outer.total,
        recompute=max((r[2] for r in regions), default=0),
        backward_peak=_replay_backward(outer, clock, grad_bytes, regions),
        grads=sum(grad_bytes.values()),
    )


def _replay_backward(saved: _SavedTensors, clock: _OpClock, grad_bytes: dict[int, int], regions) -> int:
    """Peak of (live saved tensors + recomputed region + allocated gradients) walking the ops
    backwards. Saved tensors are freed after the first op that saved them; a gradient appears
    at its parameter's last use (parameters never read keep no gradient)."""
    n = clock.index + 1
    freed_at = [0] * (n + 1)  # bytes released once backward has passed op i
    for key, index in saved.first_saved.items():
        freed_at[index] += saved.storages[key]
    allocated_at = [0] * (n + 1)
    for key, index in clock.last_use.items():
        allocated_at[index] += grad_bytes[key]
    recompute_at = [0] * (n + 1)
    for first, last, size in regions:
        for i in range(first, last + 1):
            recompute_at[i] = max(recompute_at[i], size)
    live, grads, peak = saved.total, 0, saved.total
    for i in range(n, -1, -1):
        grads += allocated_at[i]
        peak = max(peak, live + grads + recompute_at[i])
        live -= freed_at[i]
    return peak


# -- example inputs ---------------------------------------------------------------------------

KNOWN_NETWORKS = ("UNet2DConditionModel", "UNet2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "DiTTransformer2DModel")
DEFAULT_TEXT_TOKENS = {
    "UNet2DConditionModel": 77,  # CLIP
    "SD3Transformer2DModel": 77 + 256,  # CLIP tokens, then T5 (max_sequence_length 256)
    "FluxTransformer2DModel": 512,  # T5 (FLUX.1-dev max_sequence_length)
}


def example_inputs(
    module: nn.Module, batch_size: int, height: int, width: int, dtype: torch.dtype = torch.float32,
    text_tokens: int | None = None, device="meta",
) -> dict[str, Any]:
    """Keyword inputs of one training forward for the diffusers networks the toolkit distils,
    from the network's config. ``height`` x ``width`` are the *latent* (or pixel, for pixel
    networks) sizes; ``text_tokens`` defaults to the family's prompt length."""
    name = type(module).__name__
    if name not in KNOWN_NETWORKS:
        raise ValueError(f"no example inputs for {name}: give the role an example_inputs function")
    cfg = module.config
    b, h, w = int(batch_size), int(height), int(width)
    tokens = text_tokens or DEFAULT_TEXT_TOKENS.get(name, 77)
    new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)  # noqa: E731
    timestep = torch.zeros(b, device=device, dtype=torch.long)
    if name == "UNet2DConditionModel":
        context = cfg.encoder_hid_dim or cfg.cross_attention_dim
        context = context[0] if isinstance(context, (list, tuple)) else context
        inputs = {"sample": new(b, cfg.in_channels, h, w), "timestep": timestep, "encoder_hidden_states": new(b, tokens, context)}
        if cfg.addition_embed_type == "text_time":
            time_ids = 6
            text_embeds = cfg.projection_class_embeddings_input_dim - time_ids * cfg.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": new(b, text_embeds), "time_ids": new(b, time_ids)}
        if cfg.time_cond_proj_dim is not None:
            inputs["timestep_cond"] = new(b, cfg.time_cond_proj_dim)
        return inputs
    if name == "UNet2DModel":
        inputs = {"sample": new(b, cfg.in_channels, h, w), "timestep": timestep}
        if cfg.num_class_embeds is not None:
            inputs["class_labels"] = torch.zeros(b, device=device, dtype=torch.long)
        return inputs
    if name == "SD3Transformer2DModel":
        return {
            "hidden_states": new(b, cfg.in_channels, h, w),
            "timestep": new(b),
            "encoder_hidden_states": new(b, tokens, cfg.joint_attention_dim),
            "pooled_projections": new(b, cfg.pooled_projection_dim),
        }
    if name == "FluxTransformer2DModel":
        image_tokens = (h // 2) * (w // 2)  # 2x2 packed latents
        inputs = {
            "hidden_states": new(b, image_tokens, cfg.in_channels),
            "encoder_hidden_states": new(b, tokens, cfg.joint_attention_dim),
            "pooled_projections": new(b, cfg.pooled_projection_dim),
            "timestep": new(b),
            "img_ids": new(image_tokens, 3),
            "txt_ids": new(tokens, 3),
        }
        if cfg.guidance_embeds:
            inputs["guidance"] = new(b)
        return inputs
    # DiTTransformer2DModel
    return {"hidden_states": new(b, cfg.in_channels, h, w), "timestep": timestep,
            "class_labels": torch.zeros(b, device=device, dtype=torch.long)}


__all__ = ["ActivationProfile", "DEFAULT_TEXT_TOKENS", "FusedAttention", "example_inputs", "measure_activations"]
