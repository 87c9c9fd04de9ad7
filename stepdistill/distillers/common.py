"""Pieces every distiller shares: LoRA adapters on any network, and per-sample non-finite filtering.

LoRA goes through peft's ``inject_adapter_in_model``, which works on any ``nn.Module`` (a
diffusers UNet2DModel has no ``add_adapter``), so the same three helpers serve every family:
:func:`add_lora`, :func:`lora_disabled` (run the frozen base weights, e.g. the teacher under a
LoRA fake score) and :func:`merge_lora` (fold the adapter back for export).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch

from torch import nn

from ..errors import RecipeError, StepdistillError


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """[B] bool: the samples whose values are finite in every one of ``tensors``."""
    mask = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for tensor in tensors:
        mask &= torch.isfinite(tensor.detach()).flatten(1).all(dim=1)
    return mask


class NonFiniteSamples:
    """SiD's per-sample filter of non-finite values, counted.

    A method drops the samples whose values are not finite from a loss (:meth:`filter`, counted in
    ``filtered_samples``; :meth:`cut` keeps their gradients out of the network that made them). A
    loss that is still not finite (every sample dropped) is the trainer's business: it skips the
    rest of the step, counts it and stops past ``training.max_skipped_steps``.
    """

    def __init__(self):
        self.filtered_samples = 0

    def filter(self, mask: torch.Tensor) -> torch.Tensor:
        self.filtered_samples += int((~mask).sum())
        return mask

    @staticmethod
    def cut(x: torch.Tensor, keep: torch.Tensor) -> None:
        """Zero the gradient reaching ``x`` (a network's output, [B, ...]) from the dropped samples:
        backpropagating a NaN / inf through the networks that read them would poison every sample."""
        if x.requires_grad and not bool(keep.all()):
            mask = keep.reshape(-1, *([1] * (x.ndim - 1)))
            x.register_hook(lambda grad: torch.where(mask, grad, torch.zeros_like(grad)))

    def logs(self) -> dict[str, float]:
        return {"nonfinite/filtered_samples": float(self.filtered_samples)}


# -- LoRA ---------------------------------------------------------------------------------------
def lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def add_lora(model: nn.Module, rank: int, target_modules: Sequence[str], adapter_name: str = "default", what: str = "model") -> nn.Module:
    """Freeze ``model`` and inject a trainable LoRA of ``rank`` into the modules whose names end
    with one of ``target_modules`` (in place; returns ``model``).

    A target list that matches nothing in this network (e.g. attention projections on an
    attention-free UNet) is a :class:`RecipeError` naming the layers it could have used.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise RecipeError(f"{what}: lora_rank must be >= 1 for a LoRA; got {rank}")
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    matched = [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not matched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise RecipeError(
            f"{what}: LoRA target_modules {list(target_modules)} match no Linear/Conv2d layer of this "
            f"{type(model).__name__}; its layer names include {', '.join(leaves[:12])}"
        )
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights=True)
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    for layer in lora_layers(model):  # inject_adapter_in_model leaves the adapters trainable
        for p in layer.lora_A.parameters():
            p.requires_grad_(True)
        for p in layer.lora_B.parameters():
            p.requires_grad_(True)
    return model


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def lora_config(model: nn.Module, adapter_name: str = "default") -> dict:
    """The peft ``LoraConfig`` fields that rebuild ``model``'s adapter on a fresh copy of the base:
    rank, alpha and the exact module names (so a loader injects into the same layers)."""
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        raise StepdistillError("this network has no LoRA adapter")
    any_layer = next(iter(layers.values()))
    return {"r": int(any_layer.r[adapter_name]), "lora_alpha": float(any_layer.lora_alpha[adapter_name]),
            "target_modules": sorted(layers)}


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with its LoRA adapters switched off: the frozen base weights."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merge_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """A copy of ``model`` with every LoRA folded into its base layer and the peft wrappers gone:
    the stock network class again, loadable by ``from_pretrained``. ``merge=False``: the adapters
    are dropped instead -- the untouched base network."""
    from peft.tuners.lora import LoraLayer

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if merge:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


__all__ = ["NonFiniteSamples", "add_lora", "finite_rows", "has_lora", "lora_config", "lora_disabled", "merge_lora"]
