"""The recipe's ``memory:`` section, applied to the networks a distiller built, once, before the
Trainer places them (``stepdistill distill`` calls :func:`apply_memory_levers`).

- ``gradient_checkpointing``: every trained diffusers network (full student, fake score copy,
  or the network under a LoRA) recomputes its blocks' activations during backward, through
  diffusers' ``enable_gradient_checkpointing`` (non-reentrant ``torch.utils.checkpoint``: the
  GAN head's forward hook still sees graph-connected features). Under ``no_grad`` (the frozen
  teacher's passes on the same weights) nothing changes.
- ``teacher_dtype``: every *frozen* weight of the denoising networks -- the teacher's, and the
  frozen base under a LoRA student or LoRA fake score -- is stored in bf16 / fp16; trained
  weights (full students and fake scores, LoRA adapters) stay fp32 masters that autocast runs
  in ``training.mixed_precision``. Without mixed precision (``no``) the lever is ignored with a
  warning (frozen half-precision weights only run under autocast). Buffers keep their dtype.
- ``release_encoders``: text encoders and VAE do their work once -- every prompt the run will
  read (the condition pool, the real data's captions, the empty prompt) is encoded into the
  teacher's text-embedding cache -- and stay in host memory; the accelerator holds only the
  denoiser, plus the VAE when real images are VAE-encoded every step
  (:meth:`~stepdistill.distillers.base.Distiller.teacher_on_device`). Evaluation decodes its
  samples on the host.
- ``attention``: the attention backend of every network the run holds (:mod:`stepdistill.attention`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..errors import RecipeError
from .student import denoiser_name

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _networks_in(module: nn.Module) -> list[nn.Module]:
    """The outermost diffusers networks (``ModelMixin``) inside ``module`` (itself, if it is one)."""
    from diffusers import ModelMixin

    if isinstance(module, ModelMixin):
        return [module]
    found: list[nn.Module] = []
    for child in module.children():
        found += _networks_in(child)
    return found


def _unique(modules) -> list[nn.Module]:
    seen, out = set(), []
    for m in modules:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def trained_networks(method) -> list[nn.Module]:
    """The diffusers networks of the roles that have an optimizer (GAN heads are not diffusers networks)."""
    return _unique(n for role in method.roles().values() if role.optimizer is not None for n in _networks_in(role.module))


def denoising_networks(method) -> list[nn.Module]:
    """The teacher's denoiser and every trained diffusers network: what the levers act on."""
    return _unique([getattr(method.teacher, denoiser_name(method.teacher)), *trained_networks(method)])


def cast_frozen(network: nn.Module, dtype: torch.dtype) -> int:
    """Store every parameter that does not require grad in ``dtype``; returns how many were cast."""
    count = 0
    for p in network.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            count += p.numel()
    return count


def fill_text_cache(teacher, prompts, batch_size: int = 64) -> int:
    """Encode ``prompts`` once into the teacher's text-embedding cache (made if it has none);
    returns the bytes the cache holds."""
    from ..teachers.text import TextEmbeddingCache

    if getattr(teacher, "text_cache", None) is None:
        teacher.text_cache = TextEmbeddingCache(namespace=teacher.family)
    unique = list(dict.fromkeys(["", *prompts]))
    for start in range(0, len(unique), batch_size):
        teacher.encode(unique[start : start + batch_size])
    return sum(v.numel() * v.element_size() for row in teacher.text_cache._memory.values() for v in row.values())


def apply_memory_levers(method, device) -> dict[str, Any]:
    """Apply ``method.recipe.memory`` to the method's networks for a run on ``device``; returns
    what was done (the run prints it and records it in run.json)."""
    from ..attention import configure_attention

    memory = method.recipe.memory
    done: dict[str, Any] = {}
    if memory.gradient_checkpointing:
        names = []
        for network in trained_networks(method):
            if not getattr(network, "_supports_gradient_checkpointing", False):
                raise RecipeError(f"memory.gradient_checkpointing: {type(network).__name__} does not support gradient checkpointing")
            network.enable_gradient_checkpointing()
            names.append(type(network).__name__)
        done["gradient_checkpointing"] = names
    if memory.teacher_dtype is not None and method.recipe.training.mixed_precision == "no":
        # frozen bf16 / fp16 weights only run under autocast; a full-precision run (e.g. a CPU
        # check of a GPU recipe with --set training.mixed_precision=no) keeps them as loaded
        warnings.warn(f"memory.teacher_dtype: {memory.teacher_dtype} is ignored: frozen weights in {memory.teacher_dtype} "
                      "need training.mixed_precision bf16 or fp16", UserWarning, stacklevel=2)
        done["teacher_dtype"] = {"ignored (training.mixed_precision: no)": 0}
    elif memory.teacher_dtype is not None:
        dtype = DTYPES[memory.teacher_dtype]
        done["teacher_dtype"] = {memory.teacher_dtype: sum(cast_frozen(n, dtype) for n in denoising_networks(method))}
    if memory.release_encoders and method.condition_kind == "text" and method.teacher.is_latent:
        captions = method.real.captions if (method.real is not None and method.real.captions) else []
        done["release_encoders"] = {"cached_prompts": len(set(captions)) + 1, "cache_bytes": fill_text_cache(method.teacher, captions)}
    backends = {configure_attention(n, memory.attention, device) for n in denoising_networks(method)}
    done["attention"] = "+".join(sorted(backends))
    return done


def describe_levers(done: dict[str, Any]) -> str:
    """One line for the run's log."""
    parts = [f"attention: {done['attention']}"]
    if "gradient_checkpointing" in done:
        parts.append(f"gradient checkpointing: {', '.join(done['gradient_checkpointing']) or 'no trained network'}")
    if "teacher_dtype" in done:
        (name, count), = done["teacher_dtype"].items()
        parts.append(f"frozen weights in {name}: {count:,} parameters" if count else f"teacher_dtype {name}")
    if "release_encoders" in done:
        r = done["release_encoders"]
        parts.append(f"encoders in host memory ({r['cached_prompts']} prompts cached, {r['cache_bytes'] / 2**20:.1f} MiB)")
    return "; ".join(parts)


__all__ = ["apply_memory_levers", "cast_frozen", "denoising_networks", "describe_levers", "fill_text_cache", "trained_networks"]
